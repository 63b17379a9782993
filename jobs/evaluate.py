"""Evaluate a model as its card does: ``python -m jobs.evaluate --help``.

STS on a JSTS-format file (Spearman and Pearson of cosine similarity) and retrieval on an
AIO/DPR-format question file plus a passage collection (top-1/5/10/50 accuracy), the passages
embedded by the job itself. Prints the model card's tables with our row above the card's
published rows. Without --sts / --questions it runs on the small handmade sets in
``samples/eval`` (which say nothing about the card's figures; see the README for JSTS and AIO3).

Exit status: 0 done; 1 failed; 2 refused (bad file, missing model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "eval"


def build_parser() -> argparse.ArgumentParser:
    from embedding.config import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="STS and retrieval evaluation of a sentence encoder, in the layout of the GLuCoSE-base-ja card.",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"hub id, local or s3:// directory [default: {DEFAULT_MODEL}]"
    )
    p.add_argument("--sts", metavar="FILE", help="JSTS-format JSON Lines (sentence1, sentence2, label)")
    p.add_argument(
        "--questions", metavar="FILE", help="AIO/DPR questions: JSON Lines or a JSON array with question, answers"
    )
    p.add_argument(
        "--passages", metavar="URI", help="passage collection, any input the job reads (JSON Lines, Parquet, CSV)"
    )
    p.add_argument("--passage-text-column", default="text", help="[default: text]")
    p.add_argument("--passage-id-column", default="id", help="[default: id]")
    p.add_argument(
        "--passages-output",
        metavar="URI",
        help="where the job writes the passage vectors; reused if it already holds an output [default: a temporary directory]",
    )
    p.add_argument("--chunk", action="store_true", help="embed the passages as --chunk passages")
    p.add_argument("--chunk-tokens", type=int, help="passage size with --chunk [default: the model's limit]")
    p.add_argument("--chunk-overlap", type=int, default=64, help="[default: 64]")
    p.add_argument(
        "--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"), help="[default: float32]"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", metavar="FILE", help="also write the metrics here")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="WARNING")
    return p


def embed_passages(args: argparse.Namespace, output: str) -> None:
    from embedding import pipeline
    from embedding.config import JobConfig

    config = JobConfig(
        inputs=(args.passages,),
        output=output,
        model=args.model,
        text_column=args.passage_text_column,
        id_column=args.passage_id_column,
        dtype=args.dtype,
        device=args.device,
        keep_text=True,
        chunk=args.chunk,
        chunk_tokens=args.chunk_tokens,
        chunk_overlap=args.chunk_overlap,
        log_level=args.log_level,
    )
    report = pipeline.run(config)
    logging.getLogger(__name__).info("passages: %s", report.to_json())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not args.sts and not args.questions:
        args.sts = str(SAMPLES / "sts.jsonl")
        args.questions = str(SAMPLES / "aio" / "questions.jsonl")
        args.passages = str(SAMPLES / "aio" / "passages.jsonl")
    if args.questions and not (args.passages or args.passages_output):
        print("evaluate: refused: --questions needs --passages (or an existing --passages-output)", file=sys.stderr)
        return EXIT_REFUSED

    from embedding import evaluate, search
    from embedding.model import ModelNotFoundError, resolve_model

    metrics: dict = {"model": args.model}
    out = []
    try:
        if args.sts:
            spec = resolve_model(args.model)
            encoder = search.TextEncoder(spec, args.device, "float32" if args.dtype == "auto" else args.dtype)
            sts = evaluate.evaluate_sts(encoder, args.sts)
            metrics["sts"] = {"file": args.sts, "pairs": sts.pairs, "spearman": sts.spearman, "pearson": sts.pearson}
            out += [
                f"STS: {args.sts} ({sts.pairs} pairs), cosine similarity vs gold label",
                evaluate.card_table("sts", (f"{args.model} (this run)", (sts.spearman, sts.pearson)), percent=False),
                "",
            ]
        if args.questions:
            with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
                output = args.passages_output or os.path.join(tmp, "passages")
                try:
                    search.committed_files(output)
                    reuse = True
                except search.SearchError:
                    reuse = False
                if not reuse:
                    if not args.passages:
                        raise search.SearchError(f"{output} holds no output and no --passages were given")
                    embed_passages(args, output)
                ret = evaluate.evaluate_retrieval(args.questions, output, device=args.device)
            metrics["retrieval"] = {
                "questions_file": args.questions,
                "questions": ret.questions,
                "passages": ret.passages,
                "accuracy": {f"top{k}": v for k, v in ret.accuracy.items()},
                "first_hit": ret.first_hit,
            }
            out += [
                f"Retrieval: {args.questions} ({ret.questions} questions) over {ret.passages} passages"
                f"{' (reused ' + output + ')' if reuse else ''}; top-k accuracy, %",
                evaluate.card_table(
                    "retrieval",
                    (f"{args.model} (this run)", [ret.accuracy[k] for k in evaluate.RETRIEVAL_KS]),
                    percent=True,
                ),
                "",
            ]
    except (ValueError, ModelNotFoundError, FileNotFoundError, KeyError) as e:
        print(f"evaluate: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:
        logging.getLogger(__name__).debug("evaluation failed", exc_info=True)
        print(f"evaluate: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    out.append(f"Rows marked (card, ...) are quoted from the {evaluate.CARD_SOURCE}, on the full JSTS / AIO3 dev sets.")
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
