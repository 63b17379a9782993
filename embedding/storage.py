"""The only module that talks to storage: URL -> filesystem, shard listing, atomic writes.

Everything else passes URLs (``/data/x``, ``file:///data/x``, ``s3://bucket/key``, any
fsspec protocol). Credentials come from each filesystem's own chain: for S3 that is
botocore's (environment, profile, instance role) including ``AWS_ENDPOINT_URL`` and
``AWS_ENDPOINT_URL_S3``, so S3-compatible stores need no code changes. No credential ever
passes through this module's arguments, logs or errors.

Atomicity: a reader of a prefix never sees a partial file. Local files are written to a
dot-named temporary beside the target and renamed; object stores publish an object only
when its (single or multipart) upload completes, and a failed upload is aborted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
from fsspec.core import url_to_fs

logger = logging.getLogger(__name__)

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMAT_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}


@dataclass(frozen=True)
class Shard:
    """One input file. ``key`` is its path relative to the input it was found under."""

    url: str
    key: str
    size: int
    fingerprint: str  # ETag or mtime: changes when the object is replaced


# Transient object-store errors (HTTP 5xx, throttling, connection resets, timeouts) seen by
# this process. Each is retried with exponential backoff by botocore ("standard" mode, at most
# S3_MAX_ATTEMPTS attempts per request) and by s3fs; stages report the count to the run report.
TRANSIENT_ERRORS = {"count": 0}
S3_MAX_ATTEMPTS = 8
_S3_SESSION = None


def _count_transient(response=None, caught_exception=None, **_: object) -> None:
    """botocore's ``needs-retry`` hook: one call per attempt, with its outcome."""
    status = getattr(response[0], "status_code", 200) if response else 200
    if caught_exception is not None or status in (429, 500, 502, 503, 504):
        TRANSIENT_ERRORS["count"] += 1


def _s3_session():
    """One aiobotocore session per process, with the error counter on its events."""
    global _S3_SESSION
    if _S3_SESSION is None:
        from aiobotocore.session import AioSession

        _S3_SESSION = AioSession()
        _S3_SESSION.register("needs-retry.s3", _count_transient)
    return _S3_SESSION


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-less path for ``url``.

    Object-store listings are never cached: a run decides what to skip from listings, and a
    long-lived driver must see what other processes wrote since."""
    if url.startswith(("s3://", "s3a://")):
        return url_to_fs(
            url,
            use_listings_cache=False,
            session=_s3_session(),
            config_kwargs={"retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}},
        )
    if url.startswith(("gs://", "gcs://", "abfs://", "az://")):
        return url_to_fs(url, use_listings_cache=False)
    return url_to_fs(url)


class StorageAccessError(PermissionError):
    """No credentials, or access denied, for a bucket; the message names it, never a secret."""


def bucket_of(url: str) -> str:
    if is_local(url):
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


@contextlib.contextmanager
def access(url: str) -> Iterator[None]:
    """Turn credential and permission errors on ``url`` into one clear StorageAccessError."""
    try:
        yield
    except StorageAccessError:
        raise
    except PermissionError as e:
        raise StorageAccessError(
            f"access denied to {bucket_of(url)} (while reading or writing {url}); check the IAM policy or "
            f"bucket policy of the credentials in use ({type(e).__name__})"
        ) from None
    except Exception as e:
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            raise StorageAccessError(
                f"no credentials to access {bucket_of(url)}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run with an instance role"
            ) from None
        raise


def transient_errors() -> int:
    """Transient object-store errors this process has seen (and retried) so far."""
    return TRANSIENT_ERRORS["count"]


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def _unstrip(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Turn a protocol-less path back into a URL of the same kind as ``like``."""
    if is_local(like):
        return path
    return fs.unstrip_protocol(path)


def is_hidden(relpath: str) -> bool:
    """Hive/Spark convention: any component starting with ``_`` or ``.`` is not data."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/") if part)


def split_extension(name: str) -> tuple[str, str | None]:
    """``'a/b.jsonl.gz'`` -> (``'.jsonl'``, ``'gzip'``). The format extension may be empty."""
    base, ext = posixpath.splitext(name)
    compression = COMPRESSIONS.get(ext.lower())
    if compression:
        base, ext = posixpath.splitext(base)
    return ext.lower(), compression


def format_of(name: str) -> str | None:
    return FORMAT_EXTENSIONS.get(split_extension(name)[0])


def _fingerprint(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            value = info[key]
            return f"{key}:{value.isoformat() if hasattr(value, 'isoformat') else value}".replace('"', "")
    return "size-only"


def list_shards(input_url: str, format_override: str = "auto") -> list[Shard]:
    """Files under ``input_url``: a file, a directory or prefix (recursive), or a glob.

    With automatic format detection, files whose extension names no known format are skipped
    (and counted in a log line); hidden paths (``_``/``.`` components) are always skipped.
    Raises FileNotFoundError, naming the URI, when nothing matches.
    """
    fs, path = filesystem(input_url)
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
        infos = {p: i for p, i in found.items() if i.get("type") != "directory"}
    elif fs.isfile(path):
        base = posixpath.dirname(path)
        infos = {path: fs.info(path)}
    elif fs.isdir(path):
        base = path.rstrip("/")
        infos = fs.find(path, detail=True)
    else:
        raise FileNotFoundError(f"input {input_url} matches no file")

    shards: list[Shard] = []
    skipped: list[str] = []
    for p, info in sorted(infos.items()):
        rel = posixpath.relpath(p, base) if base else p
        if is_hidden(rel):
            continue
        if format_override == "auto" and format_of(p) is None:
            skipped.append(rel)
            continue
        shards.append(
            Shard(
                url=_unstrip(fs, p, input_url),
                key=rel,
                size=int(info.get("size") or 0),
                fingerprint=_fingerprint(info),
            )
        )
    if skipped:
        logger.warning(
            "skipped %d file(s) under %s with no known format extension (e.g. %s); pass --format to read them",
            len(skipped),
            input_url,
            skipped[0],
        )
    if not shards:
        raise FileNotFoundError(f"input {input_url} matches no readable file")
    return shards


def open_input(url: str) -> IO[bytes]:
    """Binary stream of ``url`` with .gz/.zst decompressed transparently."""
    _, compression = split_extension(url)
    fs, path = filesystem(url)
    if compression == "zstd":
        # fsspec's zstd wrapper cannot iterate lines; zstandard's reader behind a buffer can.
        import zstandard

        raw = fs.open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True))
    return fsspec.core.OpenFile(fs, path, mode="rb", compression=compression).open()


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def list_files(prefix: str, pattern: str = "*") -> list[str]:
    """URLs of files under ``prefix`` (recursive) whose base name matches ``pattern``."""
    fs, path = filesystem(prefix)
    if not fs.exists(path):
        return []
    found = fs.find(path)
    return [_unstrip(fs, p, prefix) for p in sorted(found) if fnmatch.fnmatch(posixpath.basename(p), pattern)]


def remove(urls: list[str]) -> None:
    if not urls:
        return
    fs, _ = filesystem(urls[0])
    paths = [filesystem(u)[1] for u in urls]
    with contextlib.suppress(FileNotFoundError):
        fs.rm(paths)


def move(src: str, dst: str) -> None:
    """Replace ``dst`` with ``src`` in one step for readers of ``dst``: a rename locally, a
    server-side copy (atomic per object) then a delete on object stores."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if is_local(src):
        os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
        os.replace(src_path, dst_path)
        return
    fs.copy(src_path, dst_path)
    fs.rm(src_path)


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[IO[bytes]]:
    """Write ``url`` so that readers see either nothing (or the old file) or the whole file.

    Local: a dot-named temporary in the target's directory, fsynced, then ``os.replace``.
    Object stores: the object appears when the upload completes; on error the upload is
    discarded (a multipart upload is aborted), never completed.
    """
    fs, path = filesystem(url)
    if is_local(url):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()
        raise
    f.close()


def write_bytes_atomic(url: str, data: bytes) -> None:
    with atomic_open(url) as f:
        f.write(data)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` only if it does not exist; False if it does. ``O_EXCL`` locally,
    ``If-None-Match: *`` on S3 (other stores: an existence check, not race-free)."""
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if fs.protocol and "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def local_cache_dir() -> str:
    """Per-node cache (models copied from object storage)."""
    root = os.environ.get("EMBEDDING_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "embedding-job"
    )
    os.makedirs(root, exist_ok=True)
    return root


def copy_tree_to_local(url: str, dest: str) -> None:
    """Copy every file under ``url`` into local directory ``dest`` (which must not exist)."""
    fs, path = filesystem(url)
    for remote in fs.find(path):
        rel = posixpath.relpath(remote, path)
        target = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(remote, target)


def tree_fingerprint(url: str) -> dict[str, str]:
    """``{relative path: fingerprint}`` of every file under ``url``."""
    fs, path = filesystem(url)
    return {posixpath.relpath(p, path): _fingerprint(info) for p, info in sorted(fs.find(path, detail=True).items())}
