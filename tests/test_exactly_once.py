"""Exactly-once output: reruns, incremental runs, changed and removed shards, settings
mismatches, concurrent runs and hard kills. Real S3 server, real Ray, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding import ledger, pipeline, storage
from embedding.config import JobConfig
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def write_shard(url: str, shard: int, rows: int, version: str = "v1") -> dict[str, str]:
    """A JSONL shard with ids ``s<shard>-<row>``; returns {id: text}."""
    docs = {f"s{shard}-{i}": f"{version} 文書{shard}の{i}番目。今日は良い天気です。" * (1 + i % 4) for i in range(rows)}
    body = "".join(json.dumps({"id": k, "text": t}, ensure_ascii=False) + "\n" for k, t in docs.items())
    storage.write_bytes_atomic(url, body.encode())
    return docs


def make_corpus(root: str, shards: int, rows: int) -> dict[str, str]:
    docs: dict[str, str] = {}
    for s in range(shards):
        docs.update(write_shard(f"{root}/part-{s:03d}.jsonl", s, rows))
    return docs


def committed_files(output: str) -> dict[str, str]:
    """Committed data files (outside ``_``/``.`` paths) -> their ETag or mtime."""
    fs, root = storage.filesystem(output)
    out = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root.rstrip("/")) + 1 :]
        if rel.endswith(".parquet") and not storage.is_hidden(rel):
            out[rel] = str(info.get("ETag") or info.get("mtime"))
    return out


def committed_rows(output: str) -> pa.Table:
    fs, root = storage.filesystem(output)
    tables = [pq.read_table(f"{root.rstrip('/')}/{rel}", filesystem=fs) for rel in sorted(committed_files(output))]
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def assert_exactly(output: str, docs: dict[str, str]) -> None:
    ids = committed_rows(output)["id"].to_pylist()
    assert len(ids) == len(set(ids)), "a row is committed twice"
    assert set(ids) == set(docs)


def job(inputs: str, output: str, model: Path, **kw) -> JobConfig:
    return JobConfig(inputs=(inputs,), output=output, model=str(model), cpus_per_actor=1, max_actors=1, **kw)


@pytest.fixture(params=["local", "relative", "s3"])
def where(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    if request.param == "local":
        return str(tmp_path / "in"), str(tmp_path / "out")
    if request.param == "relative":  # as the README's own commands run: paths relative to the cwd
        monkeypatch.chdir(tmp_path)
        return "in", "out/sample"
    bucket = request.getfixturevalue("bucket")
    return f"{bucket}/in", f"{bucket}/out"


def test_rerun_is_a_noop_and_incremental_run_embeds_only_new_shards(where, tiny_model: Path, ray_local) -> None:
    inputs, output = where
    docs = make_corpus(inputs, shards=3, rows=20)
    first = pipeline.run(job(inputs, output, tiny_model))
    assert (first.shards_embedded, first.rows_embedded) == (3, 60)
    before = committed_files(output)

    again = pipeline.run(job(inputs, output, tiny_model))
    assert (again.shards_seen, again.shards_skipped, again.shards_embedded) == (3, 3, 0)
    assert again.rows_embedded == again.tokens == 0
    assert again.device == "", "a no-op rerun must not start the encoders"
    assert committed_files(output) == before, "unchanged files must be left untouched"

    docs.update(write_shard(f"{inputs}/part-003.jsonl", 3, 10))
    inc = pipeline.run(job(inputs, output, tiny_model))
    assert (inc.shards_skipped, inc.shards_embedded, inc.rows_embedded) == (3, 1, 10)
    after = committed_files(output)
    assert {k: after[k] for k in before} == before, "old files must keep their ETag/mtime"
    assert set(after) - set(before) == {"part-003.parquet"}
    assert_exactly(output, docs)
    runs = storage.list_files(f"{output}/_runs", "*.json")
    assert len(runs) == 3 and json.loads(storage.read_bytes(runs[-1]))["shards_skipped"] == 3


def test_changed_and_removed_shards_and_prune(bucket: str, tiny_model: Path, ray_local) -> None:
    inputs, output = f"{bucket}/in", f"{bucket}/out"
    docs = make_corpus(inputs, shards=3, rows=10)
    pipeline.run(job(inputs, output, tiny_model))
    before = committed_files(output)

    # Replace shard 0 with other rows: its old rows leave, its new rows enter, in one commit.
    for k in [k for k in docs if k.startswith("s0-")]:
        del docs[k]
    new = write_shard(f"{inputs}/part-000.jsonl", 0, 7, version="v2")
    docs.update({k.replace("s0-", "s0-"): v for k, v in new.items()})
    rep = pipeline.run(job(inputs, output, tiny_model))
    assert (rep.shards_embedded, rep.shards_replaced, rep.shards_skipped, rep.rows_embedded) == (1, 1, 2, 7)
    after = committed_files(output)
    assert after["part-001.parquet"] == before["part-001.parquet"]
    assert after["part-000.parquet"] != before["part-000.parquet"]
    assert_exactly(output, docs)
    assert len(ledger.read_markers(output)["part-000.jsonl"]) == 1, "the old version's marker must go"

    # A shard that disappears keeps its output by default...
    fs, root = storage.filesystem(inputs)
    fs.rm(f"{root}/part-002.jsonl")
    rep = pipeline.run(job(inputs, output, tiny_model))
    assert (rep.shards_removed, rep.shards_pruned, rep.shards_embedded) == (1, 0, 0)
    assert_exactly(output, docs)
    # ...and --prune removes it.
    rep = pipeline.run(job(inputs, output, tiny_model, prune=True))
    assert (rep.shards_removed, rep.shards_pruned) == (1, 1)
    assert_exactly(output, {k: v for k, v in docs.items() if not k.startswith("s2-")})
    assert "part-002.jsonl" not in ledger.read_markers(output)


def test_settings_mismatch_is_refused_and_overwrite_replaces(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    docs = make_corpus(inputs, shards=2, rows=8)
    pipeline.run(job(inputs, output, tiny_model, dtype="float32"))
    with pytest.raises(
        ledger.OutputMismatchError, match=r"dtype: output has 'float32', this run 'bfloat16'.*--overwrite"
    ):
        pipeline.run(job(inputs, output, tiny_model, dtype="bfloat16"))
    assert not os.path.exists(f"{output}/_lock.json"), "a refused run must release its lease"

    os.remove(f"{inputs}/part-001.jsonl")
    rep = pipeline.run(job(inputs, output, tiny_model, dtype="bfloat16", overwrite=True))
    assert (rep.shards_embedded, rep.shards_pruned) == (1, 1)
    assert_exactly(output, {k: v for k, v in docs.items() if k.startswith("s0-")})
    meta = pq.read_schema(f"{output}/part-000.parquet").metadata
    assert meta[b"embedding.compute_dtype"] == b"bfloat16"
    assert json.loads(Path(output, "_job.json").read_text())["dtype"] == "bfloat16"
    assert not any(p.name.startswith("part-001") for p in Path(output).rglob("*") if "_runs" not in p.parts)


# --------------------------------------------------------------------------------------------
# Real processes: a concurrent run, and a hard kill in the middle of a run.


def _cli(inputs: str, output: str, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.embed_corpus",
        "--input",
        inputs,
        "--output",
        output,
        "--model",
        str(model),
        "--max-actors",
        "1",
        "--window-rows",
        "16",
        "--read-chunk-rows",
        "16",
        "--log-level",
        "WARNING",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}


def _start(inputs: str, output: str, model: Path) -> subprocess.Popen:
    """The CLI in its own session, so that it and its Ray processes can be killed together."""
    return subprocess.Popen(
        _cli(inputs, output, model),
        cwd=REPO,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_session(sid: int) -> None:
    """SIGKILL the driver and every Ray process it started (they share its session)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # field 6 of stat: session id
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the moment to act: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.mark.parametrize("where_kind", ["local", "s3"])
def test_hard_kill_after_first_commit_then_resume(where_kind: str, tmp_path: Path, tiny_model: Path, request) -> None:
    if where_kind == "local":
        inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    else:
        bucket = request.getfixturevalue("bucket")
        inputs, output = f"{bucket}/in", f"{bucket}/out"
    docs = make_corpus(inputs, shards=8, rows=48)
    proc = _start(inputs, output, tiny_model)
    try:
        _wait_for(lambda: bool(ledger.read_markers(output)), 300, proc)
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=30)

    # Right after the kill: only complete files, no row twice.
    markers = ledger.read_markers(output)
    files = committed_files(output)
    assert markers and files and len(files) < 8, f"kill landed outside the run: {len(files)} files"
    rows = committed_rows(output)
    ids = rows["id"].to_pylist()
    assert len(ids) == len(set(ids))
    for rel in files:
        shard = int(rel.split("-")[1].split(".")[0])
        got = {i for i in ids if i.startswith(f"s{shard}-")}
        assert got == {k for k in docs if k.startswith(f"s{shard}-")}, f"{rel} is partial"

    # The same command completes the output; committed shards are not redone.
    done = subprocess.run(
        _cli(inputs, output, tiny_model, "--run-id", "resume"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(storage.read_bytes(f"{output}/_runs/resume.json"))
    assert report["shards_skipped"] >= len(markers)
    assert report["shards_skipped"] + report["shards_embedded"] == 8
    assert_exactly(output, docs)
    fs, root = storage.filesystem(output)
    assert not fs.exists(f"{root}/_staging") or not fs.find(f"{root}/_staging")


def test_concurrent_run_is_detected_and_refused(tmp_path: Path, tiny_model: Path) -> None:
    inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    docs = make_corpus(inputs, shards=4, rows=48)
    first = _start(inputs, output, tiny_model)
    try:
        _wait_for(lambda: os.path.exists(f"{output}/_lock.json"), 120, first)
        second = subprocess.run(
            _cli(inputs, output, tiny_model), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        assert "is being written by run" in second.stderr and "Traceback" not in second.stderr
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            _kill_session(first.pid)
    assert_exactly(output, docs)
    assert not os.path.exists(f"{output}/_lock.json")
