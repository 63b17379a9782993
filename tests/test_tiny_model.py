"""Acceptance tests for :mod:`jobs.make_tiny_model`.

What: build the tiny GLuCoSE-base-ja look-alike once per module and check its
layout, that ``LukeModel`` loads it with no missing/unexpected keys, that the
fairseq-offset reference ids (sentencepiece id + 1, ``<s>``=0, ``</s>``=2)
run through the model, that unseen characters map to ``<unk>``, and that
``SentenceTransformer`` loads it.

Why: the job's own tests rely on this fixture standing in for the real hub
model offline; if the fixture drifts from the real layout or id conventions
those tests would prove nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers

from jobs.make_tiny_model import (
    ENTITY_VOCAB,
    EXPECTED_FILES,
    NUM_FAIRSEQ_EXTRA_TOKENS,
    SP_MODEL_FILE,
    build_tiny_model,
    main,
)

# Nothing here may reach the hub (sentence-transformers reads this at call time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN = 64
BUILD_BUDGET_S = 20.0
JA_TEXTS = [
    "今日は東京で寿司を食べました。",
    "APIを使ってデータを調べました！",
    "テスト",
]
UNSEEN_TEXT = "鬱🍣"  # a rare kanji and an emoji, absent from the training corpus


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default build (unigram sentencepiece, like GLuCoSE's own file), timed."""
    start = time.perf_counter()
    out = build_tiny_model(tmp_path_factory.mktemp("tiny") / "glucose")
    elapsed = time.perf_counter() - start
    assert elapsed < BUILD_BUDGET_S, f"build took {elapsed:.1f}s"
    return out


@pytest.fixture(scope="module")
def tiny_unigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Explicit unigram build: the variant transformers 5's MLukeTokenizer can load."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_unigram") / "glucose", sp_model_type="unigram")


@pytest.fixture(scope="module")
def tiny_bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BPE build: the job tokenises it with sentencepiece directly, so it must work too."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bpe") / "glucose", sp_model_type="bpe")


def _files(root: Path) -> set[str]:
    """Return every regular file under ``root`` as a POSIX relative path."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _sp(root: Path) -> spm.SentencePieceProcessor:
    """Load the tiny model's sentencepiece file directly."""
    return spm.SentencePieceProcessor(model_file=str(root / SP_MODEL_FILE))


def _reference_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """Ids the v4/fairseq convention gives: ``<s>`` sp-ids+1 ``</s>``.

    As in the v4 ``MLukeTokenizer``/``XLMRobertaTokenizer``, the sentencepiece
    unk id 0 becomes the fairseq ``<unk>`` id 3 (a bare +1 would give 1, which
    is ``<pad>``).
    """
    return [0, *(i + 1 if i else 3 for i in sp.encode(text)), 2]


def _read_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("variant", ["tiny_dir", "tiny_bpe_dir"])
def test_exact_layout(variant: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(variant)
    assert _files(root) == set(EXPECTED_FILES)
    assert not (root / "tokenizer.json").exists()


def test_configs_match_glucose(tiny_dir: Path) -> None:
    sp = _sp(tiny_dir)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(0) == "<unk>"

    config = _read_json(tiny_dir / "config.json")
    assert config["architectures"] == ["LukeModel"]
    assert config["model_type"] == "luke"
    assert config["vocab_size"] == sp.get_piece_size() + NUM_FAIRSEQ_EXTRA_TOKENS
    assert config["entity_vocab_size"] == len(ENTITY_VOCAB) == 4
    assert config["use_entity_aware_attention"] is True
    assert config["max_position_embeddings"] == 514
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (
        1,
        0,
        2,
    )
    assert config["type_vocab_size"] == 1
    assert config["layer_norm_eps"] == pytest.approx(1e-5)
    assert config["hidden_size"] == HIDDEN

    tok_cfg = _read_json(tiny_dir / "tokenizer_config.json")
    assert tok_cfg["tokenizer_class"] == "MLukeTokenizer"
    assert tok_cfg["model_max_length"] == 512
    assert tok_cfg["task"] is None
    assert _read_json(tiny_dir / "entity_vocab.json") == ENTITY_VOCAB

    assert _read_json(tiny_dir / "modules.json") == [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    pooling = _read_json(tiny_dir / "1_Pooling/config.json")
    assert pooling["word_embedding_dimension"] == HIDDEN
    assert pooling["pooling_mode_mean_tokens"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    assert _read_json(tiny_dir / "sentence_bert_config.json") == {
        "max_seq_length": 512,
        "do_lower_case": False,
    }


def test_luke_model_loads_without_key_warnings(tiny_dir: Path) -> None:
    model, info = transformers.LukeModel.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert type(model).__name__ == "LukeModel"


def test_reference_ids_run_and_unk_maps_to_3(tiny_dir: Path) -> None:
    sp = _sp(tiny_dir)
    model = transformers.LukeModel.from_pretrained(tiny_dir).eval()
    n_rows = model.get_input_embeddings().num_embeddings

    # Unseen characters: sentencepiece unk id 0 -> fairseq <unk> id 3.
    assert 0 in sp.encode(UNSEEN_TEXT)
    ref = _reference_ids(sp, UNSEEN_TEXT)
    assert 3 in ref
    assert 1 not in ref

    pooled = []
    for text in [*JA_TEXTS, UNSEEN_TEXT]:
        ids = _reference_ids(sp, text)
        assert max(ids) < n_rows
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state
        assert hidden.shape == (1, len(ids), HIDDEN)
        assert torch.isfinite(hidden).all()
        pooled.append(hidden.mean(dim=1)[0])
    # The highest fairseq id (<ent2>) is a valid embedding row too.
    assert sp.get_piece_size() + NUM_FAIRSEQ_EXTRA_TOKENS - 1 == n_rows - 1
    # Random init is non-trivial: different texts give different embeddings.
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in (
        SP_MODEL_FILE,
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
    ):
        digest = hashlib.sha256((again / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((tiny_dir / name).read_bytes()).hexdigest(), name


def test_sentence_transformers_encodes_unigram_variant(tiny_unigram_dir: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tiny_unigram_dir), device="cpu")
    embeddings = model.encode(["テスト"])
    assert embeddings.shape == (1, HIDDEN)
    batch = model.encode(JA_TEXTS)
    assert batch.shape == (len(JA_TEXTS), HIDDEN)


def test_cli_small_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [str(out), "--hidden", "32", "--layers", "1", "--heads", "2"]
    argv += ["--intermediate", "64", "--vocab-size", "500", "--seed", "1"]
    assert main(argv) == 0
    assert _files(out) == set(EXPECTED_FILES)
    config = _read_json(out / "config.json")
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
    ) == (32, 1, 2)
    assert config["vocab_size"] == _sp(out).get_piece_size() + NUM_FAIRSEQ_EXTRA_TOKENS
    assert "built" in capsys.readouterr().out


def test_custom_corpus_and_bad_args(tmp_path: Path) -> None:
    corpus = ["ねこがすきです。", "いぬもすきです。", "とりはきらいです。"] * 20
    out = build_tiny_model(tmp_path / "custom", corpus=corpus, vocab_size=60, hidden=16, heads=2)
    sp = _sp(out)
    assert sp.get_piece_size() <= 60
    assert 0 in sp.encode("漢字")  # never seen in this corpus -> unk
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "bad", hidden=10, heads=4)
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "bad2", sp_model_type="wordpiece")
