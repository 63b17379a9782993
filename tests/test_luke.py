"""LUKE's word weights in the plain-torch WordEncoder compute what LukeModel computes, or we fall back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding.encode import EncoderModel
from embedding.luke import check_config, load_word_encoder
from embedding.model import resolve_model
from embedding.tokenize import load_tokenizer
from tests.reference import reference_embeddings
from tests.test_tokenize import CORPUS


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wider than the session model and with 6 heads of 16, so head splitting is exercised."""
    from jobs.make_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("luke") / "m", hidden=96, layers=3, heads=6, intermediate=256)


def _padded_batch(lengths: list[int], vocab: int, pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def odd_head_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads of 24: 1/sqrt(24) is no power of two, so the scores are divided, not pre-scaled."""
    from jobs.make_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("luke") / "m", hidden=48, layers=2, heads=2, intermediate=96)


# Padded rows of very different lengths, up to the 512-token limit; a batch with no padding; and
# one padded on the left, whose mask is not the prefix the encoder writes into row by row.
BATCHES = {"padded": [2, 3, 17, 64, 130, 511, 512], "no-padding": [37] * 5, "left-padded": [3, 30, 64]}


def _batch(kind: str, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _padded_batch(BATCHES[kind], vocab)
    return (ids.flip(1), mask.flip(1)) if kind == "left-padded" else (ids, mask)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit-attention", "sdpa-as-on-gpu"])
@pytest.mark.parametrize("fixture", ["tiny_model", "wide_model", "odd_head_model"])
def test_word_encoder_matches_luke_in_fp32_within_1e5(
    fixture: str, sdpa: bool, batch: str, request: pytest.FixtureRequest
) -> None:
    from transformers import LukeModel

    path: Path = request.getfixturevalue(fixture)
    luke = LukeModel.from_pretrained(str(path), dtype=torch.float32).eval()
    word, why_not = load_word_encoder(path, torch.float32)
    assert word is not None, why_not
    assert all(layer.query_scaled for layer in word.layers) == (fixture != "odd_head_model")
    word.sdpa = sdpa
    ids, mask = _batch(batch, luke.config.vocab_size)
    with torch.inference_mode():
        want = luke(input_ids=ids, attention_mask=mask).last_hidden_state
        got = word(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_weights_prescaled_give_the_same_bits_as_dividing_the_scores(wide_model: Path, dtype) -> None:
    folded, _ = load_word_encoder(wide_model, dtype)
    divided, _ = load_word_encoder(wide_model, dtype, fold_scale=False)
    assert all(layer.query_scaled for layer in folded.layers)
    assert not any(layer.query_scaled for layer in divided.layers)
    for kind in BATCHES:
        ids, mask = _batch(kind, 2000)
        with torch.inference_mode():
            assert torch.equal(folded(input_ids=ids, attention_mask=mask), divided(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_columns_written_row_by_row_give_the_scores_and_weights_of_the_added_mask(dtype) -> None:
    from embedding.luke import _Mask

    _, right = _batch("padded", 2000)
    _, left = _batch("left-padded", 2000)
    assert _Mask(right, dtype, sdpa=False).rows is not None
    assert _Mask(left, dtype, sdpa=False).rows is None  # not a prefix: the whole mask is added
    scores = torch.randn(right.shape[0], 3, right.shape[1], right.shape[1], dtype=dtype) * 8
    added = scores + (1.0 - right[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    written = scores.clone()
    _Mask(right, dtype, sdpa=False).apply(written)
    assert torch.equal(torch.softmax(written, -1), torch.softmax(added, -1))
    assert torch.equal(
        written[right.bool()[:, None, None, :].expand_as(written)],
        scores[right.bool()[:, None, None, :].expand_as(scores)],
    )


def test_word_encoder_in_bf16_stays_close_to_luke_in_bf16(tiny_model: Path) -> None:
    """The bf16 path rounds differently (fused QKV, in-place scaling) but not further."""
    from transformers import LukeModel

    luke = LukeModel.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    word, _ = load_word_encoder(tiny_model, torch.bfloat16)
    ids, mask = _padded_batch([5, 40, 200], luke.config.vocab_size)
    with torch.inference_mode():
        want = luke(input_ids=ids, attention_mask=mask).last_hidden_state
        got = word(input_ids=ids, attention_mask=mask).float()
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(got[real], want[real], dim=-1)
    assert cos.min().item() >= 0.999


def test_encoder_runs_the_remap_and_stays_within_1e4_of_reference(tiny_model: Path) -> None:
    spec = resolve_model(str(tiny_model))
    enc = EncoderModel(spec, "cpu", "float32")
    assert enc.architecture == "WordEncoder"
    got, failed, _ = enc.embed(load_tokenizer(spec.tokenizer).encode(CORPUS), max_tokens=1024, max_rows=4)
    assert not failed
    assert np.abs(got - reference_embeddings(tiny_model, CORPUS)).max() < 1e-4


def test_unproven_luke_falls_back_to_lukemodel(tiny_model: Path, tmp_path: Path) -> None:
    d = tmp_path / "relative-positions"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (d / "config.json").write_text(json.dumps(cfg))
    model, why_not = load_word_encoder(d, torch.float32)
    assert model is None and "position_embedding_type" in why_not
    enc = EncoderModel(resolve_model(str(d)), "cpu", "float32")
    assert enc.architecture == "LukeModel"


def test_remap_refuses_unknown_weights_and_other_models(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "extra-weight"
    shutil.copytree(tiny_model, d)
    state = load_file(str(d / "model.safetensors"))
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(4)
    save_file(state, str(d / "model.safetensors"))
    model, why_not = load_word_encoder(d, torch.float32)
    assert model is None and "rotary" in why_not
    del state["encoder.layer.0.attention.self.rotary.weight"], state["encoder.layer.0.output.dense.bias"]
    save_file(state, str(d / "model.safetensors"))
    model, why_not = load_word_encoder(d, torch.float32)
    assert model is None and "encoder.layer.0.output.dense.bias" in why_not
    assert "model_type" in check_config({"model_type": "bert"})
    assert "hidden_act" in check_config({**json.loads((tiny_model / "config.json").read_text()), "hidden_act": "swish"})
