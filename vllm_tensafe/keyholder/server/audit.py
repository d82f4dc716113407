"""The key holder's audit log: append-only JSON lines, fsynced, each chained to the previous.

Every line is one canonical JSON object::

    {"event": {...}, "hash": H_n, "prev": H_(n-1), "seq": n, "time": "2026-01-01T00:00:00.123Z"}

with ``H_n = SHA-256(H_(n-1) || canonical JSON of the line without "hash")`` and
``H_0 = 64 zeros`` before the first line. Changing, removing, inserting or reordering any line
breaks the chain at that line (``vllm-tensafe key-holder audit verify FILE`` says which).
Cutting lines off the end leaves a valid, shorter chain: the head hash that ``verify`` prints
(and the service logs at start and stop) is what to keep elsewhere to detect that.

A line is written and fsynced before the reply it records leaves; if it cannot be written the
request is refused (503), so no decryption is ever released unaudited.

The log is also the key holder's memory: at start it is verified and replayed to restore the
ciphertexts used per adapter and per key, API revocations and the highest adapter version
served per name, so a restart forgets none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import ConfigError, TenSafeError

GENESIS = "0" * 64


class AuditChainError(TenSafeError):
    """The audit log is not an intact chain (a line was changed, removed or inserted)."""


class AuditWriteError(TenSafeError):
    """An audit line could not be written; the request it records must be refused."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _line_hash(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + _canonical(body)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: str
    event: dict[str, Any]
    hash: str


@dataclass(frozen=True)
class ChainReport:
    lines: int
    head: str  # hash of the last line (GENESIS for an empty log)


def iter_records(path: str | os.PathLike[str]) -> Iterator[AuditRecord]:
    """The records of an audit log, checking the chain; AuditChainError at the first break."""
    prev, expected_seq = GENESIS, 1
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditChainError(
            f"audit log {str(path)!r} cannot be read: {exc}", "check the path"
        ) from None
    with fh:
        for number, raw in enumerate(fh, 1):

            def broken(why: str, number: int = number) -> AuditChainError:
                return AuditChainError(
                    f"audit log {path}: line {number} {why}; the chain is broken from there on",
                    "treat everything from that line on as tampered; keep the file as evidence "
                    "and start the key holder with a new --audit-log",
                )

            if not raw.endswith(b"\n"):
                raise broken("is incomplete (no newline: a crash while writing, or a cut)")
            try:
                line = json.loads(raw)
            except ValueError:
                raise broken("is not JSON") from None
            if not isinstance(line, dict) or set(line) != {"event", "hash", "prev", "seq", "time"}:
                raise broken("is not an audit record")
            if raw.rstrip(b"\n") != _canonical(line):
                raise broken("is not in canonical form (it was edited)")
            if line["seq"] != expected_seq:
                raise broken(f"has sequence number {line['seq']!r}, expected {expected_seq}")
            if line["prev"] != prev:
                raise broken("does not chain to the line before it")
            body = {k: v for k, v in line.items() if k != "hash"}
            if _line_hash(prev, body) != line["hash"]:
                raise broken("does not match its hash (its content was changed)")
            if not isinstance(line["event"], dict):
                raise broken("has no event object")
            prev, expected_seq = line["hash"], expected_seq + 1
            yield AuditRecord(line["seq"], line["time"], line["event"], line["hash"])


def verify_chain(path: str | os.PathLike[str]) -> ChainReport:
    if not Path(path).is_file():
        raise AuditChainError(f"audit log {str(path)!r} does not exist", "pass the log's path")
    count, head = 0, GENESIS
    for record in iter_records(path):
        count, head = record.seq, record.hash
    return ChainReport(count, head)


# Lines an in-memory log (path None: tests, benchmarks) keeps, newest last.
MEMORY_LINES = 10_000


class AuditLog:
    """Appends chained lines to ``path`` (or keeps the last ones in memory when ``path`` is
    None, for in-process use; nothing then survives the process)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        # The history to replay at start (file logs), or the last lines (memory logs).
        self.records: list[AuditRecord] | deque[AuditRecord] = deque(maxlen=MEMORY_LINES)
        self.seq, self.head = 0, GENESIS
        if self.path is not None:
            try:
                self.records = list(iter_records(self.path))
            except AuditChainError as exc:
                raise ConfigError(
                    f"refusing to start: {exc.cause}",
                    "run `vllm-tensafe key-holder audit verify FILE` to see it; "
                    "then start with a new --audit-log",
                ) from None
            if self.records:
                self.seq, self.head = self.records[-1].seq, self.records[-1].hash
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"audit log {str(self.path)!r} cannot be opened for appending: {exc}",
                    "pass a writable --audit-log path",
                ) from None

    def append(self, event: dict[str, Any]) -> AuditRecord:
        """Write one line and fsync it; AuditWriteError if that fails (nothing is kept then)."""
        with self._lock:
            body = {"event": event, "prev": self.head, "seq": self.seq + 1, "time": _now()}
            digest = _line_hash(self.head, body)
            line = _canonical({**body, "hash": digest}) + b"\n"
            if self.path is not None:
                if self._fd is None:
                    raise AuditWriteError("the audit log is closed", "restart the key holder")
                try:
                    written = os.write(self._fd, line)
                    if written != len(line):
                        raise OSError(f"short write ({written} of {len(line)} bytes)")
                    os.fsync(self._fd)
                except OSError as exc:
                    # A partial line breaks the chain visibly; nothing is released for it.
                    raise AuditWriteError(
                        f"audit log {self.path} cannot be written: {exc}",
                        "free disk space or fix the file's permissions, then restart",
                    ) from None
            record = AuditRecord(body["seq"], body["time"], event, digest)
            self.seq, self.head = record.seq, digest
            if self.path is None:
                self.records.append(record)
            return record

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
