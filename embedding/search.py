"""Searching an embedding output: query vectors from the same model, exact and approximate top-k.

- :class:`QueryEncoder` embeds query texts with the model and settings recorded in the
  output's schema metadata (model, revision, token limit, pooling, compute dtype), and refuses
  a model whose revision differs from the one that produced the vectors.
- :func:`exact_search` streams the committed files one record batch at a time and keeps only a
  running top-k per query, so memory is bounded by the batch size, not by the output's size.
- :class:`AnnIndex` is an HNSW index (faiss) built from the committed output, saved locally
  with the location of every vector, and :func:`recall_at_k` compares it with exact search.

Scores are cosine similarities (vectors are L2-normalised here, whatever the model does).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedding import schema as S
from embedding import storage

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
INFO_FILE = "index.json"


class SearchError(ValueError):
    """The output, query or index cannot be used as asked; the message says why."""


def committed_files(output: str) -> list[str]:
    """URLs of the committed ``*.parquet`` under ``output`` (hidden ``_``/``.`` paths skipped)."""
    try:
        shards = storage.list_shards(output, "parquet")
    except FileNotFoundError:
        raise SearchError(f"output {output} holds no committed Parquet file") from None
    files = [s.url for s in shards if s.url.endswith(".parquet")]
    if not files:
        raise SearchError(f"output {output} holds no committed Parquet file")
    return files


def _parquet(url: str) -> pq.ParquetFile:
    fs, path = storage.filesystem(url)
    return pq.ParquetFile(fs.open(path, "rb"))


def output_metadata(files: list[str]) -> dict[str, str]:
    """The ``embedding.*`` schema metadata, checked to be the same in every file."""
    first = None
    for url in files:
        raw = _parquet(url).schema_arrow.metadata or {}
        meta = {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith("embedding.")}
        if first is None:
            first = meta
        elif meta != first:
            diff = sorted(k for k in set(meta) | set(first) if meta.get(k) != first.get(k))
            raise SearchError(f"{url} was written with other settings than {files[0]} ({', '.join(diff)})")
    if not first or "embedding.model" not in first:
        raise SearchError(f"{files[0]} has no embedding metadata; was it written by this job?")
    return first


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """(n, dim) -> float32 rows of unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


class TextEncoder:
    """Texts -> vectors exactly as the job computes them (its tokenizer, model and pooling), in-process."""

    def __init__(self, spec, device: str = "auto", dtype: str = "float32") -> None:
        from embedding.encode import EncoderModel, resolve_device
        from embedding.tokenize import load_tokenizer

        self.device = resolve_device(device)
        # float16 only where it runs (CUDA).
        self.dtype = "float32" if dtype == "float16" and self.device != "cuda" else dtype
        self.tokenizer = load_tokenizer(spec.tokenizer)
        self.model = EncoderModel(spec, self.device, self.dtype)
        self.spec = spec

    def __call__(self, texts: list[str], batch_tokens: int = 8192) -> np.ndarray:
        """(len(texts), dim) float32, truncated at the token limit as in the job."""
        ids = self.tokenizer.encode(list(texts))
        vectors, failed, _ = self.model.embed(ids, max(batch_tokens, self.spec.max_length), 256)
        if failed:
            raise RuntimeError(f"{len(failed)} text(s) could not be encoded, e.g. {next(iter(failed.values()))}")
        return vectors


class QueryEncoder(TextEncoder):
    """Query texts -> vectors, with the model and settings an output was written with.

    ``model`` overrides where the model is loaded from (a local copy of the same model); its
    revision must still match the output's unless ``allow_other_revision``.
    """

    def __init__(
        self,
        metadata: dict[str, str],
        *,
        model: str | None = None,
        device: str = "auto",
        allow_other_revision: bool = False,
    ) -> None:
        from embedding.model import resolve_model

        source = model or metadata["embedding.model"]
        spec = resolve_model(source, int(metadata["embedding.max_length"]))
        if spec.revision != metadata["embedding.revision"]:
            message = (
                f"model {source} is at revision {spec.revision}, but the output was embedded with "
                f"{metadata['embedding.model']} at revision {metadata['embedding.revision']}"
            )
            if not allow_other_revision:
                raise SearchError(
                    f"{message}; query vectors would not be comparable. Pass --model with the same model "
                    "files, or --allow-other-revision if they are the same weights under another path"
                )
            logger.warning("%s; going on as asked", message)
        if spec.pooling != metadata["embedding.pooling"] or str(spec.dim) != metadata["embedding.dim"]:
            raise SearchError(
                f"model {source} pools {spec.pooling} into {spec.dim} dimensions; the output has "
                f"{metadata['embedding.pooling']} and {metadata['embedding.dim']}"
            )
        # The dtype the corpus was embedded in.
        super().__init__(spec, device, metadata.get("embedding.compute_dtype", "float32"))


@dataclass
class Hits:
    """Top-k per query: ``scores`` (q, k) descending, and where each hit is: ``files`` (q, k)
    index into the file list and ``rows`` (q, k) row within that file; -1 where fewer than k."""

    scores: np.ndarray
    files: np.ndarray
    rows: np.ndarray


def iter_vectors(files: list[str], batch_rows: int = 65536) -> Iterator[tuple[int, int, np.ndarray]]:
    """(file index, first row, (n, dim) float32 unit vectors) for every record batch of the output."""
    for f, url in enumerate(files):
        start = 0
        for batch in _parquet(url).iter_batches(batch_size=batch_rows, columns=[S.EMBEDDING]):
            column = batch.column(0)
            dim = column.type.list_size
            flat = column.values.to_numpy(zero_copy_only=False)
            vectors = normalize_rows(flat.reshape(-1, dim))
            yield f, start, vectors
            start += len(vectors)


def exact_search(files: list[str], queries: np.ndarray, k: int, batch_rows: int = 65536) -> Hits:
    """Exact top-``k`` cosine over every committed vector, streamed one batch at a time.

    Memory: one batch of vectors, a (queries, batch) score block and the running (queries, k)
    best, whatever the size of the output.
    """
    q = normalize_rows(queries)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_f = np.full((len(q), k), -1, dtype=np.int64)
    best_r = np.full((len(q), k), -1, dtype=np.int64)
    for f, start, vectors in iter_vectors(files, batch_rows):
        scores = q @ vectors.T
        s = np.concatenate([best_s, scores], axis=1)
        fi = np.concatenate([best_f, np.full(scores.shape, f, dtype=np.int64)], axis=1)
        ri = np.concatenate([best_r, np.broadcast_to(np.arange(start, start + len(vectors)), scores.shape)], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)[:, :k]
        best_s = np.take_along_axis(s, top, axis=1)
        best_f = np.take_along_axis(fi, top, axis=1)
        best_r = np.take_along_axis(ri, top, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return Hits(
        np.take_along_axis(best_s, order, axis=1),
        np.take_along_axis(best_f, order, axis=1),
        np.take_along_axis(best_r, order, axis=1),
    )


def hit_rows(files: list[str], hits: Hits) -> list[list[dict]]:
    """The stored columns (all but ``embedding``) of every hit, per query, best first, with ``score``."""
    wanted: dict[int, set[int]] = {}
    for f, r in zip(hits.files.ravel(), hits.rows.ravel(), strict=True):
        if f >= 0:
            wanted.setdefault(int(f), set()).add(int(r))
    found: dict[tuple[int, int], dict] = {}
    for f, rows in wanted.items():
        pf = _parquet(files[f])
        columns = [n for n in pf.schema_arrow.names if n != S.EMBEDDING]
        table = pf.read(columns=columns)
        order = sorted(rows)
        for r, values in zip(order, table.take(pa.array(order)).to_pylist(), strict=True):
            found[(f, r)] = values
    out = []
    for qi in range(hits.scores.shape[0]):
        row = []
        for s, f, r in zip(hits.scores[qi], hits.files[qi], hits.rows[qi], strict=True):
            if f >= 0:
                row.append({"score": round(float(s), 6), **found[(int(f), int(r))]})
        out.append(row)
    return out


def fingerprint(files: list[str]) -> dict[str, str]:
    """URL -> storage fingerprint (ETag or mtime) of each committed file."""
    out = {}
    for url in files:
        fs, path = storage.filesystem(url)
        info = fs.info(path)
        out[url] = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    return out


class AnnIndex:
    """An HNSW index (faiss ``IndexHNSWFlat``, inner product over unit vectors = cosine).

    Saved as a local directory: ``index.faiss``, ``rows.parquet`` (vector number -> file, row)
    and ``index.json`` (the output's metadata and the fingerprints of the files it was built
    from, so a stale index is refused).
    """

    def __init__(self, index, files: list[str], file_of: np.ndarray, row_of: np.ndarray, info: dict) -> None:
        self.index = index
        self.files = files
        self.file_of = file_of
        self.row_of = row_of
        self.info = info

    @classmethod
    def build(cls, output: str, *, m: int = 32, ef_construction: int = 200, batch_rows: int = 65536) -> AnnIndex:
        import faiss

        files = committed_files(output)
        meta = output_metadata(files)
        dim = int(meta["embedding.dim"])
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        file_of, row_of = [], []
        started = time.monotonic()
        for f, start, vectors in iter_vectors(files, batch_rows):
            index.add(vectors)
            file_of.append(np.full(len(vectors), f, dtype=np.int32))
            row_of.append(np.arange(start, start + len(vectors), dtype=np.int64))
        info = {
            "output": output,
            "metadata": meta,
            "files": fingerprint(files),
            "vectors": int(index.ntotal),
            "m": m,
            "ef_construction": ef_construction,
            "build_seconds": round(time.monotonic() - started, 3),
        }
        logger.info("built HNSW index over %d vectors in %.1f s", index.ntotal, info["build_seconds"])
        empty = [np.empty(0, np.int32)]
        return cls(
            index, files, np.concatenate(file_of or empty), np.concatenate(row_of or empty).astype(np.int64), info
        )

    def save(self, directory: str) -> None:
        import faiss

        os.makedirs(directory, exist_ok=True)
        faiss.write_index(self.index, os.path.join(directory, INDEX_FILE))
        pq.write_table(pa.table({"file": self.file_of, "row": self.row_of}), os.path.join(directory, ROWS_FILE))
        with open(os.path.join(directory, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump({**self.info, "file_list": self.files}, f, ensure_ascii=False, indent=2)

    @classmethod
    def load(cls, directory: str, output: str | None = None) -> AnnIndex:
        import faiss

        path = os.path.join(directory, INFO_FILE)
        if not os.path.isfile(path):
            raise SearchError(f"{directory} is not an index built by `python -m jobs.search --build-index`")
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        files = info.pop("file_list")
        if output is not None:
            current = committed_files(output)
            if sorted(current) != sorted(files) or fingerprint(current) != info["files"]:
                raise SearchError(
                    f"index {directory} was built from another state of {info['output']}; rebuild it with --build-index"
                )
        rows = pq.read_table(os.path.join(directory, ROWS_FILE))
        index = faiss.read_index(os.path.join(directory, INDEX_FILE))
        return cls(index, files, rows["file"].to_numpy(), rows["row"].to_numpy(), info)

    def search(self, queries: np.ndarray, k: int, ef_search: int = 128) -> Hits:
        self.index.hnsw.efSearch = max(ef_search, k)
        scores, ids = self.index.search(normalize_rows(queries), k)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        return Hits(
            scores.astype(np.float32),
            np.where(valid, self.file_of[safe], -1).astype(np.int64),
            np.where(valid, self.row_of[safe], -1).astype(np.int64),
        )


def recall_at_k(approx: Hits, exact: Hits, k: int = 10) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k, hits compared by (file, row)."""
    total = 0.0
    for qi in range(exact.scores.shape[0]):
        a = {(f, r) for f, r in zip(approx.files[qi, :k], approx.rows[qi, :k], strict=True) if f >= 0}
        e = {(f, r) for f, r in zip(exact.files[qi, :k], exact.rows[qi, :k], strict=True) if f >= 0}
        total += len(a & e) / max(len(e), 1)
    return total / max(exact.scores.shape[0], 1)


def sample_vectors(files: list[str], n: int, seed: int = 0) -> np.ndarray:
    """``n`` stored unit vectors picked uniformly: each gets a random key, the ``n`` smallest win."""
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    chosen: np.ndarray | None = None
    for _, _, vectors in iter_vectors(files):
        pool = vectors if chosen is None else np.vstack([chosen, vectors])
        keys = np.concatenate([keys, rng.random(len(vectors))])
        keep = np.argsort(keys)[:n]
        chosen, keys = pool[keep], keys[keep]
    return chosen if chosen is not None else np.empty((0, 0), np.float32)
