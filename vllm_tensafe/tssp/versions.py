"""Rollback protection: the highest ``adapter_version`` seen per adapter name, persisted.

Two validly signed packages of one adapter name both verify; only the version tells the newer
from the older. Hosts (the vLLM plugin) and key holders keep a ``VersionLedger`` and refuse a
package older than the highest version they have accepted for its name. A package of the same
version is accepted (re-opening a package is not a rollback).

The ledger is a small JSON file, replaced atomically (temporary file, fsync, rename) under an
exclusive lock on a side file, so the processes of one vLLM instance (API server, engine core,
workers) and restarts agree. A ledger that cannot be read is refused, never treated as empty:
forgetting the marks would re-open the door they close.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import ConfigError, RollbackError

LEDGER_FORMAT = "tensafe-adapter-versions"
VERSION_FILE_ENV = "TENSAFE_VERSION_FILE"


def default_version_file() -> Path:
    """``$XDG_STATE_HOME/vllm-tensafe/adapter-versions.json`` (``~/.local/state`` by default)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "vllm-tensafe" / "adapter-versions.json"


class VersionLedger:
    """Highest adapter version per name; ``path=None`` keeps it in memory (tests, one process)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def highest(self, name: str) -> int | None:
        with self._locked() as entries:
            entry = entries.get(name)
        return int(entry["adapter_version"]) if entry else None

    def observe(self, name: str, version: int, manifest_digest: str, what: str = "") -> None:
        """Refuse ``version`` if older than the highest seen for ``name``; else record it."""
        with self._locked(write=True) as entries:
            entry = entries.get(name)
            if entry is not None and version < int(entry["adapter_version"]):
                raise RollbackError(
                    f"{what or 'package'} of adapter {name!r} has adapter_version {version}, "
                    f"older than version {entry['adapter_version']} already accepted here "
                    "(a validly signed old package is a rollback)",
                    "serve the newest package of this adapter; its owner re-packs with a "
                    "higher --adapter-version to replace it",
                )
            if entry is None or version > int(entry["adapter_version"]):
                entries[name] = {
                    "adapter_version": int(version),
                    "manifest_digest": manifest_digest,
                }

    def entries(self) -> dict[str, dict[str, Any]]:
        with self._locked() as entries:
            return {name: dict(entry) for name, entry in entries.items()}

    # --- storage ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, write: bool = False) -> Iterator[dict[str, dict[str, Any]]]:
        with self._lock:
            if self.path is None:
                yield self._memory
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise self._error(f"cannot be created: {exc.strerror or exc}") from None
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                entries = self._read()
                before = json.dumps(entries, sort_keys=True)
                yield entries
                if write and json.dumps(entries, sort_keys=True) != before:
                    self._write(entries)
            finally:
                os.close(lock_fd)

    def _read(self) -> dict[str, dict[str, Any]]:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise self._error(f"cannot be read: {exc}") from None
        try:
            data = json.loads(text)
            entries = data["adapters"]
            if data.get("format") != LEDGER_FORMAT or not isinstance(entries, dict):
                raise ValueError("not a version file")
            for entry in entries.values():
                if not isinstance(entry.get("adapter_version"), int):
                    raise ValueError("entry without adapter_version")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._error(f"is corrupt ({exc})") from None
        return entries

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        assert self.path is not None
        data = json.dumps({"format": LEDGER_FORMAT, "adapters": entries}, indent=1, sort_keys=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(data + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise self._error(f"cannot be written: {exc.strerror or exc}") from None

    def _error(self, what: str) -> ConfigError:
        return ConfigError(
            f"adapter version file {str(self.path)!r} {what}",
            f"fix or restore the file (set {VERSION_FILE_ENV} / --tensafe-version-file to "
            "another path only if you accept forgetting the versions seen)",
        )

    def __repr__(self) -> str:
        return f"VersionLedger({str(self.path) if self.path else '<memory>'})"
