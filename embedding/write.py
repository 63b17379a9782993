"""Parquet output with the declared schema, and the commit protocol.

Layout under the output prefix::

    <key>.parquet                 committed rows of input shard <key> (extension replaced)
    _rejected/<key>.parquet       rows of that shard that could not be embedded, with reasons
    _staging/<run-id>/<shard>/    parts written by the write stage, not yet committed
    _runs/<run-id>.json           the run report

Protocol. The write stage stores each batch's rows, split by shard, as *parts* under
``_staging``. A part's name is a digest of the shard and the row numbers it holds, so a
retried task rewrites the same name. Once the parts of a shard hold all its rows (its row
count arrives with its last chunk), :func:`commit_shard` reads them, drops rows seen twice
(a re-executed task whose batch was cut differently), checks that every row number from 0 to
the count is present exactly once as data or as a rejected row, and publishes
``<key>.parquet`` with one atomic write (local rename, or one completed S3 upload). Readers of
the prefix skip ``_``/``.`` paths (the Hive/Spark and ``pyarrow.dataset`` convention), so they
only ever see whole shard files, each row once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedding import ledger, storage
from embedding import schema as S
from embedding.storage import Shard

logger = logging.getLogger(__name__)

STAGING = "_staging"
REJECTED = "_rejected"
RUNS = "_runs"


class IncompleteShardError(RuntimeError):
    """The staged parts of a shard do not hold every one of its rows."""


def output_key(shard_key: str) -> str:
    """``news/part-0.jsonl.gz`` -> ``news/part-0.parquet``."""
    name = shard_key
    for _ in range(2):
        base, ext = posixpath.splitext(name)
        if ext.lower() in (".gz", ".zst", ".zstd", *storage.FORMAT_EXTENSIONS):
            name = base
    return name + ".parquet"


def shard_dir(staging: str, shard_key: str) -> str:
    digest = hashlib.sha256(shard_key.encode()).hexdigest()[:20]
    return storage.join(staging, digest)


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _part_name(prefix: str, shard_key: str, rows: np.ndarray) -> str:
    digest = hashlib.sha256(shard_key.encode() + np.sort(rows).astype("<i8").tobytes()).hexdigest()[:24]
    return f"{prefix}-{digest}.parquet"


class WriteParts:
    """Stage: stage a batch's rows as parts; return one small metadata row per shard.

    The returned rows (``shard``, ``rows``, ``rejected``, ``total``, ``tokens``) are all the
    driver needs to decide when a shard can be committed.
    """

    def __init__(self, staging: str, out_format: S.OutputFormat) -> None:
        self.staging = staging
        self.format = out_format
        self.schema = out_format.schema()
        self.keep = [name for name, _ in out_format.keep_types]

    def __call__(self, batch: pa.Table) -> pa.Table:
        meta: dict[str, list] = {"shard": [], "rows": [], "rejected": [], "total": [], "tokens": []}
        shards = batch[S.SHARD].to_numpy(zero_copy_only=False)
        for key in np.unique(shards):
            part = batch.filter(pa.array(shards == key))
            real = pc.invert(part[S.MARKER])
            good = pc.and_(real, pc.is_null(part[S.REJECT]))
            bad = pc.and_(real, pc.is_valid(part[S.REJECT]))
            directory = shard_dir(self.staging, key)
            n_good = self._stage_good(directory, key, part.filter(good))
            n_bad = self._stage_rejected(directory, key, part.filter(bad))
            meta["shard"].append(key)
            meta["rows"].append(n_good)
            meta["rejected"].append(n_bad)
            meta["total"].append(int(pc.max(part[S.TOTAL]).as_py()))
            meta["tokens"].append(
                int(pc.sum(part[S.NUM_TOKENS]).as_py() or 0) if S.NUM_TOKENS in part.column_names else 0
            )
        return pa.table(
            meta,
            schema=pa.schema(
                [
                    ("shard", pa.string()),
                    ("rows", pa.int64()),
                    ("rejected", pa.int64()),
                    ("total", pa.int64()),
                    ("tokens", pa.int64()),
                ]
            ),
        )

    def _stage_good(self, directory: str, key: str, rows: pa.Table) -> int:
        if rows.num_rows == 0:
            return 0
        columns = {S.ROW: rows[S.ROW], S.NUM_TOKENS: rows[S.NUM_TOKENS], S.TRUNCATED: rows[S.TRUNCATED]}
        for field in self.schema:
            columns[field.name] = rows[field.name].cast(field.type)
        table = pa.table(columns)
        name = _part_name("part", key, rows[S.ROW].to_numpy())
        storage.write_bytes_atomic(storage.join(directory, name), _table_bytes(table))
        return rows.num_rows

    def _stage_rejected(self, directory: str, key: str, rows: pa.Table) -> int:
        if rows.num_rows == 0:
            return 0
        reasons = rows[S.REJECT].to_pylist()
        ids = rows[S.ID].to_pylist()
        texts = rows[S.TEXT].to_pylist()
        table = pa.table(
            {
                "shard": [key] * rows.num_rows,
                "row": rows[S.ROW],
                "id": [None if i is None else str(i) for i in ids],
                "reason": [r.split(":", 1)[0] for r in reasons],
                "message": [r.split(":", 1)[1].strip() if ":" in r else r for r in reasons],
                "text": [None if t is None else t[: S.REJECTED_TEXT_CAP] for t in texts],
            },
            schema=S.rejected_schema(),
        )
        name = _part_name("rejected", key, rows[S.ROW].to_numpy())
        storage.write_bytes_atomic(storage.join(directory, name), _table_bytes(table))
        return rows.num_rows


@dataclass(frozen=True)
class CommitTask:
    """One shard to publish; built by the driver, run as a small Ray task."""

    output: str
    staging: str
    shard: Shard
    total: int
    out_format: S.OutputFormat
    digest: str  # this version's marker digest
    stale: tuple[str, ...]  # marker digests of older versions, deleted after the commit
    run_id: str
    deferred: bool = False  # --overwrite: write into staging; the driver publishes all at the end


@dataclass(frozen=True)
class CommitResult:
    shard: str
    rows: int
    rejected: int
    path: str
    reasons: dict[str, int]
    tokens: int = 0
    truncated: int = 0
    duplicate_ids: int = 0  # rows whose id another row of this shard has too
    duplicate_examples: tuple[str, ...] = ()
    id_hashes: object = None  # uint64 array of the ids, for the run-wide duplicate count


def _read_parts(urls: list[str]) -> pa.Table | None:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in urls]
    if not tables:
        return None
    return pa.concat_tables(tables)


def _dedupe(table: pa.Table, row_column: str) -> pa.Table:
    rows = table[row_column].to_numpy()
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    return table.take(pa.array(order[first]))


def commit_shard(task: CommitTask) -> CommitResult:
    """Publish one shard: merge its parts, verify every row is there once, write atomically,
    then record the shard's marker and drop the markers of its older versions."""
    key = task.shard.key
    directory = shard_dir(task.staging, key)
    schema = task.out_format.schema()
    good = _read_parts(storage.list_files(directory, "part-*.parquet"))
    good = (
        _dedupe(good, S.ROW)
        if good is not None
        else schema.empty_table()
        .append_column(S.ROW, pa.array([], pa.int64()))
        .append_column(S.NUM_TOKENS, pa.array([], pa.int32()))
        .append_column(S.TRUNCATED, pa.array([], pa.bool_()))
    )
    bad = _read_parts(storage.list_files(directory, "rejected-*.parquet"))
    bad = _dedupe(bad, "row") if bad is not None else S.rejected_schema().empty_table()

    seen = np.concatenate([good[S.ROW].to_numpy(), bad["row"].to_numpy()])
    if len(seen) != task.total or (task.total and not np.array_equal(np.sort(seen), np.arange(task.total))):
        missing = np.setdiff1d(np.arange(task.total), seen)
        raise IncompleteShardError(
            f"shard {key}: staged parts hold {len(np.unique(seen))} of {task.total} rows "
            f"(missing e.g. {missing[:5].tolist()}); nothing was committed for it"
        )
    tokens = int(pc.sum(good[S.NUM_TOKENS]).as_py() or 0)
    truncated = int(pc.sum(good[S.TRUNCATED].cast(pa.int64())).as_py() or 0)
    good = good.drop_columns([S.ROW, S.NUM_TOKENS, S.TRUNCATED]).cast(schema)
    dup_count, dup_examples = _duplicates(good[S.ID])
    root = deferred_root(task.staging) if task.deferred else task.output
    path = storage.join(root, output_key(key))
    rejected_path = storage.join(root, REJECTED, output_key(key))
    with storage.atomic_open(path) as f:
        pq.write_table(good, f, compression="zstd")
    if bad.num_rows:
        with storage.atomic_open(rejected_path) as f:
            pq.write_table(bad.sort_by("row"), f, compression="zstd")
    elif not task.deferred:
        storage.remove([rejected_path])  # an older version's rejects no longer apply
    reasons = (
        {str(r["values"]): int(r["counts"]) for r in pc.value_counts(bad["reason"]).to_pylist()} if bad.num_rows else {}
    )
    result = CommitResult(
        shard=key,
        rows=good.num_rows,
        rejected=bad.num_rows,
        path=path,
        reasons=reasons,
        tokens=tokens,
        truncated=truncated,
        duplicate_ids=dup_count,
        duplicate_examples=dup_examples,
        id_hashes=id_hashes(good[S.ID]),
    )
    if not task.deferred:
        record_commit(task, result)
    storage.remove_tree(directory)
    return result


def _duplicates(ids: pa.ChunkedArray) -> tuple[int, tuple[str, ...]]:
    """Rows whose id occurs more than once in this shard, and a few such ids."""
    if len(ids) == 0:
        return 0, ()
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    n = int(pc.sum(repeated.field("counts")).as_py() or 0)
    return n, tuple(str(v) for v in repeated.field("values").to_pylist()[:5])


def id_hashes(ids: pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of ids, to count duplicates across shards without holding the ids."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids.to_pylist(), dtype=object)).astype(np.uint64)


def deferred_root(staging: str) -> str:
    return storage.join(staging, "_final")


def record_commit(task: CommitTask, result: CommitResult) -> None:
    ledger.write_marker(
        task.output,
        task.shard.key,
        task.digest,
        {
            "shard": task.shard.url,
            "size": task.shard.size,
            "fingerprint": task.shard.fingerprint,
            "rows": result.rows,
            "rejected": result.rejected,
            "run_id": task.run_id,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    ledger.delete_markers(task.output, task.shard.key, [d for d in task.stale if d != task.digest])


def publish_deferred(task: CommitTask, result: CommitResult) -> None:
    """--overwrite: move a shard's staged files into place (one atomic replace each), then mark it."""
    okey = output_key(task.shard.key)
    root = deferred_root(task.staging)
    staged_rejected = storage.join(root, REJECTED, okey)
    storage.move(storage.join(root, okey), storage.join(task.output, okey))
    if result.rejected:
        storage.move(staged_rejected, storage.join(task.output, REJECTED, okey))
    else:
        storage.remove([storage.join(task.output, REJECTED, okey)])
    record_commit(task, result)


def remove_shard_output(output: str, key: str, digests: list[str]) -> None:
    """--prune (and --overwrite): a shard gone from the inputs leaves the output."""
    okey = output_key(key)
    storage.remove([storage.join(output, okey), storage.join(output, REJECTED, okey)])
    ledger.delete_markers(output, key, digests)
