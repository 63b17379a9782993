"""Throughput benchmark: the job against ``SentenceTransformer.encode``, whole processes, one run.

::

    python -m jobs.benchmark                      # 20,000 docs, 384 x 4 GLuCoSE-layout LUKE, CPU
    python -m jobs.benchmark --size base --docs 2000   # 768 x 12 on a smaller corpus
    python -m jobs.benchmark --device cuda --size base --docs 200000   # one GPU, < 5 minutes

It builds (or takes, ``--model``) a random-weight model with GLuCoSE's exact layout and
generates (or takes, ``--corpus``) a corpus of Japanese documents in JSONL shards, most of 10
to 150 tokens with a tail up to 512. Then, ``--repeats`` times and in rotating order, it runs as
separate processes, each from a cold start, exactly as a user would:

- ``job``: ``python -m jobs.embed_corpus`` with default settings (JSONL in, Parquet out);
- ``st-fp32``: a loop-free ``SentenceTransformer(model).encode(texts)``, the model card's usage;
- ``st-bf16``: the same with bf16 weights (the peer's best setting on a bf16-capable machine;
  by default only there: a CPU that emulates bf16 runs it many times slower than float32).

The table reports, per runner, the median wall time over the repeats, texts/s, tokens/s (real
tokens, specials included, as the job counts them), the ratio against each peer, peak memory
(proportional set size summed over the whole process tree: Ray's workers included, shared pages
counted once) and achieved model FLOP/s as a fraction of this machine's compute ceiling: its
fastest measured matrix-multiply rate, in bf16 where the hardware has it, in float32 where it
only emulates bf16 (the benchmark measures both). Padding efficiency (real tokens ÷ padded tokens) is
computed with the job's own batching helpers and default window and budget over the corpus'
token lengths. Fidelity: the job's vectors against float32 vectors computed in this process
(the job's fp32 path, which the tests hold to the reference) for a sample of texts.

Everything is written to ``--json`` too. Timings come only from here, never from tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("jobs.benchmark")

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 4, 128),  # for the memory check (pipeline buffers, not the model)
    "small": (384, 4, 6, 1536),
    "base": (768, 12, 12, 3072),
}
RUNNERS = ("job", "job-padded", "st-fp32", "st-bf16")
# job-padded: the job with --attention padded, the other side of an A/B of variable-length
# attention on a GPU (on CPU the two are the same job). Run it by naming it in --runners.
DEFAULT_RUNNERS = ("job", "st-fp32", "st-bf16")
NO_NATIVE_BF16 = (
    "this CPU has no native bf16 matrix multiply (no AVX512-BF16 or AMX), so bf16 weights are the "
    "peer's slowest setting here, not its best; name st-bf16 in --runners to time it anyway"
)


def default_runners(device: str) -> tuple[list[str], dict[str, str]]:
    """The runners a plain ``python -m jobs.benchmark`` times, and why any of the usual ones is
    left out: the bf16 peer only where bf16 runs natively (where it does not, it runs many times
    slower than float32, and the job itself computes in float32)."""
    from embedding.encode import cpu_has_fast_bf16

    if device == "cpu" and not cpu_has_fast_bf16():
        return [r for r in DEFAULT_RUNNERS if r != "st-bf16"], {"st-bf16": NO_NATIVE_BF16}
    return list(DEFAULT_RUNNERS), {}


# --------------------------------------------------------------------------
# Corpus and model
# --------------------------------------------------------------------------


def generate_documents(n: int, seed: int = 20260) -> list[str]:
    """``n`` Japanese documents: most of 10 to 150 tokens, 3% of 150 to 600 (cut at 512).

    Documents are runs of generated sentences (about 8 tokens each with the tiny tokenizer):
    a log-normal count with median 6, and a uniform tail of 20 to 75 sentences.
    """
    from jobs.make_tiny_model import generate_corpus

    rng = random.Random(seed)
    pool = generate_corpus(20_000, seed=seed)
    docs = []
    for _ in range(n):
        if rng.random() < 0.03:
            k = rng.randint(20, 75)
        else:
            k = max(1, min(19, round(rng.lognormvariate(1.8, 0.7))))
        docs.append("".join(rng.choice(pool) for _ in range(k)))
    return docs


def write_corpus(root: Path, docs: list[str], shards: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // shards)
    for s in range(shards):
        with open(root / f"part-{s:03d}.jsonl", "w", encoding="utf-8") as f:
            for i in range(s * per, min(len(docs), (s + 1) * per)):
                f.write(json.dumps({"id": i, "text": docs[i]}, ensure_ascii=False) + "\n")
    return root


def bench_model(work: Path, size: str, vocab_size: int = 8000) -> Path:
    """``work/model-SIZE``: a random-weight GLuCoSE-layout model of ``SIZES[size]``, built once."""
    from jobs.make_tiny_model import build_tiny_model

    hidden, layers, heads, intermediate = SIZES[size]
    model = work / f"model-{size}"
    if not (model / "model.safetensors").is_file():
        logger.info("building a %d x %d GLuCoSE-layout model in %s", hidden, layers, model)
        build_tiny_model(
            model, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate, vocab_size=vocab_size
        )
    return model


def bench_corpus(work: Path, docs: int, shards: int) -> Path:
    """``work/corpus-DOCS``: ``docs`` generated documents in ``shards`` JSONL shards, written once."""
    corpus = work / f"corpus-{docs}"
    if not any(corpus.glob("*.jsonl")):
        logger.info("writing %d documents to %s", docs, corpus)
        write_corpus(corpus, generate_documents(docs), shards)
    return corpus


def row_cosines(a, b):
    """Cosine of each row of ``a`` with the same row of ``b`` (numpy, float32)."""
    import numpy as np

    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def read_corpus(root: Path) -> list[str]:
    texts = []
    for path in sorted(root.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f if line.strip())
    return texts


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def _tree_sample(root_pid: int, cpu_ticks: dict[int, int]) -> int:
    """Proportional set size summed over ``root_pid`` and its descendants (Linux /proc).

    Also records each process's CPU time so far (user + system, in clock ticks) in ``cpu_ticks``.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        stats[int(entry)] = int(fields[11]) + int(fields[12])
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        if pid in stats:
            cpu_ticks[pid] = stats[pid]
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


@dataclass
class Timed:
    wall_s: float
    cpu_s: float
    peak_bytes: int
    rc: int
    tail: str
    gpu_busy: float | None = None


def _gpu_utilization() -> float | None:
    """NVML's utilisation of GPU 0 over its last sample period (percent of time a kernel ran)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def busy_fraction(samples: list[float]) -> float | None:
    """Mean utilisation between the first and the last sample where the GPU did anything: the
    encoders' busy share once they have work (start-up and shutdown excluded)."""
    active = [i for i, u in enumerate(samples) if u > 0]
    if not active:
        return None
    window = samples[active[0] : active[-1] + 1]
    return sum(window) / (100.0 * len(window))


def run_measured(cmd: list[str], log_path: Path, interval: float = 2.0, gpu: bool = False) -> Timed:
    """Run ``cmd`` to completion, sampling the process tree's memory (and, with ``gpu``, the GPU's
    utilisation); stdout+stderr to a file."""
    peak = 0
    utilisation: list[float] = []
    cpu_ticks: dict[int, int] = {}
    with open(log_path, "w") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            # A sample reads every process's smaps_rollup: 56 ms of CPU for a Ray job's 16
            # processes (11 ms for a peer's one). Every 0.5 s that took about 10 CPU-seconds from a
            # 90 s job run, a handicap only the job paid; every 2 s and at the lowest priority it
            # takes what the runner leaves. Memory here is a plateau, not a spike between samples.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            while not done.wait(interval):
                peak = max(peak, _tree_sample(proc.pid, cpu_ticks))
                if gpu and (u := _gpu_utilization()) is not None:
                    utilisation.append(u)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.monotonic() - start
        done.set()
        sampler.join()
    tail = log_path.read_text(errors="replace")[-2000:]
    # CPU seconds of every process of the tree as last sampled (Ray's workers included; the last
    # interval of each is missed): they tell work from waiting on a shared machine.
    cpu_s = sum(cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    return Timed(wall, cpu_s, peak, rc, tail, busy_fraction(utilisation) if gpu else None)


CEILING_DTYPES = ("bfloat16", "float32")


def matmul_rate(device: str, dtype: str = "bfloat16", seconds: float = 1.0) -> float:
    """This machine's matrix-multiply rate in FLOP/s in one dtype (best of a few square sizes).

    Sizes go up while time is left: a dtype with no native kernel here (bf16 on a CPU without
    AVX512-BF16 or AMX runs at a few GFLOP/s) stops after its first size, seconds, not minutes.
    """
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    sizes = (1024, 2048) if device == "cpu" else (4096, 8192)
    best, deadline = 0.0, time.perf_counter() + seconds
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        reps, start = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - start < seconds / len(sizes):
            a @ b
            reps += 1
            if device == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            break
    return best


def matmul_rates(device: str, seconds: float = 4.0) -> dict[str, float]:
    """The matrix-multiply rate in each dtype the job computes in on this device (FLOP/s)."""
    return {dtype: matmul_rate(device, dtype, seconds / len(CEILING_DTYPES)) for dtype in CEILING_DTYPES}


def ceiling(rates: dict[str, float]) -> tuple[str, float]:
    """The compute ceiling: the fastest of the measured rates, and its dtype. bf16 where the
    hardware has it; float32 on a CPU that only emulates bf16."""
    dtype = max(rates, key=rates.__getitem__)
    return dtype, rates[dtype]


def describe_rates(rates: dict[str, float]) -> str:
    """``matmul ceiling 416 GFLOP/s in bfloat16 (float32 150 GFLOP/s)``, for a table's footer."""

    def rate(flops: float) -> str:
        return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.0f} GFLOP/s"

    dtype, best = ceiling(rates)
    others = ", ".join(f"{d} {rate(r)}" for d, r in rates.items() if d != dtype)
    return f"matmul ceiling {rate(best)} in {dtype}" + (f" ({others})" if others else "")


def model_flops(lengths, hidden: int, layers: int, intermediate: int) -> float:
    """Useful forward FLOPs for texts of these token lengths (no padding): linears + attention."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    return float(layers * (per_token * lengths.sum() + 4 * hidden * (lengths**2).sum()))


# --------------------------------------------------------------------------
# The peer: sentence-transformers as the model card uses it
# --------------------------------------------------------------------------


def run_peer(model: str, corpus: Path, dtype: str, batch_size: int, device: str, out: Path | None) -> None:
    """``SentenceTransformer(model).encode(texts)``; the process the benchmark times."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if dtype == "bfloat16" else {}
    st = SentenceTransformer(model, device=device, **kwargs)
    texts = read_corpus(corpus)
    vectors = st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    if out is not None:
        np.save(out, vectors.astype(np.float32))


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


@dataclass
class RunnerResult:
    name: str
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    gpu_busy: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)


def _job_cmd(args: argparse.Namespace, model: Path, corpus: Path, out: Path, run_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "jobs.embed_corpus", "--input", str(corpus), "--output", str(out)]
    cmd += ["--model", str(model), "--run-id", run_id, "--device", args.device, "--log-level", "WARNING"]
    return cmd + list(args.job_arg)


def _peer_cmd(args: argparse.Namespace, model: Path, corpus: Path, dtype: str) -> list[str]:
    device = "cuda" if args.device == "cuda" else "cpu"
    return [
        sys.executable,
        "-m",
        "jobs.benchmark",
        "peer",
        "--model",
        str(model),
        "--corpus",
        str(corpus),
        "--dtype",
        dtype,
        "--batch-size",
        str(args.peer_batch_size),
        "--device",
        device,
    ]


def _job_vectors(out: Path):
    import numpy as np
    import pyarrow.dataset as ds

    table = ds.dataset(str(out), format="parquet").to_table()
    ids = table["id"].to_numpy()
    vecs = np.asarray(table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False))
    vecs = vecs.reshape(len(ids), -1).astype(np.float32)
    order = np.argsort(ids)
    return ids[order], vecs[order], table.schema.metadata or {}


def _fidelity(model: Path, texts: list[str], ids, vecs, sample: int, device: str) -> dict:
    """Cosine of the job's vectors against float32 vectors from the job's own fp32 path."""
    import numpy as np

    from embedding.encode import EncoderModel
    from embedding.model import resolve_model
    from embedding.tokenize import load_tokenizer

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ids), size=min(sample, len(ids)), replace=False))
    spec = resolve_model(str(model))
    tok = load_tokenizer(spec.tokenizer)
    enc = EncoderModel(spec, device, "float32")
    ref, failed, _ = enc.embed(tok.encode([texts[int(ids[i])] for i in pick]), 4096, 64)
    if failed:
        raise RuntimeError(f"the fidelity reference failed on {len(failed)} text(s)")
    got = vecs[pick]
    cos = row_cosines(got, ref)
    return {
        "sample": int(len(pick)),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float(np.abs(got - ref).max()),
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    import numpy as np

    from embedding.model import resolve_model
    from embedding.tokenize import load_tokenizer
    from embedding.write import RUNS

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hidden, layers, _, intermediate = SIZES[args.size]
    model = Path(args.model) if args.model else bench_model(work, args.size, args.vocab_size)
    if args.model:
        cfg = json.loads((model / "config.json").read_text())
        hidden, layers, intermediate = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    corpus = Path(args.corpus) if args.corpus else bench_corpus(work, args.docs, args.shards)
    texts = read_corpus(corpus)

    spec = resolve_model(str(model))
    lengths = np.array([len(ids) for ids in load_tokenizer(spec.tokenizer, threads=os.cpu_count() or 1).encode(texts)])
    device = "cuda" if args.device == "cuda" else "cpu"
    flops = model_flops(lengths, hidden, layers, intermediate)
    logger.info("measuring the matrix-multiply rates on %s", device)
    rates = matmul_rates(device)

    runners = [r for r in RUNNERS if r in args.runners]
    results = {r: RunnerResult(r) for r in runners}
    outs: dict[str, Path] = {}  # job runner -> its last output
    run_reports: dict[str, Path] = {}
    for rep in range(args.repeats):
        order = runners[rep % len(runners) :] + runners[: rep % len(runners)]
        for name in order:
            if name.startswith("job"):
                tag = f"{rep}" if name == "job" else f"{name.removeprefix('job-')}-{rep}"  # "0", "padded-0"
                run_id, outs[name] = f"bench-{tag}", work / f"out-{tag}"
                if outs[name].exists():
                    import shutil

                    shutil.rmtree(outs[name])
                run_reports[name] = outs[name] / RUNS / f"{run_id}.json"
                cmd = _job_cmd(args, model, corpus, outs[name], run_id)
                if name == "job-padded":
                    cmd += ["--attention", "padded"]
            else:
                cmd = _peer_cmd(args, model, corpus, "bfloat16" if name == "st-bf16" else "float32")
            logger.info("repeat %d: %s", rep + 1, name)
            t = run_measured(cmd, work / f"{name}-{rep}.log", gpu=device == "cuda")
            if t.rc != 0:
                raise RuntimeError(f"{name} failed with exit status {t.rc}:\n{t.tail}")
            results[name].walls.append(t.wall_s)
            results[name].peaks.append(t.peak_bytes)
            results[name].cpus.append(t.cpu_s)
            if t.gpu_busy is not None:
                results[name].gpu_busy.append(t.gpu_busy)
            logger.info("  %s: %.1f s (%.1f CPU s), peak %.0f MiB", name, t.wall_s, t.cpu_s, t.peak_bytes / 2**20)

    # Measured again after the runs, the best of both: a busy moment would understate the ceiling.
    again = matmul_rates(device)
    rates = {dtype: max(rate, again[dtype]) for dtype, rate in rates.items()}
    ceiling_dtype, ceiling_rate = ceiling(rates)
    fidelity = None
    compute_dtype = None
    job_out = outs.get("job") or outs.get("job-padded")
    if job_out is not None:
        ids, vecs, meta = _job_vectors(job_out)
        if len(ids) != len(texts):
            raise RuntimeError(f"the job wrote {len(ids)} vectors for {len(texts)} texts")
        compute_dtype = meta.get(b"embedding.compute_dtype", b"?").decode()
        if args.fidelity_sample > 0:
            fidelity = _fidelity(model, texts, ids, vecs, args.fidelity_sample, device)
            fidelity["compute_dtype"] = compute_dtype

    rows = []
    for name, r in results.items():
        row = {
            "runner": name,
            "wall_s": round(r.wall, 2),
            "walls_s": [round(w, 2) for w in r.walls],
            "cpu_s": round(statistics.median(r.cpus), 2),
            "tokens_per_cpu_s": round(float(lengths.sum()) / statistics.median(r.cpus), 1),
            "texts_per_s": round(len(texts) / r.wall, 1),
            "tokens_per_s": round(float(lengths.sum()) / r.wall, 1),
            "peak_memory_mib": round(max(r.peaks) / 2**20, 1),
            "model_flops_per_s": flops / r.wall,
            "fraction_of_matmul_ceiling": round(flops / r.wall / ceiling_rate, 4),
        }
        if r.gpu_busy:
            row["gpu_busy_fraction"] = round(statistics.median(r.gpu_busy), 3)
            row["encoder_idle_fraction"] = round(1 - statistics.median(r.gpu_busy), 3)
        for peer in ("st-fp32", "st-bf16"):
            if peer in results and peer != name:
                row[f"x_{peer}"] = round(results[peer].wall / r.wall, 3)
        if name in run_reports:
            # As the job counted it over its forward passes (the last repeat's run report; the
            # windows, and so the padding, are the same in every repeat up to block boundaries).
            row["padding_efficiency"] = json.loads(run_reports[name].read_text()).get("padding_efficiency")
            row["compute_dtype"] = compute_dtype
        rows.append(row)

    return {
        "command": " ".join(["python -m jobs.benchmark", *sys.argv[1:]]),
        "machine": _machine(device),
        "model": {"path": str(model), "hidden": hidden, "layers": layers, "intermediate": intermediate},
        "corpus": {
            "path": str(corpus),
            "texts": len(texts),
            "tokens": int(lengths.sum()),
            "tokens_p50_p95_max": [
                int(np.percentile(lengths, 50)),
                int(np.percentile(lengths, 95)),
                int(lengths.max()),
            ],
        },
        "matmul_flops_per_s": rates,
        "matmul_ceiling_dtype": ceiling_dtype,
        "repeats": args.repeats,
        "peer_batch_size": args.peer_batch_size,
        "rows": rows,
        "not_run": args.not_run,
        "fidelity": fidelity,
    }


def _machine(device: str) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    info["amx"] = bool(torch.cpu._is_amx_tile_supported())
    info["avx512_bf16"] = bool(torch.cpu._is_avx512_bf16_supported())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cell(value: float | None, spec: str) -> str:
    """A table cell: blank where a runner has no such number (a peer's padding, an absent peer)."""
    return "" if value is None or value != value else format(value, spec)


def format_table(result: dict) -> str:
    head = (
        "| runner | wall s | texts/s | tokens/s | × st-fp32 | × st-bf16 | padding eff. | peak MiB | % matmul ceiling "
        "| CPU s | tokens/CPU s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in result["rows"]:
        lines.append(
            f"| {r['runner']} | {r['wall_s']:.1f} | {r['texts_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{_cell(r.get('x_st-fp32', 1.0 if r['runner'] == 'st-fp32' else None), '.2f')} | "
            f"{_cell(r.get('x_st-bf16', 1.0 if r['runner'] == 'st-bf16' else None), '.2f')} | "
            f"{_cell(r.get('padding_efficiency'), '.3f')} | {r['peak_memory_mib']:,.0f} | "
            f"{100 * r['fraction_of_matmul_ceiling']:.1f}% | {r['cpu_s']:.0f} | {r['tokens_per_cpu_s']:,.0f} |"
            + (f" GPU idle {100 * r['encoder_idle_fraction']:.0f}% |" if "encoder_idle_fraction" in r else "")
        )
    c, m = result["corpus"], result["model"]
    lines.append("")
    lines.append(
        f"{c['texts']:,} texts, {c['tokens']:,} tokens (p50/p95/max {c['tokens_p50_p95_max']}); "
        f"model {m['hidden']} x {m['layers']}; median of {result['repeats']} alternating repeat(s); "
        f"{describe_rates(result['matmul_flops_per_s'])}; "
        f"machine: {result['machine'].get('cpu', '?')}, {result['machine']['cpus']} CPUs"
        + (f", {result['machine']['gpu']}" if "gpu" in result["machine"] else "")
    )
    for runner, why in result.get("not_run", {}).items():
        lines.append(f"{runner} not run: {why}")
    if result["fidelity"]:
        f = result["fidelity"]
        lines.append(
            f"fidelity: job ({f['compute_dtype']}) vs float32 on {f['sample']} texts: cosine min "
            f"{f['cosine_min']:.5f}, mean {f['cosine_mean']:.6f}, max |diff| {f['max_abs_diff']:.2e}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    peer = sub.add_parser("peer", help="(internal) one timed sentence-transformers process")
    peer.add_argument("--model", required=True)
    peer.add_argument("--corpus", type=Path, required=True)
    peer.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    peer.add_argument("--batch-size", type=int, default=32)
    peer.add_argument("--device", default="cpu")
    peer.add_argument("--out", type=Path)
    p.add_argument("--size", choices=tuple(SIZES), default="small", help="model size [default: small = 384 x 4]")
    p.add_argument("--docs", type=int, default=20_000, help="documents to generate [default: 20000]")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model", help="use this model directory instead of building one")
    p.add_argument("--corpus", help="use these JSONL shards (id, text) instead of generating them")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats; the table shows medians")
    p.add_argument(
        "--runners",
        help=f"comma-separated subset of {','.join(RUNNERS)} [default: {','.join(DEFAULT_RUNNERS)}; "
        "st-bf16 only where the device runs bf16 natively]",
    )
    p.add_argument("--peer-batch-size", type=int, default=32, help="sentence-transformers batch size [default: 32]")
    p.add_argument("--job-arg", action="append", default=[], help="extra flag for the job (repeatable)")
    p.add_argument(
        "--fidelity-sample", type=int, default=1000, help="texts checked against float32 (0: no check) [default: 1000]"
    )
    p.add_argument("--workdir", default=".bench")
    p.add_argument("--json", default=None, help="where to write the table as JSON [default: WORKDIR/benchmark.json]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "peer":
        run_peer(args.model, args.corpus, args.dtype, args.batch_size, args.device, args.out)
        return 0
    if args.runners is None:
        args.runners, args.not_run = default_runners(args.device)
    else:
        args.runners, args.not_run = [r.strip() for r in args.runners.split(",") if r.strip()], {}
    unknown = [r for r in args.runners if r not in RUNNERS]
    if unknown or args.repeats < 1 or args.docs < 1:
        print(f"benchmark: refused: runners {unknown} / repeats {args.repeats} / docs {args.docs}", file=sys.stderr)
        return 2
    result = run_benchmark(args)
    out = Path(args.json or Path(args.workdir) / "benchmark.json")
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(format_table(result))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
