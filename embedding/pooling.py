"""Pure tensor functions: token vectors -> one vector per text.

All take ``hidden`` of shape (batch, tokens, dim) and ``mask`` of shape (batch, tokens) with 1
for real tokens and 0 for padding, and return (batch, dim) in float32: pooling in the model's
compute dtype would round bf16 sums over hundreds of tokens.
"""

from __future__ import annotations

import torch

POOLINGS = ("mean", "cls", "max")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over attended tokens (sentence-transformers' ``pooling_mode_mean_tokens``)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    return summed / m.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first token's vector (``pooling_mode_cls_token``)."""
    return hidden[:, 0].to(torch.float32)


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max over attended tokens (``pooling_mode_max_tokens``)."""
    h = hidden.to(torch.float32).masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    return h.max(dim=1).values


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """L2 normalisation, as sentence-transformers' ``Normalize`` module."""
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def pool(mode: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    fns = {"mean": mean_pool, "cls": cls_pool, "max": max_pool}
    if mode not in fns:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {mode!r}")
    return fns[mode](hidden, mask)
