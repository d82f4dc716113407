"""Property tests: whatever bytes arrive, the opener answers with a TsspError subclass.

Hypothesis drives three kinds of input: arbitrary bytes, arbitrary bytes behind a valid
header, and mutations of a real package (flips, cuts, insertions, splices). A last property
re-signs mutated payloads with the trusted key, so the fuzzed bytes reach the payload parsers
that sit behind the signature and digest checks.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_tensafe.errors import TsspError
from vllm_tensafe.tssp import open_package, open_package_unverified

from .helpers import MAGIC, ORDER, member_spans, resign, split

# No per-example deadline: wall-clock limits flip with machine load. A hang or a super-linear
# path still fails the run through the per-test pytest-timeout (pyproject.toml).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # reproducible in CI; the mutation space is still large
)


def _refused(path: Path, data: bytes, trust: Any, **kw: Any) -> None:
    path.write_bytes(data)
    try:
        open_package(path, trust=trust, **kw)
    except TsspError:
        pass
    else:
        raise AssertionError("a mutated package was accepted")


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(tmp_path: Path, trust: Any, data: bytes) -> None:
    _refused(tmp_path / "f.tssp", data, trust)


@FUZZ
@given(
    count=st.integers(0, 20),
    table=st.binary(max_size=1024),
    tail=st.binary(max_size=1024),
)
def test_valid_header_arbitrary_table(
    tmp_path: Path, trust: Any, count: int, table: bytes, tail: bytes
) -> None:
    _refused(tmp_path / "f.tssp", MAGIC + struct.pack(">HHI", 2, count, 0) + table + tail, trust)


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**31), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 64)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= arg
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf.insert(pos, arg)
        else:
            del buf[pos : pos + arg]
    return bytes(buf)


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_package(
    tmp_path: Path, trust: Any, package_bytes: bytes, mutations: list[tuple[str, int, int]]
) -> None:
    mutated = _mutate(package_bytes, mutations)
    if mutated == package_bytes:  # e.g. two flips of the same byte cancelling out
        return
    _refused(tmp_path / "f.tssp", mutated, trust)
    # Without the signature check, the digests still catch every change of a member; a change
    # confined to the manifest or signature may then open, and that is the documented risk of
    # verify_signature=False. So only "a TsspError or a successful open" is required here.
    path = tmp_path / "g.tssp"
    path.write_bytes(mutated)
    try:
        open_package_unverified(path)
    except TsspError:
        pass


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(
    member=st.sampled_from(["lora_a.safetensors", "lora_b.he", "he_context"]),
    mutations=st.lists(MUTATION, min_size=1, max_size=3),
)
def test_resigned_mutated_payloads(
    tmp_path: Path,
    trust: Any,
    signer: Any,
    package_bytes: bytes,
    member: str,
    mutations: list[tuple[str, int, int]],
) -> None:
    """Signed by the trusted key, digests fixed: the payload parsers see hostile bytes."""
    original = split(package_bytes)[member]
    # Bias mutations to the start of the member, where headers and indexes live.
    head = _mutate(original[:512], mutations)
    mutated = head + original[512:]
    if mutated == original:
        return
    forged = resign(package_bytes, signer.key, members={member: mutated})
    path = tmp_path / "r.tssp"
    path.write_bytes(forged)
    try:
        open_package(path, trust=trust)
    except TsspError:
        pass  # refused with a typed error: fine. Opening is fine too when the change is benign.


def test_every_single_byte_flip_in_header_and_table_is_refused(
    tmp_path: Path, trust: Any, package_bytes: bytes
) -> None:
    end = member_spans(package_bytes)[ORDER[0]][0]
    for pos in range(end):
        data = bytearray(package_bytes)
        data[pos] ^= 0x80
        _refused(tmp_path / "h.tssp", bytes(data), trust)


def test_spread_single_byte_flips_are_refused(
    tmp_path: Path, trust: Any, package_bytes: bytes
) -> None:
    """One flip at a time at 64 evenly spread offsets plus each member's first and last byte
    (every member is covered by the signature or a digest, so no byte may change silently)."""
    positions = set(range(0, len(package_bytes), max(1, len(package_bytes) // 64)))
    for offset, size in member_spans(package_bytes).values():
        positions |= {offset, offset + size - 1}
    for pos in sorted(positions):
        data = bytearray(package_bytes)
        data[pos] ^= 0x01
        _refused(tmp_path / "s.tssp", bytes(data), trust)
