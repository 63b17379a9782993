"""Pure helpers: pooling functions and token-budget batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding.batching import padding_efficiency, token_budget_batches
from embedding.pooling import cls_pool, max_pool, mean_pool, normalize, pool


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    return hidden, mask


def test_mean_pool_ignores_padding() -> None:
    hidden, mask = _example()
    got = mean_pool(hidden, mask)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i], hidden[i, :n].mean(dim=0))


def test_mean_pool_pools_in_float32_from_bf16() -> None:
    hidden, mask = _example()
    got = mean_pool(hidden.to(torch.bfloat16), mask)
    assert got.dtype == torch.float32


def test_cls_and_max_pool() -> None:
    hidden, mask = _example()
    torch.testing.assert_close(cls_pool(hidden, mask), hidden[:, 0])
    got = max_pool(hidden, mask)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i], hidden[i, :n].max(dim=0).values)


def test_normalize_and_dispatch() -> None:
    hidden, mask = _example()
    v = normalize(pool("mean", hidden, mask))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool("weighted", hidden, mask)


def test_batches_cover_every_row_once_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 513, size=1000)
    batches = token_budget_batches(lengths, max_tokens=4096, max_rows=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) <= 64
        assert len(b) * lengths[b].max() <= 4096
    assert padding_efficiency(lengths, batches) > 0.9


def test_oversized_text_gets_its_own_batch() -> None:
    lengths = np.array([10, 600, 10])
    batches = token_budget_batches(lengths, max_tokens=512, max_rows=8)
    assert [sorted(b.tolist()) for b in batches] == [[0, 2], [1]]


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(np.array([1]), 0, 1)
