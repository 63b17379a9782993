"""Embed a sharded text corpus into Parquet: ``python -m jobs.embed_corpus --help``.

Every flag has a YAML key of the same name (``--text-column`` -> ``text_column``). Settings
come from the defaults, then ``--config job.yaml``, then the flags given.

Exit status: 0 done; 1 the run failed (see the one-line reason); 2 refused before starting
(bad setting, missing input or model).
"""

from __future__ import annotations

import argparse
import logging
import sys

from embedding.config import DEFAULT_MODEL, DTYPES, FORMATS, ID_TYPES, OUTPUT_DTYPES, JobConfig

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.embed_corpus",
        description=(
            "Embed Japanese texts sharded in object storage or local files with a "
            "sentence-transformers encoder (default pkshatech/GLuCoSE-base-ja), on a Ray "
            "cluster or this machine, and write the vectors as Parquet."
        ),
        argument_default=argparse.SUPPRESS,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--config", help="YAML file of settings; keys are the long flag names with _ (flags override it)")
    io.add_argument(
        "--input",
        dest="inputs",
        action="append",
        metavar="URI",
        help="file, directory/prefix (read recursively), or glob; local or s3:// (any fsspec URL). Repeatable",
    )
    io.add_argument("--output", metavar="URI", help="directory or prefix for the Parquet output (local or s3://)")
    io.add_argument(
        "--format",
        choices=FORMATS,
        help="input format; auto takes it from the extension (.jsonl .parquet .csv .txt, optionally .gz/.zst)",
    )
    io.add_argument("--text-column", help="column (or JSON key) holding the text [default: text]")
    io.add_argument(
        "--id-column",
        help="column holding each row's id [default: id]; where the inputs have none, ids are "
        "derived as '<shard path>#<row>'",
    )
    io.add_argument(
        "--id-type", choices=ID_TYPES, help="type of the output id column; auto follows the first shard [default: auto]"
    )
    io.add_argument(
        "--keep-columns", type=_csv, metavar="A,B", help="input columns copied to the output beside id and embedding"
    )
    io.add_argument("--output-dtype", choices=OUTPUT_DTYPES, help="stored vector type [default: float32]")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        help=f"hub id (optionally @revision), local sentence-transformers directory, or s3:// directory [default: {DEFAULT_MODEL}]",
    )
    m.add_argument(
        "--dtype",
        choices=DTYPES,
        help="compute dtype; auto picks bfloat16 on CUDA GPUs with bf16 and on CPUs with AMX/AVX512-BF16, else float32 [default: auto]",
    )
    m.add_argument(
        "--max-length", type=int, help="token limit, specials included [default: the model's, 512 for GLuCoSE]"
    )
    r = p.add_argument_group("resources and batching")
    r.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="cpu forces CPU encoders even on a GPU cluster [default: auto]",
    )
    r.add_argument("--num-gpus", type=float, help="GPUs per encoder actor; fractions share a GPU [default: 1]")
    r.add_argument("--cpus-per-actor", type=float, help="CPUs per encoder actor where there is no GPU [default: 1]")
    r.add_argument("--threads-per-actor", type=int, help="torch threads per CPU encoder actor [default: its CPUs]")
    r.add_argument("--min-actors", type=int, help="smallest encoder pool [default: 1]")
    r.add_argument("--max-actors", type=int, help="largest encoder pool [default: one per GPU, or per CPU share]")
    r.add_argument("--tokenizer-actors", type=int, help="tokenizer actors (CPU) [default: 1]")
    r.add_argument("--tokenizer-cpus", type=float, help="CPUs per tokenizer actor [default: 0.5]")
    r.add_argument(
        "--batch-tokens",
        type=int,
        help="tokens per forward pass, padding included [default: 4096 on CPU, 65536 on GPU]",
    )
    r.add_argument("--batch-rows", type=int, help="texts per forward pass at most [default: 256 on CPU, 1024 on GPU]")
    r.add_argument(
        "--window-rows",
        type=int,
        help="rows per encoder call, sorted by length within [default: 4096 on CPU, 32768 on GPU]",
    )
    r.add_argument("--read-chunk-rows", type=int, help="rows per block read from a shard [default: 8192]")
    o = p.add_argument_group("run")
    o.add_argument("--ray-address", help="Ray cluster address [default: RAY_ADDRESS, else a local Ray]")
    o.add_argument("--run-id", help="name of this run's report [default: UTC time + random suffix]")
    o.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="[default: INFO]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    try:
        config = JobConfig.from_sources(yaml_path, args)
    except (ValueError, TypeError, OSError) as e:
        print(f"embed_corpus: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from embedding import pipeline
    from embedding.model import ModelNotFoundError
    from embedding.read import InputError

    try:
        report = pipeline.run(config)
    except (pipeline.ConfigError, InputError, ModelNotFoundError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"embed_corpus: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # one line for schedulers; the traceback goes to the debug log
        logging.getLogger(__name__).debug("run failed", exc_info=True)
        print(f"embed_corpus: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"run {report.run_id}: {report.shards_committed}/{report.shards_seen} shards, "
        f"{report.rows_embedded} rows embedded, {report.rows_rejected} rejected, "
        f"{report.tokens} tokens in {report.wall_seconds:.1f} s "
        f"({report.rows_per_second:.0f} rows/s, {report.tokens_per_second:.0f} tokens/s) "
        f"on {report.device}/{report.dtype} -> {report.output}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
