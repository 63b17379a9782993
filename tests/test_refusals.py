"""Refusals: fast, one line, no traceback, exit 2, never a secret. The CLI runs as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding import storage
from tests.conftest import REPO

SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = (env or dict(os.environ)) | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.embed_corpus", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_refused(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("embed_corpus:")]
    assert len(lines) == 1
    assert SECRET not in proc.stderr + proc.stdout


def test_missing_text_column_names_column_and_shard(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["本文"]}), tmp_path / "in" / "x.parquet")
    proc = _run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_model)])
    _assert_refused(proc, "text column 'text' is not in shard")
    assert "x.parquet" in proc.stderr


def test_model_not_found_offline_says_how_to_supply_it(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "a", "text": "x"}\n')
    proc = _run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    _assert_refused(proc, "model 'pkshatech/GLuCoSE-base-ja' could not be loaded")
    assert "--model DIR" in proc.stderr


def test_invalid_setting_names_field_value_and_allowed(tmp_path: Path) -> None:
    proc = _run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--batch-rows", "0"])
    _assert_refused(proc, "`batch_rows` must be a whole number ≥ 1; got 0")


def test_varlen_attention_without_a_gpu_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "a", "text": "本文"}\n')
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_model)]
    proc = _run([*args, "--device", "cpu", "--attention", "varlen"])
    _assert_refused(proc, "`attention` 'varlen' (flash attention over packed tokens) needs GPU encoders")
    assert not (tmp_path / "out" / "a.parquet").exists()


def test_no_credentials_names_the_bucket(bucket: str, tiny_model: Path) -> None:
    storage.write_bytes_atomic(f"{bucket}/in/a.jsonl", b'{"id": "a", "text": "x"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS_KEY", "AWS_SECRET", "AWS_SESSION"))}
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = _run(["--input", f"{bucket}/in/", "--output", f"{bucket}/out", "--model", str(tiny_model)], env)
    _assert_refused(proc, f"no credentials to access {bucket}")


@pytest.fixture
def auth_s3() -> str:
    """A second S3 server on loopback that checks credentials (moto's IAM auth switched on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ) | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_access_denied_names_the_bucket(auth_s3: str, tiny_model: Path) -> None:
    env = dict(os.environ) | {"AWS_ENDPOINT_URL": auth_s3}
    proc = _run(
        ["--input", "s3://private-corpus/in/", "--output", "s3://private-corpus/out", "--model", str(tiny_model)], env
    )
    _assert_refused(proc, "access denied to s3://private-corpus")


def test_a_bad_later_shard_is_left_out_with_exit_4_and_one_line(tmp_path: Path, tiny_model: Path) -> None:
    """Only the first shard's schema is checked before the run; a later bad one does not stop
    it: the others are committed, and the exit status and one line say which could not be read."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["良い"]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "body": ["本文"]}), tmp_path / "in" / "b.parquet")
    pq.write_table(pa.table({"id": ["c"], "text": ["天気"]}), tmp_path / "in" / "c.parquet")
    proc = _run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_model)])
    assert proc.returncode == 4, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("embed_corpus:")]
    assert len(line) == 1 and line[0].startswith("embed_corpus: shards not read: 1 of 3 shard(s)"), line
    assert "InputError" in line[0] and "'text'" in line[0] and "b.parquet" in line[0]
    assert "Traceback" not in line[0]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["a.parquet", "c.parquet"]
