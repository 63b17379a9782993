"""Dirty input: every bad row is quarantined with its reason, never lost; good rows all land.

The policy, one row per case (``embedded`` means the row enters the output):
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding import pipeline
from embedding import schema as S
from embedding.config import JobConfig
from embedding.read import probe_layout
from tests.test_exactly_once import committed_rows

pytestmark = pytest.mark.slow

HUGE = "吾輩は猫である。名前はまだ無い。" * 20_000  # 320,000 characters

# (JSONL line as bytes, expected outcome: "embedded" or the reject reason code)
CASES: list[tuple[bytes, str]] = [
    (b'{"id": "good-1", "text": "\xe4\xbb\x8a\xe6\x97\xa5\xe3\x81\xaf\xe6\x99\xb4\xe3\x82\x8c"}', "embedded"),
    (b'{"id": "null-text", "text": null}', "missing_text"),
    (b'{"id": "missing-text"}', "missing_text"),
    (b'{"id": "empty-text", "text": ""}', "empty_text"),
    (b'{"id": "blank-text", "text": " \\t\\u3000 "}', "empty_text"),
    (b'{"id": "number-text", "text": 42}', "text_type"),
    (b'{"id": "list-text", "text": ["a", "b"]}', "text_type"),
    (b'{"id": "object-text", "text": {"ja": "x"}}', "text_type"),
    (b'{"id": "broken", "text": "unterminated', "malformed_json"),
    (b'["not", "an", "object"]', "not_object"),
    (b'"just a string"', "not_object"),
    (b'{"id": "bad-utf8", "text": "\xff\xfe\xfa"}', "invalid_utf8"),
    (b'{"id": "surrogate", "text": "\\ud800 lone"}', "lone_surrogate"),
    (b'{"id": "nul", "text": "a\\u0000b"}', "nul_char"),
    (b'{"text": "no id here"}', "missing_id"),
    (b'{"id": null, "text": "null id"}', "missing_id"),
    (b'{"id": 1.5, "text": "float id"}', "id_type"),
    (b'{"id": ["x"], "text": "list id"}', "id_type"),
    (b'{"id": 7, "text": "an integer id is kept, as the string 7"}', "embedded"),
    (b'{"id": "dup", "text": "first of two rows with one id"}', "embedded"),
    (b'{"id": "dup", "text": "second of two rows with one id"}', "embedded"),
    (json.dumps({"id": "huge", "text": HUGE}, ensure_ascii=False).encode(), "embedded"),
    (b'{"id": "good-2", "text": "[MASK] \xe3\x81\xa8 <mask> \xe3\x81\xaf\xe6\x96\x87\xe5\xad\x97"}', "embedded"),
]


def test_every_bad_row_is_quarantined_with_its_reason(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    shard = tmp_path / "in" / "dirty.jsonl"
    shard.parent.mkdir()
    # Every case is followed by a blank line: blank lines are not rows. Case i is on line 2i+1.
    shard.write_bytes(b"".join(line + b"\n\n" for line, _ in CASES) + b" \n")
    output = tmp_path / "out"
    report = pipeline.run(
        JobConfig(
            inputs=(str(shard.parent),), output=str(output), model=str(tiny_model), cpus_per_actor=1, max_actors=1
        )
    )

    embedded = [i for i, (_, want) in enumerate(CASES) if want == "embedded"]
    rejected = {i: want for i, (_, want) in enumerate(CASES) if want != "embedded"}
    assert report.rows_in == len(CASES)
    assert report.rows_embedded + report.rows_rejected == len(CASES)
    assert report.rows_embedded == len(embedded)
    expected_reasons: dict[str, int] = {}
    for reason in rejected.values():
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert report.rejected_by_reason == expected_reasons
    assert report.rows_truncated == 1, "the enormous text is truncated, not rejected"
    assert report.duplicate_ids == 2 and "dup" in report.duplicate_examples

    ids = committed_rows(str(output))["id"].to_pylist()
    assert sorted(ids) == sorted(["good-1", "7", "dup", "dup", "huge", "good-2"])

    quarantine = pq.read_table(output / "_rejected" / "dirty.parquet").to_pylist()
    assert {r["row"]: r["reason"] for r in quarantine} == rejected
    for r in quarantine:
        assert r["shard"] == "dirty.jsonl" and r["message"]
    by_row = {r["row"]: r for r in quarantine}
    assert by_row[1]["id"] == "null-text"
    assert "unterminated" in by_row[8]["text"]
    assert "line 17" in by_row[8]["message"], "the message names the input line"


def test_max_rejected_fraction_fails_the_run_after_committing(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    shard = tmp_path / "in" / "mostly-bad.jsonl"
    shard.parent.mkdir()
    shard.write_text('{"id": "a", "text": "良い"}\n{"id": "b", "text": ""}\n{"id": "c"}\n')
    output = tmp_path / "out"
    config = JobConfig(
        inputs=(str(shard.parent),),
        output=str(output),
        model=str(tiny_model),
        cpus_per_actor=1,
        max_actors=1,
        max_rejected_fraction=0.5,
    )
    with pytest.raises(pipeline.TooManyRejectedError, match=r"2 of 3 rows \(66.7%\) were rejected") as info:
        pipeline.run(config)
    assert info.value.report.status == "rejected_over_threshold"
    assert committed_rows(str(output))["id"].to_pylist() == ["a"]
    run = json.loads(next((output / "_runs").glob("*.json")).read_text())
    assert run["status"] == "rejected_over_threshold" and run["rows_rejected"] == 2


def test_empty_and_all_rejected_shards_commit_empty_files(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.jsonl").write_text("\n\n")
    (inputs / "all-bad.jsonl").write_text('{"id": "x", "text": ""}\n{"id": "y"}\n')
    (inputs / "ok.jsonl").write_text('{"id": "z", "text": "良い天気"}\n')
    output = tmp_path / "out"
    report = pipeline.run(
        JobConfig(inputs=(str(inputs),), output=str(output), model=str(tiny_model), cpus_per_actor=1, max_actors=1)
    )
    assert (report.shards_embedded, report.rows_embedded, report.rows_rejected) == (3, 1, 2)
    assert pq.read_table(output / "empty.parquet").num_rows == 0
    assert pq.read_table(output / "all-bad.parquet").num_rows == 0
    assert pq.read_table(output / "_rejected" / "all-bad.parquet").num_rows == 2
    assert committed_rows(str(output))["id"].to_pylist() == ["z"]


def test_unreadable_shards_are_left_out_with_reasons_and_redone_by_the_next_run(
    tmp_path: Path, tiny_model: Path, ray_local
) -> None:
    """A shard that cannot be read (a later shard without the text column, a gzip cut short
    after some of its rows were already read and embedded, a Parquet file that is not one)
    does not stop the run: every other shard is committed, none of the bad ones is (not even
    the rows read before the error), the report says why for each, nothing stays staged, an
    --overwrite run replaces nothing, and the next run, once they are fixed, embeds exactly them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = {f"a{i}": f"最初の文書 {i}" for i in range(30)}
    (inputs / "a.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    pq.write_table(pa.table({"id": ["b0"], "body": ["本文"]}), inputs / "b.parquet")
    cut = {f"c{i}": f"途中で切れた文書 {i}" for i in range(300)}
    whole = gzip.compress("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in cut.items()).encode())
    (inputs / "c.jsonl.gz").write_bytes(whole[: len(whole) * 3 // 4])
    (inputs / "d.parquet").write_bytes(b"PAR1 this is not a parquet file")
    last = {f"e{i}": f"最後の文書 {i}" for i in range(20)}
    (inputs / "e.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in last.items()))
    output = tmp_path / "out"
    # 16-row reads: c.jsonl.gz yields chunks of good rows before its read fails.
    config = JobConfig(
        inputs=(str(inputs),),
        output=str(output),
        model=str(tiny_model),
        cpus_per_actor=1,
        max_actors=1,
        read_chunk_rows=16,
    )
    # What the read stage hands on for the cut gzip: chunks of good rows, then the failure marker.
    shard_c = next(s for s in pipeline.list_inputs(config) if s.key == "c.jsonl.gz")
    layout = probe_layout(shard_c, text_column="text", id_column="id", id_type="string", keep_columns=(), chunk_rows=16)
    chunks = list(pipeline._read_stage(pa.Table.from_pylist([dataclasses.asdict(shard_c)]), layout))
    assert len(chunks) > 2 and all(c.num_rows == 16 for c in chunks[:-1])
    assert all(c[S.FAILED].null_count == 16 and c[S.TOTAL][0].as_py() == -1 for c in chunks[:-1])
    assert chunks[-1][S.MARKER].to_pylist() == [True] and chunks[-1][S.TOTAL].to_pylist() == [-1]
    assert chunks[-1][S.FAILED][0].as_py().startswith("EOFError")
    # A shard deleted since the listing: the marker alone.
    gone = dataclasses.replace(shard_c, url=str(inputs / "gone.jsonl.gz"), key="gone.jsonl.gz")
    (marker,) = pipeline._read_stage(pa.Table.from_pylist([dataclasses.asdict(gone)]), layout)
    assert marker[S.MARKER].to_pylist() == [True] and marker[S.FAILED][0].as_py().startswith("FileNotFoundError")

    with pytest.raises(pipeline.ShardsFailedError, match=r"^3 of 5 shard\(s\) to embed could not be read") as info:
        pipeline.run(config)
    report = info.value.report
    assert (report.status, report.shards_failed, report.shards_embedded) == ("shards_failed", 3, 2)
    assert sorted(report.failed_shards) == ["b.parquet", "c.jsonl.gz", "d.parquet"]
    assert report.failed_shards["b.parquet"].startswith("InputError") and "'text'" in report.failed_shards["b.parquet"]
    assert report.failed_shards["c.jsonl.gz"].startswith("EOFError")
    assert report.failed_shards["d.parquet"].startswith("ArrowInvalid: Parquet magic bytes not found")
    assert report.rows_embedded == len(docs) + len(last)  # c's rows read before the error are not counted
    assert sorted(p.name for p in output.glob("*.parquet")) == ["a.parquet", "e.parquet"]
    assert sorted(committed_rows(str(output))["id"].to_pylist()) == sorted(docs | last)
    assert not (output / "_staging").exists()
    run = json.loads((output / "_runs" / f"{report.run_id}.json").read_text())
    assert run["status"] == "shards_failed" and run["failed_shards"] == report.failed_shards

    # --overwrite replaces the output as a whole or not at all.
    before = {p.name: p.read_bytes() for p in output.glob("*.parquet")}
    with pytest.raises(RuntimeError, match=r"3 shard\(s\) could not be read .* nothing was replaced"):
        pipeline.run(dataclasses.replace(config, overwrite=True))
    assert {p.name: p.read_bytes() for p in output.glob("*.parquet")} == before

    pq.write_table(pa.table({"id": ["b0"], "text": ["本文"]}), inputs / "b.parquet")
    (inputs / "c.jsonl.gz").write_bytes(whole)
    (inputs / "d.parquet").unlink()
    again = pipeline.run(config)
    assert (again.status, again.shards_skipped, again.shards_embedded, again.shards_failed) == ("succeeded", 2, 2, 0)
    ids = committed_rows(str(output))["id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(docs) | set(last) | set(cut) | {"b0"}
