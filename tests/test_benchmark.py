"""`python -m jobs.benchmark` end to end on a tiny model and corpus: it runs, and its table adds up.

Only that the deliverable works (a crash here once cost a 15-minute run its table); the speed
claims come from running it for real, never from a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_benchmark_runs_the_job_and_a_peer_and_reports_what_they_did(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jobs.benchmark", "--size", "tiny", "--docs", "300", "--shards", "2"]
    cmd += ["--runners", "job,job-padded,st-fp32", "--fidelity-sample", "50"]
    cmd += ["--workdir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["runner"]: r for r in result["rows"]}
    assert set(rows) == {"job", "job-padded", "st-fp32"}
    job, peer = rows["job"], rows["st-fp32"]
    assert result["corpus"]["texts"] == 300 and result["corpus"]["tokens"] > 300
    # From the unrounded walls; the JSON's walls are rounded to 10 ms.
    assert job["x_st-fp32"] == pytest.approx(peer["wall_s"] / job["wall_s"], abs=2e-3)
    # The job's own count over its forward passes, as its run report gives it.
    report = json.loads((tmp_path / "out-0" / "_runs" / "bench-0.json").read_text())
    assert 0 < job["padding_efficiency"] == report["padding_efficiency"] <= 1
    assert report["rows_embedded"] == 300
    # The A/B side for GPUs (--attention padded): its own output and report.
    padded = json.loads((tmp_path / "out-padded-0" / "_runs" / "bench-padded-0.json").read_text())
    assert padded["rows_embedded"] == 300 and padded["settings"]["attention"] == "padded"
    assert rows["job-padded"]["padding_efficiency"] == padded["padding_efficiency"]
    assert job["peak_memory_mib"] > 0 and peer["peak_memory_mib"] > 0
    assert result["fidelity"]["sample"] == 50 and result["fidelity"]["cosine_min"] >= 0.999
    assert "| job |" in proc.stdout and "| st-fp32 |" in proc.stdout
    # The share of the compute ceiling: the fastest measured rate, whichever dtype that is here.
    rates = result["matmul_flops_per_s"]
    assert set(rates) == {"bfloat16", "float32"} and all(r > 0 for r in rates.values())
    assert rates[result["matmul_ceiling_dtype"]] == max(rates.values())
    assert job["fraction_of_matmul_ceiling"] == pytest.approx(job["model_flops_per_s"] / max(rates.values()), abs=1e-4)
    assert f"in {result['matmul_ceiling_dtype']}" in proc.stdout
    assert result["not_run"] == {}  # runners named on the command line all run


def test_rates_and_ceiling_read_as_the_hardware_is() -> None:
    from jobs.benchmark import ceiling, describe_rates

    amx_like = {"bfloat16": 4.16e11, "float32": 1.5e11}
    avx2_like = {"bfloat16": 1.2e9, "float32": 1.55e11}
    assert ceiling(amx_like) == ("bfloat16", 4.16e11) and ceiling(avx2_like) == ("float32", 1.55e11)
    assert describe_rates(amx_like) == "matmul ceiling 416 GFLOP/s in bfloat16 (float32 150 GFLOP/s)"
    assert describe_rates(avx2_like) == "matmul ceiling 155 GFLOP/s in float32 (bfloat16 1 GFLOP/s)"
    assert describe_rates({"bfloat16": 9.1e14, "float32": 5e13}).startswith("matmul ceiling 910.0 TFLOP/s in bf")


def test_the_bf16_peer_runs_by_default_only_where_bf16_is_native() -> None:
    """On a CPU that emulates bf16, st-bf16 is the peer's slowest setting (bf16 square matmuls ran
    at 1 GFLOP/s against fp32's 150 on an AVX2-only EPYC here): left out, with the reason."""
    from embedding.encode import cpu_has_fast_bf16
    from jobs.benchmark import DEFAULT_RUNNERS, NO_NATIVE_BF16, default_runners

    runners, not_run = default_runners("cpu")
    if cpu_has_fast_bf16():
        assert runners == list(DEFAULT_RUNNERS) and not_run == {}
    else:
        assert runners == ["job", "st-fp32"] and not_run == {"st-bf16": NO_NATIVE_BF16}
    assert default_runners("cuda") == (list(DEFAULT_RUNNERS), {})


def test_encoder_bench_times_each_attention_the_device_runs_and_says_why_not_for_the_others(tmp_path: Path) -> None:
    """The Ray-free encoder benchmark a GPU session runs first: on CPU, padded attention is timed
    and variable-length attention is reported as not available, with the reason."""
    out = tmp_path / "enc.json"
    cmd = [sys.executable, "-m", "jobs.encoder_bench", "--device", "cpu", "--size", "tiny", "--docs", "300"]
    cmd += ["--repeats", "2", "--fidelity-sample", "50", "--workdir", str(tmp_path), "--json", str(out)]
    env = dict(os.environ) | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    padded, varlen = result["rows"]
    assert padded["attention"] == "padded" and len(padded["walls_s"]) == 2
    assert padded["tokens_per_s"] == pytest.approx(result["tokens"] / padded["wall_s"], rel=1e-2)
    assert 0 < padded["padding_efficiency"] <= 1 and padded["cosine_min_vs_float32"] >= 0.999
    assert 0 < padded["fraction_of_matmul_ceiling"] and result["matmul_ceiling_dtype"] in result["matmul_flops_per_s"]
    assert "CUDA" in varlen["not_available"]
    assert "| padded |" in proc.stdout and "| varlen | not available" in proc.stdout
