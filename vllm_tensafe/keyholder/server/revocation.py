"""The revocation file: adapters (and keys) the owner has revoked, re-read when it changes.

One entry per line: an adapter name (the package's signed name, i.e. the "adapter id"), or
``key:<64 hex>`` for a CKKS key; blank lines and lines starting with ``#`` are ignored. Lines
are split at ``\\n`` only (never at U+2028 or other Unicode separators) and every entry must be
an adapter name or a key, so a line cannot hide or split an entry. ``revoke`` through the API
appends to the file and ``unrevoke`` rewrites it without the entry, so both survive a restart.
A file that becomes unreadable or invalid keeps the last good list: losing the file must not
un-revoke anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.tssp.manifest import NAME_RULE, is_adapter_name

log = logging.getLogger("vllm_tensafe.key_holder")

_KEY_ENTRY = re.compile(r"key:([0-9a-f]{64})")


@dataclass(frozen=True)
class Revocations:
    names: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()


def parse_revocations(text: str, where: str) -> Revocations:
    names: set[str] = set()
    keys: set[str] = set()
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        match = _KEY_ENTRY.fullmatch(line)
        if match:
            keys.add(match.group(1))
        elif is_adapter_name(line):
            names.add(line)
        else:
            raise ConfigError(
                f"{where}, line {number}: {line[:80]!r} is neither an adapter name nor "
                "key:<64 hex>",
                f"write one adapter name per line ({NAME_RULE}), or key:KEYID",
            )
    return Revocations(frozenset(names), frozenset(keys))


class RevocationFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(
                f"revocation file {str(self.path)!r} does not exist",
                "create it (it may be empty): one adapter name per line",
            )
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self.current = Revocations()
        self._reload(strict=True)

    def revocations(self) -> Revocations:
        """The list as of now (re-read if the file changed since the last call)."""
        with self._lock:
            self._reload(strict=False)
            return self.current

    def _reload(self, strict: bool) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            text = self.path.read_bytes().decode("utf-8")
            parsed = parse_revocations(text, f"revocation file {self.path}")
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            if strict:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(
                    f"revocation file {str(self.path)!r} cannot be read: {exc}", "fix the file"
                ) from None
            log.error("revocation file %s: %s; keeping the last list", self.path, exc)
            return
        self.current, self._stamp = parsed, stamp
        log.info(
            "revocation list loaded from %s: %d adapters, %d keys",
            self.path,
            len(parsed.names),
            len(parsed.keys),
        )

    def add(self, name: str) -> None:
        with self._lock:
            self._reload(strict=False)
            if name in self.current.names:
                return
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(name + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def remove(self, name: str) -> bool:
        """Rewrite the file without ``name``'s lines; True if there were any."""
        with self._lock:
            lines = self.path.read_bytes().decode("utf-8").split("\n")
            kept = [line for line in lines if line.strip(" \t\r") != name]
            if len(kept) == len(lines):
                return False
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write("\n".join(kept))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, self.path.stat().st_mode & 0o777)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._stamp = None
            self._reload(strict=False)
            return True
