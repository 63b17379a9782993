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

Passages (chunked runs). One input row becomes several output rows, keyed by (row, passage),
and each carries its document's passage count (``__passages``). Parts are named by their
(row, passage) keys; the commit drops (row, passage) pairs seen twice, checks the *set* of
input rows exactly as above (each row present once, as passages or as a rejected row), and
checks that each row's passages are exactly ``0 .. __passages - 1``. The write stage reports
the documents it staged (their passage 0) and the passages staged and expected, so the driver
only commits a shard once all of its passages are staged, not just a first passage per row.
"""

from __future__ import annotations

import dataclasses
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


def _row_keys(rows: np.ndarray, passages: np.ndarray | None) -> np.ndarray:
    """(row, passage) as one int64 per output row; just the row where there are no passages."""
    rows = rows.astype(np.int64)
    return rows if passages is None else (rows << 32) | passages.astype(np.int64)


def _part_name(prefix: str, shard_key: str, keys: np.ndarray) -> str:
    digest = hashlib.sha256(shard_key.encode() + np.sort(keys).astype("<i8").tobytes()).hexdigest()[:24]
    return f"{prefix}-{digest}.parquet"


class WriteParts:
    """Stage: stage a batch's rows as parts; return one small metadata row per shard.

    The returned rows (``shard``, ``rows``, ``rejected``, ``total``, ``tokens``, ``passages``,
    ``passages_expected``) are all the driver needs to decide when a shard can be committed;
    ``padded_tokens`` (the forward passes' widths summed over the rows) is for the run report;
    ``failed`` is why the shard could not be read, where its failure marker is in the batch.
    ``rows`` counts input rows (documents) staged; ``passages`` counts output rows staged and
    ``passages_expected`` the passages of the documents staged here (equal without chunking).
    """

    def __init__(self, staging: str, out_format: S.OutputFormat) -> None:
        self.staging = staging
        self.format = out_format
        self.schema = out_format.schema()
        self.keep = [name for name, _ in out_format.keep_types]

    def __call__(self, batch: pa.Table) -> pa.Table:
        meta: dict[str, list] = {
            "shard": [],
            "rows": [],
            "rejected": [],
            "total": [],
            "tokens": [],
            "padded_tokens": [],
            "passages": [],
            "passages_expected": [],
            "storage_errors": [],
            "failed": [],
        }
        errors_before = storage.transient_errors()
        shards = batch[S.SHARD].to_numpy(zero_copy_only=False)
        for key in np.unique(shards):
            part = batch.filter(pa.array(shards == key))
            real = pc.invert(part[S.MARKER])
            good = pc.and_(real, pc.is_null(part[S.REJECT]))
            bad = pc.and_(real, pc.is_valid(part[S.REJECT]))
            directory = shard_dir(self.staging, key)
            good_rows = part.filter(good)
            n_good = self._stage_good(directory, key, good_rows)
            n_bad = self._stage_rejected(directory, key, part.filter(bad))
            meta["shard"].append(key)
            if self.format.chunked:
                first = good_rows.filter(pc.equal(good_rows[S.PASSAGE], 0))
                meta["rows"].append(first.num_rows)
                meta["passages_expected"].append(int(pc.sum(first[S.PASSAGES]).as_py() or 0))
            else:
                meta["rows"].append(n_good)
                meta["passages_expected"].append(n_good)
            meta["passages"].append(n_good)
            meta["rejected"].append(n_bad)
            meta["total"].append(int(pc.max(part[S.TOTAL]).as_py()))
            meta["tokens"].append(
                int(pc.sum(part[S.NUM_TOKENS]).as_py() or 0) if S.NUM_TOKENS in part.column_names else 0
            )
            # Over the rows that went through a forward pass (good ones, not rejected ones).
            meta["padded_tokens"].append(
                int(pc.sum(part[S.PASS_WIDTH]).as_py() or 0) if S.PASS_WIDTH in part.column_names else 0
            )
            # Errors the reader of this shard retried ride on its rows; add this stage's own.
            errors = part[S.STORAGE_ERRORS] if S.STORAGE_ERRORS in part.column_names else pa.array([0])
            meta["storage_errors"].append(int(pc.sum(errors).as_py() or 0))
            reasons = part[S.FAILED].drop_null() if S.FAILED in part.column_names else []
            meta["failed"].append(reasons[0].as_py() if len(reasons) else None)
        if meta["storage_errors"]:
            meta["storage_errors"][-1] += storage.transient_errors() - errors_before
        return pa.table(
            meta,
            schema=pa.schema(
                [
                    ("shard", pa.string()),
                    ("rows", pa.int64()),
                    ("rejected", pa.int64()),
                    ("total", pa.int64()),
                    ("tokens", pa.int64()),
                    ("padded_tokens", pa.int64()),
                    ("passages", pa.int64()),
                    ("passages_expected", pa.int64()),
                    ("storage_errors", pa.int64()),
                    ("failed", pa.string()),
                ]
            ),
        )

    def _stage_good(self, directory: str, key: str, rows: pa.Table) -> int:
        if rows.num_rows == 0:
            return 0
        columns = {S.ROW: rows[S.ROW], S.NUM_TOKENS: rows[S.NUM_TOKENS], S.TRUNCATED: rows[S.TRUNCATED]}
        if self.format.chunked:
            columns[S.PASSAGES] = rows[S.PASSAGES]
        for field in self.schema:
            columns[field.name] = rows[field.name].cast(field.type)
        table = pa.table(columns)
        passages = rows[S.PASSAGE].to_numpy() if self.format.chunked else None
        name = _part_name("part", key, _row_keys(rows[S.ROW].to_numpy(), passages))
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


def _check_passages(shard_key: str, rows: np.ndarray, passages: np.ndarray, counts: np.ndarray) -> None:
    """After a (row, passage) dedupe: every staged row holds exactly its passages 0..n-1."""
    if not len(rows):
        return
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    stops = np.r_[starts[1:], len(rows)]
    held = stops - starts
    # Unique, sorted passages of a row are exactly 0..n-1 when there are n of them and the last is n-1.
    bad = (held != counts[starts]) | (passages[stops - 1] != counts[starts] - 1)
    if bad.any():
        row = int(rows[starts[np.flatnonzero(bad)[0]]])
        raise IncompleteShardError(
            f"shard {shard_key}: row {row} has {int(held[bad][0])} of its {int(counts[starts][bad][0])} "
            "passages staged; nothing was committed for it"
        )


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
    rows: int  # input rows embedded (documents)
    rejected: int
    path: str
    reasons: dict[str, int]
    tokens: int = 0
    truncated: int = 0
    duplicate_ids: int = 0  # rows whose id another row of this shard has too
    duplicate_examples: tuple[str, ...] = ()
    id_hashes: object = None  # uint64 array of the ids, for the run-wide duplicate count
    passages: int = 0  # output rows: one per passage with --chunk, else equal to rows
    storage_errors: int = 0  # transient object-store errors retried while committing


def _read_parts(urls: list[str]) -> pa.Table | None:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in urls]
    if not tables:
        return None
    return pa.concat_tables(tables)


def _dedupe(table: pa.Table, row_column: str, passage_column: str | None = None) -> pa.Table:
    """One row per key, sorted by key: the row number, or (row, passage) with passages."""
    passages = table[passage_column].to_numpy() if passage_column else None
    rows = _row_keys(table[row_column].to_numpy(), passages)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    return table.take(pa.array(order[first]))


def commit_shard(task: CommitTask) -> CommitResult:
    """Publish one shard: merge its parts, verify every row is there once, write atomically,
    then record the shard's marker and drop the markers of its older versions."""
    errors_before = storage.transient_errors()
    key = task.shard.key
    directory = shard_dir(task.staging, key)
    schema = task.out_format.schema()
    chunked = task.out_format.chunked
    good = _read_parts(storage.list_files(directory, "part-*.parquet"))
    if good is not None:
        good = _dedupe(good, S.ROW, S.PASSAGE if chunked else None)
    else:
        good = (
            schema.empty_table()
            .append_column(S.ROW, pa.array([], pa.int64()))
            .append_column(S.NUM_TOKENS, pa.array([], pa.int32()))
            .append_column(S.TRUNCATED, pa.array([], pa.bool_()))
        )
        if chunked:
            good = good.append_column(S.PASSAGES, pa.array([], pa.int32()))
    bad = _read_parts(storage.list_files(directory, "rejected-*.parquet"))
    bad = _dedupe(bad, "row") if bad is not None else S.rejected_schema().empty_table()

    good_rows = good[S.ROW].to_numpy()
    if chunked:
        _check_passages(key, good_rows, good[S.PASSAGE].to_numpy(), good[S.PASSAGES].to_numpy())
        good_rows = np.unique(good_rows)  # sorted by (row, passage): one entry per document
    seen = np.concatenate([good_rows, bad["row"].to_numpy()])
    if len(seen) != task.total or (task.total and not np.array_equal(np.sort(seen), np.arange(task.total))):
        missing = np.setdiff1d(np.arange(task.total), seen)
        raise IncompleteShardError(
            f"shard {key}: staged parts hold {len(np.unique(seen))} of {task.total} rows "
            f"(missing e.g. {missing[:5].tolist()}); nothing was committed for it"
        )
    tokens = int(pc.sum(good[S.NUM_TOKENS]).as_py() or 0)
    truncated = int(pc.sum(good[S.TRUNCATED].cast(pa.int64())).as_py() or 0)
    # One id per input row: with passages, the first passage of each document stands for it.
    doc_ids = good.filter(pc.equal(good[S.PASSAGE], 0))[S.ID] if chunked else good[S.ID]
    dup_count, dup_examples = _duplicates(doc_ids)
    internal = [S.ROW, S.NUM_TOKENS, S.TRUNCATED] + ([S.PASSAGES] if chunked else [])
    good = good.drop_columns(internal).cast(schema)
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
        rows=len(good_rows),
        rejected=bad.num_rows,
        path=path,
        reasons=reasons,
        tokens=tokens,
        truncated=truncated,
        duplicate_ids=dup_count,
        duplicate_examples=dup_examples,
        id_hashes=id_hashes(doc_ids),
        passages=good.num_rows,
    )
    if not task.deferred:
        record_commit(task, result)
    storage.remove_tree(directory)
    return dataclasses.replace(result, storage_errors=storage.transient_errors() - errors_before)


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
