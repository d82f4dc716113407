"""The ``lora_b.he`` member: an index, then one EncryptedMatrix blob per module.

Layout (all integers unsigned big-endian)::

    magic   8 bytes  b"TSSPHEB1"
    count   u32      number of modules
    count x entry:   name length (u16), name (ASCII), blob size (u64)
    blobs            EncryptedMatrix.to_bytes() of each module, in index order, no gaps

Entries are in sorted module-name order and must agree exactly (names, order, sizes) with the
signed manifest's ``modules``; the member ends right after the last blob. The index is
redundant with the manifest on purpose: the member describes itself (a tool can walk it
without the manifest) and the reader cross-checks the two, so neither can be used to make
the other point at the wrong bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from vllm_tensafe.errors import MalformedPackageError

MAGIC = b"TSSPHEB1"
_COUNT = struct.Struct(">I")
_NAME_LEN = struct.Struct(">H")
_SIZE = struct.Struct(">Q")
_FIX = "re-create the package with `vllm-tensafe pack`"


@dataclass(frozen=True)
class BlobRef:
    name: str
    offset: int  # from the start of the lora_b.he member
    size: int


def encode_index(entries: list[tuple[str, int]]) -> bytes:
    parts = [MAGIC, _COUNT.pack(len(entries))]
    for name, size in entries:
        raw = name.encode("ascii")
        parts += [_NAME_LEN.pack(len(raw)), raw, _SIZE.pack(size)]
    return b"".join(parts)


def index_size(names: list[str]) -> int:
    return len(MAGIC) + _COUNT.size + sum(_NAME_LEN.size + len(n) + _SIZE.size for n in names)


def parse_index(head: bytes, member_size: int, expected: Mapping[str, int]) -> list[BlobRef]:
    """Parse the index at the start of ``lora_b.he`` and check it against the manifest.

    ``head`` holds at least the index (the caller passes ``index_size(list(expected))``
    bytes, or the whole member); ``expected`` maps module name -> blob size, from the manifest.
    """

    def bad(what: str) -> MalformedPackageError:
        return MalformedPackageError(f"Invalid TSSP package: lora_b.he {what}", _FIX)

    names = sorted(expected)
    need = index_size(names)
    if len(head) < need or member_size < need:
        raise bad("is shorter than its index")
    if head[: len(MAGIC)] != MAGIC:
        raise bad("does not start with its magic bytes")
    pos = len(MAGIC)
    (count,) = _COUNT.unpack_from(head, pos)
    pos += _COUNT.size
    if count != len(names):
        raise bad(f"lists {count} modules, the manifest {len(names)}")
    refs: list[BlobRef] = []
    offset = need
    for name in names:
        (name_len,) = _NAME_LEN.unpack_from(head, pos)
        pos += _NAME_LEN.size
        raw = head[pos : pos + name_len]
        pos += name_len
        if raw != name.encode("ascii"):
            raise bad(f"index entry does not match manifest module {name} (or is out of order)")
        (size,) = _SIZE.unpack_from(head, pos)
        pos += _SIZE.size
        if size != expected[name]:
            raise bad(f"blob of {name} is {size} bytes, the manifest says {expected[name]}")
        refs.append(BlobRef(name, offset, size))
        offset += size
    if offset != member_size:
        raise bad(f"index covers {offset} bytes, the member has {member_size}")
    return refs


class BlobSpool:
    """Collects encrypted blobs in a temporary file next to the output (bounded memory).

    Pack encrypts one module at a time; its blob goes to disk at once, so packing a large
    adapter needs memory for one module's ciphertexts, not for the whole package.
    """

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=".tssp-blobs.", suffix=".tmp", dir=directory)
        self.path = Path(name)
        self._fh = os.fdopen(fd, "wb")
        self.entries: list[tuple[str, int]] = []

    def add(self, name: str, blob: bytes) -> None:
        if self.entries and name <= self.entries[-1][0]:
            raise ValueError("blobs must be added in sorted module order")
        self._fh.write(blob)
        self.entries.append((name, len(blob)))

    def finish(self) -> tuple[bytes, str, int]:
        """(index bytes, sha256 of the whole member, member size)."""
        self._fh.flush()
        self._fh.close()
        index = encode_index(self.entries)
        digest = hashlib.sha256(index)
        with open(self.path, "rb") as fh:
            while block := fh.read(4 * 1024 * 1024):
                digest.update(block)
        return index, digest.hexdigest(), len(index) + sum(size for _, size in self.entries)

    def discard(self) -> None:
        with suppress(OSError):
            self._fh.close()
        with suppress(OSError):
            self.path.unlink()
