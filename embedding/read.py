"""Shard parsing: one input file -> Arrow chunks of ``{id, text, keep..., internals}``.

Formats: JSON Lines, Parquet, CSV (header row) and plain text (one document per line), each
optionally ``.gz``/``.zst`` compressed; see :func:`embedding.storage.format_of`.

Every input row is numbered (``__row``, dense from 0 over good and rejected rows) so that the
writer can prove a shard complete: the shard's last chunk carries its row count in
``__total``. A row that cannot be embedded is not dropped: it travels on with a reason in
``__reject`` and ends in ``_rejected/``. Blank lines are not rows.

The id type is fixed for the whole run before reading (see :func:`probe_layout`), so every
output file shares one schema. When the run's inputs have no id column, ids are derived as
``"<shard key>#<row>"``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from embedding import schema as S
from embedding.storage import Shard, format_of, open_input

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A shard cannot be read as configured (missing column, unknown format, ...)."""


@dataclass(frozen=True)
class InputLayout:
    """How rows are read, fixed for the run: formats, columns and the id type."""

    text_column: str
    id_column: str
    has_ids: bool
    id_type: str  # "string" | "int64"
    keep_types: tuple[tuple[str, str], ...]
    format_override: str = "auto"
    chunk_rows: int = 8192

    @property
    def keep_columns(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.keep_types)


def shard_format(shard_url: str, override: str) -> str:
    fmt = override if override != "auto" else format_of(shard_url)
    if fmt is None:
        raise InputError(f"cannot tell the format of {shard_url}; pass --format")
    return fmt


# --------------------------------------------------------------------------------------------
# Probing: decide the run's id type and kept column types from the first shard.


def probe_layout(
    shard: Shard,
    *,
    text_column: str,
    id_column: str,
    id_type: str,
    keep_columns: tuple[str, ...],
    format_override: str = "auto",
    chunk_rows: int = 8192,
) -> InputLayout:
    """Look at the first shard (its schema, or its first JSON object) to fix the layout."""
    fmt = shard_format(shard.url, format_override)
    has_ids = False
    probed_id = "string"
    keep_types = {c: "string" for c in keep_columns}
    if fmt == "parquet":
        with open_input(shard.url) as f:
            arrow_schema = pq.ParquetFile(f).schema_arrow
        names = set(arrow_schema.names)
        if text_column not in names:
            raise InputError(
                f"text column {text_column!r} is not in shard {shard.url} (columns: {', '.join(arrow_schema.names)})"
            )
        has_ids = id_column in names
        if has_ids and pa.types.is_integer(arrow_schema.field(id_column).type):
            probed_id = "int64"
        for c in keep_columns:
            if c not in names:
                raise InputError(f"keep column {c!r} is not in shard {shard.url}")
            t = arrow_schema.field(c).type
            keep_types[c] = "large_string" if pa.types.is_large_string(t) else str(t)
    elif fmt == "jsonl":
        first = _first_json_object(shard.url)
        if first is not None:
            has_ids = id_column in first
            value = first.get(id_column)
            if isinstance(value, int) and not isinstance(value, bool):
                probed_id = "int64"
    elif fmt == "csv":
        with open_input(shard.url) as f:
            header = pa_csv.open_csv(f, read_options=pa_csv.ReadOptions(block_size=1 << 20)).schema.names
        if text_column not in header:
            raise InputError(f"text column {text_column!r} is not in shard {shard.url} (columns: {', '.join(header)})")
        has_ids = id_column in header
    if id_type == "auto":
        id_type = probed_id if has_ids else "string"
    elif not has_ids and id_type != "string":
        raise InputError(
            f"`id_type` is {id_type!r} but shard {shard.url} has no {id_column!r} column, so ids "
            "are derived from the shard path and row number, which are strings"
        )
    return InputLayout(
        text_column=text_column,
        id_column=id_column,
        has_ids=has_ids,
        id_type=id_type,
        keep_types=tuple((c, keep_types[c]) for c in keep_columns),
        format_override=format_override,
        chunk_rows=chunk_rows,
    )


def _first_json_object(url: str) -> dict[str, Any] | None:
    with open_input(url) as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


# --------------------------------------------------------------------------------------------
# Reading.


@dataclass
class _Rows:
    """Column-wise rows of one chunk before numbering. ``ids``/``texts`` may be Arrow arrays."""

    ids: Any
    texts: Any
    rejects: list[str | None] | pa.Array
    keep: dict[str, Any]


def read_shard(shard: Shard, layout: InputLayout) -> Iterator[pa.Table]:
    """Yield Arrow chunks of ``shard``. The last chunk carries the shard's row count.

    An empty shard yields a single marker row so the writer still learns it is done.
    """
    fmt = shard_format(shard.url, layout.format_override)
    parts = {"jsonl": _read_jsonl, "parquet": _read_parquet, "csv": _read_csv, "text": _read_text}
    if fmt not in parts:
        raise InputError(f"unknown format {fmt!r} for {shard.url}")
    start = 0
    pending: _Rows | None = None
    for rows in parts[fmt](shard, layout):
        if _length(rows) == 0:
            continue
        if pending is not None:
            table = _to_table(shard, layout, pending, start, total=-1)
            start += table.num_rows
            yield table
        pending = rows
    if pending is None:
        yield _marker_table(shard, layout)
        return
    n = _length(pending)
    yield _to_table(shard, layout, pending, start, total=start + n)


def _length(rows: _Rows) -> int:
    return len(rows.texts)


def _to_table(shard: Shard, layout: InputLayout, rows: _Rows, start: int, total: int) -> pa.Table:
    n = _length(rows)
    row_numbers = pa.array(range(start, start + n), pa.int64())
    if layout.has_ids:
        ids = rows.ids
    else:
        ids = pa.array([f"{shard.key}#{i}" for i in range(start, start + n)], pa.string())
    columns = {
        S.SHARD: pa.array([shard.key] * n, pa.string()),
        S.ROW: row_numbers,
        S.TOTAL: pa.array([total] * n, pa.int64()),
        S.REJECT: rows.rejects if isinstance(rows.rejects, pa.Array) else pa.array(rows.rejects, pa.string()),
        S.MARKER: pa.array([False] * n, pa.bool_()),
        S.ID: ids if isinstance(ids, pa.Array) else pa.array(ids, S.ID_TYPES[layout.id_type]),
        S.TEXT: rows.texts if isinstance(rows.texts, pa.Array) else pa.array(rows.texts, pa.string()),
    }
    for name, type_name in layout.keep_types:
        value = rows.keep[name]
        arrow_t = S.arrow_type(type_name)
        columns[name] = value.cast(arrow_t) if isinstance(value, pa.Array) else pa.array(value, arrow_t)
    return pa.table(columns)


def _marker_table(shard: Shard, layout: InputLayout, total: int = 0) -> pa.Table:
    rows = _Rows(ids=[None], texts=[None], rejects=[None], keep={c: [None] for c in layout.keep_columns})
    table = _to_table(shard, layout, rows, start=-1, total=total)
    return table.set_column(table.schema.get_field_index(S.MARKER), S.MARKER, pa.array([True]))


def failure_marker(shard: Shard, layout: InputLayout) -> pa.Table:
    """The one placeholder row that stands for a shard that could not be read: no total (the
    shard never completes, so it is never committed) and no rows. The caller adds the reason."""
    return _marker_table(shard, layout, total=-1)


def _text_reject(text: Any) -> str | None:
    """Why a text cannot be embedded, or None when it can."""
    if text is None:
        return "missing_text: the text is null or absent"
    if not isinstance(text, str):
        return f"text_type: the text is a {type(text).__name__}, not a string"
    if not text.strip():
        return "empty_text: the text is empty or whitespace only"
    if "\x00" in text:
        return "nul_char: the text holds NUL characters (binary data?)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone_surrogate: the text holds an unpaired UTF-16 surrogate"
    return None


def _raw(value: Any) -> str | None:
    """A rejected value, as text for the quarantine, capped."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[: S.REJECTED_TEXT_CAP]


def _read_jsonl(shard: Shard, layout: InputLayout) -> Iterator[_Rows]:
    ids: list[Any] = []
    texts: list[str | None] = []
    rejects: list[str | None] = []
    keep: dict[str, list[Any]] = {c: [] for c in layout.keep_columns}

    def add(id_: Any, text: str | None, reject: str | None, obj: dict | None) -> None:
        ids.append(id_)
        texts.append(text)
        rejects.append(reject)
        for c in keep:
            v = obj.get(c) if obj else None
            keep[c].append(v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False))

    with open_input(shard.url) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                add(None, _raw(raw.decode("utf-8", "replace")), f"invalid_utf8: line {line_no}: {e.reason}", None)
            else:
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    add(None, _raw(line), f"malformed_json: line {line_no}: {e}", None)
                else:
                    if not isinstance(obj, dict):
                        add(None, _raw(line), f"not_object: line {line_no} is a JSON {type(obj).__name__}", None)
                    else:
                        id_, id_reject = _check_id(obj, layout) if layout.has_ids else (None, None)
                        text = obj.get(layout.text_column)
                        reject = id_reject or _text_reject(text)
                        add(id_, text if reject is None else _raw(text), reject, obj)
            if len(texts) >= layout.chunk_rows:
                yield _Rows(ids, texts, rejects, keep)
                ids, texts, rejects = [], [], []
                keep = {c: [] for c in layout.keep_columns}
    yield _Rows(ids, texts, rejects, keep)


def _check_id(obj: dict, layout: InputLayout) -> tuple[Any, str | None]:
    if layout.id_column not in obj or obj[layout.id_column] is None:
        return None, f"missing_id: no {layout.id_column!r} value"
    value = obj[layout.id_column]
    if layout.id_type == "int64":
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return value, None
        return None, f"id_type: id {_raw(value)!r} is not a 64-bit integer as this run's ids are"
    if isinstance(value, str):
        if not value:
            return None, "missing_id: the id is an empty string"
        return value, None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    return None, f"id_type: id {_raw(value)!r} is a {type(value).__name__}, not a string"


def _reject_arrow(ids: pa.Array | None, texts: pa.Array, layout: InputLayout) -> pa.Array:
    """Vectorised text/id checks for columnar formats -> reason strings or nulls."""
    if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
        reason = f"text_type: the text column is {texts.type}, not a string"
        return pa.array([reason] * len(texts), pa.string())
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)
    nul = pc.match_substring(texts, "\x00")
    none = pa.scalar(None, pa.string())
    reasons = pc.if_else(
        pc.is_null(texts),
        "missing_text: the text is null",
        pc.if_else(
            empty,
            "empty_text: the text is empty or whitespace only",
            pc.if_else(nul, "nul_char: the text holds NUL characters (binary data?)", none),
        ),
    )
    if ids is not None:
        reasons = pc.if_else(pc.is_null(ids), f"missing_id: no {layout.id_column!r} value", reasons)
    return reasons


def _read_parquet(shard: Shard, layout: InputLayout) -> Iterator[_Rows]:
    with open_input(shard.url) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        wanted = [layout.text_column, *layout.keep_columns]
        if layout.has_ids:
            wanted.append(layout.id_column)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise InputError(f"column(s) {', '.join(map(repr, missing))} not in shard {shard.url}")
        for batch in pf.iter_batches(batch_size=layout.chunk_rows, columns=wanted):
            texts = batch.column(layout.text_column)
            ids = None
            if layout.has_ids:
                ids = batch.column(layout.id_column)
                ids = _cast_ids(ids, layout, shard)
            yield _Rows(
                ids=ids,
                texts=texts,
                rejects=_reject_arrow(ids, texts, layout),
                keep={c: batch.column(c) for c in layout.keep_columns},
            )


def _cast_ids(ids: pa.Array, layout: InputLayout, shard: Shard) -> pa.Array:
    target = S.ID_TYPES[layout.id_type]
    if ids.type == target:
        return ids
    if layout.id_type == "int64" and not pa.types.is_integer(ids.type):
        raise InputError(
            f"id column {layout.id_column!r} of shard {shard.url} is {ids.type}, but this run's ids "
            "are int64 (fixed by the first shard); pass --id-type string to store all ids as strings"
        )
    return ids.cast(target)


def _read_csv(shard: Shard, layout: InputLayout) -> Iterator[_Rows]:
    """CSV with a header row. Cells are read as bytes so that one row of invalid UTF-8 or one
    row with the wrong number of cells is rejected alone instead of failing the file."""
    wanted = [layout.text_column, *layout.keep_columns]
    if layout.has_ids:
        wanted.append(layout.id_column)
    bad_lines: list[tuple[int, str, str]] = []

    def on_invalid(row: pa_csv.InvalidRow) -> str:
        bad_lines.append(
            (
                row.number or -1,
                row.text,
                f"line {row.number}: {row.actual_columns} cells, expected {row.expected_columns}",
            )
        )
        return "skip"

    convert = pa_csv.ConvertOptions(
        include_columns=wanted, column_types={c: pa.binary() for c in wanted}, strings_can_be_null=False
    )
    with open_input(shard.url) as f:
        try:
            reader = pa_csv.open_csv(
                f,
                read_options=pa_csv.ReadOptions(block_size=1 << 22),
                parse_options=pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
                convert_options=convert,
            )
        except (pa.ArrowInvalid, KeyError) as e:
            raise InputError(f"cannot read CSV shard {shard.url}: {e}") from e
        for batch in reader:
            columns, utf8_rejects = _decode_utf8({c: batch.column(c) for c in wanted})
            texts = columns[layout.text_column]
            ids = columns[layout.id_column] if layout.has_ids else None
            if ids is not None:
                # An empty CSV cell is a missing id.
                ids = pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)
            rejects = _reject_arrow(ids, texts, layout)
            if utf8_rejects is not None:
                rejects = pc.coalesce(utf8_rejects, rejects)
            yield _Rows(ids=ids, texts=texts, rejects=rejects, keep={c: columns[c] for c in layout.keep_columns})
    if bad_lines:
        n = len(bad_lines)
        yield _Rows(
            ids=[None] * n,
            texts=[_raw(text) for _, text, _ in bad_lines],
            rejects=[f"csv_row: {why}" for _, _, why in bad_lines],
            keep={c: [None] * n for c in layout.keep_columns},
        )


def _decode_utf8(columns: dict[str, pa.Array]) -> tuple[dict[str, pa.Array], pa.Array | None]:
    """Binary columns -> string; cells that are not UTF-8 become null and their row a reject."""
    out: dict[str, pa.Array] = {}
    rejects: list[str | None] | None = None
    for name, col in columns.items():
        try:
            out[name] = col.cast(pa.string())
            continue
        except pa.ArrowInvalid:
            pass
        values = []
        for i, raw in enumerate(col.to_pylist()):
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                values.append(raw.decode("utf-8", "replace"))
                rejects = rejects or [None] * len(col)
                rejects[i] = rejects[i] or f"invalid_utf8: column {name!r}: {e.reason}"
        out[name] = pa.array(values, pa.string())
    return out, None if rejects is None else pa.array(rejects, pa.string())


def _read_text(shard: Shard, layout: InputLayout) -> Iterator[_Rows]:
    texts: list[str | None] = []
    rejects: list[str | None] = []
    with open_input(shard.url) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
                reject = None
            except UnicodeDecodeError as e:
                text = _raw(raw.decode("utf-8", "replace"))
                reject = f"invalid_utf8: line {line_no}: {e.reason}"
            texts.append(text)
            rejects.append(reject)
            if len(texts) >= layout.chunk_rows:
                yield _Rows(None, texts, rejects, {})
                texts, rejects = [], []
    yield _Rows(None, texts, rejects, {})
