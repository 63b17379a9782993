"""Readers: every format and compression, local and s3://, with row numbering and rejects."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from embedding import schema as S
from embedding import storage
from embedding.read import InputError, probe_layout, read_shard

TEXTS = ["今日は良い天気です。", '寿司🍣, "引用" と改行\nを含む', "ｶﾞｷﾞｸﾞ", "[MASK]です"]
IDS = [f"doc-{i}" for i in range(len(TEXTS))]


def _encode(fmt: str) -> bytes:
    if fmt == "jsonl":
        lines = [
            json.dumps({"id": i, "text": t, "lang": "ja"}, ensure_ascii=False) for i, t in zip(IDS, TEXTS, strict=True)
        ]
        return ("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n").encode()  # a blank line is not a row
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "text", "lang"])
        w.writerows([i, t, "ja"] for i, t in zip(IDS, TEXTS, strict=True))
        return buf.getvalue().encode()
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": IDS, "text": TEXTS, "lang": ["ja"] * 4}), buf)
        return buf.getvalue()
    if fmt == "text":
        return ("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n\n").encode()
    raise AssertionError(fmt)


def _compress(data: bytes, ext: str) -> bytes:
    if ext == ".gz":
        return gzip.compress(data, mtime=0)
    if ext == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


CASES = [
    ("jsonl", ".jsonl", ""),
    ("jsonl", ".jsonl", ".gz"),
    ("jsonl", ".jsonl", ".zst"),
    ("csv", ".csv", ""),
    ("csv", ".csv", ".gz"),
    ("csv", ".csv", ".zst"),
    ("parquet", ".parquet", ""),
    ("text", ".txt", ""),
    ("text", ".txt", ".gz"),
    ("text", ".txt", ".zst"),
]


def _read_all(url: str, keep: tuple[str, ...] = ()) -> pa.Table:
    (shard,) = storage.list_shards(url)
    layout = probe_layout(shard, text_column="text", id_column="id", id_type="auto", keep_columns=keep, chunk_rows=2)
    return pa.concat_tables(read_shard(shard, layout))


@pytest.mark.parametrize(("fmt", "ext", "comp"), CASES, ids=[f"{f}{c}" for f, _, c in CASES])
def test_each_format_and_compression_local(tmp_path, fmt: str, ext: str, comp: str) -> None:
    path = tmp_path / f"shard-0{ext}{comp}"
    path.write_bytes(_compress(_encode(fmt), comp))
    keep = () if fmt == "text" else ("lang",)
    table = _read_all(str(path), keep)
    assert table[S.ROW].to_pylist() == [0, 1, 2, 3]
    # Only the last chunk carries the shard's row count (CSV chunks by bytes, not rows).
    assert table[S.TOTAL].to_pylist() == ([4] * 4 if fmt == "csv" else [-1, -1, 4, 4])
    assert table[S.REJECT].null_count == 4
    if fmt == "text":
        assert table[S.TEXT].to_pylist() == [t.replace("\n", " ") for t in TEXTS]
        assert table[S.ID].to_pylist() == [f"shard-0{ext}{comp}#{i}" for i in range(4)]
    else:
        assert table[S.TEXT].to_pylist() == TEXTS
        assert table[S.ID].to_pylist() == IDS
        assert table["lang"].to_pylist() == ["ja"] * 4


def test_jsonl_on_s3(bucket: str) -> None:
    url = f"{bucket}/corpus/a/part-0.jsonl.gz"
    storage.write_bytes_atomic(url, _compress(_encode("jsonl"), ".gz"))
    table = _read_all(url)
    assert table[S.ID].to_pylist() == IDS and table[S.TEXT].to_pylist() == TEXTS


def test_parquet_on_s3(bucket: str) -> None:
    url = f"{bucket}/corpus/p.parquet"
    storage.write_bytes_atomic(url, _encode("parquet"))
    assert _read_all(url)[S.TEXT].to_pylist() == TEXTS


def test_integer_ids_keep_their_type(tmp_path) -> None:
    path = tmp_path / "ints.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": f"文{i}"}) for i in range(3)) + "\n")
    table = _read_all(str(path))
    assert table.schema.field(S.ID).type == pa.int64() and table[S.ID].to_pylist() == [0, 1, 2]


def test_bad_rows_are_flagged_not_dropped(tmp_path) -> None:
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(
        b'{"id": "a", "text": "good"}\n'
        b'{"id": "b", "text": ""}\n'
        b'{"id": "c", "text": 5}\n'
        b"not json\n"
        b"[1, 2]\n"
        b'{"text": "no id"}\n'
        b'{"id": "e", "text": "\\ud800"}\n'
        b'{"id": "f", "text": "\xff\xfe"}\n'
    )
    table = _read_all(str(path))
    reasons = [r and r.split(":")[0] for r in table[S.REJECT].to_pylist()]
    assert reasons == [
        None,
        "empty_text",
        "text_type",
        "malformed_json",
        "not_object",
        "missing_id",
        "lone_surrogate",
        "invalid_utf8",
    ]
    assert table[S.ROW].to_pylist() == list(range(8))


def test_empty_shard_yields_one_marker(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    (shard,) = storage.list_shards(str(path))
    layout = probe_layout(shard, text_column="text", id_column="id", id_type="auto", keep_columns=())
    (table,) = list(read_shard(shard, layout))
    assert table[S.MARKER].to_pylist() == [True] and table[S.TOTAL].to_pylist() == [0]


def test_missing_text_column_names_column_and_shard(tmp_path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["b"]}), path)
    (shard,) = storage.list_shards(str(path))
    with pytest.raises(InputError, match=r"text column 'text' is not in shard .*x\.parquet"):
        probe_layout(shard, text_column="text", id_column="id", id_type="auto", keep_columns=())


def test_listing_dir_glob_and_hidden(tmp_path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "_tmp").mkdir()
    for p in ["a/1.jsonl", "a/b/2.csv.gz", "a/notes.md", "_tmp/3.jsonl", "a/.4.jsonl"]:
        (tmp_path / p).write_text("x")
    keys = [s.key for s in storage.list_shards(str(tmp_path))]
    assert keys == ["a/1.jsonl", "a/b/2.csv.gz"]
    assert [s.key for s in storage.list_shards(str(tmp_path / "a" / "*.jsonl"))] == ["1.jsonl"]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.list_shards(str(tmp_path / "nothing-here"))


def test_listing_on_s3_with_fingerprints(bucket: str) -> None:
    storage.write_bytes_atomic(f"{bucket}/in/x/1.jsonl", b"{}\n")
    storage.write_bytes_atomic(f"{bucket}/in/y/2.parquet", _encode("parquet"))
    storage.write_bytes_atomic(f"{bucket}/in/_staging/3.jsonl", b"{}\n")
    shards = storage.list_shards(f"{bucket}/in/")
    assert [s.key for s in shards] == ["x/1.jsonl", "y/2.parquet"]
    assert all(s.url.startswith(f"{bucket}/in/") for s in shards)
    assert all(s.fingerprint.lower().startswith("etag") for s in shards)
    assert [s.key for s in storage.list_shards(f"{bucket}/in/*/*.parquet")] == ["y/2.parquet"]
