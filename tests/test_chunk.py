"""Passages on the model's own tokenization: ids, sizes, overlap and character spans.

The expected pieces come from ``sentencepiece``'s plain ``encode_as_pieces`` over the whole
text, windowed here independently of :func:`embedding.tokenize.token_windows`; the spans are
checked by normalising ``text[char_start:char_end]`` with sentencepiece and comparing it with
the passage's pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from embedding import schema as S
from embedding.model import resolve_model
from embedding.tokenize import ChunkSpec, Tokenize, load_tokenizer, token_windows
from tests.conftest import SAMPLES
from tests.reference import reference_ids

TRICKY = [
    "  ＡＢＣ　東京は晴れ。😀 [MASK] ｶﾀｶﾅ   end\u3000! \u200b末尾  " * 7,
    "が\u3099 か\u3099 ﾊﾟﾝ ① ㍻ ｶﾞ " * 20 + "\t\n終わり。",
    "短い。",
    "   ",
]


def longest_sample_texts(n: int = 3) -> list[str]:
    texts = []
    for path in sorted(SAMPLES.rglob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(texts, key=len)[-n:]


@pytest.fixture(scope="module")
def sp(tiny_model: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_model / "sentencepiece.bpe.model"))


@pytest.mark.parametrize(
    ("n", "body", "overlap"), [(0, 5, 1), (5, 5, 1), (6, 5, 1), (23, 5, 0), (100, 10, 9), (7, 510, 64)]
)
def test_token_windows_cover_every_piece_within_size_with_the_overlap(n: int, body: int, overlap: int) -> None:
    windows = token_windows(n, body, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == n
    assert all(0 < e - s <= body for s, e in windows) or n == 0
    for (_s0, e0), (s1, e1) in zip(windows, windows[1:], strict=False):
        assert e0 - s1 == overlap and e1 > e0  # shares `overlap` pieces and advances
    assert set().union(*(range(s, e) for s, e in windows)) == set(range(n))


@pytest.mark.parametrize(("tokens", "overlap"), [(12, 3), (16, 0), (512, 64)])
def test_passages_match_independent_pieces_and_spans(tiny_model: Path, sp, tokens: int, overlap: int) -> None:
    tok = load_tokenizer(resolve_model(str(tiny_model)).tokenizer)
    texts = TRICKY + longest_sample_texts()
    body = tokens - 2
    for text, got in zip(texts, tok.encode_passages(texts, ChunkSpec(tokens, overlap)), strict=True):
        pieces = sp.encode_as_pieces(text)
        ref = reference_ids(sp, text, max_length=10**9)[1:-1]  # fairseq ids of every piece
        # Expected windows, written out here: start at 0, advance by body - overlap.
        starts = list(range(0, max(len(pieces) - overlap, 1), body - overlap)) or [0]
        starts = [s for i, s in enumerate(starts) if i == 0 or starts[i - 1] + body < len(pieces)]
        assert len(got.ids) == len(starts)
        for k, s in enumerate(starts):
            ids = got.ids[k]
            assert len(ids) <= tokens and ids[0] == 0 and ids[-1] == 2
            assert ids[1:-1].tolist() == ref[s : s + body]
            span = text[got.char_start[k] : got.char_end[k]]
            # The span, normalised as the model normalises, holds this passage's pieces and at
            # most the rest of a character that normalisation expanded into several pieces (℃ -> °C).
            normalized = sp.normalize(span).replace("▁", "")
            expected = "".join(pieces[s : s + body]).replace("▁", "")
            assert expected in normalized and len(normalized) - len(expected) <= 2, (span, expected)
        # Every character of the document is in some passage; spans are ordered.
        assert got.char_start[0] == 0 and got.char_end[-1] == len(text)
        assert (got.char_start[1:] <= got.char_end[:-1]).all() and (np.diff(got.char_start) >= 0).all()


def test_chunked_tokenize_stage_explodes_good_rows_and_keeps_rejected_ones(tiny_model: Path) -> None:
    spec = resolve_model(str(tiny_model))
    long = longest_sample_texts(1)[0]
    batch = pa.table(
        {
            S.ID: ["a", "b", "c"],
            S.TEXT: [long, '{"broken json', "短い文。"],
            S.SHARD: ["s"] * 3,
            S.ROW: pa.array([0, 1, 2], pa.int64()),
            S.TOTAL: pa.array([-1, -1, 3], pa.int64()),
            S.REJECT: [None, "malformed_json: unterminated", None],
            S.MARKER: [False, False, False],
        }
    )
    out = Tokenize(spec.tokenizer, chunk=ChunkSpec(64, 8), keep_text=True)(batch)
    rows = out.to_pydict()
    n = rows[S.ID].count("a")
    assert n > 1 and rows[S.ID] == ["a"] * n + ["b", "c"]
    assert rows[S.PASSAGE] == [*range(n), 0, 0] and rows[S.PASSAGES] == [n] * n + [1, 1]
    assert rows[S.NUM_TOKENS][n] == 0 and all(0 < t <= 64 for t in rows[S.NUM_TOKENS][:n])
    assert rows[S.TEXT_OUT][:n] == [
        long[s:e] for s, e in zip(rows[S.CHAR_START][:n], rows[S.CHAR_END][:n], strict=True)
    ]
    assert rows[S.TEXT] == [None] * n + ['{"broken json', None]  # the full text rides on only for rejects
    assert rows[S.REJECT][n] == "malformed_json: unterminated"
