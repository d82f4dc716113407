"""The ``lora_a.safetensors`` member: A' of every module, float32, shape (r, d_in).

Written and read with the safetensors library (no pickle). Before the library sees the bytes
the reader checks the safetensors header itself against the signed manifest (exact tensor
names, dtype F32, shapes, contiguous offsets covering the buffer): verification can then
vouch for the member without loading any tensor, and open only hands the library a buffer
whose layout is already known to be the expected one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from vllm_tensafe.errors import MalformedPackageError

_FIX = "re-create the package with `vllm-tensafe pack`"
_HEADER_LEN = struct.Struct("<Q")


def _bad(what: str) -> MalformedPackageError:
    return MalformedPackageError(f"Invalid TSSP package: lora_a.safetensors {what}", _FIX)


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(t, dtype=np.float32) for name, t in tensors.items()})


def header_length(head: bytes, member_size: int) -> int:
    """Bytes the header occupies (8-byte length prefix included)."""
    if len(head) < _HEADER_LEN.size or member_size < _HEADER_LEN.size:
        raise _bad("is too short for a safetensors header")
    (n,) = _HEADER_LEN.unpack_from(head, 0)
    if n > member_size - _HEADER_LEN.size:
        raise _bad("header length points past the end of the member")
    return _HEADER_LEN.size + n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def check_header(head: bytes, member_size: int, expected: Mapping[str, tuple[int, int]]) -> None:
    """Check the safetensors header (``head`` holds at least the header) against the manifest.

    ``expected`` maps module name -> (r, d_in).
    """
    end = header_length(head, member_size)
    if len(head) < end:
        raise _bad("header is truncated")
    try:
        header = json.loads(
            head[_HEADER_LEN.size : end].decode("utf-8"), object_pairs_hook=_no_duplicates
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    header.pop("__metadata__", None)
    if set(header) != set(expected):
        extra = sorted(set(header) - set(expected))[:3]
        missing = sorted(set(expected) - set(header))[:3]
        raise _bad(
            f"tensor names do not match the manifest modules (unexpected {extra}, missing "
            f"{missing})"
        )
    spans: list[tuple[int, int]] = []
    for name, (rank, d_in) in expected.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != "F32":
            raise _bad(f"tensor {name} is not float32")
        if info.get("shape") != [rank, d_in]:
            raise _bad(f"tensor {name} has shape {info.get('shape')}, expected [{rank}, {d_in}]")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or offsets[1] - offsets[0] != rank * d_in * 4
        ):
            raise _bad(f"tensor {name} has bad data offsets")
        spans.append((offsets[0], offsets[1]))
    # Tensors must tile the data area exactly: no overlap, no gap, nothing after.
    pos = 0
    for begin, stop in sorted(spans):
        if begin != pos:
            raise _bad("tensor data overlaps or leaves gaps")
        pos = stop
    if end + pos != member_size:
        raise _bad("tensor data does not end at the end of the member")


def decode(data: bytes, expected: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """A' per module as float32 arrays (after ``check_header`` passes on the same bytes)."""
    check_header(data, len(data), expected)
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise _bad(f"cannot be read ({str(exc)[:200]})") from None
    out: dict[str, np.ndarray] = {}
    for name, (rank, d_in) in expected.items():
        t = tensors.get(name)
        if t is None or t.dtype != np.float32 or t.shape != (rank, d_in):
            raise _bad(f"tensor {name} does not have dtype float32 and shape ({rank}, {d_in})")
        if not np.isfinite(t).all():
            raise _bad(f"tensor {name} has non-finite values")
        out[name] = t
    return out
