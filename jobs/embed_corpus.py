"""Embed a sharded text corpus into Parquet: ``python -m jobs.embed_corpus --help``.

Every flag has a YAML key of the same name (``--text-column`` -> ``text_column``). Settings
come from the defaults, then ``--config job.yaml``, then the flags given.

Exit status (:class:`Exit`, the one place the codes are defined; schedulers branch on them):

====  ===================  ==============================================================
code  name                 meaning
====  ===================  ==============================================================
0     OK                   done; the output is complete for the inputs seen
1     FAILED               the run started and failed; rerun to complete (nothing partial is
                           visible); one line on stderr says why
2     REFUSED              refused before any work: bad setting, missing input or model,
                           output inside the input, settings that differ from the output's,
                           another run holds the output's lock
3     REJECTED_ABOVE_LIMIT done and committed, but more rows were rejected than
                           --max-rejected-fraction allows
4     SHARDS_FAILED        every shard that could be read is committed; some could not be
                           read (the run report's failed_shards says why); they are not
                           committed, and the next run tries them again
130   INTERRUPTED          stopped by SIGINT (Ctrl-C); rerun to complete
====  ===================  ==============================================================
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys

from embedding.config import (
    ATTENTIONS,
    DEFAULT_MODEL,
    DTYPES,
    FORMATS,
    ID_TYPES,
    OUTPUT_DTYPES,
    PROGRESS,
    JobConfig,
)
from embedding.logs import configure_logging, redact_text


class Exit(enum.IntEnum):
    """The process exit codes; documented in this module's docstring and the README."""

    OK = 0
    FAILED = 1
    REFUSED = 2
    REJECTED_ABOVE_LIMIT = 3  # --max-rejected-fraction exceeded; the output is committed
    SHARDS_FAILED = 4  # some shards could not be read; all the others are committed
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


EPILOG = """exit status: 0 done; 1 failed (rerun to complete); 2 refused before starting;
3 done, but more rows rejected than --max-rejected-fraction allows; 4 done, but some shards could
not be read (listed in the run report; the next run tries them again); 130 interrupted.
The run report is written to <output>/_runs/<run-id>.json."""


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
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    io.add_argument(
        "--keep-text",
        action="store_true",
        help="store each row's text in a `text` column (the passage's span of it with --chunk)",
    )
    c = p.add_argument_group("passages")
    c.add_argument(
        "--chunk",
        action="store_true",
        help="split long texts into overlapping passages, one output row each, with `passage`, "
        "`char_start` and `char_end` (without it a text longer than the limit is truncated)",
    )
    c.add_argument(
        "--chunk-tokens", type=int, help="passage size in tokens, specials included [default: --max-length, 512]"
    )
    c.add_argument("--chunk-overlap", type=int, help="tokens shared by consecutive passages [default: 64]")
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
        "--attention",
        choices=ATTENTIONS,
        help="GPU encoders: varlen packs each pass's real tokens and runs flash attention over each text's own "
        "(no padding computed); auto uses it where torch has it and it checks out on the GPU at start-up, "
        "else padded [default: auto]",
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
    r.add_argument(
        "--cpus-per-actor",
        type=float,
        help="CPUs per encoder actor where there is no GPU [default: one single-threaded actor per core, "
        "less the share the read and commit tasks hold]",
    )
    r.add_argument(
        "--threads-per-actor",
        type=int,
        help="torch threads per CPU encoder actor [default: 1, or its whole CPUs with --cpus-per-actor]",
    )
    r.add_argument(
        "--min-actors", type=int, help="smallest encoder pool [default: every CPU encoder at once; 1 on GPU]"
    )
    r.add_argument("--max-actors", type=int, help="largest encoder pool [default: one per GPU, or per CPU share]")
    r.add_argument(
        "--tokenizer-actors",
        type=int,
        help="tokenizer actors ahead of GPU encoders (CPU encoders tokenize themselves) [default: 1]",
    )
    r.add_argument("--tokenizer-cpus", type=float, help="CPUs per tokenizer actor [default: 0.5]")
    r.add_argument(
        "--batch-tokens",
        type=int,
        help="tokens per forward pass, padding included [default: 2048 on CPU, 65536 on GPU]",
    )
    r.add_argument("--batch-rows", type=int, help="texts per forward pass at most [default: 256 on CPU, 1024 on GPU]")
    r.add_argument(
        "--window-rows",
        type=int,
        help="rows per encoder call, sorted by length within [default: 2048 on CPU, 32768 on GPU]",
    )
    r.add_argument(
        "--read-chunk-rows", type=int, help="rows per block read from a shard [default: a window's rows, at most 8192]"
    )
    o = p.add_argument_group("run")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output produced with other settings (model, revision, pooling, dtype, max length, ...); "
        "without it such a run is refused",
    )
    o.add_argument(
        "--prune",
        action="store_true",
        help="remove the output of shards that are no longer in the inputs (kept by default)",
    )
    o.add_argument(
        "--ray-address",
        help="Ray cluster to join (auto: the one running on this node) [default: RAY_ADDRESS, else a new private local Ray]",
    )
    o.add_argument("--run-id", help="name of this run's report [default: UTC time + random suffix]")
    o.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="[default: INFO]")
    o.add_argument(
        "--progress",
        choices=PROGRESS,
        help="bars: Ray Data's progress bars; log: a progress line every --progress-interval seconds; "
        "auto: bars in a terminal, else log [default: auto]",
    )
    o.add_argument(
        "--progress-interval", type=float, metavar="SECONDS", help="seconds between progress lines [default: 30]"
    )
    o.add_argument(
        "--gpu-hour-price",
        type=float,
        metavar="PRICE",
        help="price of one GPU-hour; the run report then estimates the run's cost [default: none]",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    try:
        config = JobConfig.from_sources(yaml_path, args)
    except (ValueError, TypeError, OSError) as e:
        return _stop(Exit.REFUSED, str(e))
    configure_logging(config.log_level)
    from embedding import pipeline
    from embedding.ledger import LockedError
    from embedding.model import ModelNotFoundError
    from embedding.read import InputError

    try:
        report = pipeline.run(config)
    except KeyboardInterrupt:
        return _stop(Exit.INTERRUPTED, "stopped by SIGINT; rerun to complete")
    except Exception as e:  # one line for schedulers; the traceback goes to the debug log
        logging.getLogger(__name__).debug("run failed", exc_info=True)
        if isinstance(e, pipeline.TooManyRejectedError):
            return _stop(Exit.REJECTED_ABOVE_LIMIT, str(e))
        if isinstance(e, pipeline.ShardsFailedError):
            return _stop(Exit.SHARDS_FAILED, str(e))
        refusals = (
            pipeline.ConfigError,
            InputError,
            ModelNotFoundError,
            LockedError,
            FileNotFoundError,
            PermissionError,
            ValueError,
        )
        if isinstance(e, refusals) and not _is_ray_error(e):  # known before any work started
            return _stop(Exit.REFUSED, str(e))
        cause = _root_cause(e)
        lines = str(cause).strip().splitlines() or [""]
        message = lines[-1] if _is_ray_error(cause) else lines[0]
        return _stop(Exit.FAILED, f"{type(cause).__name__}: {message}. The committed output is intact; rerun to resume")
    hardware = f" on {report.device}/{report.dtype}" if report.device else ""
    print(
        f"run {report.run_id}: {report.shards_seen} shards seen, {report.shards_skipped} skipped, "
        f"{report.shards_embedded} embedded ({report.shards_replaced} replaced), {report.shards_pruned} pruned; "
        f"{report.rows_embedded} rows embedded"
        + (f" as {report.passages_embedded} passages" if config.chunk else "")
        + f", {report.rows_rejected} rejected, "
        f"{report.tokens} tokens in {report.wall_seconds:.1f} s "
        f"({report.rows_per_second:.0f} rows/s, {report.tokens_per_second:.0f} tokens/s"
        + (f", padding efficiency {report.padding_efficiency:.3f}" if report.padding_efficiency else "")
        + f"){hardware}, {report.gpu_hours:.3f} GPU-hours{_cost(report)} -> {report.output}"
    )
    # The work and its summary are done. (A failed run keeps Ray's wait for late log lines:
    # its actors' last lines may say why.)
    pipeline.stop_own_ray()
    return Exit.OK


def _is_ray_error(e: BaseException) -> bool:
    """Raised by Ray on behalf of a task (RayTaskError subclasses the task's own error type)."""
    return any(
        t.__module__.startswith("ray.") for t in type(e).__mro__ if t is not object and t.__name__ != "Exception"
    )


def _root_cause(e: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (RayTaskError keeps it as ``cause``)."""
    while _is_ray_error(e) and getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    return e


def _cost(report) -> str:
    return "" if report.estimated_cost is None else f" (est. cost {report.estimated_cost:.2f})"


def _stop(code: Exit, message: str) -> int:
    """One line on stderr for schedulers, secrets masked; returns ``code``."""
    word = {
        Exit.REFUSED: "refused",
        Exit.INTERRUPTED: "interrupted",
        Exit.REJECTED_ABOVE_LIMIT: "too many rejected rows",
        Exit.SHARDS_FAILED: "shards not read",
    }.get(code, "failed")
    print(f"embed_corpus: {word}: {redact_text(message)}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
