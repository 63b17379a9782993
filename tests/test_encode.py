"""Encoder stage parity with the independent reference, pooling configs, and model sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedding import schema as S
from embedding import storage
from embedding.encode import Encode, resolve_dtype
from embedding.model import ModelNotFoundError, materialize, resolve_model
from embedding.tokenize import Tokenize
from tests.reference import cosine, reference_embeddings
from tests.test_tokenize import CORPUS


def _batch(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            S.REJECT: pa.array([None] * n, pa.string()),
            S.MARKER: [False] * n,
            S.TEXT: texts,
        }
    )


def _encode(model_source: str, texts: list[str], dtype: str, **kwargs) -> np.ndarray:
    spec = resolve_model(model_source)
    batch = Tokenize(spec.tokenizer)(_batch(texts))
    out = Encode(spec, device="cpu", dtype=dtype, threads=2, **kwargs)(batch)
    assert S.INPUT_IDS not in out.column_names
    return np.array(out[S.EMBEDDING].to_pylist(), dtype=np.float32)


def test_float32_matches_reference_within_1e4(tiny_model: Path) -> None:
    # A small token budget forces many padded batches of mixed lengths.
    got = _encode(str(tiny_model), CORPUS, "float32", batch_tokens=1024, batch_rows=4)
    ref = reference_embeddings(tiny_model, CORPUS)
    assert np.abs(got - ref).max() < 1e-4


def test_bfloat16_cosine_at_least_0999(tiny_model: Path) -> None:
    got = _encode(str(tiny_model), CORPUS, "bfloat16")
    ref = reference_embeddings(tiny_model, CORPUS)
    assert cosine(got, ref).min() >= 0.999


def _variant(tiny_model: Path, tmp_path: Path, pooling: str, normalize: bool) -> Path:
    d = tmp_path / f"{pooling}-{normalize}"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    for mode in ("mean_tokens", "cls_token", "max_tokens"):
        cfg[f"pooling_mode_{mode}"] = mode.startswith(pooling)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    if normalize:
        modules = json.loads((d / "modules.json").read_text())
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (d / "modules.json").write_text(json.dumps(modules))
    return d


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("max", True), ("mean", True)])
def test_pooling_follows_model_config(tiny_model: Path, tmp_path: Path, pooling: str, normalize: bool) -> None:
    d = _variant(tiny_model, tmp_path, pooling, normalize)
    spec = resolve_model(str(d))
    assert (spec.pooling, spec.normalize) == (pooling, normalize)
    texts = CORPUS[:6]
    got = _encode(str(d), texts, "float32")
    assert np.abs(got - reference_embeddings(d, texts)).max() < 1e-4
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_pass_widths_count_the_padding_of_the_forward_passes(tiny_model: Path) -> None:
    from embedding.batching import padding_efficiency, token_budget_batches
    from embedding.encode import EncoderModel
    from embedding.tokenize import load_tokenizer

    spec = resolve_model(str(tiny_model))
    ids = load_tokenizer(spec.tokenizer).encode(CORPUS)
    lengths = np.array([len(a) for a in ids])
    _, failed, widths = EncoderModel(spec, "cpu", "float32").embed(ids, 256, 4)
    assert not failed and (widths >= lengths).all()
    batches = token_budget_batches(lengths, 256, 4)
    for group in batches:
        assert (widths[group] == lengths[group].max()).all()
    assert lengths.sum() / widths.sum() == pytest.approx(padding_efficiency(lengths, batches))
    assert lengths.sum() / widths.sum() < 1  # the corpus has texts of many lengths

    # The stage hands each row's width on, 0 where a row was never encoded.
    batch = _batch(["x", *CORPUS[:3]])
    batch = batch.set_column(0, S.REJECT, pa.array(["empty_text: x", None, None, None], pa.string()))
    out = Encode(spec, device="cpu", dtype="float32", threads=1)(Tokenize(spec.tokenizer)(batch))
    got = out[S.PASS_WIDTH].to_pylist()
    assert got[0] == 0 and all(w >= n > 0 for w, n in zip(got[1:], out[S.NUM_TOKENS].to_pylist()[1:], strict=True))


def test_float16_output_and_rejected_rows(tiny_model: Path) -> None:
    spec = resolve_model(str(tiny_model))
    batch = _batch(["今日は晴れ", "x", "寿司"])
    batch = batch.set_column(0, S.REJECT, pa.array([None, "empty_text: x", None], pa.string()))
    out = Encode(spec, device="cpu", dtype="float32", output_dtype="float16")(Tokenize(spec.tokenizer)(batch))
    emb = out[S.EMBEDDING]
    assert emb.type == pa.list_(pa.float16(), spec.dim)
    assert emb.null_count == 1 and emb[1].as_py() is None
    assert out[S.TEXT].to_pylist() == [None, "x", None], "only rejected rows keep their text"


def test_model_from_s3_is_copied_once_per_node(tiny_model: Path, bucket: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDDING_CACHE_DIR", str(tmp_path / "cache"))
    for f in tiny_model.rglob("*"):
        if f.is_file():
            storage.write_bytes_atomic(
                f"{bucket}/models/glucose/{f.relative_to(tiny_model).as_posix()}", f.read_bytes()
            )
    spec = resolve_model(f"{bucket}/models/glucose")
    assert spec.kind == "remote" and spec.source == f"{bucket}/models/glucose"
    local = materialize(spec)
    assert (local / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    mtime = (local / "model.safetensors").stat().st_mtime_ns
    assert materialize(spec) == local and (local / "model.safetensors").stat().st_mtime_ns == mtime
    got = _encode(f"{bucket}/models/glucose", CORPUS[:4], "float32")
    assert np.abs(got - reference_embeddings(tiny_model, CORPUS[:4])).max() < 1e-4


def test_hub_model_missing_offline_says_how_to_supply_it() -> None:
    with pytest.raises(ModelNotFoundError, match=r"pkshatech/GLuCoSE-base-ja.*--local-dir DIR.*--model DIR"):
        resolve_model("pkshatech/GLuCoSE-base-ja")


def test_model_without_safetensors_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    d = tmp_path / "no-st"
    shutil.copytree(tiny_model, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="only safetensors"):
        resolve_model(str(d))


def test_dtype_auto_follows_hardware() -> None:
    from embedding.encode import cpu_has_fast_bf16

    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    assert resolve_dtype("float16", "cpu") == "float16"


def test_driver_reads_the_same_bf16_answer_from_cpu_flags_as_torch() -> None:
    """The local driver decides the compute dtype from /proc/cpuinfo, without torch; the
    answer must be torch's own, or the job would pick bf16 where it is slow, or miss it where fast."""
    from embedding.encode import cpu_has_fast_bf16
    from embedding.pipeline import cpu_flags_fast_bf16

    flags = cpu_flags_fast_bf16()
    if flags is None:
        pytest.skip("no CPU flags in /proc/cpuinfo on this system")
    assert flags == cpu_has_fast_bf16()


def test_a_cpu_encoder_starts_without_importing_what_only_gpus_use(tiny_model: Path) -> None:
    """An encoder actor's start-up is paid by every run: on CPU it must not import the
    variable-length attention kernel (its module imports torch._dynamo, 1.4 s of CPU per actor)
    nor transformers (2 s), which only a GPU or a non-LUKE model needs. A fresh interpreter, since
    other tests import both."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys; from embedding.encode import Encode; from embedding.model import resolve_model; "
        f"e = Encode(resolve_model({str(tiny_model)!r}), device='cpu', dtype='float32'); "
        "print(e.model.attention, e.model.architecture, sorted(m for m in ('torch._dynamo', 'transformers') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["padded", "WordEncoder", "[]"]
