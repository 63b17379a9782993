"""LUKE read with word inputs only, as a plain-torch encoder: the same computation, less around it.

GLuCoSE is a ``LukeModel``. Without entity inputs a LUKE layer computes exactly what a RoBERTa
layer does: its entity-aware attention (``w2e``/``e2w``/``e2e`` queries) only applies to
entity tokens, and its embeddings are RoBERTa's (position ids counted from ``pad_token_id``,
token type 0). :class:`WordEncoder` is that word path and nothing else:

- query, key and value are one ``hidden × 3·hidden`` matrix multiply (LUKE's three weights,
  concatenated at load), so each layer runs four linear layers instead of six;
- attention on CPU in bf16 is the explicit matmul-softmax-matmul, which at these lengths (tens
  to a few hundred tokens, head size 64) embedded 5 to 15% more tokens per second in process
  than PyTorch's CPU flash kernel; in float32 the flash kernel is the faster one (attention
  alone 1.4 to 2.7 times as fast on an AVX2 CPU, the whole pass 3% less CPU), see
  :func:`default_sdpa`;
  on GPU it is ``scaled_dot_product_attention`` (the fused, memory-efficient kernels), or,
  where the caller has checked it on the device, variable-length flash attention over packed
  tokens (:class:`Packing`): every layer then runs on the real tokens only and no padding is
  computed at all. On CPU, packing gave no measurable gain (bit-identical, +0.6% within noise:
  padding is 3.4% there, and the gathers cost about what it saves), so CPU stays padded;
- on CPU, three passes over the score matrices or the hidden states are gone, each without
  changing a bit of the result: the ``1/sqrt(64)`` score scale is folded into the query
  weights, the padding mask is written into the padded columns only, and the residual adds
  are in place. Together about 7% more tokens per second in process (10.2k to 10.9k on one
  core of the benchmark's 384 × 4 model; ``tests/test_luke.py`` checks the bits);
- it returns the last hidden state only: no output objects, no pooler, no entity side;
- it needs only torch, so an encoder actor does not import ``transformers`` (2 s a process).

:func:`load_word_encoder` builds it only where the config and the weights are exactly what this
equivalence needs (:func:`check_config`, strict weight names), and returns ``None`` with the
reason otherwise, so the caller falls back to ``LukeModel``. ``tests/test_luke.py`` proves the
equivalence in fp32 (≤ 1e-5 against ``LukeModel``) over padded batches of mixed lengths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENTITY_PREFIXES = ("entity_embeddings.", "pooler.")
ENTITY_QUERIES = (".w2e_query.", ".e2w_query.", ".e2e_query.")
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
)
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # exact erf GELU, as transformers' "gelu"


def check_config(luke: dict) -> str | None:
    """None where :class:`WordEncoder` computes what ``luke`` (a LukeConfig as a dict) computes
    on words; otherwise the reason it may not."""
    if luke.get("model_type") != "luke":
        return f"model_type is {luke.get('model_type')!r}, not 'luke'"
    if luke.get("position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {luke['position_embedding_type']!r} is not absolute"
    if luke.get("is_decoder") or luke.get("add_cross_attention"):
        return "a decoder LUKE is not a RoBERTa encoder"
    missing = [k for k in REQUIRED if k not in luke]
    if missing:
        return f"config lacks {missing}"
    if luke.get("hidden_act", "gelu") not in ACTIVATIONS:
        return f"hidden_act {luke['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}"
    if luke["hidden_size"] % luke["num_attention_heads"]:
        return "hidden_size is not a multiple of num_attention_heads"
    return None


class _Mask:
    """An attention mask, applied to the scores as transformers applies it: the dtype's minimum
    added where a key is padding. Right padding (what the job sends) is written into just the
    padded columns of each padded row, which gives the same scores and skips a pass over the
    whole score matrix; any other mask is added whole."""

    def __init__(self, attention_mask: torch.Tensor, dtype: torch.dtype, *, sdpa: bool) -> None:
        self.min = torch.finfo(dtype).min
        self.rows: list[tuple[int, int]] | None = None
        self.bias: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        if sdpa:  # SDPA takes the boolean mask (the padded rows would have to come back from the device)
            self.keep = attention_mask.bool()[:, None, None, :]
            return
        t = attention_mask.shape[1]
        lengths = attention_mask.sum(dim=1)
        if torch.equal(attention_mask.bool(), torch.arange(t, device=attention_mask.device) < lengths[:, None]):
            self.rows = [(i, n) for i, n in enumerate(lengths.tolist()) if n < t]
        else:
            self.bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * self.min

    def apply(self, scores: torch.Tensor) -> None:
        if self.rows is None:
            scores.add_(self.bias)
        else:
            for i, n in self.rows:
                scores[i, :, :, n:] = self.min


class Packing:
    """The real tokens of a padded batch, packed row after row: what variable-length attention
    reads instead of a padded grid. Built on the host from the mask the host already has, so a
    GPU never reports back where the tokens are (no device-to-host sync per forward pass).

    ``flat``: each real token's index in the flattened (batch x width) grid; ``starts``: where
    each row's tokens begin in the packed order, with the total last (int32, as flash attention
    takes it); ``longest``: the longest row."""

    def __init__(self, flat: torch.Tensor, starts: torch.Tensor, longest: int) -> None:
        self.flat, self.starts, self.longest = flat, starts, longest

    @classmethod
    def of(cls, attention_mask: np.ndarray | torch.Tensor) -> Packing:
        mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
        lengths = mask.sum(axis=1)
        starts = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=starts[1:])
        flat = np.flatnonzero(mask.reshape(-1))
        return cls(torch.from_numpy(flat), torch.from_numpy(starts), int(lengths.max(initial=0)))

    def to(self, device: torch.device | str) -> Packing:
        return Packing(self.flat.to(device, non_blocking=True), self.starts.to(device, non_blocking=True), self.longest)


def varlen_attention():
    """PyTorch's variable-length flash attention (CUDA, bf16/fp16), or None where this torch
    has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def default_sdpa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether padded attention goes through ``scaled_dot_product_attention`` (a fused kernel)
    rather than explicit matmul, mask and softmax: on GPUs always, on CPUs in float32 only.

    Measured on CPU, 384 x 4, the benchmark corpus in 512-text windows: in float32 (AVX2),
    PyTorch's flash kernel took attention from 2.55 to 1.75 s of a 17.8 s pass, and the whole
    pass 3% less CPU time with both cores busy; in bf16 (AVX512-BF16) the explicit path was
    faster at every width below 512 tokens (4.3 against 6.8 ms at 28 x 73)."""
    return device.type == "cuda" or dtype == torch.float32


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act) -> None:
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.act = act
        self.query_scaled = False

    @torch.no_grad()
    def fold_query_scale(self) -> None:
        """Scale the query weights by attention's ``1/sqrt(head_size)`` once, where that is a
        power of two (head size 64: 1/8), instead of scaling every score matrix.

        A power-of-two scale changes no rounding anywhere, so the scores are bit for bit the
        ones the division gives. Other head sizes keep the division."""
        scale = 1 / math.sqrt(self.head_size)
        if self.query_scaled or math.frexp(scale)[0] != 0.5:
            return
        h = self.out.in_features
        self.qkv.weight[:h].mul_(scale)
        self.qkv.bias[:h].mul_(scale)
        self.query_scaled = True

    @property
    def kernel_scale(self) -> float | None:
        """The ``scale`` an attention kernel is passed: 1 where the queries carry it already,
        else None (the kernel's own ``1/sqrt(head_size)``)."""
        return 1.0 if self.query_scaled else None

    def forward(self, x: torch.Tensor, mask: _Mask, sdpa: bool) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        if sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.keep, scale=self.kernel_scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))
            if not self.query_scaled:
                scores.div_(math.sqrt(self.head_size))
            mask.apply(scores)
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self._rest(ctx.transpose(1, 2).reshape(b, t, h), x)

    def forward_packed(self, x: torch.Tensor, packing: Packing, attend) -> torch.Tensor:
        """``x``: the real tokens only, (tokens, hidden); ``attend``: variable-length attention
        with :func:`varlen_attention`'s signature."""
        n, h = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_size).unbind(1)
        ctx = attend(q, k, v, packing.starts, packing.starts, packing.longest, packing.longest, scale=self.kernel_scale)
        return self._rest(ctx.reshape(n, h), x)

    def _rest(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.out(ctx).add_(x))
        return self.norm2(self.down(self.act(self.up(x))).add_(x))


class WordEncoder(nn.Module):
    """LUKE's word path: ``(input_ids, attention_mask) -> last hidden state``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.pad_id = config["pad_token_id"]
        self.sdpa: bool | None = None  # None: default_sdpa(device, dtype)
        # Variable-length attention (varlen_attention()'s signature) over packed tokens, in
        # place of either; set by the caller once it has checked it on its device.
        self.varlen = None
        self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type = nn.Parameter(torch.zeros(hidden))  # row 0: word inputs have type 0
        self.norm = nn.LayerNorm(hidden, eps=eps)
        act = ACTIVATIONS[config.get("hidden_act", "gelu")]
        self.layers = nn.ModuleList(
            _Layer(hidden, config["num_attention_heads"], config["intermediate_size"], eps, act)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: Packing | None = None
    ) -> torch.Tensor:
        """(batch, width) ids and mask -> (batch, width, hidden); padded positions are zeros
        where attention is variable-length, and unspecified otherwise. ``packing``: the batch's
        :class:`Packing` on the model's device, for variable-length attention (built from the
        mask where not given)."""
        # RoBERTa's positions: counted over non-pad tokens, starting after pad_token_id.
        real = input_ids.ne(self.pad_id).int()
        positions = torch.cumsum(real, dim=1).mul_(real).long() + self.pad_id
        if self.varlen is not None:
            return self._forward_packed(input_ids, positions, attention_mask, packing)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type
        x = self.norm(x)
        sdpa = self.sdpa if self.sdpa is not None else default_sdpa(x.device, x.dtype)
        mask = _Mask(attention_mask, x.dtype, sdpa=sdpa)
        for layer in self.layers:
            x = layer(x, mask, sdpa)
        return x

    def _forward_packed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, packing: Packing | None
    ) -> torch.Tensor:
        """Every token-wise layer on the real tokens only, attention over each row's own."""
        if packing is None:
            packing = Packing.of(attention_mask).to(input_ids.device)
        b, t = input_ids.shape
        ids, positions = input_ids.reshape(-1)[packing.flat], positions.reshape(-1)[packing.flat]
        x = self.norm(self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type)
        for layer in self.layers:
            x = layer.forward_packed(x, packing, self.varlen)
        out = x.new_zeros(b * t, x.shape[1])
        return out.index_copy_(0, packing.flat, x).view(b, t, -1)


def word_state_dict(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """LukeModel's word weights under :class:`WordEncoder`'s names; raises KeyError naming a
    weight that is missing, ValueError naming one it does not know."""
    state = {
        k: v for k, v in state.items() if not k.startswith(ENTITY_PREFIXES) and not any(q in k for q in ENTITY_QUERIES)
    }
    out = {
        "word_embeddings.weight": state.pop("embeddings.word_embeddings.weight"),
        "position_embeddings.weight": state.pop("embeddings.position_embeddings.weight"),
        "token_type": state.pop("embeddings.token_type_embeddings.weight")[0],
        "norm.weight": state.pop("embeddings.LayerNorm.weight"),
        "norm.bias": state.pop("embeddings.LayerNorm.bias"),
    }
    state.pop("embeddings.position_ids", None)  # a buffer some exports carry
    for i in range(layers):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[o + "qkv." + kind] = torch.cat(
                [state.pop(f"{p}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            )
            out[o + "out." + kind] = state.pop(f"{p}attention.output.dense.{kind}")
            out[o + "norm1." + kind] = state.pop(f"{p}attention.output.LayerNorm.{kind}")
            out[o + "up." + kind] = state.pop(f"{p}intermediate.dense.{kind}")
            out[o + "down." + kind] = state.pop(f"{p}output.dense.{kind}")
            out[o + "norm2." + kind] = state.pop(f"{p}output.LayerNorm.{kind}")
    if state:
        raise ValueError(f"weights outside LUKE's word path: {sorted(state)[:3]}")
    return out


def load_word_encoder(
    path: str | Path, dtype: torch.dtype, *, fold_scale: bool = True
) -> tuple[WordEncoder | None, str | None]:
    """:class:`WordEncoder` with LUKE's word weights from ``path``, or ``(None, reason)``.

    Every weight must be placed (strict loading): a weight this mapping does not know about
    means a model it has not been proven on. ``fold_scale``: see :meth:`_Layer.fold_query_scale`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    reason = check_config(config)
    if reason is not None:
        return None, reason
    try:
        state = word_state_dict(load_file(str(path / "model.safetensors")), config["num_hidden_layers"])
    except KeyError as e:
        return None, f"weights lack {e.args[0]}"
    except ValueError as e:
        return None, str(e)
    model = WordEncoder(config)
    model.load_state_dict(state, strict=True)
    if fold_scale:
        for layer in model.layers:
            layer.fold_query_scale()
    return model.to(dtype).eval(), None
