"""The job's token ids are the ids GLuCoSE was trained with (fairseq offset over sentencepiece)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from embedding import schema as S
from embedding.model import resolve_model
from embedding.tokenize import FairseqSentencePiece, Tokenize, ids_to_arrow
from tests.reference import reference_ids

# Varied Japanese, with every case the issue names.
CORPUS = [
    "今日は良い天気ですね。",
    "東京都渋谷区で新しいカフェがオープンしました。",
    "ｶﾞｷﾞｸﾞｹﾞｺﾞ ﾊﾟﾋﾟﾌﾟﾍﾟﾎﾟ",  # half-width voiced kana: NFKC composes them
    "ＡＢＣ１２３と全角英数字、①②③、㍻、㌔",  # NFKC changes all of these
    "寿司🍣とラーメン🍜が好きです😀",  # emoji
    "𠮷野家と𩸽（ほっけ）の定食",  # rare kanji outside the tiny model's pieces -> <unk>
    "龘靐齉",  # unknown characters
    "この文には[MASK]が含まれています。",  # literal [MASK] is text, not an entity token
    "<mask>や<s>、</s>は本文中ではただの文字列です。",
    "333 4444 55555 と 1,234,567 円",  # repeated digits (the Rust tokenizers tie-break trap)
    "Pythonで自然言語処理 (NLP) を学ぶ: https://example.com/path?q=日本語",
    "　全角スペースで始まり、\t タブと\n改行を含む。",
    "a",
    "。",
    "吾輩は猫である。名前はまだ無い。" * 80,  # far beyond 512 tokens
    "あ" * 3000,
]


@pytest.fixture(scope="module")
def sp(tiny_model: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_model / "sentencepiece.bpe.model"))


@pytest.fixture(scope="module")
def tiny_bpe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jobs.make_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bpe") / "m", sp_model_type="bpe")


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_bpe_model"])
def test_ids_equal_independent_sentencepiece_reference(model_fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(model_fixture)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "sentencepiece.bpe.model"))
    spec = resolve_model(str(model_dir))
    assert spec.tokenizer.kind == "sentencepiece-fairseq"
    tok = FairseqSentencePiece(dict(spec.tokenizer.files)["sentencepiece.bpe.model"], spec.max_length)
    got = tok.encode(CORPUS)
    for text, ids in zip(CORPUS, got, strict=True):
        assert ids.tolist() == reference_ids(sp, text), text


def test_corpus_exercises_nfkc_unknowns_and_truncation(sp) -> None:
    """Guard the test corpus itself: each edge case it claims is really there."""
    assert any(unicodedata.normalize("NFKC", t) != t for t in CORPUS)
    refs = [reference_ids(sp, t) for t in CORPUS]
    assert any(3 in r for r in refs), "no text maps to <unk>"
    assert any(len(sp.encode(t)) > 510 for t in CORPUS), "no text exceeds 512 tokens"
    assert max(len(r) for r in refs) == 512


def test_special_ids_and_truncation(tiny_model: Path, sp) -> None:
    spec = resolve_model(str(tiny_model))
    tok = FairseqSentencePiece(dict(spec.tokenizer.files)["sentencepiece.bpe.model"], 512)
    long_ids = tok.encode(["吾輩は猫である。" * 200])[0]
    assert len(long_ids) == 512 and long_ids[0] == 0 and long_ids[-1] == 2
    assert 1 not in long_ids.tolist(), "<pad> must never appear inside a text"
    short = tok.encode(["龘"])[0].tolist()
    assert short[0] == 0 and short[-1] == 2 and 3 in short
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert all(int(ids.max()) < vocab for ids in tok.encode(CORPUS)), "an id beyond the embedding table"


def test_transformers_tokenizer_trap_is_avoided(tiny_model: Path, sp) -> None:
    """transformers 5 loads MLukeTokenizer without error but its ids are not the trained ones.

    We only assert what the job needs: our ids are the reference, and the job never routes a
    fairseq-sentencepiece model through AutoTokenizer. If a future transformers fixes the
    shift, this test still holds.
    """
    from transformers import AutoTokenizer

    spec = resolve_model(str(tiny_model))
    auto = AutoTokenizer.from_pretrained(str(tiny_model))
    text = "この文には[MASK]が含まれています。"
    ours = FairseqSentencePiece(dict(spec.tokenizer.files)["sentencepiece.bpe.model"], 512).encode([text])[0].tolist()
    assert ours == reference_ids(sp, text)
    theirs = auto(text)["input_ids"]
    if theirs != ours:  # the trap, as seen with transformers 5.x
        print(f"AutoTokenizer ids differ from the trained ids: {theirs[:8]} vs {ours[:8]}")
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert max(ours) < vocab, "our ids for a literal [MASK] must stay inside the embedding table"


def test_tokenize_stage_skips_rejected_and_marker_rows(tiny_model: Path, sp) -> None:
    spec = resolve_model(str(tiny_model))
    batch = pa.table(
        {
            S.REJECT: pa.array([None, "empty_text: x", None, None], pa.string()),
            S.MARKER: [False, False, True, False],
            S.TEXT: ["今日は晴れ", "", None, "寿司🍣"],
        }
    )
    out = Tokenize(spec.tokenizer)(batch)
    ids = out[S.INPUT_IDS].to_pylist()
    assert ids[0] == reference_ids(sp, "今日は晴れ") and ids[3] == reference_ids(sp, "寿司🍣")
    assert ids[1] == [] and ids[2] == []
    assert out[S.NUM_TOKENS].to_pylist() == [len(ids[0]), 0, 0, len(ids[3])]


def test_ids_to_arrow_round_trip() -> None:
    arrays = [np.array([0, 5, 2], np.int32), np.empty(0, np.int32), np.array([0, 2], np.int32)]
    assert ids_to_arrow(arrays).to_pylist() == [[0, 5, 2], [], [0, 2]]
    assert ids_to_arrow([]).to_pylist() == []


def _fuzz_texts(n: int, seed: int = 5) -> list[str]:
    """Random strings over the code points where tokenizers disagree: half-width (voiced) kana,
    full-width ASCII, NFKC-composed symbols, repeated digits, rare kanji, emoji, combining marks
    and odd whitespace."""
    import random

    rng = random.Random(seed)
    ranges = [
        (0x3041, 0x3096),  # hiragana
        (0x30A1, 0x30FA),  # katakana
        (0xFF66, 0xFF9F),  # half-width katakana with the voicing marks ﾞ ﾟ
        (0xFF01, 0xFF5E),  # full-width ASCII
        (0x4E00, 0x9FFF),  # CJK
        (0x20000, 0x2A6DF),  # CJK extension B
        (0x1F300, 0x1F64F),  # emoji
        (0x2460, 0x24FF),  # circled numbers
        (0x3300, 0x33FF),  # squared katakana words
        (0x0300, 0x036F),  # combining marks
        (0x20, 0x7E),  # ASCII
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.1:
                parts.append(rng.choice("0123456789") * rng.randint(2, 7))
            elif r < 0.15:
                parts.append(rng.choice(["\u3000", "\t", "\n", "  ", "\u00a0", "\u200b"]))
            else:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_bpe_model"])
def test_batched_threaded_tokenizer_matches_reference_on_large_varied_corpus(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    """The job's fast path (sentencepiece's batched C++ encode over 2 threads, fairseq offset in
    numpy) gives the reference ids, text by text, on 7,000 texts of every kind."""
    from jobs.benchmark import generate_documents
    from jobs.make_tiny_model import generate_corpus

    model_dir: Path = request.getfixturevalue(model_fixture)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "sentencepiece.bpe.model"))
    texts = generate_documents(3000, seed=11) + generate_corpus(2000, seed=99) + _fuzz_texts(2000) + CORPUS
    tok = FairseqSentencePiece((model_dir / "sentencepiece.bpe.model").read_bytes(), 512, threads=2)
    got = []
    for start in range(0, len(texts), 4096):  # the encoder's window on CPU
        got.extend(tok.encode(texts[start : start + 4096]))
    mismatched = [t for t, ids in zip(texts, got, strict=True) if ids.tolist() != reference_ids(sp, t)]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[0]!r}"
    assert sum(3 in ids for ids in got) > 100, "the corpus must reach <unk> often"
    assert any(len(ids) == 512 for ids in got), "and the truncation limit"
