"""Build a tiny random-weight stand-in for ``pkshatech/GLuCoSE-base-ja``.

What: :func:`build_tiny_model` writes a directory with the same file layout and
the same classes as the real hub repository (``LukeModel`` weights in
``model.safetensors``, an ``MLukeTokenizer`` backed by a fairseq-style
sentencepiece model (BPE by default, unigram on request), ``entity_vocab.json`` and the old-style
sentence-transformers files ``modules.json`` / ``1_Pooling`` /
``sentence_bert_config.json``), only with small sizes and random weights.

Why: the job and its tests must run without network access or the 1.3 GB real
checkpoint, yet exercise the real loading code paths (``LukeModel``,
``MLukeTokenizer``, ``SentenceTransformer``) and the real token-id conventions
(fairseq offset: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, every other
sentencepiece id + 1). Everything is deterministic for a given argument set.

CLI::

    python -m jobs.make_tiny_model OUTPUT_DIR [--hidden 64 --layers 2 --heads 4
        --intermediate 128 --vocab-size 2000 --seed 0 --sp-model-type bpe]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import string
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ENTITY_VOCAB",
    "EXPECTED_FILES",
    "NUM_FAIRSEQ_EXTRA_TOKENS",
    "SP_MODEL_FILE",
    "SP_MODEL_TYPES",
    "build_tiny_model",
    "generate_corpus",
    "main",
]

#: File name of the sentencepiece model, as in the real repository.
SP_MODEL_FILE = "sentencepiece.bpe.model"

#: Entity vocabulary of the "lite" LUKE checkpoints GLuCoSE derives from
#: (``studio-ousia/luke-japanese-base-lite``): the conversion script of the LUKE
#: project rebuilds the 4 special entities in exactly this order when it strips
#: the Wikipedia entity embeddings. Entities are never used for sentence
#: embeddings; the tokenizer only requires the four keys to exist.
ENTITY_VOCAB: dict[str, int] = {"[MASK]": 0, "[UNK]": 1, "[PAD]": 2, "[MASK2]": 3}

#: Token ids beyond the sentencepiece pieces (+1 fairseq offset): ``<mask>``
#: plus the two entity marker tokens ``<ent>`` and ``<ent2>``. The real model
#: has 32768 pieces -> ``vocab_size`` 32772 = 32768 + 4.
NUM_FAIRSEQ_EXTRA_TOKENS = 1 + 1 + 2  # offset + <mask> + <ent>, <ent2>

#: Every file the builder writes, relative to the output directory.
EXPECTED_FILES: tuple[str, ...] = (
    "1_Pooling/config.json",
    "config.json",
    "config_sentence_transformers.json",
    "entity_vocab.json",
    "model.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    SP_MODEL_FILE,
    "special_tokens_map.json",
    "tokenizer_config.json",
)

#: Sentencepiece algorithms :func:`build_tiny_model` can train.
SP_MODEL_TYPES: tuple[str, ...] = ("bpe", "unigram")

MAX_SEQ_LENGTH = 512
MAX_POSITION_EMBEDDINGS = 514  # RoBERTa/XLM-R style: 512 + padding_idx + 1

# --------------------------------------------------------------------------
# Deterministic Japanese corpus
# --------------------------------------------------------------------------

# fmt: off
_PEOPLE: tuple[str, ...] = (
    "私", "僕", "彼", "彼女", "先生", "学生", "母", "父", "兄", "姉", "友達", "田中さん", "佐藤さん",
    "鈴木さん", "山田先生", "社長", "店員", "医者", "子供たち", "みんな", "エンジニア", "デザイナー",
)
_PLACES: tuple[str, ...] = (
    "東京", "大阪", "京都", "北海道", "沖縄", "名古屋", "福岡", "横浜", "駅", "学校", "図書館", "会社",
    "病院", "公園", "空港", "コンビニ", "スーパー", "レストラン", "ホテル", "カフェ", "大学", "神社", "お寺",
    "海", "山",
)
_THINGS: tuple[str, ...] = (
    "本", "新聞", "手紙", "写真", "映画", "音楽", "料理", "ご飯", "お茶", "コーヒー", "ラーメン", "寿司",
    "天ぷら", "パン", "ケーキ", "りんご", "パソコン", "スマートフォン", "カメラ", "テレビ", "ゲーム", "自転車",
    "電車", "バス", "車", "傘", "鞄", "時計", "データ", "モデル", "ベクトル", "文章", "日本語", "英語",
    "宿題", "資料", "会議", "天気", "ニュース",
)
_VERBS: tuple[str, ...] = (
    "読みました", "書きました", "見ました", "聞きました", "食べました", "飲みました", "買いました",
    "使いました", "作りました", "調べました", "送りました", "探しています", "持っています", "勉強します",
    "準備します", "確認しました", "忘れました", "借りました", "返しました", "選びました",
)
_MOVES: tuple[str, ...] = (
    "行きました", "来ました", "帰りました", "着きました", "向かいます",
)
_ADJECTIVES: tuple[str, ...] = (
    "大きい", "小さい", "新しい", "古い", "高い", "安い", "おいしい", "楽しい", "難しい", "簡単な", "静かな",
    "にぎやかな", "便利な", "きれいな", "有名な", "暑い", "寒い", "忙しい", "面白い", "長い", "短い",
)
_TIMES: tuple[str, ...] = (
    "今日", "昨日", "明日", "今朝", "今晩", "先週", "来週", "毎日", "週末", "午前", "午後", "夏休み",
    "年末", "春", "夏", "秋", "冬",
)
_ASCII_WORDS: tuple[str, ...] = (
    "AI", "API", "GPU", "CPU", "Python", "Ray", "batch", "embedding", "model",
    "data", "OK", "USB", "Wi-Fi", "PDF", "URL", "JSON", "SQL", "Web", "app",
    "test", "server", "cloud", "job", "log", "v2",
)
_UNITS: tuple[str, ...] = (
    "円", "人", "個", "本", "枚", "回", "時", "分", "年", "月", "日", "%", "km", "kg",
)
_CONNECTIVES = ("そして", "しかし", "だから", "でも", "また", "さらに", "ところで")
_ENDINGS = ("。", "！", "？", "…", "。", "。")
_SYMBOLS = tuple("[](){}<>/#@&+-=_:;'\"!?*%$~|,.")
# fmt: on


def _ascii_token(rng: random.Random) -> str:
    """Return a short random ASCII word so every letter and digit gets seen."""
    alphabet = string.ascii_letters + string.digits
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))


def _sentence(rng: random.Random) -> str:
    """Return one pseudo-natural Japanese sentence drawn from the word lists."""
    person = rng.choice(_PEOPLE)
    place = rng.choice(_PLACES)
    thing = rng.choice(_THINGS)
    adjective = rng.choice(_ADJECTIVES)
    when = rng.choice(_TIMES)
    number = f"{rng.randint(0, 9999):,}" if rng.random() < 0.3 else str(rng.randint(1, 99))
    unit = rng.choice(_UNITS)
    ascii_word = rng.choice(_ASCII_WORDS)
    end = rng.choice(_ENDINGS)
    templates = (
        f"{when}、{person}は{place}で{thing}を{rng.choice(_VERBS)}{end}",
        f"{person}は{when}{place}へ{rng.choice(_MOVES)}{end}",
        f"この{thing}はとても{adjective}です{end}",
        f"{place}の{thing}は{number}{unit}でした{end}",
        f"{ascii_word}を使って{thing}を{rng.choice(_VERBS)}{end}",
        f"「{thing}」について{person}と話しました{end}",
        f"{rng.choice(_CONNECTIVES)}、{place}には{adjective}{thing}があります{end}",
        f"{number}{unit}の{thing}（{ascii_word}）を{rng.choice(_VERBS)}{end}",
        f"{person}の{thing}は{adjective}、{rng.choice(_THINGS)}も{adjective}{end}",
        f"{ascii_word} {rng.choice(_ASCII_WORDS)} {number}: {thing}・{place}{end}",
        f"{_ascii_token(rng)}{rng.choice(_SYMBOLS)}{_ascii_token(rng)} {rng.choice(_SYMBOLS)}{thing}{end}",
        f'[{ascii_word}] <{place}> (#{number}) @{person} {{{_ascii_token(rng)}}} = "{thing}"{end}',
    )
    return rng.choice(templates)


def generate_corpus(num_sentences: int = 4000, seed: int = 1234) -> list[str]:
    """Return ``num_sentences`` deterministic, varied Japanese sentences.

    The text mixes hiragana, katakana, kanji, ASCII words, numbers (with
    thousands separators) and full/half-width punctuation so that the trained
    tokenizer sees every script the real job will meet. The corpus depends only
    on ``seed`` (not on the model seed), so all tiny models share a tokenizer.
    """
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(num_sentences)]


# --------------------------------------------------------------------------
# Builders for each artefact
# --------------------------------------------------------------------------


def _train_sentencepiece(corpus: Sequence[str], vocab_size: int, model_type: str = "bpe") -> bytes:
    """Train a fairseq/XLM-R convention sentencepiece model; return its bytes.

    ``model_type`` is ``"bpe"`` (the default) or ``"unigram"`` (see
    :func:`build_tiny_model` for why both exist). Ids: unk=0, bos=1, eos=2 and no
    pad piece, as in the ``sentencepiece.bpe.model`` of XLM-R/mLUKE/GLuCoSE.
    ``byte_fallback`` is off so unseen characters map to the unk id.
    Single-threaded and unshuffled so the model is byte-identical across runs.
    ``hard_vocab_limit=False`` lets a small custom corpus yield fewer pieces than
    requested instead of failing.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc",
        byte_fallback=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buffer.getvalue()


def _added_token(content: str, *, lstrip: bool = False) -> dict[str, Any]:
    """Serialise an ``AddedToken`` the way transformers 4.x wrote it to JSON."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": lstrip,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def _tokenizer_config() -> dict[str, Any]:
    """Return ``tokenizer_config.json`` for ``MLukeTokenizer`` (GLuCoSE style)."""
    return {
        "additional_special_tokens": [_added_token("<ent>"), _added_token("<ent2>")],
        "bos_token": "<s>",
        "cls_token": "<s>",
        "entity_mask2_token": "[MASK2]",
        "entity_mask_token": "[MASK]",
        "entity_pad_token": "[PAD]",
        "entity_token_1": _added_token("<ent>"),
        "entity_token_2": _added_token("<ent2>"),
        "entity_unk_token": "[UNK]",
        "eos_token": "</s>",
        "mask_token": _added_token("<mask>", lstrip=True),
        "max_entity_length": 32,
        "max_mention_length": 30,
        "model_max_length": MAX_SEQ_LENGTH,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "sp_model_kwargs": {},
        "special_tokens_map_file": None,
        "task": None,
        "tokenizer_class": "MLukeTokenizer",
        "unk_token": "<unk>",
    }


def _special_tokens_map() -> dict[str, Any]:
    """Return ``special_tokens_map.json`` matching :func:`_tokenizer_config`."""
    plain = {k: v for k, v in _added_token("<mask>", lstrip=True).items() if k != "__type"}
    return {
        "additional_special_tokens": [
            {k: v for k, v in _added_token(tok).items() if k != "__type"} for tok in ("<ent>", "<ent2>")
        ],
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": plain,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }


def _luke_config(*, vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int) -> Any:
    """Return a ``LukeConfig`` with GLuCoSE's non-size settings and tiny sizes.

    ``entity_emb_size`` is kept smaller than ``hidden`` (256 vs 768 in the real
    model) so the ``entity_embedding_dense`` projection exists, like upstream.
    """
    from transformers import LukeConfig

    return LukeConfig(
        vocab_size=vocab_size,
        entity_vocab_size=len(ENTITY_VOCAB),
        hidden_size=hidden,
        entity_emb_size=max(hidden // 2, 1),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        type_vocab_size=1,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_entity_aware_attention=True,
        classifier_dropout=None,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        architectures=["LukeModel"],
    )


def _sentence_transformers_files(hidden: int) -> dict[str, Any]:
    """Return the old-style (sentence-transformers 2.x) module files, by path."""
    return {
        "modules.json": [
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
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
        "sentence_bert_config.json": {
            "max_seq_length": MAX_SEQ_LENGTH,
            "do_lower_case": False,
        },
        "config_sentence_transformers.json": {
            "__version__": {
                "sentence_transformers": "2.2.2",
                "transformers": "4.30.2",
                "pytorch": "2.0.1",
            }
        },
    }


def _write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as pretty UTF-8 JSON (Japanese kept unescaped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab_size: int = 2000,
    seed: int = 0,
    corpus: list[str] | None = None,
    sp_model_type: str = "unigram",
) -> Path:
    """Write a tiny random GLuCoSE-base-ja look-alike into ``out_dir``; return it.

    ``vocab_size`` is the *sentencepiece* target size; the ``LukeConfig`` gets
    ``piece_size + 4`` rows (fairseq offset, ``<mask>``, ``<ent>``, ``<ent2>``),
    mirroring the real 32768 pieces -> 32772 rows, so every id the v4
    ``MLukeTokenizer`` can produce is a valid embedding row. ``corpus``
    replaces the built-in generated Japanese text used to train the tokenizer.
    Weights are ``LukeModel(config)``'s own initialisation under
    ``torch.manual_seed(seed)``. Existing files in ``out_dir`` are overwritten;
    extra files already there are left alone.

    ``sp_model_type`` picks the sentencepiece algorithm. The file name
    ``sentencepiece.bpe.model`` is imposed by the tokenizer class and says
    nothing about the algorithm (XLM-R's file of that name is a unigram model).
    This matters on transformers 5: its ``MLukeTokenizer`` rebuilds a
    ``tokenizers`` Unigram backend from the file and fails to load a BPE-type
    model at all (``TypeError`` in ``AutoTokenizer``, ``ValueError`` in
    ``SentenceTransformer``), whereas a unigram-type model loads. Use
    ``"unigram"`` wherever the tiny model must load through transformers 5. The default is
    unigram because GLuCoSE's real file loads through transformers 5 (with shifted ids), which
    only a unigram-type model does.
    """
    import sentencepiece as spm
    import torch
    from transformers import LukeModel

    if sp_model_type not in SP_MODEL_TYPES:
        raise ValueError(f"sp_model_type must be one of {SP_MODEL_TYPES}, got {sp_model_type!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sentences = generate_corpus() if corpus is None else list(corpus)
    if not sentences:
        raise ValueError("corpus must contain at least one sentence")
    sp_bytes = _train_sentencepiece(sentences, vocab_size, sp_model_type)
    (out / SP_MODEL_FILE).write_bytes(sp_bytes)
    piece_size = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()

    config = _luke_config(
        vocab_size=piece_size + NUM_FAIRSEQ_EXTRA_TOKENS,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
    )
    torch.manual_seed(seed)
    model = LukeModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)

    _write_json(out / "entity_vocab.json", ENTITY_VOCAB)
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    for rel_path, payload in _sentence_transformers_files(hidden).items():
        _write_json(out / rel_path, payload)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI wrapper around :func:`build_tiny_model`; prints the layout built."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_tiny_model",
        description="Build a tiny random-weight pkshatech/GLuCoSE-base-ja look-alike.",
    )
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2000, help="sentencepiece pieces (target)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sp-model-type", choices=SP_MODEL_TYPES, default="unigram")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = build_tiny_model(
        args.output_dir,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        vocab_size=args.vocab_size,
        seed=args.seed,
        sp_model_type=args.sp_model_type,
    )
    elapsed = time.perf_counter() - start
    for path in _iter_files(out):
        print(f"{path.relative_to(out)}\t{path.stat().st_size} bytes")
    print(f"built {out} in {elapsed:.1f}s")
    return 0


def _iter_files(root: Path) -> Iterator[Path]:
    """Yield the regular files under ``root`` in sorted order."""
    return iter(sorted(p for p in root.rglob("*") if p.is_file()))


if __name__ == "__main__":
    raise SystemExit(main())
