"""LUKE's word weights in the plain-torch WordEncoder compute what LukeModel computes, or we fall back."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding.encode import EncoderModel, check_varlen
from embedding.luke import Packing, check_config, default_sdpa, load_word_encoder
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


def varlen_on_cpu(q, k, v, starts_q, starts_k, longest_q, longest_k, *, scale=None):
    """``torch.nn.attention.varlen.varlen_attn`` (CUDA only) on CPU, text by text: each packed
    text attends to its own tokens only. It stands in for the flash kernel so that the packing
    around it (:class:`Packing`, ``WordEncoder._forward_packed``) is tested here; the kernel
    itself is checked on the GPU at start-up (``check_varlen``)."""
    assert torch.equal(starts_q, starts_k) and longest_q == longest_k
    bounds = starts_q.tolist()
    assert max(b - a for a, b in itertools.pairwise(bounds)) == longest_q
    out = torch.empty_like(q)
    for a, b in itertools.pairwise(bounds):
        one = [x[a:b].transpose(0, 1) for x in (q, k, v)]  # (heads, tokens, head size)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*one, scale=scale).transpose(0, 1)
    return out


ATTENTION = {
    "explicit-attention": {"sdpa": False},
    "sdpa-as-on-gpu": {"sdpa": True},
    "varlen": {"varlen": varlen_on_cpu},
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attention", sorted(ATTENTION))
@pytest.mark.parametrize("fixture", ["tiny_model", "wide_model", "odd_head_model"])
def test_word_encoder_matches_luke_in_fp32_within_1e5(
    fixture: str, attention: str, batch: str, request: pytest.FixtureRequest
) -> None:
    from transformers import LukeModel

    path: Path = request.getfixturevalue(fixture)
    luke = LukeModel.from_pretrained(str(path), dtype=torch.float32).eval()
    word, why_not = load_word_encoder(path, torch.float32)
    assert word is not None, why_not
    assert all(layer.query_scaled for layer in word.layers) == (fixture != "odd_head_model")
    for name, value in ATTENTION[attention].items():
        setattr(word, name, value)
    ids, mask = _batch(batch, luke.config.vocab_size)
    with torch.inference_mode():
        want = luke(input_ids=ids, attention_mask=mask).last_hidden_state
        got = word(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5
    if attention == "varlen":
        assert not got[~real].any()  # padding is never computed: zeros


def test_cpu_attention_is_the_fused_kernel_in_float32_and_explicit_in_bf16(wide_model: Path) -> None:
    """The default padded attention: SDPA wherever it measured faster (GPUs; CPUs in float32),
    explicit in bf16 on CPU. The model's own forward pass takes that default."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_sdpa(cpu, torch.float32) and default_sdpa(cuda, torch.float32) and default_sdpa(cuda, torch.bfloat16)
    assert not default_sdpa(cpu, torch.bfloat16)
    ids, mask = _batch("padded", 1000)
    for dtype in (torch.float32, torch.bfloat16):
        word, _ = load_word_encoder(wide_model, dtype)
        with torch.inference_mode():
            default = word(input_ids=ids, attention_mask=mask)
            word.sdpa = not default_sdpa(cpu, dtype)
            other = word(input_ids=ids, attention_mask=mask)
            word.sdpa = default_sdpa(cpu, dtype)
            chosen = word(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        assert torch.equal(default[real], chosen[real])
        assert not torch.equal(default[real], other[real])  # the two paths round differently


def test_packing_lists_each_texts_tokens_in_order_for_right_and_left_padding() -> None:
    right = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    for mask in (right, right[:, ::-1]):
        p = Packing.of(torch.from_numpy(mask.copy()))
        assert p.flat.tolist() == np.flatnonzero(mask).tolist()
        assert p.starts.tolist() == [0, 3, 4, 8] and p.starts.dtype == torch.int32
        assert p.longest == 4
        same = Packing.of(mask)  # the host's numpy mask, as the encoder builds it
        assert torch.equal(same.flat, p.flat) and torch.equal(same.starts, p.starts)


def test_varlen_is_checked_on_its_device_before_it_is_used(wide_model: Path) -> None:
    """check_varlen accepts an attention that gives each text's own attention, in the model's
    dtype, and names what is wrong with one that does not: one that raises, one that attends
    across texts, one that gives NaN."""
    for dtype in (torch.float32, torch.bfloat16):
        word, _ = load_word_encoder(wide_model, dtype)
        assert check_varlen(word, varlen_on_cpu, torch.device("cpu")) is None

    def raises(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    def across_texts(q, k, v, starts_q, starts_k, longest_q, longest_k, *, scale=None):
        whole = torch.tensor([0, len(q)], dtype=torch.int32)  # every token attends to every text
        return varlen_on_cpu(q, k, v, whole, whole, len(q), len(q), scale=scale)

    def nan(*args, **kwargs):
        return varlen_on_cpu(*args, **kwargs) * float("nan")

    assert check_varlen(word, raises, torch.device("cpu")) == (
        "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    )
    assert "differ from each text's own attention" in check_varlen(word, across_texts, torch.device("cpu"))
    assert "non-finite" in check_varlen(word, nan, torch.device("cpu"))


def test_varlen_attention_is_refused_where_it_cannot_run(tiny_model: Path) -> None:
    spec = resolve_model(str(tiny_model))
    assert EncoderModel(spec, "cpu", "bfloat16").attention == "padded"  # auto, on CPU
    with pytest.raises(RuntimeError, match="CUDA"):
        EncoderModel(spec, "cpu", "bfloat16", attention="varlen")
    with pytest.raises(ValueError, match="attention must be one of"):
        EncoderModel(spec, "cpu", "bfloat16", attention="flash")


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


def test_encoder_with_varlen_attention_stays_within_1e4_of_reference(tiny_model: Path) -> None:
    """The encoder's packed path as a GPU runs it (the mask packed on the host, handed to the
    model), with the flash kernel's CPU stand-in."""
    spec = resolve_model(str(tiny_model))
    enc = EncoderModel(spec, "cpu", "float32")
    enc.attention, enc.model.varlen = "varlen", varlen_on_cpu
    ids = load_tokenizer(spec.tokenizer).encode(CORPUS)
    got, failed, widths = enc.embed(ids, max_tokens=1024, max_rows=4)
    assert not failed
    assert np.abs(got - reference_embeddings(tiny_model, CORPUS)).max() < 1e-4
    assert widths.tolist() == [len(a) for a in ids]  # no padding computed: padding efficiency 1


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
