"""Column names and the output ``pyarrow.Schema``: the one place the output format is declared.

Output files hold ``id`` (the input id, its type fixed per run), ``embedding``
(``fixed_size_list<float32|float16>[dim]``) and any ``keep_columns``. The schema metadata
records what produced the vectors, under the keys in :data:`METADATA_KEYS`.

Chunked runs (``--chunk``) write one row per passage: ``id`` stays the document id, and
``passage`` (0-based index within the document), ``char_start`` and ``char_end`` (the
passage's ``[start, end)`` in the document's original text, in characters) follow it; rows are
ordered by input row, then passage. ``--keep-text`` adds ``text`` (the passage's span of the
text, or the whole text without ``--chunk``).

Between stages rows also carry internal ``__``-prefixed columns (shard, row number, reject
reason); they never reach the committed output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

ID = "id"
EMBEDDING = "embedding"
PASSAGE = "passage"  # chunked runs: passage index within its document, from 0
CHAR_START = "char_start"  # chunked runs: passage start in the original text, in characters
CHAR_END = "char_end"  # chunked runs: passage end (exclusive)
TEXT_OUT = "text"  # --keep-text: the row's text (the passage's span when chunked)

# Internal columns of the stream between read and write.
TEXT = "__text"
SHARD = "__shard"  # shard key (path relative to its input)
ROW = "__row"  # row number within the shard, 0-based, dense over data and rejected rows
TOTAL = "__total"  # on a shard's last chunk: its number of rows; -1 elsewhere
REJECT = "__reject"  # null for good rows; "<code>: <message>" for rejected ones
MARKER = "__marker"  # true for the one placeholder row an empty shard emits
INPUT_IDS = "__input_ids"
NUM_TOKENS = "__num_tokens"
PASS_WIDTH = "__pass_width"  # tokens per row, padding included, of the forward pass the row ran in
TRUNCATED = "__truncated"  # the text was cut at the model's token limit
STORAGE_ERRORS = "__storage_errors"  # transient storage errors the reader retried (on one row)
FAILED = "__failed"  # on a shard's failure marker: why the shard could not be read; null elsewhere
PASSAGES = "__passages"  # chunked runs: number of passages of the row's document

REJECTED_TEXT_CAP = 4096  # characters of a rejected row's raw text kept for inspection

METADATA_KEYS = {
    "embedding.model": "model id, local path or s3:// URI as given",
    "embedding.revision": "hub commit, object ETags digest, or local weights digest",
    "embedding.dim": "vector dimension",
    "embedding.pooling": "mean | cls | max",
    "embedding.normalized": "true when vectors are L2-normalised by the model's Normalize module",
    "embedding.compute_dtype": "dtype the encoder ran in (float32 | bfloat16 | float16)",
    "embedding.output_dtype": "dtype stored in the file (float32 | float16)",
    "embedding.max_length": "token limit, specials included",
    "embedding.tokenizer": "tokenizer implementation used for the ids",
    "embedding.job_version": "version of this job",
    # Only in chunked runs:
    "embedding.chunk_tokens": "passage size limit in tokens, specials included",
    "embedding.chunk_overlap": "tokens shared by consecutive passages of a document",
}

ID_TYPES = {"string": pa.string(), "int64": pa.int64()}
VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class OutputFormat:
    """What an output file looks like; fixed for a run before any row is read."""

    id_type: str  # "string" | "int64"
    dim: int
    output_dtype: str  # "float32" | "float16"
    keep_types: tuple[tuple[str, str], ...]  # (name, arrow type string)
    metadata: tuple[tuple[str, str], ...]
    chunked: bool = False  # one row per passage, with passage / char_start / char_end
    keep_text: bool = False  # a `text` column

    def schema(self) -> pa.Schema:
        fields = [pa.field(ID, ID_TYPES[self.id_type], nullable=False)]
        if self.chunked:
            fields += [
                pa.field(PASSAGE, pa.int32(), nullable=False),
                pa.field(CHAR_START, pa.int64(), nullable=False),
                pa.field(CHAR_END, pa.int64(), nullable=False),
            ]
        fields.append(pa.field(EMBEDDING, pa.list_(VALUE_TYPES[self.output_dtype], self.dim), nullable=False))
        if self.keep_text:
            fields.append(pa.field(TEXT_OUT, pa.string()))
        fields += [pa.field(name, arrow_type(t)) for name, t in self.keep_types]
        return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in self.metadata})

    def rejected_schema(self) -> pa.Schema:
        return rejected_schema()


def arrow_type(name: str) -> pa.DataType:
    """Arrow type from its string form (``'string'``, ``'int64'``, ``'double'``, ...)."""
    return pa.type_for_alias(name) if name != "large_string" else pa.large_string()


def rejected_schema() -> pa.Schema:
    """Rows quarantined under ``_rejected/``: where they came from and why."""
    return pa.schema(
        [
            pa.field("shard", pa.string(), nullable=False),
            pa.field("row", pa.int64(), nullable=False),
            pa.field("id", pa.string()),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("message", pa.string()),
            pa.field("text", pa.string()),
        ]
    )


def build_metadata(**values: object) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in values.items():
        name = f"embedding.{key}"
        if name not in METADATA_KEYS:
            raise KeyError(f"undeclared metadata key {name}")
        out.append((name, json.dumps(value) if isinstance(value, bool) else str(value)))
    return tuple(out)
