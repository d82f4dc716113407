"""The adapter owner's key records: which adapter name each CKKS key encrypts, and the highest
``adapter_version`` packed per name.

One CKKS key per adapter is what keeps an active host's worst case small: a host that recovers
a key from a remote key holder (docs/threat-model.md) then decrypts only that one adapter's B',
which r unit-vector queries give it anyway. ``pack`` therefore refuses a public key already
bound to another adapter name here, unless told otherwise, and picks the next version.

The records live beside the public context (``PREFIX.public`` -> ``PREFIX.records.json``), so
they follow the key; ``--key-records FILE`` keeps them elsewhere. The file is replaced
atomically; a record that cannot be read is an error, never an empty record.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import TsspError

RECORDS_FORMAT = "tensafe-key-records"


def default_records_path(he_public: str | os.PathLike[str]) -> Path:
    path = Path(he_public)
    stem = path.name.removesuffix(".public")
    return path.with_name(f"{stem}.records.json")


class KeyRecords:
    """``{key id: [adapter names]}`` and ``{adapter name: highest version}`` of one owner."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.keys: dict[str, list[str]] = {}
        self.versions: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(f"cannot be read: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
            if data.get("format") != RECORDS_FORMAT:
                raise ValueError("not a key records file")
            keys = {str(k): [str(n) for n in v] for k, v in data["keys"].items()}
            versions = {str(k): int(v) for k, v in data["versions"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._error(f"is corrupt ({exc})") from None
        self.keys, self.versions = keys, versions

    def _error(self, what: str) -> TsspError:
        return TsspError(
            f"key records {str(self.path)!r} {what}",
            "restore the file, or pass --key-records with another path",
        )

    def names_for(self, key_id: str) -> list[str]:
        return list(self.keys.get(key_id, []))

    def other_names(self, key_id: str, name: str) -> list[str]:
        return [n for n in self.keys.get(key_id, []) if n != name]

    def next_version(self, name: str) -> int:
        return self.versions.get(name, 0) + 1

    def record(self, key_id: str, name: str, version: int) -> None:
        names = self.keys.setdefault(key_id, [])
        if name not in names:
            names.append(name)
        self.versions[name] = max(version, self.versions.get(name, 0))
        self._save()

    def _save(self) -> None:
        data: dict[str, Any] = {
            "format": RECORDS_FORMAT,
            "keys": self.keys,
            "versions": self.versions,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
