"""The TSSP container: a fixed header, a fixed member table, then the members back to back.

Byte layout (docs/tssp-format.md is the normative description; this module must match it)::

    offset  size  field
    0       8     magic  b"\\x89TSSP\\r\\n\\x1a"
    8       2     format version, unsigned big-endian (2)
    10      2     member count, unsigned big-endian (5 in versions 1 and 2)
    12      4     reserved, must be zero
    16      40*n  member table: name (32 bytes, ASCII, NUL-padded) + size (u64 big-endian)
    ...           member data, in table order, no gaps; the file ends right after the last one

Why a custom container and not zip: zip has two directories that can disagree, optional
compression, paths as names, and tolerates trailing and interleaved data; each of those has
been a parser-confusion bug somewhere. Here every byte has exactly one meaning, offsets are
implied by sizes (so nothing can overlap), names come from a closed set, and the file length
is fixed by the table (so truncation and appended data are both detected).

This module only checks structure and bounds. Integrity (digests) and authenticity (signature)
live in package.py, on top of the signed manifest that lists every member's size and digest.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vllm_tensafe.errors import MalformedPackageError, TsspError, UnsupportedVersionError

MAGIC = b"\x89TSSP\r\n\x1a"
# Version 2: the manifest gained adapter_version and not_after (rollback protection).
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (FORMAT_VERSION,)

_HEADER = struct.Struct(">8sHHI")
_ENTRY = struct.Struct(">32sQ")
HEADER_SIZE = _HEADER.size  # 16
ENTRY_SIZE = _ENTRY.size  # 40
NAME_FIELD = 32

MANIFEST = "manifest.json"
SIGNATURE = "signature"
HE_CONTEXT = "he_context"
LORA_A = "lora_a.safetensors"
LORA_B = "lora_b.he"
# The only members, in the only order a file may list them (versions 1 and 2).
MEMBER_ORDER: tuple[str, ...] = (MANIFEST, SIGNATURE, HE_CONTEXT, LORA_A, LORA_B)
# The members whose digest the manifest carries (everything except itself and the signature).
DIGESTED_MEMBERS: tuple[str, ...] = (HE_CONTEXT, LORA_A, LORA_B)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SIGNATURE_SIZE = 64  # Ed25519
# Per-member caps: checked against the table before a single member byte is read.
MEMBER_LIMITS: dict[str, int] = {
    MANIFEST: 1 * MiB,
    SIGNATURE: SIGNATURE_SIZE,
    HE_CONTEXT: 64 * MiB,
    LORA_A: 4 * GiB,
    LORA_B: 64 * GiB,
}
TOTAL_LIMIT = 68 * GiB
# Reading a header with a huge member count must not make us read a huge table.
MAX_TABLE_ENTRIES = 16

_CHUNK = 4 * MiB


def unsupported_version(version: int, what: str = "format version") -> UnsupportedVersionError:
    """The refusal of a package of another format version; the fix depends on which side is
    older (an old package is re-packed, a new one needs a newer vllm-tensafe)."""
    cause = (
        f"Invalid TSSP package: {what} {version} is not supported (this vllm-tensafe reads "
        f"version {FORMAT_VERSION})"
    )
    if version < FORMAT_VERSION:
        return UnsupportedVersionError(
            cause,
            "re-pack the adapter with `vllm-tensafe pack` (version 2 adds the signed "
            "adapter_version that hosts and key holders use against rollback)",
        )
    return UnsupportedVersionError(cause, "upgrade vllm-tensafe to read this package")


@dataclass(frozen=True)
class MemberInfo:
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class ContainerLayout:
    """The parsed header and table of a TSSP file (no member data)."""

    version: int
    members: dict[str, MemberInfo]
    total_size: int


def _describe(raw: bytes) -> str:
    """A safe, printable rendering of an untrusted name (never echo control bytes)."""
    return raw.decode("ascii", errors="backslashreplace").encode("unicode_escape").decode("ascii")


def _parse_name(field: bytes) -> str:
    name_bytes = field.rstrip(b"\x00")
    if not name_bytes:
        raise MalformedPackageError(
            "Invalid TSSP package: member table has an entry with an empty name",
            "re-create the package with `vllm-tensafe pack`",
        )
    shown = _describe(name_bytes)
    if b"\x00" in name_bytes or any(b < 0x21 or b > 0x7E for b in name_bytes):
        raise MalformedPackageError(
            f"Invalid TSSP package: member name {shown!r} has non-printable bytes",
            "re-create the package with `vllm-tensafe pack`",
        )
    name = name_bytes.decode("ascii")
    if name in MEMBER_ORDER:
        return name
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or ":" in name:
        raise MalformedPackageError(
            f"Invalid TSSP package: member name {shown!r} looks like a path; member names are "
            f"fixed identifiers ({', '.join(MEMBER_ORDER)})",
            "do not use this file; re-create the package with `vllm-tensafe pack`",
        )
    raise MalformedPackageError(
        f"Invalid TSSP package: unknown member {shown!r}; version {FORMAT_VERSION} has "
        f"exactly {', '.join(MEMBER_ORDER)}",
        "re-create the package with `vllm-tensafe pack`",
    )


def parse_layout(head: bytes, file_size: int) -> ContainerLayout:
    """Parse header + table from the first bytes of a file of ``file_size`` bytes.

    ``head`` may be longer than the header and table; it must hold at least
    ``HEADER_SIZE + ENTRY_SIZE * MAX_TABLE_ENTRIES`` bytes or the whole file.
    """
    fix_recreate = "re-create the package with `vllm-tensafe pack`"
    if len(head) < HEADER_SIZE:
        if MAGIC.startswith(head[: len(MAGIC)]) and head:
            raise MalformedPackageError(
                f"Invalid TSSP package: truncated header ({file_size} bytes, need at least "
                f"{HEADER_SIZE})",
                "the file is incomplete; copy or download it again",
            )
        raise MalformedPackageError(
            "Invalid TSSP package: not a TSSP file (no TSSP magic bytes)",
            "pass a .tssp file made by `vllm-tensafe pack`",
        )
    magic, version, count, reserved = _HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise MalformedPackageError(
            "Invalid TSSP package: not a TSSP file (no TSSP magic bytes)",
            "pass a .tssp file made by `vllm-tensafe pack`",
        )
    if version not in SUPPORTED_VERSIONS:
        raise unsupported_version(version)
    if reserved != 0:
        raise MalformedPackageError(
            f"Invalid TSSP package: reserved header field is {reserved:#x}, must be 0",
            fix_recreate,
        )
    if count > MAX_TABLE_ENTRIES:
        raise MalformedPackageError(
            f"Invalid TSSP package: member table claims {count} entries (at most "
            f"{MAX_TABLE_ENTRIES})",
            fix_recreate,
        )
    table_end = HEADER_SIZE + ENTRY_SIZE * count
    if len(head) < table_end:
        raise MalformedPackageError(
            f"Invalid TSSP package: truncated member table ({file_size} bytes, table needs "
            f"{table_end})",
            "the file is incomplete; copy or download it again",
        )
    entries: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i in range(count):
        field, size = _ENTRY.unpack_from(head, HEADER_SIZE + ENTRY_SIZE * i)
        name = _parse_name(field)
        if name in seen:
            raise MalformedPackageError(
                f"Invalid TSSP package: duplicate member {name!r}", fix_recreate
            )
        seen.add(name)
        limit = MEMBER_LIMITS[name]
        if size > limit:
            raise MalformedPackageError(
                f"Invalid TSSP package: member {name!r} is {size} bytes, over the "
                f"{limit}-byte limit",
                "do not use this file; packages over the limits are not accepted",
            )
        entries.append((name, size))
    missing = [n for n in MEMBER_ORDER if n not in seen]
    if missing:
        raise MalformedPackageError(
            f"Invalid TSSP package: missing member(s) {', '.join(missing)}", fix_recreate
        )
    if tuple(n for n, _ in entries) != MEMBER_ORDER:
        raise MalformedPackageError(
            "Invalid TSSP package: members are not in the canonical order "
            f"({', '.join(MEMBER_ORDER)})",
            fix_recreate,
        )
    sig_size = dict(entries)[SIGNATURE]
    if sig_size != SIGNATURE_SIZE:
        raise MalformedPackageError(
            f"Invalid TSSP package: signature member is {sig_size} bytes, an Ed25519 "
            f"signature is {SIGNATURE_SIZE}",
            fix_recreate,
        )
    members: dict[str, MemberInfo] = {}
    offset = table_end
    for name, size in entries:
        members[name] = MemberInfo(name, offset, size)
        offset += size
    if offset > TOTAL_LIMIT:
        raise MalformedPackageError(
            f"Invalid TSSP package: members add up to {offset} bytes, over the "
            f"{TOTAL_LIMIT}-byte limit",
            "do not use this file; packages over the limits are not accepted",
        )
    if file_size < offset:
        raise MalformedPackageError(
            f"Invalid TSSP package: truncated: the member table needs {offset} bytes, the file "
            f"has {file_size}",
            "the file is incomplete; copy or download it again",
        )
    if file_size > offset:
        raise MalformedPackageError(
            f"Invalid TSSP package: {file_size - offset} unexpected bytes after the last member",
            "do not use this file; re-create the package with `vllm-tensafe pack`",
        )
    return ContainerLayout(version=version, members=members, total_size=offset)


class ContainerReader:
    """Bounds-checked reads of one TSSP file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (a hang, not an error).
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise TsspError(
                f"cannot read TSSP package {str(self.path)!r}: {exc.strerror or exc}",
                "check the path and its permissions",
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise TsspError(
                f"cannot read TSSP package {str(self.path)!r}: not a regular file",
                "pass the path of a .tssp file",
            )
        self._fh: BinaryIO = os.fdopen(fd, "rb")
        try:
            size = st.st_size
            head = self._read_exact(0, min(size, HEADER_SIZE + ENTRY_SIZE * MAX_TABLE_ENTRIES))
            self.layout = parse_layout(head, size)
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> ContainerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def _read_exact(self, offset: int, size: int) -> bytes:
        try:
            self._fh.seek(offset)
            data = self._fh.read(size)
        except OSError as exc:
            raise TsspError(
                f"cannot read TSSP package {str(self.path)!r}: {exc.strerror or exc}",
                "check the file and the disk",
            ) from None
        if len(data) != size:
            # The file shrank after we measured it: report it as the truncation it is.
            raise MalformedPackageError(
                f"Invalid TSSP package: truncated while reading ({len(data)} of {size} bytes "
                f"at offset {offset})",
                "the file is incomplete or was changed while reading; copy it again",
            )
        return data

    def read(self, name: str) -> bytes:
        """The whole member (its size was bounded by ``MEMBER_LIMITS`` in ``parse_layout``)."""
        info = self.layout.members[name]
        return self._read_exact(info.offset, info.size)

    def read_prefix(self, name: str, n: int) -> bytes:
        """The first ``min(n, size)`` bytes of a member (an index or header at its start)."""
        info = self.layout.members[name]
        return self._read_exact(info.offset, min(n, info.size))

    def iter_chunks(self, name: str, chunk: int = _CHUNK) -> Iterator[bytes]:
        info = self.layout.members[name]
        pos, end = info.offset, info.offset + info.size
        while pos < end:
            n = min(chunk, end - pos)
            yield self._read_exact(pos, n)
            pos += n

    def sha256(self, name: str) -> str:
        """Hash a member without holding it in memory (for verification of large members)."""
        digest = hashlib.sha256()
        for block in self.iter_chunks(name):
            digest.update(block)
        return digest.hexdigest()


# --- writing ---------------------------------------------------------------------------------

Chunk = bytes | bytearray | memoryview | Path
# A member is one chunk or a list of chunks written back to back (e.g. an index in memory
# followed by blobs spooled to a temporary file).
MemberSource = Chunk | list[Chunk]


def _parts(source: MemberSource) -> list[Chunk]:
    return list(source) if isinstance(source, list) else [source]


def _source_size(source: MemberSource) -> int:
    return sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in _parts(source))


def _source_chunks(source: MemberSource) -> Iterator[bytes | bytearray | memoryview]:
    for part in _parts(source):
        if isinstance(part, Path):
            with open(part, "rb") as fh:
                while block := fh.read(_CHUNK):
                    yield block
        else:
            yield memoryview(part)


def encode_table(sizes: dict[str, int]) -> bytes:
    """Header + member table for members of the given sizes (in canonical order)."""
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, len(MEMBER_ORDER), 0)]
    for name in MEMBER_ORDER:
        parts.append(_ENTRY.pack(name.encode("ascii").ljust(NAME_FIELD, b"\x00"), sizes[name]))
    return b"".join(parts)


def write_container(out_path: str | os.PathLike[str], members: dict[str, MemberSource]) -> Path:
    """Write a TSSP file atomically: a temporary file in the same folder, fsync, rename.

    Readers therefore see either the old file or the complete new one, never a partial file
    (a crash mid-write leaves only a ``.tmp`` file, which nothing loads).
    """
    if set(members) != set(MEMBER_ORDER):
        raise ValueError(f"members must be exactly {MEMBER_ORDER}, got {sorted(members)}")
    sizes = {name: _source_size(src) for name, src in members.items()}
    for name, size in sizes.items():
        if size > MEMBER_LIMITS[name]:
            raise TsspError(
                f"cannot write TSSP package: member {name!r} would be {size} bytes, over the "
                f"{MEMBER_LIMITS[name]}-byte limit readers accept",
                "pack fewer target modules or a lower rank",
            )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(encode_table(sizes))
            for name in MEMBER_ORDER:
                for block in _source_chunks(members[name]):
                    fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    return out
