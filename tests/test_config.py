"""Settings: YAML + flags fill one frozen object; bad values name the field and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from embedding.config import DEFAULT_MODEL, JobConfig
from jobs.embed_corpus import build_parser


def test_defaults() -> None:
    c = JobConfig(inputs=("in/",), output="out/")
    assert c.model == DEFAULT_MODEL and c.dtype == "auto" and c.text_column == "text"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.output = "x"  # type: ignore[misc]


def test_yaml_then_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "input: s3://b/corpus/\noutput: s3://b/emb/\ntext-column: body\ndtype: float32\nkeep_columns: [source]\n"
    )
    flags = vars(build_parser().parse_args(["--config", str(cfg), "--dtype", "bfloat16"]))
    flags.pop("config")
    c = JobConfig.from_sources(cfg, flags)
    assert c.inputs == ("s3://b/corpus/",)
    assert c.text_column == "body" and c.dtype == "bfloat16" and c.keep_columns == ("source",)


def test_every_flag_is_a_yaml_key() -> None:
    fields = set(JobConfig.field_names())
    for action in build_parser()._actions:
        if action.dest in ("help", "config"):
            continue
        assert action.dest in fields, f"--{action.dest} has no YAML key"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "fp8"}, r"`dtype` must be one of auto, float32, bfloat16, float16; got 'fp8'"),
        ({"num_gpus": 0}, r"`num_gpus` is GPUs per encoder actor and must be in \(0, 8\]"),
        ({"max_length": 4}, r"`max_length` must be between 8 and 8192"),
        ({"batch_rows": 0}, r"`batch_rows` must be a whole number ≥ 1; got 0"),
        ({"min_actors": 3, "max_actors": 2}, r"`max_actors` \(2\) must be ≥ `min_actors` \(3\)"),
        ({"keep_columns": ("embedding",)}, r"`keep_columns` may not name \['embedding'\]"),
        ({"text_column": "id"}, r"`text_column` and `id_column` must differ"),
        ({"output": ""}, r"`output` must be"),
    ],
)
def test_bad_values_name_field_value_and_allowed(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JobConfig(**{"inputs": ("in/",), "output": "out/", **overrides})


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: a\noutput: b\nbatch_size: 3\n")
    with pytest.raises(ValueError, match="unknown settings: batch_size"):
        JobConfig.from_sources(cfg)


def test_missing_output_is_refused() -> None:
    with pytest.raises(ValueError, match="`output` is required"):
        JobConfig.from_sources(None, {"inputs": ["a"]})
