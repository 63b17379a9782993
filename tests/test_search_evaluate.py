"""Passages end to end, search and evaluation, each checked against an independent computation.

Expected embeddings come from ``tests/reference.py`` (sentencepiece + LukeModel, one text at a
time, pooling by hand); expected rankings from a numpy brute force over those; expected
correlations from scipy.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
from scipy import stats

from embedding import schema as S
from embedding import storage
from embedding.storage import Shard
from embedding.write import CommitTask, IncompleteShardError, WriteParts, commit_shard
from tests.reference import reference_embeddings, reference_ids

EVAL = Path(__file__).resolve().parents[1] / "samples" / "eval"
LONG_DOCS = {
    "d0": "東京の天気は晴れ。" * 30 + "最高気温は18℃の予想です。",
    "d1": "短い文書です。",
    "d2": "ＡＢＣ社は新しいｶﾀｶﾅ製品を発表した。\n" * 12 + "価格は㌦建てで未定。",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference_from_ids(model_dir: Path, ids: list[list[int]]) -> np.ndarray:
    """Mean-pooled LukeModel output for given ids, one sequence at a time (no padding)."""
    from transformers import LukeModel

    model = LukeModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return np.stack([model(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0).numpy() for x in ids])


def brute_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    return np.argsort(-(q @ c.T), axis=1)[:, :k]


# ---------------------------------------------------------------------------------------------
# The commit with passages, without Ray.


def _passage_batch(rows: list[tuple[int, int, int]], dim: int = 4) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            S.ID: [f"doc{r}" for r, _, _ in rows],
            S.SHARD: ["s.jsonl"] * n,
            S.ROW: pa.array([r for r, _, _ in rows], pa.int64()),
            S.TOTAL: pa.array([-1] * n, pa.int64()),
            S.REJECT: pa.array([None] * n, pa.string()),
            S.MARKER: [False] * n,
            S.TEXT: pa.array([None] * n, pa.string()),
            S.PASSAGE: pa.array([p for _, p, _ in rows], pa.int32()),
            S.PASSAGES: pa.array([c for _, _, c in rows], pa.int32()),
            S.CHAR_START: pa.array([p * 10 for _, p, _ in rows], pa.int64()),
            S.CHAR_END: pa.array([p * 10 + 12 for _, p, _ in rows], pa.int64()),
            S.NUM_TOKENS: pa.array([5] * n, pa.int32()),
            S.TRUNCATED: pa.array([False] * n),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * dim, np.float32)), dim),
        }
    )


def test_commit_with_passages_needs_every_passage_and_drops_retried_duplicates(tmp_path: Path) -> None:
    fmt = S.OutputFormat(
        "string", 4, "float32", (), S.build_metadata(dim=4, chunk_tokens=16, chunk_overlap=2), chunked=True
    )
    staging, out = str(tmp_path / "_staging" / "r"), str(tmp_path / "out")
    write = WriteParts(staging, fmt)
    # Doc 0 has 3 passages split over two batches (one passage staged twice, as by a retry); doc 1 has 1.
    meta1 = write(_passage_batch([(0, 0, 3), (0, 1, 3), (1, 0, 1)])).to_pylist()
    assert meta1[0]["rows"] == 2 and meta1[0]["passages"] == 3 and meta1[0]["passages_expected"] == 4
    task = CommitTask(out, staging, Shard("s.jsonl", "s.jsonl", 1, "x"), 2, fmt, digest="d", stale=(), run_id="r")
    with pytest.raises(IncompleteShardError, match="row 0 has 2 of its 3 passages"):
        commit_shard(task)
    write(_passage_batch([(0, 1, 3), (0, 2, 3)]))
    result = commit_shard(task)
    assert (result.rows, result.passages) == (2, 4)
    table = pq.read_table(tmp_path / "out" / "s.parquet")
    assert table.column_names == ["id", "passage", "char_start", "char_end", "embedding"]
    assert list(zip(table["id"].to_pylist(), table["passage"].to_pylist(), strict=True)) == [
        ("doc0", 0),
        ("doc0", 1),
        ("doc0", 2),
        ("doc1", 0),
    ]


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_rank_correlations_match_scipy_with_ties() -> None:
    from embedding.evaluate import pearson, spearman

    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_sts_on_the_bundled_set_matches_scipy_over_reference_embeddings(tiny_model: Path) -> None:
    from embedding.evaluate import evaluate_sts
    from embedding.model import resolve_model
    from embedding.search import TextEncoder

    result = evaluate_sts(TextEncoder(resolve_model(str(tiny_model)), "cpu", "float32"), str(EVAL / "sts.jsonl"))
    rows = read_jsonl(EVAL / "sts.jsonl")
    a = reference_embeddings(tiny_model, [r["sentence1"] for r in rows])
    b = reference_embeddings(tiny_model, [r["sentence2"] for r in rows])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    labels = [r["label"] for r in rows]
    assert result.pairs == len(rows) == 24
    assert result.spearman == pytest.approx(stats.spearmanr(cos, labels).statistic, abs=1e-4)
    assert result.pearson == pytest.approx(stats.pearsonr(cos, labels).statistic, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# With Ray: a chunked run on S3, searched; the retrieval evaluation on the bundled set.


@pytest.mark.slow
def test_chunked_run_on_s3_then_exact_and_hnsw_search(tiny_model: Path, bucket: str, ray_local) -> None:
    from embedding import pipeline, search
    from embedding.config import JobConfig

    lines = "".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in LONG_DOCS.items())
    storage.write_bytes_atomic(f"{bucket}/docs/part-0.jsonl", lines.encode())
    config = JobConfig(
        inputs=(f"{bucket}/docs/",),
        output=f"{bucket}/emb",
        model=str(tiny_model),
        dtype="float32",
        chunk=True,
        chunk_tokens=32,
        chunk_overlap=6,
        keep_text=True,
        window_rows=8,  # passages of one document cross batch boundaries
    )
    report = pipeline.run(config)
    files = search.committed_files(f"{bucket}/emb")
    table = pa.concat_tables(
        pq.read_table(storage.filesystem(f)[1], filesystem=storage.filesystem(f)[0]) for f in files
    )

    # Independent passages: sentencepiece pieces of the whole text, windows of 30 advancing by 24.
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model / "sentencepiece.bpe.model"))
    expected_ids, expected_keys = [], []
    for doc, text in LONG_DOCS.items():
        body = reference_ids(sp, text, max_length=10**9)[1:-1]
        start = 0
        while True:
            expected_ids.append([0, *body[start : start + 30], 2])
            expected_keys.append((doc, len([k for k in expected_keys if k[0] == doc])))
            if start + 30 >= len(body):
                break
            start += 24
    got_keys = list(zip(table["id"].to_pylist(), table["passage"].to_pylist(), strict=True))
    assert got_keys == expected_keys and report.passages_embedded == len(expected_keys) > 6
    assert report.rows_embedded == len(LONG_DOCS)
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    ref = reference_from_ids(tiny_model, expected_ids)
    assert np.abs(got - ref).max() < 1e-4
    for doc, text in LONG_DOCS.items():
        part = table.filter(pa.compute.equal(table["id"], doc)).to_pydict()
        assert part["text"] == [text[s:e] for s, e in zip(part["char_start"], part["char_end"], strict=True)]
        covered = np.zeros(len(text), bool)
        for s, e in zip(part["char_start"], part["char_end"], strict=True):
            covered[s:e] = True
        assert covered.all()
    meta = search.output_metadata(files)
    assert meta["embedding.chunk_tokens"] == "32" and meta["embedding.chunk_overlap"] == "6"

    # Exact search: the query vector is the reference one, the ranking a numpy brute force.
    queries = ["東京の最高気温", "新製品の価格"]
    encoder = search.QueryEncoder(meta, device="cpu")
    qv = encoder(queries)
    assert np.abs(qv - reference_embeddings(tiny_model, queries)).max() < 1e-4
    hits = search.exact_search(files, qv, 5, batch_rows=3)  # several batches: the running top-k merges
    rows = search.hit_rows(files, hits)
    truth = brute_top_k(qv, got, 5)
    # The same top 5 as the brute force; near-ties (overlapping passages) may come in either order.
    q = qv / np.linalg.norm(qv, axis=1, keepdims=True)
    brute = q @ (got / np.linalg.norm(got, axis=1, keepdims=True)).T
    position = {key: i for i, key in enumerate(got_keys)}
    for qi, r in enumerate(rows):
        found = [brute[qi, position[(h["id"], h["passage"])]] for h in r]
        np.testing.assert_allclose(found, brute[qi, truth[qi]], atol=1e-5)

    # HNSW: built from the committed output; recall computed here against the brute force.
    index = search.AnnIndex.build(f"{bucket}/emb")
    approx = index.search(got, 10)
    exact = search.exact_search(files, got, 10)
    truth10 = brute_top_k(got, got, 10)
    order = {(f, r): i for i, (f, r) in enumerate((0, r) for r in range(len(got)))}
    mine = np.mean(
        [
            len({order[(f, r)] for f, r in zip(approx.files[q], approx.rows[q], strict=True)} & set(truth10[q])) / 10
            for q in range(len(got))
        ]
    )
    assert search.recall_at_k(approx, exact, 10) == pytest.approx(mine)
    assert mine >= 0.9


@pytest.mark.slow
def test_retrieval_accuracy_on_the_bundled_set_matches_an_independent_brute_force(
    tiny_model: Path, tmp_path: Path, ray_local
) -> None:
    from embedding import pipeline
    from embedding.config import JobConfig
    from embedding.evaluate import evaluate_retrieval

    passages = read_jsonl(EVAL / "aio" / "passages.jsonl")
    questions = read_jsonl(EVAL / "aio" / "questions.jsonl")
    out = str(tmp_path / "passages")
    pipeline.run(
        JobConfig(
            inputs=(str(EVAL / "aio" / "passages.jsonl"),),
            output=out,
            model=str(tiny_model),
            dtype="float32",
            keep_text=True,
        )
    )
    result = evaluate_retrieval(str(EVAL / "aio" / "questions.jsonl"), out, ks=(1, 5, 10, 50), device="cpu")

    p = reference_embeddings(tiny_model, [x["text"] for x in passages])
    q = reference_embeddings(tiny_model, [x["question"] for x in questions])
    ranked = brute_top_k(q, p, len(passages))

    def nfkc(s: str) -> str:
        return unicodedata.normalize("NFKC", s)

    first = []
    for qi, question in enumerate(questions):
        hit = [any(nfkc(a) in nfkc(passages[i]["text"]) for a in question["answers"]) for i in ranked[qi]]
        first.append(hit.index(True) + 1 if any(hit) else None)
    expected = {k: 100 * sum(r is not None and r <= k for r in first) / len(questions) for k in (1, 5, 10, 50)}
    assert result.first_hit == first
    assert result.accuracy == pytest.approx(expected)
    assert result.questions == 12 and result.passages == 24


def test_passage_settings_are_part_of_the_job_identity_only_when_used() -> None:
    from embedding import ledger

    base = {name: f"v-{name}" for name in ledger.IDENTITY_FIELDS}
    chunked = {**base, "chunk_tokens": 128, "chunk_overlap": 16}
    # Outputs written without passages keep the digest they had before these fields existed.
    plain_blob = json.dumps({k: base[k] for k in ledger.IDENTITY_FIELDS}, sort_keys=True)
    assert ledger.settings_digest(base) == hashlib.sha256(plain_blob.encode()).hexdigest()[:16]
    assert ledger.settings_digest(chunked) != ledger.settings_digest(base)
    ledger.check_job("out", chunked, chunked)
    for recorded, this_run in ((chunked, base), (base, chunked), (chunked, {**chunked, "chunk_tokens": 256})):
        with pytest.raises(ledger.OutputMismatchError, match="chunk_tokens"):
            ledger.check_job("out", this_run, recorded)
