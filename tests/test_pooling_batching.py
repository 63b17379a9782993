"""Pure helpers: pooling functions and token-budget batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding.batching import padding_efficiency, token_budget_batches, windowed_batches
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


def _corpus_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token lengths shaped like the benchmark corpus: most 10 to 150, a tail up to 512."""
    rng = np.random.default_rng(seed)
    body = np.clip(rng.lognormal(np.log(55), 0.7, size=n), 3, 512)
    tail = rng.random(n) < 0.03
    return np.where(tail, rng.integers(150, 513, size=n), body).astype(np.int64)


def test_windowed_batches_cover_every_row_once_and_stay_in_their_window() -> None:
    lengths = _corpus_like_lengths(5000)
    batches = windowed_batches(lengths, window_rows=1024, max_tokens=4096, max_rows=256)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(5000))
    for b in batches:
        assert len(set((b // 1024).tolist())) == 1, "a batch mixes rows of two windows"
        assert len(b) <= 256 and (len(b) * lengths[b].max() <= 4096 or len(b) == 1)


def test_default_window_and_budget_reach_095_padding_efficiency() -> None:
    from embedding.batching import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS, DEFAULT_WINDOW_ROWS

    lengths = _corpus_like_lengths(100_000)
    for device in ("cpu", "cuda"):
        batches = windowed_batches(
            lengths, DEFAULT_WINDOW_ROWS[device], DEFAULT_BATCH_TOKENS[device], DEFAULT_BATCH_ROWS[device]
        )
        assert padding_efficiency(lengths, batches) >= 0.95, device


def test_small_windows_waste_more_than_large_ones() -> None:
    lengths = _corpus_like_lengths(8192)
    eff = [padding_efficiency(lengths, windowed_batches(lengths, w, 4096, 256)) for w in (64, 512, 8192)]
    assert eff[0] < eff[1] < eff[2]


def test_padding_efficiency_counts_padding() -> None:
    lengths = np.array([2, 4, 4, 8])
    assert padding_efficiency(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(18 / 24)
    assert padding_efficiency(lengths, [np.array([0]), np.array([1, 2]), np.array([3])]) == 1.0
    with pytest.raises(ValueError, match="window_rows"):
        windowed_batches(lengths, 0, 16, 4)
