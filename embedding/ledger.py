"""What an output prefix already holds, what produced it, and who is writing it.

Three kinds of small objects under the output prefix, all under ``_`` names so readers of
the data never see them:

``_job.json``
    The settings that produced the output (model and revision, pooling, normalisation,
    dtypes, max length, tokenizer, columns). A run whose settings differ is refused unless
    it is an ``--overwrite`` run.

``_done/<shard key>@<digest>.json``
    One marker per committed shard. ``digest`` hashes the shard's size and fingerprint (ETag
    or mtime) with the settings digest, so one LIST of ``_done/`` tells which shards are
    committed, unchanged, changed or gone, without reading any data. A marker is written
    after its shard's data file, so a crash in between only makes the next run redo (and
    rewrite identically) that one shard.

``_lock.json``
    A lease: run id, host, pid and a heartbeat the driver renews. Created exclusively
    (``O_EXCL`` locally, ``If-None-Match: *`` on S3), so a second concurrent run sees it
    and refuses. A lease whose heartbeat is older than :data:`LEASE_SECONDS`, or whose
    process on this host is gone, is stale and taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from embedding import storage
from embedding.storage import Shard

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
DONE = "_done"
LOCK_FILE = "_lock.json"
LEASE_SECONDS = 120.0

# Settings that change the vectors (or the file layout); a difference forbids mixing.
IDENTITY_FIELDS = (
    "model",
    "revision",
    "pooling",
    "normalized",
    "max_length",
    "dtype",
    "output_dtype",
    "tokenizer",
    "text_column",
    "id_column",
    "id_type",
    "keep_columns",
)
# Recorded only when used (--chunk, --keep-text): absent means "not used", so outputs written
# without them keep their digest, and a change in either direction is still a change.
OPTIONAL_FIELDS = ("chunk_tokens", "chunk_overlap", "keep_text")


class OutputMismatchError(ValueError):
    """The output was produced with other settings; mixing them is refused."""


class LockedError(RuntimeError):
    """Another run holds the output's lease."""


def settings_digest(identity: dict) -> str:
    values = {k: identity.get(k) for k in IDENTITY_FIELDS}
    values.update({k: identity[k] for k in OPTIONAL_FIELDS if identity.get(k) is not None})
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shard_digest(shard: Shard, settings: str) -> str:
    return hashlib.sha256(f"{shard.size}\n{shard.fingerprint}\n{settings}".encode()).hexdigest()[:16]


def marker_url(output: str, key: str, digest: str) -> str:
    return storage.join(output, DONE, f"{key}@{digest}.json")


def read_markers(output: str) -> dict[str, list[str]]:
    """``{shard key: [digest, ...]}`` from one listing of ``_done/``."""
    prefix = storage.join(output, DONE)
    markers: dict[str, list[str]] = {}
    for url in storage.list_files(prefix, "*.json"):
        rel = url[len(prefix) + 1 : -len(".json")]
        key, sep, digest = rel.rpartition("@")
        if sep:
            markers.setdefault(key, []).append(digest)
    return markers


@dataclass
class Plan:
    """What a run must do, from the inputs and the markers."""

    todo: list[Shard] = field(default_factory=list)  # new or changed
    changed: set[str] = field(default_factory=set)
    unchanged: list[Shard] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # committed shard keys absent from the inputs
    digests: dict[str, str] = field(default_factory=dict)  # key -> digest of this run's version
    stale: dict[str, list[str]] = field(default_factory=dict)  # key -> digests to delete after commit


def plan(shards: list[Shard], markers: dict[str, list[str]], settings: str, *, overwrite: bool = False) -> Plan:
    p = Plan()
    present = {s.key for s in shards}
    for shard in shards:
        digest = shard_digest(shard, settings)
        p.digests[shard.key] = digest
        old = markers.get(shard.key, [])
        if digest in old and not overwrite:
            p.unchanged.append(shard)
            p.stale[shard.key] = [d for d in old if d != digest]
        else:
            p.todo.append(shard)
            if old:
                p.changed.add(shard.key)
            p.stale[shard.key] = list(old)
    p.removed = sorted(k for k in markers if k not in present)
    return p


def write_marker(output: str, key: str, digest: str, record: dict) -> None:
    storage.write_bytes_atomic(marker_url(output, key, digest), json.dumps(record, sort_keys=True).encode())


def delete_markers(output: str, key: str, digests: list[str]) -> None:
    storage.remove([marker_url(output, key, d) for d in digests])


# --------------------------------------------------------------------------------------------
# The settings record.


def read_job(output: str) -> dict | None:
    url = storage.join(output, JOB_FILE)
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None


def check_job(output: str, identity: dict, recorded: dict | None, *, fields: tuple[str, ...] = IDENTITY_FIELDS) -> None:
    """Refuse when ``recorded`` settings differ from this run's on any of ``fields``."""
    if recorded is None:
        return
    diffs = [
        f"{name}: output has {recorded.get(name)!r}, this run {identity.get(name)!r}"
        for name in fields
        if name in recorded and name in identity and _norm(recorded[name]) != _norm(identity[name])
    ]
    if fields is IDENTITY_FIELDS:
        diffs += [
            f"{name}: output has {recorded.get(name)!r}, this run {identity.get(name)!r}"
            for name in OPTIONAL_FIELDS
            if recorded.get(name) != identity.get(name)
        ]
    if diffs:
        raise OutputMismatchError(
            f"output {output} was produced with other settings ({'; '.join(diffs)}); mixing vectors "
            "is refused. Pass --overwrite to replace the whole output, or choose another --output"
        )


def _norm(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def write_job(output: str, identity: dict) -> None:
    storage.write_bytes_atomic(
        storage.join(output, JOB_FILE), json.dumps(identity, sort_keys=True, indent=2, ensure_ascii=False).encode()
    )


# --------------------------------------------------------------------------------------------
# The lease.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive lease on an output prefix for one run; renew() from the driver loop."""

    def __init__(self, output: str, run_id: str) -> None:
        self.url = storage.join(output, LOCK_FILE)
        self.output = output
        self.run_id = run_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._last = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {"run_id": self.run_id, "host": self.host, "pid": self.pid, "heartbeat": time.time()}
        ).encode()

    def acquire(self) -> None:
        if storage.create_exclusive(self.url, self._record()):
            self._last = time.monotonic()
            return
        holder = self._holder()
        if holder is not None and not self._stale(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            raise LockedError(
                f"output {self.output} is being written by run {holder.get('run_id')} (host "
                f"{holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago); "
                f"wait for it to finish. A lease older than {LEASE_SECONDS:.0f} s is taken over"
            )
        logger.warning("taking over the stale lease of run %s", holder and holder.get("run_id"))
        storage.remove([self.url])
        if not storage.create_exclusive(self.url, self._record()):
            raise LockedError(f"output {self.output}: another run took the lease at the same moment")
        self._last = time.monotonic()

    def _holder(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.url))
        except (FileNotFoundError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > LEASE_SECONDS:
            return True
        return holder.get("host") == self.host and not _pid_alive(int(holder.get("pid", -1)))

    def renew(self, every: float = LEASE_SECONDS / 4) -> None:
        """Refresh the heartbeat if ``every`` seconds passed; raise if another run took over."""
        if self.lost:
            raise LockedError(self.lost)
        if time.monotonic() - self._last >= every:
            holder = self._holder()
            if holder is not None and holder.get("run_id") != self.run_id:
                self.lost = f"output {self.output}: run {holder.get('run_id')} took over this run's lease"
                raise LockedError(self.lost)
            storage.write_bytes_atomic(self.url, self._record())
            self._last = time.monotonic()

    def keep_alive(self) -> None:
        """Renew from a daemon thread, so long silent stretches (model download, a huge shard)
        do not let the lease go stale."""

        def loop() -> None:
            while not self._stop.wait(LEASE_SECONDS / 8):
                try:
                    self.renew()
                except LockedError:
                    return
                except Exception as e:  # a transient storage error: try again next beat
                    logger.warning("could not renew the lease on %s: %s", self.output, e)

        self._thread = threading.Thread(target=loop, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            holder = self._holder()
            if holder is None or holder.get("run_id") == self.run_id:
                storage.remove([self.url])
