"""End to end on a real local Ray: sample corpus in, Parquet out, locally and on S3.

Checked against inputs read independently (csv/json/pyarrow) and embeddings computed by the
independent reference in ``tests/reference.py``.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embedding import storage
from embedding.config import JobConfig
from tests.conftest import REPO, SAMPLES
from tests.reference import cosine, reference_embeddings

pytestmark = pytest.mark.slow


def sample_rows() -> dict[str, dict]:
    """Every sample document, read with the standard library and pyarrow, keyed by id."""
    rows: dict[str, dict] = {}
    for path in sorted(SAMPLES.rglob("*")):
        if path.name.endswith(".jsonl"):
            lines = path.read_text(encoding="utf-8").splitlines()
        elif path.name.endswith(".jsonl.gz"):
            lines = gzip.decompress(path.read_bytes()).decode().splitlines()
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                lines = [json.dumps(r) for r in csv.DictReader(f)]
        elif path.suffix == ".parquet":
            lines = [json.dumps(r) for r in pq.read_table(path).to_pylist()]
        else:
            continue
        for line in filter(str.strip, lines):
            r = json.loads(line)
            assert r["id"] not in rows, f"duplicate sample id {r['id']}"
            rows[r["id"]] = r
    return rows


def check_output(table: pa.Table, expected: dict[str, dict], model_dir: Path, dtype: str) -> None:
    # Rows: exactly one per input document, nothing lost, nothing twice.
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == set(expected)
    # Schema as declared.
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert table["source"].to_pylist() == [expected[i]["source"] for i in ids]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["embedding.dim"] == "64" and meta["embedding.pooling"] == "mean"
    assert meta["embedding.normalized"] == "false" and meta["embedding.max_length"] == "512"
    assert meta["embedding.compute_dtype"] == dtype and meta["embedding.output_dtype"] == "float32"
    assert meta["embedding.tokenizer"] == "sentencepiece-fairseq" and meta["embedding.revision"]
    # Vectors: the model as trained, row for row.
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    ref = reference_embeddings(model_dir, [expected[i]["text"] for i in ids])
    if dtype == "float32":
        assert np.abs(got - ref).max() < 1e-4
    else:
        assert cosine(got, ref).min() >= 0.999


def test_cli_round_trip_local(tiny_model: Path, tmp_path: Path) -> None:
    """The README's command, as a user runs it: a subprocess with its own local Ray."""
    inputs = tmp_path / "corpus"
    shutil.copytree(SAMPLES, inputs)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "jobs.embed_corpus",
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--model",
        str(tiny_model),
        "--dtype",
        "float32",
        "--keep-columns",
        "source",
        "--run-id",
        "r1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = sample_rows()
    assert f"{len(expected)} rows embedded, 0 rejected" in proc.stdout

    committed = sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*.parquet")
        if not storage.is_hidden(p.relative_to(out).as_posix())
    )
    assert committed == [
        "faq/part-000.parquet",
        "news/part-000.parquet",
        "news/part-001.parquet",
        "news/part-002.parquet",
        "reviews/part-000.parquet",
    ]
    assert not (out / "_staging" / "r1").exists()
    table = pads.dataset(str(out), format="parquet").to_table()
    check_output(table, expected, tiny_model, "float32")
    report = json.loads((out / "_runs" / "r1.json").read_text())
    assert report["rows_embedded"] == len(expected) and report["shards_embedded"] == 5 and report["tokens"] > 0
    assert report["padded_tokens"] >= report["tokens"]
    assert report["padding_efficiency"] == round(report["tokens"] / report["padded_tokens"], 4)
    assert f"padding efficiency {report['padding_efficiency']:.3f}" in proc.stdout


def test_round_trip_s3_with_model_on_s3(tiny_model: Path, bucket: str, ray_local) -> None:
    """S3 shards and an s3:// model through AWS_ENDPOINT_URL; bf16 compute."""
    from embedding import pipeline

    for path in SAMPLES.rglob("*"):
        if path.is_file():
            storage.write_bytes_atomic(f"{bucket}/corpus/{path.relative_to(SAMPLES).as_posix()}", path.read_bytes())
    for path in tiny_model.rglob("*"):
        if path.is_file():
            storage.write_bytes_atomic(
                f"{bucket}/models/tiny/{path.relative_to(tiny_model).as_posix()}", path.read_bytes()
            )
    config = JobConfig(
        inputs=(f"{bucket}/corpus/",),
        output=f"{bucket}/embeddings",
        model=f"{bucket}/models/tiny",
        dtype="bfloat16",
        keep_columns=("source",),
        cpus_per_actor=1,
        max_actors=2,
        window_rows=64,
        read_chunk_rows=50,
    )
    report = pipeline.run(config)
    expected = sample_rows()
    assert report.rows_embedded == len(expected) and report.rows_rejected == 0 and report.shards_embedded == 5
    # Windows of 64 rows: some padding, counted over the forward passes.
    assert report.tokens <= report.padded_tokens and 0 < report.padding_efficiency <= 1
    # The CLI stops the Ray a run started, never one its caller started (the tests' own).
    assert not pipeline.stop_own_ray() and ray_local.is_initialized()

    fs, root = storage.filesystem(f"{bucket}/embeddings")
    files = sorted(fs.find(root))
    data = [f for f in files if not storage.is_hidden(f[len(root) + 1 :])]
    assert [f[len(root) + 1 :] for f in data] == [
        "faq/part-000.parquet",
        "news/part-000.parquet",
        "news/part-001.parquet",
        "news/part-002.parquet",
        "reviews/part-000.parquet",
    ]
    assert not any("/_staging/" in f for f in files)
    table = pads.dataset(f"{root}", filesystem=fs, format="parquet").to_table()
    check_output(table, expected, tiny_model, "bfloat16")
    assert fs.exists(f"{root}/_runs/{report.run_id}.json")


def test_cli_help_explains_every_option() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.embed_corpus", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0
    for flag in (
        "--input",
        "--output",
        "--model",
        "--text-column",
        "--id-column",
        "--dtype",
        "--config",
        "--format",
        "--keep-columns",
        "--output-dtype",
    ):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "/nonexistent/corpus", "--output", "/tmp/x"], "input /nonexistent/corpus matches no file"),
        (["--input", "samples/corpus", "--output", "/tmp/x", "--dtype", "fp8"], "invalid choice: 'fp8'"),
        (
            ["--input", "samples/corpus", "--output", "samples/corpus/out"],
            f"lies inside input {REPO / 'samples' / 'corpus'}",
        ),
    ],
)
def test_cli_refusals_are_one_line(args: list[str], message: str) -> None:
    from tests.test_refusals import _run

    proc = _run(args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
