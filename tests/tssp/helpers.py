"""Build and take apart TSSP files by hand, from docs/tssp-format.md (not from the code under
test), so the tests also check that the code matches the written specification."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MAGIC = b"\x89TSSP\r\n\x1a"
ORDER = ["manifest.json", "signature", "he_context", "lora_a.safetensors", "lora_b.he"]
DIGESTED = ["he_context", "lora_a.safetensors", "lora_b.he"]
DOMAIN = b"tssp-manifest-v1\x00"


def build_container(
    entries: list[tuple[bytes | str, bytes]],
    *,
    version: int = 2,
    count: int | None = None,
    reserved: int = 0,
    magic: bytes = MAGIC,
    sizes: list[int] | None = None,
) -> bytes:
    """Header + table + data; ``sizes`` overrides the table's sizes (data is written as is)."""
    n = len(entries) if count is None else count
    out = [magic, struct.pack(">HHI", version, n, reserved)]
    for i, (name, data) in enumerate(entries):
        raw = name.encode() if isinstance(name, str) else name
        size = len(data) if sizes is None else sizes[i]
        out.append(raw.ljust(32, b"\x00")[:32] + struct.pack(">Q", size))
    out += [data for _, data in entries]
    return b"".join(out)


def member_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of a well-formed file."""
    magic, _version, n, _reserved = struct.unpack_from(">8sHHI", data, 0)
    assert magic == MAGIC
    spans: dict[str, tuple[int, int]] = {}
    offset = 16 + 40 * n
    for i in range(n):
        raw, size = struct.unpack_from(">32sQ", data, 16 + 40 * i)
        spans[raw.rstrip(b"\x00").decode()] = (offset, size)
        offset += size
    assert offset == len(data)
    return spans


def split(data: bytes) -> dict[str, bytes]:
    return {name: data[off : off + size] for name, (off, size) in member_spans(data).items()}


def canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def resign(
    data: bytes,
    key: Ed25519PrivateKey,
    *,
    members: dict[str, bytes] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    raw_manifest: bytes | None = None,
) -> bytes:
    """A validly signed variant of a package: replace members, edit the manifest, fix the
    digests, sign with ``key``. For payload checks that sit behind the signature."""
    parts = split(data)
    parts.update(members or {})
    manifest = json.loads(parts["manifest.json"])
    for name in DIGESTED:
        manifest["members"][name] = {
            "sha256": hashlib.sha256(parts[name]).hexdigest(),
            "size": len(parts[name]),
        }
    if edit is not None:
        edit(manifest)
    parts["manifest.json"] = raw_manifest if raw_manifest is not None else canonical(manifest)
    parts["signature"] = key.sign(DOMAIN + parts["manifest.json"])
    return build_container([(name, parts[name]) for name in ORDER])


def ciphertext_index(names_sizes: list[tuple[str, int]]) -> bytes:
    out = [b"TSSPHEB1", struct.pack(">I", len(names_sizes))]
    for name, size in names_sizes:
        out += [struct.pack(">H", len(name)), name.encode(), struct.pack(">Q", size)]
    return b"".join(out)
