"""Progress lines, fraction done and ETA, GPU-hours and cost: pure, with a fake clock."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest

from embedding import progress
from embedding.progress import Progress
from embedding.storage import Shard


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def shard(key: str, size: int) -> Shard:
    return Shard(url=f"/in/{key}", key=key, size=size, fingerprint="x")


def meta(key: str, rows: int, total: int = -1, tokens: int = 0, rejected: int = 0) -> dict:
    return {"shard": key, "rows": rows, "rejected": rejected, "total": total, "tokens": tokens}


def test_rates_fraction_and_eta_follow_the_staged_rows() -> None:
    clock = Clock()
    p = Progress([shard("a", 1000), shard("b", 3000)], clock=clock, log=False)
    clock.t += 10
    p.observe(meta("a", 40, tokens=400))
    snap = p.tick()
    # Nothing finished yet: no bytes-per-row to extrapolate from, so no estimate.
    assert snap.fraction is None and snap.eta_s is None
    assert snap.rows_per_s == pytest.approx(4.0) and snap.tokens_per_s == pytest.approx(40.0)

    clock.t += 10
    p.observe(meta("a", 60, total=100, tokens=600, rejected=0))  # a: 100 rows in 1000 bytes
    p.observe(meta("b", 150, tokens=1500))  # b: 150 rows ~ 1500 of its 3000 bytes
    snap = p.tick()
    assert snap.shards_done == 1 and snap.rows == 250
    assert snap.fraction == pytest.approx((1000 + 1500) / 4000)
    elapsed = 20.0
    assert snap.eta_s == pytest.approx(elapsed * (1 - 0.625) / 0.625)
    assert snap.rows_per_s == pytest.approx(21.0)  # 210 rows in the last 10 s


def test_a_shard_in_flight_never_counts_as_finished() -> None:
    clock = Clock()
    p = Progress([shard("a", 100), shard("b", 100)], clock=clock, log=False)
    p.observe(meta("a", 10, total=10))
    p.observe(meta("b", 10_000))  # far more rows than the estimate: capped below its size
    assert p.fraction() == pytest.approx((100 + 99) / 200)
    p.observe(meta("b", 1, total=10_001))
    assert p.fraction() == 1.0


def test_rejected_rows_count_as_processed() -> None:
    p = Progress([shard("a", 100)], clock=Clock(), log=False)
    p.observe(meta("a", 7, total=10, rejected=3))
    assert p.fraction() == 1.0 and p.tick().rows == 10


def test_log_line_has_rows_tokens_fraction_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    p = Progress([shard("a", 100), shard("b", 100)], clock=clock, log=True)
    clock.t += 4
    p.observe(meta("a", 8, total=8, tokens=80))
    with caplog.at_level(logging.INFO, logger="embedding.progress"):
        p.tick()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "embedding.progress"]
    assert line == "progress: 8 rows staged (2 rows/s, 20 tokens/s), 1/2 shards done, 50.0% done, ETA 0:00:04"


def test_gpu_hours_integrate_the_cluster_gpus_and_price_the_report() -> None:
    clock = Clock()
    gpus = [4.0]
    report = SimpleNamespace(gpu_hours=0.0, gpu_hour_price=None, estimated_cost=None)
    p = Progress([shard("a", 1)], clock=clock, gpus=lambda: gpus[0], gpu_hour_price=2.5, report=report, log=False)
    clock.t += 1800  # 4 GPUs for half an hour
    gpus[0] = 8.0  # the autoscaler added a node
    p.tick()
    assert report.gpu_hours == pytest.approx(2.0) and report.estimated_cost == pytest.approx(5.0)
    clock.t += 900  # 8 GPUs for a quarter hour
    p.finish()
    assert report.gpu_hours == pytest.approx(4.0) and report.estimated_cost == pytest.approx(10.0)
    assert report.gpu_hour_price == 2.5


def test_no_price_no_cost() -> None:
    assert progress.estimated_cost(3.0, None) is None
    assert progress.estimated_cost(1.234, 3.0) == 3.70


def test_track_ticks_in_the_background_and_stops_with_the_batches(caplog: pytest.LogCaptureFixture) -> None:
    import time

    p = Progress([shard("a", 10)], interval_s=0.02, log=True)

    def batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    with caplog.at_level(logging.INFO, logger="embedding.progress"):
        assert list(p.track(batches())) == [0, 1, 2]
        p._thread.join(timeout=2)
    assert not p._thread.is_alive()
    assert sum(r.name == "embedding.progress" for r in caplog.records) >= 2


@pytest.mark.parametrize(("tty", "mode"), [(True, "bars"), (False, "log")])
def test_auto_mode_is_bars_in_a_terminal_and_log_lines_elsewhere(tty: bool, mode: str) -> None:
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    assert progress.resolve_mode("auto", stream) == mode
    assert progress.resolve_mode("none", stream) == "none"
