"""Finding a sentence-transformers model and reading its layout (not its weights).

A model source is one of:

- a hub id, optionally pinned: ``pkshatech/GLuCoSE-base-ja`` or ``...@<revision>``;
- a local sentence-transformers directory;
- an ``s3://`` (or other fsspec) directory, copied once per node into a local cache.

:func:`resolve_model` runs on the driver and reads only the small files (``modules.json``,
``1_Pooling/config.json``, ``config.json``, the tokenizer files). It pins the revision, so
every node loads the same weights. :func:`materialize` runs on each encoder actor and returns
a local directory with the weights. Weights are safetensors only; remote code is never run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from embedding import storage
from embedding.logs import error_line
from embedding.tokenize import TokenizerSpec

logger = logging.getLogger(__name__)

SMALL_FILES = (
    "modules.json",
    "config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "entity_vocab.json",
)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
)
FAIRSEQ_SP_TOKENIZERS = {"MLukeTokenizer", "XLMRobertaTokenizer", "XLMRobertaTokenizerFast", "CamembertTokenizer"}
WEIGHTS = "model.safetensors"


class ModelNotFoundError(FileNotFoundError):
    """The model cannot be found where it was asked for; the message says how to supply it."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: where its files are, which revision, and how to pool its output."""

    source: str  # as given by the user, minus any @revision
    kind: str  # "hub" | "local" | "remote"
    revision: str
    pooling: str  # "mean" | "cls" | "max"
    normalize: bool
    dim: int
    max_length: int
    model_type: str
    tokenizer: TokenizerSpec


def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _split_revision(source: str) -> tuple[str, str | None]:
    if _is_remote(source) or os.path.exists(source) or "@" not in source:
        return source, None
    repo, _, rev = source.rpartition("@")
    return repo, rev or None


def resolve_model(source: str, max_length: int | None = None) -> ModelSpec:
    """Read a model's layout on the driver. Raises ModelNotFoundError with a remedy."""
    repo, revision = _split_revision(source)
    if _is_remote(repo):
        kind = "remote"
        prints = storage.tree_fingerprint(repo)
        if not prints:
            raise ModelNotFoundError(f"model directory {repo} is empty or does not exist")
        files = {name: storage.read_bytes(storage.join(repo, name)) for name in SMALL_FILES if name in prints}
        if WEIGHTS not in prints:
            raise ModelNotFoundError(f"model {repo} has no {WEIGHTS}; only safetensors weights are loaded")
        revision = hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()[:16]
    elif os.path.isdir(repo.removeprefix("file://")):
        kind = "local"
        path = Path(repo.removeprefix("file://"))
        files = {name: (path / name).read_bytes() for name in SMALL_FILES if (path / name).is_file()}
        if not (path / WEIGHTS).is_file():
            raise ModelNotFoundError(f"model directory {path} has no {WEIGHTS}; only safetensors weights are loaded")
        st = (path / WEIGHTS).stat()
        revision = hashlib.sha256(
            f"{st.st_size}:{st.st_mtime_ns}".encode() + files.get("config.json", b"")
        ).hexdigest()[:16]
    else:
        kind = "hub"
        snapshot = _hub_snapshot(repo, revision, weights=False)
        revision = snapshot.name  # the commit hash, so all nodes load the same weights
        files = {name: (snapshot / name).read_bytes() for name in SMALL_FILES if (snapshot / name).is_file()}
    return _layout(repo, kind, revision, files, max_length)


def _hub_snapshot(repo: str, revision: str | None, *, weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = [*SMALL_FILES, WEIGHTS] if weights else list(SMALL_FILES)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except HFValidationError as e:
        raise ModelNotFoundError(f"model {repo!r} is neither a local directory nor a valid hub id: {e}") from None
    except Exception as e:  # offline, not cached, gated, 404: one message with the remedy
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = f"HF_HUB_OFFLINE is set and {repo} is not in the local hub cache" if offline else error_line(e)
        raise ModelNotFoundError(
            f"model {repo!r} could not be loaded ({hint}). Supply a local copy: on a machine with "
            f"internet run `hf download {repo} --local-dir DIR` and pass --model DIR (or copy DIR "
            "to s3:// and pass that URI)"
        ) from None


def _layout(repo: str, kind: str, revision: str, files: dict[str, bytes], max_length: int | None) -> ModelSpec:
    if "config.json" not in files:
        raise ModelNotFoundError(f"model {repo} has no config.json")
    config = json.loads(files["config.json"])
    modules = json.loads(files.get("modules.json", b"[]"))
    types = [m.get("type", "") for m in modules]
    pooling_cfg = json.loads(files.get("1_Pooling/config.json", b"{}"))
    if pooling_cfg.get("pooling_mode_cls_token"):
        pooling = "cls"
    elif pooling_cfg.get("pooling_mode_max_tokens"):
        pooling = "max"
    elif pooling_cfg.get("pooling_mode_mean_tokens", True):
        pooling = "mean"
    else:
        raise ValueError(
            f"model {repo}: 1_Pooling/config.json selects no supported pooling mode "
            "(supported: pooling_mode_mean_tokens, pooling_mode_cls_token, pooling_mode_max_tokens)"
        )
    normalize = any(t.endswith("models.Normalize") for t in types)
    unsupported = [t for t in types if not t.endswith(("models.Transformer", "models.Pooling", "models.Normalize"))]
    if unsupported:
        raise ValueError(f"model {repo} has modules this job cannot run: {unsupported}")

    tok_cfg = json.loads(files.get("tokenizer_config.json", b"{}"))
    st_cfg = json.loads(files.get("sentence_bert_config.json", b"{}"))
    limits = [
        v
        for v in (
            st_cfg.get("max_seq_length"),
            tok_cfg.get("model_max_length"),
            config.get("max_position_embeddings", 514) - 2
            if config.get("model_type") in ("luke", "xlm-roberta", "roberta")
            else config.get("max_position_embeddings"),
        )
        if isinstance(v, int) and 0 < v < 1_000_000
    ]
    model_limit = min(limits) if limits else 512
    if max_length is not None and max_length > model_limit:
        raise ValueError(f"`max_length` {max_length} exceeds model {repo}'s limit of {model_limit} tokens")
    limit = max_length or model_limit

    tok_class = tok_cfg.get("tokenizer_class", "")
    if "sentencepiece.bpe.model" in files and (tok_class in FAIRSEQ_SP_TOKENIZERS or "tokenizer.json" not in files):
        tokenizer = TokenizerSpec(
            kind="sentencepiece-fairseq",
            max_length=limit,
            files=(("sentencepiece.bpe.model", files["sentencepiece.bpe.model"]),),
        )
    else:
        tokenizer = TokenizerSpec(
            kind="hf",
            max_length=limit,
            files=tuple((n, files[n]) for n in TOKENIZER_FILES if n in files),
            pad_id=int(config.get("pad_token_id") or 0),
        )
    return ModelSpec(
        source=repo,
        kind=kind,
        revision=revision,
        pooling=pooling,
        normalize=normalize,
        dim=int(pooling_cfg.get("word_embedding_dimension") or config["hidden_size"]),
        max_length=limit,
        model_type=str(config.get("model_type", "")),
        tokenizer=tokenizer,
    )


def materialize(spec: ModelSpec) -> Path:
    """A local directory holding the model's weights, fetched at most once per node."""
    if spec.kind == "local":
        return Path(spec.source.removeprefix("file://"))
    if spec.kind == "hub":
        return _hub_snapshot(spec.source, spec.revision, weights=True)
    key = hashlib.sha256(f"{spec.source}\n{spec.revision}".encode()).hexdigest()[:24]
    root = Path(storage.local_cache_dir()) / "models"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / key
    if (dest / WEIGHTS).is_file():
        return dest
    # Several actors on one node: the first copies, the others wait on the lock.
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / WEIGHTS).is_file():
            return dest
        tmp = root / f".{key}.{uuid.uuid4().hex}"
        logger.info("copying model %s into %s", spec.source, dest)
        try:
            storage.copy_tree_to_local(spec.source, str(tmp))
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
