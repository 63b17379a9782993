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


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit-attention", "sdpa-as-on-gpu"])
@pytest.mark.parametrize("fixture", ["tiny_model", "wide_model"])
def test_word_encoder_matches_luke_in_fp32_within_1e5(fixture: str, sdpa: bool, request: pytest.FixtureRequest) -> None:
    from transformers import LukeModel

    path: Path = request.getfixturevalue(fixture)
    luke = LukeModel.from_pretrained(str(path), dtype=torch.float32).eval()
    word, why_not = load_word_encoder(path, torch.float32)
    assert word is not None, why_not
    word.sdpa = sdpa
    # Padded rows of very different lengths, up to the 512-token limit.
    ids, mask = _padded_batch([2, 3, 17, 64, 130, 511, 512], luke.config.vocab_size)
    with torch.inference_mode():
        want = luke(input_ids=ids, attention_mask=mask).last_hidden_state
        got = word(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5


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
    got, failed = enc.embed(load_tokenizer(spec.tokenizer).encode(CORPUS), max_tokens=1024, max_rows=4)
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
