"""The encoder alone, without Ray: padded against variable-length attention, on one device.

``python -m jobs.benchmark`` measures the whole job against its peers. This measures what one
encoder actor does with its windows (``EncoderModel.embed`` over the job's length-sorted windows
and token budgets, the device's defaults), once for each attention the device runs, alternating:
tokens/s, the share of the device's measured matrix-multiply ceiling, padding efficiency
(real ÷ computed tokens) and the cosine of each side's vectors against float32.

It needs torch, numpy, pyarrow, safetensors, sentencepiece and transformers (to build the model),
not Ray, so it runs on a GPU machine that has no Ray::

    python -m jobs.encoder_bench --device cuda --size base --docs 100000

Where an attention cannot run on the device (variable-length attention on CPU, say), its row
says why instead of timing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from embedding.config import DTYPES
from jobs.benchmark import (
    SIZES,
    bench_corpus,
    bench_model,
    ceiling,
    describe_rates,
    matmul_rates,
    model_flops,
    read_corpus,
    row_cosines,
)

logger = logging.getLogger("jobs.encoder_bench")

ATTENTIONS = ("padded", "varlen")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from embedding.batching import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS, DEFAULT_WINDOW_ROWS
    from embedding.encode import EncoderModel, resolve_dtype
    from embedding.model import resolve_model
    from embedding.tokenize import load_tokenizer

    device = args.device
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hidden, layers, _, intermediate = SIZES[args.size]
    texts = read_corpus(bench_corpus(work, args.docs, 8))
    spec = resolve_model(str(bench_model(work, args.size)))
    ids = load_tokenizer(spec.tokenizer, threads=os.cpu_count() or 1).encode(texts)
    lengths = np.array([len(a) for a in ids])
    window = args.window_rows or DEFAULT_WINDOW_ROWS[device]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    budget, rows = DEFAULT_BATCH_TOKENS[device], DEFAULT_BATCH_ROWS[device]
    dtype = resolve_dtype(args.dtype, device)
    flops = model_flops(lengths, hidden, layers, intermediate)
    rates = matmul_rates(device)
    ceiling_dtype, ceiling_rate = ceiling(rates)

    encoders, why_not = {}, {}
    for attention in ATTENTIONS:
        try:
            encoders[attention] = EncoderModel(spec, device, dtype, attention=attention)
        except RuntimeError as e:
            why_not[attention] = str(e)
        else:
            encoders[attention].embed(windows[0][: min(len(windows[0]), 256)], budget, rows)  # warm-up
    walls: dict[str, list[float]] = {a: [] for a in encoders}
    vectors, widths = {}, {}
    for rep in range(args.repeats):
        order = list(encoders) if rep % 2 == 0 else list(reversed(encoders))
        for attention in order:
            enc, out, w = encoders[attention], [], []
            _sync(device)
            start = time.perf_counter()
            for batch in windows:
                v, failed, pw = enc.embed(batch, budget, rows)
                if failed:
                    raise RuntimeError(f"{attention}: {len(failed)} texts failed: {next(iter(failed.values()))}")
                out.append(v)
                w.append(pw)
            _sync(device)
            walls[attention].append(time.perf_counter() - start)
            vectors[attention], widths[attention] = np.concatenate(out), np.concatenate(w)
            logger.info("repeat %d: %s %.2f s", rep + 1, attention, walls[attention][-1])

    sample = min(args.fidelity_sample, len(ids))
    reference = None
    if sample:
        ref = EncoderModel(spec, device, "float32", attention="padded")
        reference = ref.embed(ids[:sample], budget, rows)[0]
        del ref

    result_rows = []
    for attention in ATTENTIONS:
        if attention not in encoders:
            result_rows.append({"attention": attention, "not_available": why_not[attention]})
            continue
        wall = float(np.median(walls[attention]))
        row = {
            "attention": attention,
            "wall_s": round(wall, 4),
            "walls_s": [round(x, 4) for x in walls[attention]],
            "texts_per_s": round(len(ids) / wall, 1),
            "tokens_per_s": round(float(lengths.sum()) / wall, 1),
            "fraction_of_matmul_ceiling": round(flops / wall / ceiling_rate, 4),
            "padding_efficiency": round(float(lengths.sum() / widths[attention].sum()), 4),
        }
        if reference is not None:
            row["cosine_min_vs_float32"] = round(float(row_cosines(vectors[attention][:sample], reference).min()), 6)
        result_rows.append(row)
    cross = None
    if len(encoders) == 2:
        cross = round(float(row_cosines(vectors["padded"], vectors["varlen"]).min()), 6)
    return {
        "command": " ".join(["python -m jobs.encoder_bench", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": dtype,
        "model": {"hidden": hidden, "layers": layers, "intermediate": intermediate},
        "texts": len(ids),
        "tokens": int(lengths.sum()),
        "window_rows": window,
        "batch_tokens": budget,
        "batch_rows": rows,
        "matmul_flops_per_s": rates,
        "matmul_ceiling_dtype": ceiling_dtype,
        "rows": result_rows,
        "cosine_min_padded_vs_varlen": cross,
    }


def format_table(result: dict) -> str:
    lines = [
        "| attention | wall s | texts/s | tokens/s | % matmul ceiling | padding eff. | cos vs fp32 (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "not_available" in r:
            lines.append(f"| {r['attention']} | not available: {r['not_available']} | | | | | |")
            continue
        cos = r.get("cosine_min_vs_float32")
        lines.append(
            f"| {r['attention']} | {r['wall_s']:.2f} | {r['texts_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['fraction_of_matmul_ceiling']:.1f}% | {r['padding_efficiency']:.3f} | "
            f"{'' if cos is None else f'{cos:.5f}'} |"
        )
    lines.append("")
    lines.append(
        f"{result['texts']:,} texts, {result['tokens']:,} tokens on {result['device']} in {result['dtype']} "
        f"(torch {result['torch']}); windows of {result['window_rows']} rows, {result['batch_tokens']} tokens "
        f"per pass at most; {describe_rates(result['matmul_flops_per_s'])}; "
        f"padded against varlen, cosine min: {result['cosine_min_padded_vs_varlen']}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.encoder_bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--size", choices=sorted(SIZES), default="base", help="model size [default: base = 768 x 12]")
    p.add_argument("--docs", type=int, default=100_000, help="documents to generate [default: 100000]")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--window-rows", type=int, help="rows sorted together [default: the device's]")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats; the table shows medians")
    p.add_argument("--fidelity-sample", type=int, default=2000, help="texts checked against float32 (0: none)")
    p.add_argument("--workdir", default=".bench-encoder")
    p.add_argument("--json", help="where to write the result [default: WORKDIR/encoder_bench.json]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.repeats < 1 or args.docs < 1:
        print("encoder_bench: refused: --repeats and --docs must be ≥ 1", file=sys.stderr)
        return 2
    result = run(args)
    print(format_table(result))
    path = Path(args.json or Path(args.workdir) / "encoder_bench.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
