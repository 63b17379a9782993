"""Evaluation as on the GLuCoSE-base-ja model card: STS correlations and top-k retrieval accuracy.

- **STS** (the JSTS format: JSON Lines with ``sentence1``, ``sentence2``, ``label``): Spearman
  and Pearson correlation between the gold labels and the cosine similarity of the two
  sentences' vectors.
- **Retrieval** (the AIO / DPR format: questions with answer strings, plus a passage
  collection): a question counts at k when one of its k nearest passages (cosine) contains one
  of its answer strings, as in the DPR paper (Karpukhin et al., 2020) that the card cites.
  Passages and answers are compared after NFKC normalisation, so full-width and half-width
  forms match. The passages are embedded by the job itself; the questions with the model and
  settings recorded in that output (:class:`embedding.search.QueryEncoder`).

:data:`CARD` holds the numbers *published* on the model card, for printing beside ours; they
are quoted, never measured here.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from embedding import schema as S
from embedding import search

RETRIEVAL_KS = (1, 5, 10, 50)

# Published in the README of pkshatech/GLuCoSE-base-ja (model card, "Benchmarks"), quoted as is.
CARD_SOURCE = "pkshatech/GLuCoSE-base-ja model card (published, not measured here)"
CARD = {
    "sts": {
        "dataset": "JSTS dev set",
        "columns": ("Spearman", "Pearson"),
        "rows": (
            ("text-embedding-ada-002", (0.837, 0.790)),
            ("pkshatech/simcse-ja-bert-base-clcmlp", (0.850, 0.801)),
            ("pkshatech/GLuCoSE-base-ja", (0.864, 0.818)),
        ),
    },
    "retrieval": {
        "dataset": "AIO3 dev set",
        "columns": ("Top-1", "Top-5", "Top-10", "Top-50"),
        "rows": (
            ("text-embedding-ada-002", (33.50, 57.80, 65.10, 76.60)),
            ("pkshatech/simcse-ja-bert-base-clcmlp", (30.60, 54.50, 62.50, 76.70)),
            ("pkshatech/GLuCoSE-base-ja", (36.10, 59.40, 66.40, 78.30)),
        ),
    },
}


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    stops = np.r_[starts[1:], len(x)]
    average = (starts + stops + 1) / 2.0  # mean of the 1-based ranks starts+1 .. stops
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(average, stops - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    return float((x @ y) / np.sqrt((x @ x) * (y @ y)))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (search.normalize_rows(a) * search.normalize_rows(b)).sum(axis=1)


def read_jsonl(path: str) -> list[dict]:
    """JSON Lines (JSTS, AIO), one JSON array (DPR's retriever files), or DPR's question TSV
    (``question<TAB>["answer", ...]``); local or any fsspec URL, optionally ``.gz``/``.zst``."""
    import ast

    from embedding import storage

    with storage.open_input(path) as f:
        text = f.read().decode("utf-8")
    if ".tsv" in path.rsplit("/", 1)[-1]:
        rows = []
        for line in text.splitlines():
            if line.strip():
                question, answers = line.split("\t", 1)
                rows.append({"question": question, "answers": ast.literal_eval(answers.strip())})
        return rows
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class StsResult:
    pairs: int
    spearman: float
    pearson: float
    scores: np.ndarray  # cosine per pair


def evaluate_sts(encode: Callable[[list[str]], np.ndarray], path: str) -> StsResult:
    rows = read_jsonl(path)
    for i, r in enumerate(rows):
        missing = [k for k in ("sentence1", "sentence2", "label") if k not in r]
        if missing:
            raise ValueError(
                f"{path} line {i + 1}: no {', '.join(missing)} (the JSTS format has sentence1, sentence2, label)"
            )
    labels = np.array([float(r["label"]) for r in rows])
    scores = cosine_pairs(encode([r["sentence1"] for r in rows]), encode([r["sentence2"] for r in rows]))
    return StsResult(len(rows), spearman(scores, labels), pearson(scores, labels), scores)


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def has_answer(passage: str, answers: Sequence[str]) -> bool:
    """DPR's criterion, as string containment after NFKC normalisation."""
    p = normalize_text(passage)
    return any(normalize_text(a) in p for a in answers if a)


@dataclass(frozen=True)
class RetrievalResult:
    questions: int
    passages: int
    accuracy: dict[int, float]  # k -> percent of questions with an answer in the top k
    first_hit: list[int | None]  # per question: 1-based rank of the first passage with an answer


def read_questions(path: str) -> list[tuple[str, list[str]]]:
    out = []
    for i, r in enumerate(read_jsonl(path)):
        if "question" not in r or "answers" not in r:
            raise ValueError(f"{path} item {i + 1}: needs `question` and `answers` (the AIO / DPR format)")
        answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
        out.append((r["question"], [str(a) for a in answers]))
    return out


def evaluate_retrieval(
    questions_path: str,
    passages_output: str,
    *,
    ks: Sequence[int] = RETRIEVAL_KS,
    device: str = "auto",
    model: str | None = None,
) -> RetrievalResult:
    """Top-k accuracy of exact cosine search over an output written with ``--keep-text``."""
    files = search.committed_files(passages_output)
    meta = search.output_metadata(files)
    questions = read_questions(questions_path)
    encoder = search.QueryEncoder(meta, model=model, device=device)
    vectors = encoder([q for q, _ in questions])
    hits = search.exact_search(files, vectors, max(ks))
    rows = search.hit_rows(files, hits)
    n_passages = sum(search._parquet(f).metadata.num_rows for f in files)
    first_hit: list[int | None] = []
    for (_, answers), ranked in zip(questions, rows, strict=True):
        if ranked and S.TEXT_OUT not in ranked[0]:
            raise ValueError(f"{passages_output} has no `text` column; embed the passages with --keep-text")
        first_hit.append(
            next((i + 1 for i, hit in enumerate(ranked) if has_answer(hit[S.TEXT_OUT] or "", answers)), None)
        )
    n = len(questions)
    accuracy = {k: 100.0 * sum(1 for r in first_hit if r is not None and r <= k) / n for k in ks}
    return RetrievalResult(n, n_passages, accuracy, first_hit)


def card_table(task: str, ours: tuple[str, Sequence[float]] | None, *, percent: bool) -> str:
    """The card's table layout: our row (if any) above the card's published rows, labelled."""
    card = CARD[task]
    fmt = "{:.2f}" if percent else "{:.3f}"
    lines = [
        "| Model | " + " | ".join(card["columns"]) + " |",
        "| --- |" + " --- |" * len(card["columns"]),
    ]
    if ours is not None:
        lines.append(f"| {ours[0]} | " + " | ".join(fmt.format(v) for v in ours[1]) + " |")
    for name, values in card["rows"]:
        lines.append(f"| {name} (card, {card['dataset']}) | " + " | ".join(fmt.format(v) for v in values) + " |")
    return "\n".join(lines)
