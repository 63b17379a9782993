"""Seeing the work: progress on the driver, and the GPU time a run used.

In a terminal, Ray Data draws its progress bars for the stages. Without one (``ray job
submit`` logs, cron, Airflow, CI), Ray Data's bars are turned off and :class:`Progress` logs
one line every ``interval_s`` seconds instead::

    progress: 1,204/9,876 rows staged (98 rows/s, 10,388 tokens/s), 1/5 shards done, 12.2% done, ETA 0:01:28

The fraction done is by input bytes: a shard whose rows are all staged counts its whole size;
a shard in flight counts its staged rows times the bytes per row seen in finished shards
(capped below its size). Before any shard has finished there is no estimate, and the line
says ``?``. Rates are over the last interval.

GPU time is the cluster's GPU count integrated over the embedding phase, sampled at every
tick: what an autoscaling cluster bills, not what the encoders kept busy.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from embedding.storage import Shard

logger = logging.getLogger(__name__)

MODES = ("auto", "bars", "log", "none")


def resolve_mode(mode: str, stream=None) -> str:
    """``auto`` -> ``bars`` where stderr is a terminal, else ``log``."""
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    return "bars" if getattr(stream, "isatty", lambda: False)() else "log"


def set_ray_data_bars(enabled: bool) -> None:
    """Ray Data's own progress output: bars in a terminal; off where our log line replaces it
    (without a terminal Ray Data would log a multi-line block per stage every few seconds)."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = enabled
    if enabled:
        # Ray 2.60 draws its per-stage bars in a terminal only with the rich UI (its tqdm bars
        # print nothing under a pseudo-terminal); checked with `script -qc`.
        ctx.enable_rich_progress_bars = True
        ctx.use_ray_tqdm = False
    if not enabled:
        log_once("ray_data_progress_manager_disabled")  # its "bars disabled" hint misleads here


def for_run(config: Any, shards: Iterable[Shard], report: Any) -> Progress:
    """The driver's tracker for one run: resolves ``config.progress``, sets Ray Data's bars,
    and samples the cluster's GPUs. Call after ``ray.init``."""
    import ray

    mode = resolve_mode(config.progress)
    set_ray_data_bars(mode == "bars")
    use_gpus = config.device != "cpu"
    return Progress(
        shards,
        interval_s=config.progress_interval,
        log=mode == "log",
        gpus=lambda: ray.cluster_resources().get("GPU", 0.0) if use_gpus else 0.0,
        gpu_hour_price=config.gpu_hour_price,
        report=report,
    )


@dataclass(frozen=True)
class Snapshot:
    rows: int
    tokens: int
    shards_done: int
    shards: int
    rows_per_s: float
    tokens_per_s: float
    fraction: float | None
    eta_s: float | None

    def line(self) -> str:
        fraction = "?" if self.fraction is None else f"{100 * self.fraction:.1f}%"
        eta = "?" if self.eta_s is None else _hms(self.eta_s)
        return (
            f"progress: {self.rows:,} rows staged ({self.rows_per_s:,.0f} rows/s, "
            f"{self.tokens_per_s:,.0f} tokens/s), {self.shards_done}/{self.shards} shards done, "
            f"{fraction} done, ETA {eta}"
        )


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counters the driver's loop feeds (:meth:`observe`), a periodic log line, GPU seconds.

    ``gpus`` returns the cluster's GPU count now; ``clock`` is seconds (monotonic). A thread
    ticks every ``interval_s`` while :meth:`track` runs; ``log`` says whether a tick logs.
    """

    def __init__(
        self,
        shards: Iterable[Shard],
        *,
        interval_s: float = 30.0,
        log: bool = True,
        gpus: Callable[[], float] = lambda: 0.0,
        gpu_hour_price: float | None = None,
        report: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sizes = {s.key: max(0, s.size) for s in shards}
        self.interval_s = interval_s
        self.log = log
        self.gpu_hour_price = gpu_hour_price
        # The run report gets `gpu_hours` and `estimated_cost` at every tick, so that a run
        # that fails still reports what it used up to its last tick.
        self.report = report
        self._gpus, self._clock = gpus, clock
        self.staged: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.rows = 0
        self.tokens = 0
        self.started = clock()
        self._last = (self.started, 0, 0)
        self._gpu_now = self._sample_gpus()
        self._gpu_at = self.started
        self.gpu_seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- fed by the driver loop -------------------------------------------------------------
    def observe(self, row: dict) -> None:
        """One metadata row of the write stage: ``shard``, ``rows``, ``rejected``, ``total``, ``tokens``."""
        with self._lock:
            key = row["shard"]
            n = row["rows"] + row["rejected"]
            self.staged[key] = self.staged.get(key, 0) + n
            if row["total"] >= 0:
                self.totals[key] = row["total"]
            self.rows += n
            self.tokens += row["tokens"]

    def track(self, batches: Iterable) -> Iterator:
        """Yield ``batches`` unchanged while a thread logs progress; the thread ends with them."""
        self._thread = threading.Thread(target=self._run, name="embedding-progress", daemon=True)
        self._thread.start()
        try:
            yield from batches
        finally:
            self._stop.set()

    def finish(self) -> Snapshot:
        """Stop ticking, bring the report's GPU time up to now and log the final line."""
        self._stop.set()
        return self.tick()

    # -- computed ---------------------------------------------------------------------------
    def fraction(self) -> float | None:
        """Estimated fraction of the input bytes processed, or None before any shard finished."""
        done = {k for k, t in self.totals.items() if self.staged.get(k, 0) >= t}
        total_bytes = sum(self.sizes.values())
        if not self.sizes:
            return None
        if total_bytes == 0:  # sizes unknown: count shards
            return len(done) / len(self.sizes)
        done_bytes = sum(self.sizes.get(k, 0) for k in done)
        done_rows = sum(self.totals[k] for k in done)
        if not done or done_bytes == 0:
            return None
        rows_per_byte = done_rows / done_bytes
        partial = 0.0
        for key, n in self.staged.items():
            if key in done or key not in self.sizes:
                continue
            size = self.sizes[key]
            partial += min(0.99 * size, n / rows_per_byte) if rows_per_byte else 0.0
        return min(1.0, (done_bytes + partial) / total_bytes)

    def tick(self) -> Snapshot:
        """Take a snapshot, fold GPU time up to now, and log the line (when logging)."""
        now = self._clock()
        with self._lock:
            rows, tokens = self.rows, self.tokens
            fraction = self.fraction()
            shards_done = sum(1 for k, t in self.totals.items() if self.staged.get(k, 0) >= t)
        self._fold_gpus(now)
        last_t, last_rows, last_tokens = self._last
        dt = max(now - last_t, 1e-9)
        self._last = (now, rows, tokens)
        elapsed = now - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction else None
        snap = Snapshot(
            rows=rows,
            tokens=tokens,
            shards_done=shards_done,
            shards=len(self.sizes),
            rows_per_s=(rows - last_rows) / dt,
            tokens_per_s=(tokens - last_tokens) / dt,
            fraction=fraction,
            eta_s=eta,
        )
        if self.report is not None:
            self.report.gpu_hours = round(self.gpu_seconds / 3600, 4)
            self.report.gpu_hour_price = self.gpu_hour_price
            self.report.estimated_cost = estimated_cost(self.gpu_seconds / 3600, self.gpu_hour_price)
        if self.log:
            logger.info(snap.line())
        return snap

    def _fold_gpus(self, now: float) -> None:
        with self._lock:
            self.gpu_seconds += self._gpu_now * max(0.0, now - self._gpu_at)
            self._gpu_at = now
            self._gpu_now = self._sample_gpus()

    def _sample_gpus(self) -> float:
        try:
            return float(self._gpus())
        except Exception:  # a sampling hiccup must not end the run; keep the last value
            logger.debug("could not read the cluster's GPU count", exc_info=True)
            return getattr(self, "_gpu_now", 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                logger.debug("progress tick failed", exc_info=True)


def estimated_cost(gpu_hours: float, price: float | None) -> float | None:
    """``gpu_hours`` × ``price`` (currency per GPU-hour), rounded to cents; None without a price."""
    return None if price is None else round(gpu_hours * price, 2)
