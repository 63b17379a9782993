"""The one place that wires Ray Data: stages, actor pools, resources, and the commit loop.

::

    shards (listed on the driver)
      │  from_items, one block per shard
      ▼
    read_shards        CPU tasks      file -> Arrow chunks {id, text, row, ...}; bad rows flagged
      ▼
    Tokenize           CPU actors     text -> token ids (sentencepiece + fairseq offset);
                                      with --chunk, one row per passage
      ▼
    Encode             GPU actors     ids -> vectors (length-sorted, token-budget batches)
      ▼
    WriteParts         CPU actors     rows -> staged parts under _staging/, one metadata row out
      ▼
    driver             streams the metadata; commits each shard as soon as all its rows are
                       staged (commit_shard, a small Ray task); writes _runs/<run-id>.json

Where the cluster has no GPU, Tokenize, Encode and WriteParts run as one CPU actor stage
(:class:`CpuStages`, explicit torch threads): on CPU the encoder is two orders of magnitude
slower than the tokenizer and the writer, so separate pools would only add processes, object
copies and scheduling on the cores the encoder needs. On GPU they stay apart, so that the
encoders never wait for tokens.

Backpressure is Ray Data's streaming executor: no stage materialises the corpus.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from embedding import ledger, progress, storage
from embedding import schema as S
from embedding.config import JobConfig
from embedding.logs import error_line, redact_text
from embedding.model import ModelSpec, resolve_model
from embedding.read import InputLayout, failure_marker, probe_layout, read_shard
from embedding.storage import Shard
from embedding.write import (
    RUNS,
    STAGING,
    CommitResult,
    CommitTask,
    WriteParts,
    commit_shard,
    output_key,
    publish_deferred,
    remove_shard_output,
)

logger = logging.getLogger(__name__)

JOB_VERSION = "0.1.0"


@dataclass
class RunReport:
    """What a run did; written to ``_runs/<run_id>.json`` and printed by the CLI.

    Shards: ``seen`` in the inputs = ``skipped`` (committed before, unchanged) + ``embedded``
    (new or changed; ``replaced`` counts the changed ones). ``removed`` shards are committed
    but gone from the inputs; ``pruned`` of them were deleted (``--prune``/``--overwrite``).
    ``failed`` shards could not be read (``failed_shards``: shard -> why, the first
    ``MAX_FAILED_LISTED``); they are not committed, so the next run tries them again.
    Rows and tokens count this run's work only.
    """

    run_id: str
    output: str
    model: str
    revision: str
    status: str = "running"
    device: str = ""
    dtype: str = ""
    shards_seen: int = 0
    shards_skipped: int = 0
    shards_embedded: int = 0
    shards_replaced: int = 0
    shards_removed: int = 0
    shards_pruned: int = 0
    shards_failed: int = 0
    failed_shards: dict[str, str] = field(default_factory=dict)
    rows_in: int = 0
    rows_embedded: int = 0
    rows_rejected: int = 0
    passages_embedded: int = 0  # output rows; more than rows_embedded with --chunk
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    storage_errors_retried: int = 0  # transient object-store errors (5xx, throttling, timeouts) retried
    rows_truncated: int = 0  # texts cut at the model's token limit (embedded from their start)
    duplicate_ids: int = 0  # embedded rows whose id another row of this run has too
    duplicate_examples: list[str] = field(default_factory=list)
    tokens: int = 0
    # Tokens the forward passes ran over, padding included; tokens / padded_tokens is the
    # padding efficiency (1.0: no padding).
    padded_tokens: int = 0
    padding_efficiency: float | None = None
    wall_seconds: float = 0.0
    rows_per_second: float = 0.0
    tokens_per_second: float = 0.0
    # The cluster's GPUs over the embedding phase (see progress.py), priced by --gpu-hour-price.
    gpu_hours: float = 0.0
    gpu_hour_price: float | None = None
    estimated_cost: float | None = None
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2, sort_keys=True)


class ConfigError(ValueError):
    """The run cannot start as configured; the message says why."""


class ShardsFailedError(RuntimeError):
    """The run committed every shard it could read, and some it could not (the report lists them)."""

    def __init__(self, message: str, report: RunReport) -> None:
        super().__init__(message)
        self.report = report


class TooManyRejectedError(RuntimeError):
    """The run committed its output, but rejected more rows than ``max_rejected_fraction``."""

    def __init__(self, message: str, report: RunReport) -> None:
        super().__init__(message)
        self.report = report


READ_CPUS = 0.25  # logical CPUs of a read task; differs from the tokenizer's so Ray does not fuse them
COMMIT_CPUS = 0.25
MAX_READ_CHUNK_ROWS = 8192  # rows per block read from a shard, unless --read-chunk-rows
MAX_FAILED_LISTED = 1000  # shards named in the run report's failed_shards; all are counted
MAX_HASHED_IDS = 200_000_000  # 1.6 GB of hashes on the driver; beyond it duplicates count per shard


def list_inputs(config: JobConfig) -> list[Shard]:
    """All shards of all inputs, with keys unique across inputs."""
    shards: list[Shard] = []
    for uri in config.inputs:
        with storage.access(uri):
            shards.extend(storage.list_shards(uri, config.format))
    seen: dict[str, str] = {}
    for shard in shards:
        key = output_key(shard.key)
        if key in seen and seen[key] != shard.url:
            raise ConfigError(
                f"inputs {seen[key]} and {shard.url} would both be written to {key}; give them "
                "distinct relative paths (or run them into different outputs)"
            )
        seen[key] = shard.url
    return sorted({s.url: s for s in shards}.values(), key=lambda s: s.key)


def check_output_outside_inputs(config: JobConfig) -> None:
    out = config.output.rstrip("/") + "/"
    for uri in config.inputs:
        base = uri.split("*", 1)[0].rstrip("/") + "/"
        if out.startswith(base) or base.startswith(out):
            raise ConfigError(
                f"output {config.output} lies inside input {uri} (or contains it); a rerun would "
                "read its own output. Choose an output outside the inputs"
            )


def _read_stage(batch: pa.Table, layout: InputLayout) -> Iterator[pa.Table]:
    """Ray task body: each row of ``batch`` names one shard; yield its chunks. The transient
    storage errors retried while reading ride on the first row of the shard's last chunk.

    A shard that cannot be read (a column missing, corrupt compression or Parquet, gone since
    the listing, storage errors beyond the retries) ends in a failure marker carrying the
    reason, in place of its last chunk: the driver then never commits it, and the chunks
    already read are dropped with the run's staging area. Other shards go on."""
    for row in batch.to_pylist():
        shard = Shard(**row)
        before = storage.transient_errors()
        previous = None
        try:
            for table in read_shard(shard, layout):
                if previous is not None:
                    yield previous
                previous = _with_read_columns(table, None)
        except MemoryError:
            raise
        except Exception as e:
            reason = redact_text(error_line(e, 500))
            logger.warning("shard %s could not be read and will not be committed: %s", shard.url, reason)
            if previous is not None:
                yield previous
            previous = _with_read_columns(failure_marker(shard, layout), reason)
        errors = [0] * previous.num_rows
        errors[0] = storage.transient_errors() - before
        yield previous.set_column(
            previous.schema.get_field_index(S.STORAGE_ERRORS), S.STORAGE_ERRORS, pa.array(errors, pa.int64())
        )


def _with_read_columns(table: pa.Table, failed: str | None) -> pa.Table:
    n = table.num_rows
    table = table.append_column(S.STORAGE_ERRORS, pa.array([0] * n, pa.int64()))
    return table.append_column(S.FAILED, pa.array([failed] * n, pa.string()))


class CpuStages:
    """Ray actor stage for CPU-only clusters: Tokenize, then Encode, then WriteParts, in turn.

    Each stage is given as ``(class or "module:Class", args, kwargs)`` and built once in the
    actor; by name, the driver need not import what only the actor runs (torch)."""

    def __init__(self, *stages: tuple[type | str, tuple, dict]) -> None:
        import importlib

        self.stages = []
        for cls, args, kwargs in stages:
            if isinstance(cls, str):
                module, _, name = cls.partition(":")
                cls = getattr(importlib.import_module(module), name)
            self.stages.append(cls(*args, **kwargs))

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch


def _cpu_encoders(config: JobConfig, nodes: list[dict]) -> tuple[float, int, int]:
    """Logical CPUs per CPU encoder actor, the most actors, and torch threads per actor.

    By default one single-threaded actor per core: on 2 cores two 1-thread encoders embed about
    13% more tokens per second than one 2-thread encoder (no thread barrier per operation, and a
    core lost to another process stalls one actor, not both). Each actor declares the share of
    a core that leaves the read and commit tasks room on the smallest node.
    """
    sizes = [n["Resources"].get("CPU", 0) for n in nodes if n.get("Alive")]
    sizes = [c for c in sizes if c >= 1] or [1.0]
    others = READ_CPUS + COMMIT_CPUS
    smallest = min(sizes)
    if config.cpus_per_actor is None:
        per = max(0.01, int((smallest - others) / smallest * 100) / 100)
    else:
        per = config.cpus_per_actor
    fit = [max(1, int((c - others) // per)) for c in sizes]
    max_actors = config.max_actors or sum(fit)
    if config.threads_per_actor:
        threads = config.threads_per_actor
    elif config.cpus_per_actor is None:
        # Fewer actors than cores (--max-actors) share the cores out as threads.
        threads = max(1, int(smallest // min(fit[sizes.index(smallest)], max_actors)))
    else:
        threads = max(1, int(per))
    return per, max_actors, threads


_started_ray = False  # whether _init_ray started the Ray this process is connected to


def _init_ray(config: JobConfig) -> None:
    global _started_ray
    import ray

    if ray.is_initialized():
        return
    # Join the cluster named by --ray-address or RAY_ADDRESS (set by `ray job submit`). Without
    # one, start a Ray for this run ("local"): a bare ray.init() would join whatever cluster
    # `ray start` last left in /tmp/ray, even a dead one. Its dashboard would only take CPU.
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    local = {}
    if not address:
        # Ray keeps one idle worker per CPU and kills any other after a second idle; but reads
        # and commits take a quarter of a CPU each, so a run restarted a worker process (about
        # a CPU-second each) for nearly every shard, taking the CPU from the encoders. Keep as
        # many as can run at once, plus Ray Data's own actors.
        cpus = os.cpu_count() or 1
        workers = int(cpus / min(READ_CPUS, COMMIT_CPUS)) + 4
        local = {"include_dashboard": False, "_system_config": {"num_workers_soft_limit": workers}}
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True, **local)
    _started_ray = not address


def stop_own_ray() -> bool:
    """Stop the local Ray a run of this process started, now rather than in Ray's exit hook
    (which first waits 0.5 s for late log lines). A Ray the caller started, or a cluster a run
    joined, is left alone. True if there was one to stop."""
    global _started_ray
    import ray

    if not (_started_ray and ray.is_initialized()):
        return False
    ray.shutdown()
    _started_ray = False
    return True


def cpu_flags_fast_bf16() -> bool | None:
    """``encode.cpu_has_fast_bf16`` from the kernel's CPU flags, without importing torch (a
    second and 300 MB in a driver that runs no model); None where there are no flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"amx_bf16", "avx512_bf16"} & set(flags))


def _probe(config: JobConfig, use_gpu: bool) -> dict[str, str]:
    """Ask a worker with the encoder's resources what device and dtype it would use."""
    import ray

    local = not use_gpu and not (config.ray_address or os.environ.get("RAY_ADDRESS"))
    # Ray runs on this machine: answer here rather than pay a worker start-up for it, and from
    # the CPU flags where they say, rather than import torch into the driver.
    fast = cpu_flags_fast_bf16() if local and config.device in ("auto", "cpu") else None
    if fast is not None:
        return {
            "device": "cpu",
            "dtype": config.dtype if config.dtype != "auto" else ("bfloat16" if fast else "float32"),
        }
    from embedding.encode import probe_hardware

    if local:
        return probe_hardware(config.device, config.dtype)
    resources = {"num_gpus": config.num_gpus} if use_gpu else {"num_cpus": 0}
    task = ray.remote(probe_hardware).options(**resources)
    return ray.get(task.remote("cuda" if use_gpu else config.device, config.dtype))


def identity_of(config: JobConfig, spec: ModelSpec, layout: InputLayout) -> dict:
    """The settings that decide what the vectors are; recorded in ``_job.json``."""
    return {
        "model": spec.source,
        "revision": spec.revision,
        "pooling": spec.pooling,
        "normalized": spec.normalize,
        "max_length": spec.max_length,
        "dtype": config.dtype,
        "output_dtype": config.output_dtype,
        "tokenizer": spec.tokenizer.kind,
        "text_column": config.text_column,
        "id_column": config.id_column,
        "id_type": layout.id_type,
        "keep_columns": list(config.keep_columns),
        "dim": spec.dim,
        "job_version": JOB_VERSION,
        # Recorded only where used, so outputs written before these settings existed keep their identity.
        **(
            {"chunk_tokens": config.chunk_tokens or spec.max_length, "chunk_overlap": config.chunk_overlap}
            if config.chunk
            else {}
        ),
        **({"keep_text": True} if config.keep_text else {}),
    }


def run(config: JobConfig) -> RunReport:
    """Bring ``config.output`` up to date with ``config.inputs``. Returns the run report.

    Unchanged committed shards are skipped without starting Ray; new and changed shards are
    embedded and committed one by one; see :mod:`embedding.ledger` and :mod:`embedding.write`.
    """
    started = time.monotonic()
    driver_errors = storage.transient_errors()
    check_output_outside_inputs(config)
    shards = list_inputs(config)
    with storage.access(config.model):
        spec = resolve_model(config.model, config.max_length)
    with storage.access(shards[0].url):
        layout = probe_layout(
            shards[0],
            text_column=config.text_column,
            id_column=config.id_column,
            id_type=config.id_type,
            keep_columns=config.keep_columns,
            format_override=config.format,
            chunk_rows=config.read_chunk_rows or MAX_READ_CHUNK_ROWS,
        )
    identity = identity_of(config, spec, layout)
    run_id = config.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    lease = ledger.Lease(config.output, run_id)
    with storage.access(config.output):
        lease.acquire()
    lease.keep_alive()
    report = RunReport(
        run_id=run_id,
        output=config.output,
        model=spec.source,
        revision=spec.revision,
        settings=config.to_dict(),
        gpu_hour_price=config.gpu_hour_price,
        estimated_cost=progress.estimated_cost(0.0, config.gpu_hour_price),
    )
    try:
        recorded = ledger.read_job(config.output)
        if not config.overwrite:
            ledger.check_job(config.output, identity, recorded)
        work = ledger.plan(
            shards, ledger.read_markers(config.output), ledger.settings_digest(identity), overwrite=config.overwrite
        )
        report.shards_seen = len(shards)
        report.shards_skipped = len(work.unchanged)
        report.shards_removed = len(work.removed)
        # Parts left by a run that died; the lease says no other run is writing them.
        storage.remove_tree(storage.join(config.output, STAGING))
        logger.info(
            "run %s: %d shard(s) in the inputs: %d committed and unchanged, %d to embedding (%d changed), "
            "%d gone from the inputs",
            run_id,
            len(shards),
            len(work.unchanged),
            len(work.todo),
            len(work.changed),
            len(work.removed),
        )
        if work.todo:
            _embed(config, spec, layout, identity, recorded, work, run_id, lease, report)
        if config.prune or config.overwrite:
            for key in work.removed:
                remove_shard_output(config.output, key, ledger.read_markers(config.output).get(key, []))
            report.shards_pruned = len(work.removed)
        report.status = "succeeded" if not report.shards_failed else "shards_failed"
        rows = report.rows_embedded + report.rows_rejected
        limit = config.max_rejected_fraction
        if limit is not None and rows and report.rows_rejected / rows > limit and not report.shards_failed:
            report.status = "rejected_over_threshold"
    except BaseException as e:
        report.status = "refused" if isinstance(e, ledger.OutputMismatchError) else "failed"
        raise
    finally:
        report.storage_errors_retried += storage.transient_errors() - driver_errors
        report.rows_in = report.rows_embedded + report.rows_rejected
        report.wall_seconds = round(time.monotonic() - started, 3)
        if report.wall_seconds:
            report.rows_per_second = round(report.rows_in / report.wall_seconds, 1)
            report.tokens_per_second = round(report.tokens / report.wall_seconds, 1)
        if report.padded_tokens:
            report.padding_efficiency = round(report.tokens / report.padded_tokens, 4)
        try:
            storage.write_bytes_atomic(storage.join(config.output, RUNS, f"{run_id}.json"), report.to_json().encode())
        finally:
            lease.release()
    if report.status == "shards_failed":
        key, why = next(iter(report.failed_shards.items()))
        raise ShardsFailedError(
            f"{report.shards_failed} of {len(work.todo)} shard(s) to embed could not be read and are not committed "
            f"(e.g. {key}: {why}); every other shard is committed. {storage.join(config.output, RUNS, run_id)}.json "
            "lists them with their reasons; the next run tries them again",
            report,
        )
    if report.status == "rejected_over_threshold":
        raise TooManyRejectedError(
            f"{report.rows_rejected} of {report.rows_in} rows ({report.rows_rejected / report.rows_in:.1%}) were "
            f"rejected, over --max-rejected-fraction {config.max_rejected_fraction}; the good rows are committed, "
            f"the rejected ones are in {storage.join(config.output, '_rejected')}/ with their reasons",
            report,
        )
    return report


def _embed(
    config: JobConfig,
    spec: ModelSpec,
    layout: InputLayout,
    identity: dict,
    recorded: dict | None,
    work: ledger.Plan,
    run_id: str,
    lease: ledger.Lease,
    report: RunReport,
) -> None:
    """Run the Ray Data pipeline over ``work.todo`` and commit each shard as it completes."""
    import ray
    from ray.data import ActorPoolStrategy

    from embedding.batching import DEFAULT_WINDOW_ROWS
    from embedding.tokenize import ChunkSpec, Tokenize

    chunk = None
    if config.chunk:
        chunk = ChunkSpec(tokens=config.chunk_tokens or spec.max_length, overlap=config.chunk_overlap)
        if chunk.tokens > spec.max_length:
            raise ConfigError(
                f"`chunk_tokens` {chunk.tokens} exceeds model {spec.source}'s limit of {spec.max_length} tokens"
            )
    chunk_metadata = {"chunk_tokens": chunk.tokens, "chunk_overlap": chunk.overlap} if chunk else {}

    _init_ray(config)
    gpus = ray.cluster_resources().get("GPU", 0) if config.device != "cpu" else 0
    use_gpu = gpus > 0
    hw = _probe(config, use_gpu)
    report.device, report.dtype = hw["device"], hw["dtype"]
    if config.attention == "varlen" and hw["device"] != "cuda":
        raise ConfigError("`attention` 'varlen' (flash attention over packed tokens) needs GPU encoders")
    identity = {**identity, "compute_dtype": hw["dtype"]}
    if recorded is not None and not config.overwrite:
        ledger.check_job(config.output, identity, recorded, fields=("compute_dtype",))
    if recorded is None or (not config.overwrite and recorded != identity):
        ledger.write_job(config.output, identity)

    out_format = S.OutputFormat(
        id_type=layout.id_type,
        dim=spec.dim,
        output_dtype=config.output_dtype,
        keep_types=layout.keep_types,
        metadata=S.build_metadata(
            model=spec.source,
            revision=spec.revision,
            dim=spec.dim,
            pooling=spec.pooling,
            normalized=spec.normalize,
            compute_dtype=hw["dtype"],
            output_dtype=config.output_dtype,
            max_length=spec.max_length,
            tokenizer=spec.tokenizer.kind,
            job_version=JOB_VERSION,
            **chunk_metadata,
        ),
        chunked=chunk is not None,
        keep_text=config.keep_text,
    )
    staging = storage.join(config.output, STAGING, run_id)
    logger.info(
        "embedding %d shard(s) with %s@%s on %s/%s",
        len(work.todo),
        spec.source,
        spec.revision[:12],
        hw["device"],
        hw["dtype"],
    )

    if use_gpu:
        max_actors = config.max_actors or max(1, int(gpus / config.num_gpus))
        min_actors = min(config.min_actors or 1, max_actors)
        encoder_resources = {"num_gpus": config.num_gpus}
        threads = config.threads_per_actor
    else:
        cpus, max_actors, threads = _cpu_encoders(config, ray.nodes())
        min_actors = min(config.min_actors or max_actors, max_actors)
        encoder_resources = {"num_cpus": cpus}

    window_rows = config.window_rows or DEFAULT_WINDOW_ROWS["cuda" if use_gpu else "cpu"]
    # A block is what one encoder call is handed at once: blocks no larger than a window let
    # the last windows of a run spread over the actors instead of queueing on one.
    layout = dataclasses.replace(layout, chunk_rows=config.read_chunk_rows or min(MAX_READ_CHUNK_ROWS, window_rows))
    # Before the Dataset exists: it copies Ray Data's context (progress bars on or off).
    tracker = progress.for_run(config, work.todo, report)
    # Ray Data would read every map worker's USS from /proc each second: CPU the encoders need.
    ray.data.DataContext.get_current().memory_usage_poll_interval_s = None
    items = [asdict(s) for s in work.todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Reads take a CPU share unlike the next stage's, so that Ray does not fuse them into its
    # actors: reads run as parallel tasks, ahead of the actors.
    ds = ds.map_batches(
        _read_stage, fn_kwargs={"layout": layout}, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS
    )
    tokenize = (Tokenize, (spec.tokenizer,), {"chunk": chunk, "keep_text": config.keep_text})
    encode = (
        "embedding.encode:Encode",
        (spec,),
        {
            "device": "cuda" if use_gpu else "cpu",
            "dtype": hw["dtype"],
            "threads": threads,
            "batch_tokens": config.batch_tokens,
            "batch_rows": config.batch_rows,
            "output_dtype": config.output_dtype,
            "attention": config.attention,
            "fault_injection": config.fault_injection,
        },
    )
    write = (WriteParts, (staging, out_format), {})
    # On CPU an actor is handed one window at a time: with more queued on it, the last
    # windows could wait behind a busy actor while another one idles.
    encoders = ActorPoolStrategy(
        min_size=min_actors, max_size=max_actors, max_tasks_in_flight_per_actor=None if use_gpu else 1
    )
    if not use_gpu:
        ds = ds.map_batches(
            CpuStages,
            fn_constructor_args=(tokenize, encode, write),
            batch_size=window_rows,
            batch_format="pyarrow",
            compute=encoders,
            **encoder_resources,
        )
    else:
        from embedding.encode import Encode

        encode = (Encode, *encode[1:])
        for (cls, args, kwargs), batch_size, compute, resources in (
            (
                tokenize,
                window_rows,
                ActorPoolStrategy(min_size=1, max_size=config.tokenizer_actors),
                {"num_cpus": config.tokenizer_cpus},
            ),
            (encode, window_rows, encoders, encoder_resources),
            (write, None, ActorPoolStrategy(min_size=1, max_size=2), {"num_cpus": 0.25}),
        ):
            ds = ds.map_batches(
                cls,
                fn_constructor_args=args,
                fn_constructor_kwargs=kwargs,
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=compute,
                **resources,
            )

    by_key = {s.key: s for s in work.todo}
    commit = ray.remote(commit_shard).options(num_cpus=COMMIT_CPUS, max_retries=3)
    staged: dict[str, int] = {}
    # Output rows staged and expected per shard; they differ only while a chunked shard has
    # documents whose later passages are not staged yet.
    passages: dict[str, list[int]] = {}
    totals: dict[str, int] = {}
    pending: dict[str, ray.ObjectRef] = {}
    done: dict[str, tuple[CommitTask, CommitResult]] = {}
    tasks: dict[str, CommitTask] = {}
    hashes: list = []
    hashed = 0
    failed: dict[str, str] = {}

    def start_commit(key: str) -> None:
        tasks[key] = CommitTask(
            output=config.output,
            staging=staging,
            shard=by_key[key],
            total=totals[key],
            out_format=out_format,
            digest=work.digests[key],
            stale=tuple(work.stale.get(key, ())),
            run_id=run_id,
            deferred=config.overwrite,
        )
        pending[key] = commit.remote(tasks[key])

    def collect(timeout: float | None) -> None:
        nonlocal hashed
        keys = list(pending)
        refs = [pending[k] for k in keys]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        ready_set = set(ready)
        for key, ref in zip(keys, refs, strict=True):
            if ref in ready_set:
                result = ray.get(pending.pop(key))
                if hashed + result.rows <= MAX_HASHED_IDS:
                    hashes.append(result.id_hashes)
                    hashed += result.rows
                result = dataclasses.replace(result, id_hashes=None)
                done[key] = (tasks[key], result)
                _account(report, result, replaced=key in work.changed)

    for meta in tracker.track(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        for row in meta.to_pylist():
            tracker.observe(row)
            report.storage_errors_retried += row["storage_errors"]
            report.padded_tokens += row["padded_tokens"]
            key = row["shard"]
            if row["failed"] is not None:
                failed.setdefault(key, row["failed"])
            staged[key] = staged.get(key, 0) + row["rows"] + row["rejected"]
            counts = passages.setdefault(key, [0, 0])
            counts[0] += row["passages"]
            counts[1] += row["passages_expected"]
            if row["total"] >= 0:
                totals[key] = row["total"]
            if (
                key in totals
                and key not in failed
                and key not in pending
                and key not in done
                and staged[key] >= totals[key]
                and counts[0] >= counts[1]
            ):
                start_commit(key)
        collect(timeout=0)
        lease.renew()
    report.shards_failed = len(failed)
    report.failed_shards = dict(itertools.islice(failed.items(), MAX_FAILED_LISTED))

    missing = [k for k in by_key if k not in totals and k not in failed]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shard(s) never reported their end (e.g. {missing[0]}); nothing was "
            "committed for them. Rerun to complete the output"
        )
    for key in totals:
        if key not in pending and key not in done and key not in failed:
            start_commit(key)
    while pending:
        collect(timeout=10)
        lease.renew()
    tracker.finish()

    _count_duplicates(report, hashes, hashed)
    if config.overwrite:
        if failed:
            key = next(iter(failed))
            raise RuntimeError(
                f"{len(failed)} shard(s) could not be read (e.g. {key}: {failed[key]}); --overwrite replaces the "
                "output only as a whole, so nothing was replaced. Fix or remove them and rerun"
            )
        # Everything is staged; now swap it in, one atomic replace per file. Shards gone from
        # the inputs leave first, so a crash here leaves no file of the old settings behind
        # that a later run would keep (unpublished shards still carry old markers and are redone).
        markers = ledger.read_markers(config.output)
        for key in work.removed:
            remove_shard_output(config.output, key, markers.get(key, []))
        ledger.write_job(config.output, identity)
        for task, result in done.values():
            publish_deferred(dataclasses.replace(task, stale=tuple(markers.get(task.shard.key, ()))), result)
    # The lease is ours, so the whole staging area is this run's: leave no empty `_staging/`.
    storage.remove_tree(storage.join(config.output, STAGING))


def _count_duplicates(report: RunReport, hashes: list, hashed: int) -> None:
    """Rows of this run whose id occurs more than once, across shards (exact up to 2^-64)."""
    import numpy as np

    if hashes and hashed == report.rows_embedded:
        _, counts = np.unique(np.concatenate(hashes), return_counts=True)
        report.duplicate_ids = int(counts[counts > 1].sum())
    elif hashes:
        logger.warning("duplicate ids were counted within shards only: the run has over %d rows", MAX_HASHED_IDS)
    if report.duplicate_ids:
        logger.warning(
            "%d embedded rows share their id with another row of this run (e.g. %s)",
            report.duplicate_ids,
            ", ".join(report.duplicate_examples) or "across shards",
        )


def _account(report: RunReport, result: CommitResult, *, replaced: bool) -> None:
    report.shards_embedded += 1
    report.storage_errors_retried += result.storage_errors
    report.tokens += result.tokens
    report.rows_truncated += result.truncated
    report.duplicate_ids += result.duplicate_ids
    report.duplicate_examples = (report.duplicate_examples + list(result.duplicate_examples))[:10]
    report.shards_replaced += int(replaced)
    report.rows_embedded += result.rows
    report.passages_embedded += result.passages
    report.rows_rejected += result.rejected
    for reason, n in result.reasons.items():
        report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + n
