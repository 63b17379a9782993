"""Faults survived with nothing lost or duplicated: encoder errors, a dying actor, a flaky
S3 endpoint (a fault-injecting proxy on loopback), and a worker node lost mid-run."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedding import pipeline
from embedding.config import JobConfig
from tests.conftest import REPO
from tests.reference import reference_embeddings
from tests.test_exactly_once import assert_exactly, committed_rows, make_corpus

pytestmark = pytest.mark.slow


def _job(inputs: str, output: str, model: Path, **kw) -> JobConfig:
    return JobConfig(
        inputs=(inputs,), output=output, model=str(model), cpus_per_actor=1, max_actors=1, dtype="float32", **kw
    )


def test_failing_batches_are_split_and_retried(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    docs = make_corpus(inputs, shards=2, rows=12)
    # Every forward pass of more than 2 rows "runs out of memory": the encoder splits them.
    report = pipeline.run(_job(inputs, output, tiny_model, fault_injection={"oom_over_rows": 2}))
    assert report.rows_embedded == 24 and report.rows_rejected == 0
    table = committed_rows(output)
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    ref = reference_embeddings(tiny_model, [docs[i] for i in table["id"].to_pylist()])
    assert np.abs(got - ref).max() < 1e-4


def test_a_row_that_fails_alone_is_quarantined(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    (tmp_path / "in").mkdir()
    Path(inputs, "a.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "text": "あ" * (i + 1)}) + "\n" for i in range(6)), encoding="utf-8"
    )
    from embedding.model import resolve_model
    from embedding.tokenize import load_tokenizer

    tok = load_tokenizer(resolve_model(str(tiny_model)).tokenizer)
    poison = len(tok.encode(["あ" * 4])[0])
    lengths = [len(tok.encode(["あ" * (i + 1)])[0]) for i in range(6)]
    bad = {f"r{i}" for i, n in enumerate(lengths) if n == poison}
    report = pipeline.run(_job(inputs, output, tiny_model, fault_injection={"poison_length": poison}))
    assert report.rows_rejected == len(bad) and report.rejected_by_reason == {"encode_error": len(bad)}
    assert set(committed_rows(output)["id"].to_pylist()) == {f"r{i}" for i in range(6)} - bad
    quarantine = pq.read_table(Path(output, "_rejected", "a.parquet")).to_pylist()
    assert {r["id"] for r in quarantine} == bad and "poisoned row" in quarantine[0]["message"]


def test_an_actor_that_dies_mid_batch_loses_nothing(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    docs = make_corpus(inputs, shards=3, rows=20)
    flag = tmp_path / "crashed"
    report = pipeline.run(
        _job(inputs, output, tiny_model, window_rows=16, fault_injection={"crash_once_flag": str(flag)})
    )
    assert flag.exists(), "the fault was not injected"
    assert report.rows_embedded == 60
    assert_exactly(output, docs)


# --------------------------------------------------------------------------------------------
# A flaky S3 endpoint.


class FlakyProxy:
    """HTTP proxy on 127.0.0.1 in front of the S3 server. Every ``every``-th request gets a 503
    SlowDown, a 500, or a reset connection, in turn; the rest are forwarded."""

    def __init__(self, upstream: str, every: int = 4) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.faults = {"503": 0, "500": 0, "reset": 0}
        self.faulted: list[tuple[str, str, str]] = []  # (kind, method, path) of each injected fault
        self.requests = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    proxy.requests += 1
                    n = proxy.requests
                if n % every == 0:
                    kind = ("503", "500", "reset")[(n // every) % 3]
                    with lock:
                        proxy.faults[kind] += 1
                        proxy.faulted.append((kind, self.command, self.path))
                    if kind == "reset":
                        # SO_LINGER 0 then closing every handle on the socket sends a TCP RST.
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                        self.rfile.close()
                        self.wfile.close()
                        self.connection.close()
                        self.close_connection = True
                        return
                    code, err = (503, "SlowDown") if kind == "503" else (500, "InternalError")
                    payload = f"<Error><Code>{err}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Content-Type", "application/xml")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = self.headers.get("Host", f"{host}:{port}")
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD response states the object's length without a body.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()


def test_flaky_s3_endpoint_still_gives_complete_output(bucket: str, s3_endpoint: str, tiny_model: Path) -> None:
    """The job runs as a user runs it (a CLI process with its own Ray), through the proxy."""
    from tests.test_exactly_once import _cli, _env

    docs = make_corpus(f"{bucket}/in", shards=4, rows=24)
    proxy = FlakyProxy(s3_endpoint, every=5)
    try:
        env = _env() | {"AWS_ENDPOINT_URL": proxy.url}
        proc = subprocess.run(
            _cli(f"{bucket}/in", f"{bucket}/out", tiny_model, "--run-id", "flaky"),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(proxy.faults.values()) >= 6 and all(proxy.faults.values()), proxy.faults
    assert_exactly(f"{bucket}/out", docs)
    from embedding import storage

    report = json.loads(storage.read_bytes(f"{bucket}/out/_runs/flaky.json"))
    assert report["rows_embedded"] == 96
    # Every 503 and 500 was seen and retried by botocore, and counted; resets are retried
    # below botocore (by the HTTP client) and may not be. The report cannot count the faults
    # on its own write, nor on the lease release after it, so those requests are left out.
    late = ("/_runs/", "/_lock.json")
    counted = [f for f in proxy.faulted if f[0] != "reset" and not any(part in f[2] for part in late)]
    assert report["storage_errors_retried"] >= len(counted), proxy.faulted


# --------------------------------------------------------------------------------------------
# A worker node lost mid-run, on a multi-node Ray cluster on this machine.


def test_worker_node_lost_mid_run(tmp_path: Path, tiny_model: Path) -> None:
    inputs, output = str(tmp_path / "in"), str(tmp_path / "out")
    docs = make_corpus(inputs, shards=6, rows=40)
    script = REPO / "tests" / "node_loss_driver.py"
    proc = subprocess.run(
        [sys.executable, str(script), inputs, output, str(tiny_model), str(tmp_path / "result.json")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["removed_node"], "no worker node was removed during the run"
    assert result["rows_embedded"] == 240
    assert_exactly(output, docs)
