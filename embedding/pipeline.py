"""The one place that wires Ray Data: stages, actor pools, resources, and the commit loop.

::

    shards (listed on the driver)
      │  from_items, one block per shard
      ▼
    read_shards        CPU tasks      file -> Arrow chunks {id, text, row, ...}; bad rows flagged
      ▼
    Tokenize           CPU actors     text -> token ids (sentencepiece + fairseq offset)
      ▼
    Encode             GPU actors     ids -> vectors (length-sorted, token-budget batches)
      │                (CPU actors with explicit threads where the cluster has no GPU)
      ▼
    WriteParts         CPU tasks      rows -> staged parts under _staging/, one metadata row out
      ▼
    driver             streams the metadata; commits each shard as soon as all its rows are
                       staged (commit_shard, a small Ray task); writes _runs/<run-id>.json

Backpressure is Ray Data's streaming executor: no stage materialises the corpus.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from embedding import schema as S
from embedding import storage
from embedding.config import JobConfig
from embedding.model import ModelSpec, resolve_model
from embedding.read import InputLayout, probe_layout, read_shard
from embedding.storage import Shard
from embedding.write import RUNS, STAGING, CommitResult, WriteParts, commit_shard, output_key

logger = logging.getLogger(__name__)

JOB_VERSION = "0.1.0"


@dataclass
class RunReport:
    """What a run did; written to ``_runs/<run_id>.json`` and printed by the CLI."""

    run_id: str
    output: str
    model: str
    revision: str
    device: str
    dtype: str
    shards_seen: int = 0
    shards_committed: int = 0
    rows_in: int = 0
    rows_embedded: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    wall_seconds: float = 0.0
    rows_per_second: float = 0.0
    tokens_per_second: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2, sort_keys=True)


class ConfigError(ValueError):
    """The run cannot start as configured; the message says why."""


def list_inputs(config: JobConfig) -> list[Shard]:
    """All shards of all inputs, with keys unique across inputs."""
    shards: list[Shard] = []
    for uri in config.inputs:
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
    """Ray task body: each row of ``batch`` names one shard; yield its chunks."""
    for row in batch.to_pylist():
        yield from read_shard(Shard(**row), layout)


def _init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    # Without an address, start a Ray for this run ("local"): a bare ray.init() would join
    # whatever cluster `ray start` last left in /tmp/ray, even a dead one. Its dashboard would
    # only take CPU from the job.
    local = {} if address else {"include_dashboard": False}
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True, **local)


def _probe(config: JobConfig, use_gpu: bool) -> dict[str, str]:
    """Ask a worker with the encoder's resources what device and dtype it would use."""
    import ray

    from embedding.encode import probe_hardware

    if not use_gpu and not (config.ray_address or os.environ.get("RAY_ADDRESS")):
        # Ray runs on this machine: ask here rather than pay a worker start-up for the answer.
        return probe_hardware(config.device, config.dtype)
    resources = {"num_gpus": config.num_gpus} if use_gpu else {"num_cpus": 0}
    task = ray.remote(probe_hardware).options(**resources)
    return ray.get(task.remote("cuda" if use_gpu else config.device, config.dtype))


def run(config: JobConfig) -> RunReport:
    """Embed every shard of ``config.inputs`` into ``config.output``. Returns the run report."""
    import ray
    from ray.data import ActorPoolStrategy

    from embedding.encode import DEFAULT_WINDOW_ROWS, Encode
    from embedding.tokenize import Tokenize

    started = time.monotonic()
    check_output_outside_inputs(config)
    shards = list_inputs(config)
    spec: ModelSpec = resolve_model(config.model, config.max_length)
    layout = probe_layout(
        shards[0],
        text_column=config.text_column,
        id_column=config.id_column,
        id_type=config.id_type,
        keep_columns=config.keep_columns,
        format_override=config.format,
        chunk_rows=config.read_chunk_rows,
    )

    _init_ray(config)
    gpus = ray.cluster_resources().get("GPU", 0) if config.device != "cpu" else 0
    use_gpu = gpus > 0
    hw = _probe(config, use_gpu)
    run_id = config.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
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
        ),
    )
    staging = storage.join(config.output, STAGING, run_id)
    report = RunReport(
        run_id=run_id,
        output=config.output,
        model=spec.source,
        revision=spec.revision,
        device=hw["device"],
        dtype=hw["dtype"],
        shards_seen=len(shards),
        settings=config.to_dict(),
    )
    logger.info(
        "run %s: %d shard(s) -> %s with %s@%s on %s/%s",
        run_id,
        len(shards),
        config.output,
        spec.source,
        spec.revision[:12],
        hw["device"],
        hw["dtype"],
    )

    if use_gpu:
        max_actors = config.max_actors or max(1, int(gpus / config.num_gpus))
        encoder_resources = {"num_gpus": config.num_gpus}
        threads = config.threads_per_actor
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
        # Logical CPUs the other stages hold (tokenizers, a read task, the writers): encoders
        # that assumed them free could never all start.
        others = config.tokenizer_actors * config.tokenizer_cpus + 0.25 + 2 * 0.25
        max_actors = config.max_actors or max(1, int((cpus - others) // config.cpus_per_actor))
        encoder_resources = {"num_cpus": config.cpus_per_actor}
        # ...but they use little of them, so torch's threads are sized to the cores: on 2 cores
        # one encoder with 2 threads, not 1 thread and an idle core.
        threads = config.threads_per_actor or max(1, int(cpus // max_actors))
    min_actors = min(config.min_actors, max_actors)

    window_rows = config.window_rows or DEFAULT_WINDOW_ROWS["cuda" if use_gpu else "cpu"]
    items = [asdict(s) for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_stage, fn_kwargs={"layout": layout}, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_args=(spec.tokenizer,),
        batch_size=window_rows,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=config.tokenizer_actors),
        num_cpus=config.tokenizer_cpus,
    )
    ds = ds.map_batches(
        Encode,
        fn_constructor_args=(spec,),
        fn_constructor_kwargs={
            "device": "cuda" if use_gpu else "cpu",
            "dtype": hw["dtype"],
            "threads": threads,
            "batch_tokens": config.batch_tokens,
            "batch_rows": config.batch_rows,
            "output_dtype": config.output_dtype,
        },
        batch_size=window_rows,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        **encoder_resources,
    )
    ds = ds.map_batches(
        WriteParts,
        fn_constructor_args=(staging, out_format),
        batch_size=None,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.25,
    )

    commit = ray.remote(commit_shard).options(num_cpus=0.25, max_retries=3)
    staged: dict[str, int] = {}
    totals: dict[str, int] = {}
    pending: dict[str, ray.ObjectRef] = {}
    committed: set[str] = set()

    def maybe_commit(key: str) -> None:
        if key in pending or key in committed or key not in totals:
            return
        if staged.get(key, 0) >= totals[key]:
            pending[key] = commit.remote(config.output, staging, key, totals[key], out_format)

    for meta in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in meta.to_pylist():
            key = row["shard"]
            staged[key] = staged.get(key, 0) + row["rows"] + row["rejected"]
            if row["total"] >= 0:
                totals[key] = row["total"]
            report.tokens += row["tokens"]
            maybe_commit(key)
        done = [k for k, ref in pending.items() if ray.wait([ref], timeout=0)[0]]
        for key in done:
            _account(report, ray.get(pending.pop(key)))
            committed.add(key)

    missing = [s.key for s in shards if s.key not in totals]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shard(s) never reported their end (e.g. {missing[0]}); nothing was "
            "committed for them. Rerun to complete the output"
        )
    for key in totals:
        if key not in pending and key not in committed:
            pending[key] = commit.remote(config.output, staging, key, totals[key], out_format)
    for key, ref in pending.items():
        _account(report, ray.get(ref))
        committed.add(key)
    storage.remove_tree(staging)

    report.shards_committed = len(committed)
    report.rows_in = report.rows_embedded + report.rows_rejected
    report.wall_seconds = round(time.monotonic() - started, 3)
    report.rows_per_second = round(report.rows_in / report.wall_seconds, 1) if report.wall_seconds else 0.0
    report.tokens_per_second = round(report.tokens / report.wall_seconds, 1) if report.wall_seconds else 0.0
    storage.write_bytes_atomic(storage.join(config.output, RUNS, f"{run_id}.json"), report.to_json().encode())
    return report


def _account(report: RunReport, result: CommitResult) -> None:
    report.rows_embedded += result.rows
    report.rows_rejected += result.rejected
    for reason, n in result.reasons.items():
        report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + n
