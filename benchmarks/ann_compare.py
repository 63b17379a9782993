"""Compare approximate-nearest-neighbour libraries on embedding-like vectors (not part of the job).

Clustered synthetic 768-d vectors (GLuCoSE's dimension), cosine similarity, one thread each;
recall@10 is measured against exact numpy search. Run with the candidates importable::

    pip install --target /tmp/ann-pkgs faiss-cpu usearch hnswlib lancedb
    PYTHONPATH=/tmp/ann-pkgs:. python benchmarks/ann_compare.py [N]
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import sys
import tempfile
import time

import numpy as np

logger = logging.getLogger(__name__)
DIM, QUERIES, K = 768, 200, 10
NOISE = 1.2  # cluster spread: high enough that the neighbours of a query are not trivially separated


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(8, n // 200), DIM)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + NOISE * rng.standard_normal((n, DIM)).astype(np.float32)
    q = centers[rng.integers(0, len(centers), QUERIES)] + NOISE * rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def run_faiss(x, q):
    import faiss

    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 100
    index.add(x)
    build = time.perf_counter() - t
    index.hnsw.efSearch = 64
    t = time.perf_counter()
    _, ids = index.search(q, K)
    return build, time.perf_counter() - t, ids


def run_usearch(x, q):
    from usearch.index import Index

    t = time.perf_counter()
    index = Index(ndim=DIM, metric="cos", dtype="f32", connectivity=16, expansion_add=100, expansion_search=64)
    index.add(np.arange(len(x)), x, threads=1)
    build = time.perf_counter() - t
    t = time.perf_counter()
    ids = index.search(q, K, threads=1).keys
    return build, time.perf_counter() - t, ids


def run_hnswlib(x, q):
    import hnswlib

    t = time.perf_counter()
    index = hnswlib.Index(space="cosine", dim=DIM)
    index.init_index(max_elements=len(x), M=16, ef_construction=100)
    index.add_items(x, np.arange(len(x)), num_threads=1)
    build = time.perf_counter() - t
    index.set_ef(64)
    t = time.perf_counter()
    ids, _ = index.knn_query(q, k=K, num_threads=1)
    return build, time.perf_counter() - t, ids


def run_lancedb(x, q):
    import lancedb
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        db = lancedb.connect(d)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)
        tbl = db.create_table("v", pa.table({"id": np.arange(len(x)), "vector": vec}))
        tbl.create_index(metric="cosine", index_type="IVF_HNSW_SQ", num_partitions=max(1, len(x) // 4096))
        build = time.perf_counter() - t
        t = time.perf_counter()
        ids = np.array(
            [tbl.search(v).distance_type("cosine").limit(K).select(["id"]).to_arrow()["id"].to_numpy() for v in q]
        )
        return build, time.perf_counter() - t, ids


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    x, q = data(n)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :K]
    print(f"N={n} dim={DIM} queries={QUERIES} k={K}, one thread")
    print("| library | version | build s | query ms/q | recall@10 |")
    print("|---|---|---:|---:|---:|")
    for name, fn, dist in (
        ("faiss-cpu HNSW32", run_faiss, "faiss-cpu"),
        ("usearch HNSW16", run_usearch, "usearch"),
        ("hnswlib HNSW16", run_hnswlib, "hnswlib"),
        ("lancedb IVF_HNSW_SQ", run_lancedb, "lancedb"),
    ):
        try:
            build, query, ids = fn(x, q)
        except Exception as e:  # report and go on: one broken candidate should not hide the others
            print(f"| {name} | {md.version(dist)} | failed: {type(e).__name__}: {e} | | |")
            continue
        print(
            f"| {name} | {md.version(dist)} | {build:.2f} | {1000 * query / QUERIES:.2f} | {recall(ids, truth):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
