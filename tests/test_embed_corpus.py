"""The CLI's exit codes: distinct, documented, and each returned for its case.

``pipeline.run`` is replaced by a stub so that each outcome is produced without Ray; the real
runs are in test_pipeline.py (0 and 2 through a subprocess) and test_cluster.py (0 through
``ray job submit``).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from embedding import pipeline
from embedding.ledger import LockedError
from jobs import embed_corpus
from jobs.embed_corpus import Exit
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures the root logger; give the next test the logging it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


ARGS = ["--input", "samples/corpus", "--output", "/tmp/never-written"]


def report(**kw) -> SimpleNamespace:
    base = dict(
        run_id="r",
        shards_seen=1,
        shards_skipped=0,
        shards_embedded=1,
        shards_replaced=0,
        shards_pruned=0,
        rows_embedded=3,
        rows_rejected=0,
        tokens=30,
        wall_seconds=1.0,
        rows_per_second=3.0,
        tokens_per_second=30.0,
        padding_efficiency=0.9,
        device="cpu",
        dtype="float32",
        gpu_hours=0.5,
        estimated_cost=1.25,
        output="/tmp/never-written",
    )
    return SimpleNamespace(**(base | kw))


def test_exit_codes_are_distinct_and_documented() -> None:
    codes = [int(c) for c in Exit]
    assert len(set(codes)) == len(codes) == 6
    assert {c.name: int(c) for c in Exit} == {
        "OK": 0,
        "FAILED": 1,
        "REFUSED": 2,
        "REJECTED_ABOVE_LIMIT": 3,
        "SHARDS_FAILED": 4,
        "INTERRUPTED": 130,
    }
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for code in Exit:
        assert f"| `{int(code)}` |" in readme, f"README's exit status table lacks {code!r}"
        assert code.name in embed_corpus.__doc__


@pytest.mark.parametrize(
    ("outcome", "code", "line"),
    [
        (report(), Exit.OK, None),
        (RuntimeError("worker died"), Exit.FAILED, "embed_corpus: failed: RuntimeError: worker died"),
        (pipeline.ConfigError("output inside input"), Exit.REFUSED, "embed_corpus: refused: output inside input"),
        (LockedError("run x holds the lock"), Exit.REFUSED, "embed_corpus: refused: run x holds the lock"),
        (KeyboardInterrupt(), Exit.INTERRUPTED, "embed_corpus: interrupted:"),
        (
            pipeline.TooManyRejectedError("9 of 10 rows rejected", report()),
            Exit.REJECTED_ABOVE_LIMIT,
            "embed_corpus: too many rejected rows: 9 of 10",
        ),
        (
            pipeline.ShardsFailedError("1 of 3 shard(s) to embed could not be read", report()),
            Exit.SHARDS_FAILED,
            "embed_corpus: shards not read: 1 of 3",
        ),
    ],
)
def test_each_outcome_has_its_exit_code(
    outcome, code: Exit, line: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def fake_run(config):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert embed_corpus.main(ARGS) == code
    out, err = capsys.readouterr()
    if line is None:
        assert "0.500 GPU-hours (est. cost 1.25)" in out and err == ""
    else:
        assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err


def test_bad_setting_is_refused_before_the_run(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(pipeline, "run", lambda config: pytest.fail("must not run"))
    assert embed_corpus.main([*ARGS, "--gpu-hour-price", "-1"]) == Exit.REFUSED
    assert "`gpu_hour_price`" in capsys.readouterr().err


def test_failure_line_never_shows_a_credential(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    secret = "aws-secret-value-that-must-not-leak"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def fake_run(config):
        raise OSError(f"signature mismatch for key {secret}")

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert embed_corpus.main(ARGS) == Exit.FAILED
    err = capsys.readouterr().err
    assert secret not in err and "***" in err
