"""The job's settings: one frozen dataclass, checked eagerly.

YAML files and command-line flags only *fill* :class:`JobConfig`; every check lives in
``__post_init__`` so that a bad value fails before any data is read or any GPU is taken.
A YAML key is the field name (``text_column``; ``text-column`` is accepted too).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "pkshatech/GLuCoSE-base-ja"

FORMATS = ("auto", "jsonl", "parquet", "csv", "text")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OUTPUT_DTYPES = ("float32", "float16")
ATTENTIONS = ("auto", "padded", "varlen")
ID_TYPES = ("auto", "string", "int64")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS = ("auto", "bars", "log", "none")


def _allowed(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"`{name}` must be a positive number; got {value!r}")


def _absolute(uri: str) -> str:
    """``uri`` unchanged where it has a scheme (s3://, file://); a local path made absolute."""
    if "://" in uri:
        return uri
    trailing = "/" if uri.endswith("/") and len(uri) > 1 else ""
    return os.path.abspath(os.path.expanduser(uri)) + trailing


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of the embedding job needs to know.

    Sizes are in tokens or rows as named; fractions of GPUs and CPUs are Ray resource units.
    """

    inputs: tuple[str, ...]
    output: str
    model: str = DEFAULT_MODEL
    text_column: str = "text"
    id_column: str = "id"
    id_type: str = "auto"
    format: str = "auto"
    keep_columns: tuple[str, ...] = ()
    dtype: str = "auto"
    output_dtype: str = "float32"
    # GPU encoders: "auto" runs variable-length attention over packed tokens where it is
    # available and checks out on the device (bf16/fp16 LUKE), padded attention otherwise.
    attention: str = "auto"
    max_length: int | None = None
    # Passages: split each text into windows of at most `chunk_tokens` tokens (specials
    # included; None = max_length) sharing `chunk_overlap` tokens, one output row each.
    chunk: bool = False
    chunk_tokens: int | None = None
    chunk_overlap: int = 64
    keep_text: bool = False
    # Encoder batching: a forward pass holds at most `batch_tokens` tokens, padding included,
    # and at most `batch_rows` texts. None picks a default for the device (see encode.py).
    batch_tokens: int | None = None
    batch_rows: int | None = None
    # Rows handed to one encoder call; the encoder sorts within it by length, so larger
    # windows waste less on padding. None picks a default for the device (see encode.py).
    window_rows: int | None = None
    read_chunk_rows: int | None = None  # None: a window's rows, at most 8192
    device: str = "auto"
    num_gpus: float = 1.0
    # CPU encoders: None sizes them to the cores (one single-threaded actor per core).
    cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    min_actors: int | None = None  # None: all CPU encoders at once; on GPU, grow from 1
    max_actors: int | None = None
    tokenizer_actors: int = 1
    tokenizer_cpus: float = 0.5
    # Output protocol: --overwrite replaces an output made with other settings; --prune
    # removes the output of shards that are gone from the inputs.
    overwrite: bool = False
    prune: bool = False
    # A run whose rejected rows exceed this fraction of its rows fails (exit 3) after
    # committing; None accepts any number.
    max_rejected_fraction: float | None = None
    # Test-only fault injection for the encoder (keys: crash_once_flag, oom_over_rows,
    # poison_length). Never set it in production.
    fault_injection: dict | None = None
    ray_address: str | None = None
    run_id: str | None = None
    log_level: str = "INFO"
    # Progress: Ray Data's bars in a terminal, else a log line every `progress_interval`
    # (see progress.py). `gpu_hour_price` (currency per GPU-hour) prices the run report.
    progress: str = "auto"
    progress_interval: float = 30.0
    gpu_hour_price: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str | Path):
            object.__setattr__(self, "inputs", (str(self.inputs),))
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        object.__setattr__(self, "keep_columns", tuple(self.keep_columns))
        if not self.inputs:
            raise ValueError("`inputs` must name at least one file, directory, prefix or glob")
        if not self.output:
            raise ValueError("`output` must be a directory or prefix URI; got an empty value")
        # Local paths are made absolute once, here: listings come back absolute, and the
        # markers a rerun compares are paths relative to the output.
        object.__setattr__(self, "inputs", tuple(_absolute(i) for i in self.inputs))
        object.__setattr__(self, "output", _absolute(str(self.output)))
        if not self.model:
            raise ValueError("`model` must be a hub id, a local directory or an s3:// directory")
        for name in ("text_column", "id_column"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty column name")
        if self.text_column == self.id_column:
            raise ValueError(f"`text_column` and `id_column` must differ; both are {self.text_column!r}")
        reserved = {self.text_column, self.id_column, "id", "embedding", "passage", "char_start", "char_end", "text"}
        clash = [c for c in self.keep_columns if c in reserved or c.startswith("__")]
        if clash:
            raise ValueError(
                f"`keep_columns` may not name {clash}: the output already has `id` and "
                "`embedding` (and `passage`, `char_start`, `char_end` with --chunk, `text` with "
                "--keep-text), and the text column is copied only by --keep-text (names starting "
                "with `__` are reserved)"
            )
        _allowed("format", self.format, FORMATS)
        _allowed("dtype", self.dtype, DTYPES)
        _allowed("output_dtype", self.output_dtype, OUTPUT_DTYPES)
        _allowed("attention", self.attention, ATTENTIONS)
        _allowed("id_type", self.id_type, ID_TYPES)
        _allowed("device", self.device, DEVICES)
        _allowed("log_level", self.log_level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))
        _allowed("progress", self.progress, PROGRESS)
        _positive("progress_interval", self.progress_interval)
        if self.gpu_hour_price is not None and not 0 <= self.gpu_hour_price < 1000:
            raise ValueError(
                f"`gpu_hour_price` is the price of one GPU-hour and must be in [0, 1000); got {self.gpu_hour_price!r}"
            )
        if self.max_length is not None and not 8 <= self.max_length <= 8192:
            raise ValueError(
                f"`max_length` must be between 8 and 8192 tokens, specials included; got {self.max_length}"
            )
        if self.chunk_tokens is not None and not 3 <= self.chunk_tokens <= 8192:
            raise ValueError(
                f"`chunk_tokens` must be between 3 and 8192 tokens, specials included; got {self.chunk_tokens}"
            )
        if not isinstance(self.chunk_overlap, int) or self.chunk_overlap < 0:
            raise ValueError(f"`chunk_overlap` must be a whole number of tokens ≥ 0; got {self.chunk_overlap!r}")
        size = self.chunk_tokens or self.max_length
        if self.chunk and size is not None and self.chunk_overlap >= size - 2:
            raise ValueError(
                f"`chunk_overlap` ({self.chunk_overlap}) must be smaller than the passage size less its two "
                f"specials ({size - 2}), or passages would not advance"
            )
        _positive("batch_tokens", self.batch_tokens, allow_none=True)
        for name in ("batch_rows", "window_rows", "read_chunk_rows", "tokenizer_actors"):
            value = getattr(self, name)
            if value is None and name in ("batch_rows", "window_rows", "read_chunk_rows"):
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a whole number ≥ 1; got {value!r}")
        if not 0 < self.num_gpus <= 8:
            raise ValueError(f"`num_gpus` is GPUs per encoder actor and must be in (0, 8]; got {self.num_gpus}")
        if self.cpus_per_actor is not None:
            _positive("cpus_per_actor", self.cpus_per_actor)
        _positive("tokenizer_cpus", self.tokenizer_cpus)
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ValueError(f"`threads_per_actor` must be ≥ 1; got {self.threads_per_actor}")
        if self.min_actors is not None and self.min_actors < 1:
            raise ValueError(f"`min_actors` must be ≥ 1; got {self.min_actors}")
        if self.max_actors is not None and self.max_actors < (self.min_actors or 1):
            raise ValueError(f"`max_actors` ({self.max_actors}) must be ≥ `min_actors` ({self.min_actors})")
        if self.batch_tokens is not None and self.max_length is not None:
            if self.batch_tokens < self.max_length:
                raise ValueError(
                    f"`batch_tokens` ({self.batch_tokens}) must hold at least one text of "
                    f"`max_length` ({self.max_length}) tokens"
                )
        if self.max_rejected_fraction is not None and not 0 <= self.max_rejected_fraction <= 1:
            raise ValueError(
                f"`max_rejected_fraction` must be between 0 and 1 (a fraction of the run's rows); "
                f"got {self.max_rejected_fraction}"
            )
        if self.extra:
            raise ValueError(f"unknown settings: {', '.join(sorted(self.extra))}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
        """Defaults < YAML file < overrides (flags). Unknown YAML keys are refused."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = set(cls.field_names())
        extra = {k: v for k, v in values.items() if k not in known}
        kwargs = {k: v for k, v in values.items() if k in known}
        for name in ("inputs", "output"):
            if name not in kwargs:
                flag = "--input" if name == "inputs" else "--output"
                raise ValueError(f"`{name}` is required (flag {flag} or YAML key `{name}`)")
        if isinstance(kwargs.get("keep_columns"), str):
            kwargs["keep_columns"] = tuple(c.strip() for c in kwargs["keep_columns"].split(",") if c.strip())
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for reports, with anything that looks like a secret masked
        (credentials never enter the settings, but a URL may carry a password or signature)."""
        from embedding.logs import redact

        out = dataclasses.asdict(self)
        out.pop("extra")
        out["inputs"] = list(self.inputs)
        out["keep_columns"] = list(self.keep_columns)
        return redact(out)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings; got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "input":
            name = "inputs"
        if name == "inputs" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out
