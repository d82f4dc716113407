"""Container structure: hand-built hostile files are refused with MalformedPackageError (or
UnsupportedVersionError), before any member is read. No HE needed here."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vllm_tensafe.errors import MalformedPackageError, TsspError, UnsupportedVersionError
from vllm_tensafe.tssp.format import (
    MEMBER_LIMITS,
    TOTAL_LIMIT,
    ContainerReader,
    write_container,
)

from .helpers import MAGIC, ORDER, build_container


def _members(**overrides: bytes) -> list[tuple[bytes | str, bytes]]:
    data = {
        "manifest.json": b"{}",
        "signature": b"\x00" * 64,
        "he_context": b"ctx",
        "lora_a.safetensors": b"aaaa",
        "lora_b.he": b"bbbbbb",
    }
    data.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [(name, data[name]) for name in ORDER]


def _open(path: Path) -> ContainerReader:
    reader = ContainerReader(path)
    reader.close()
    return reader


def test_well_formed_container_parses(write) -> None:
    reader = _open(write(build_container(_members())))
    assert list(reader.layout.members) == ORDER
    assert reader.layout.members["manifest.json"].offset == 16 + 40 * 5


def test_writer_matches_hand_built_bytes(tmp_path: Path) -> None:
    members = dict(_members())
    out = write_container(tmp_path / "x.tssp", {str(k): v for k, v in members.items()})
    assert out.read_bytes() == build_container(_members())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_writer_accepts_chunked_member(tmp_path: Path) -> None:
    spool = tmp_path / "blobs"
    spool.write_bytes(b"bbbb")
    members: dict = {str(k): v for k, v in _members()}
    members["lora_b.he"] = [b"bb", spool]
    out = write_container(tmp_path / "x.tssp", members)
    assert out.read_bytes() == build_container(_members())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not a TSSP file"),
        (b"PK\x03\x04" + b"\x00" * 100, "not a TSSP file"),
        (MAGIC[:5], "truncated header"),
        (MAGIC + b"\x00\x01", "truncated header"),
    ],
)
def test_not_tssp(write, data: bytes, match: str) -> None:
    with pytest.raises(MalformedPackageError, match=match):
        _open(write(data))


def test_unsupported_version(write) -> None:
    for version in (0, 3, 0xFFFF):
        with pytest.raises(UnsupportedVersionError, match=f"format version {version}"):
            _open(write(build_container(_members(), version=version)))


def test_version_1_package_names_the_fix(write) -> None:
    # Version 1 had no adapter_version (no rollback protection): re-pack, not upgrade.
    with pytest.raises(UnsupportedVersionError, match="format version 1") as info:
        _open(write(build_container(_members(), version=1)))
    assert "re-pack" in str(info.value) and "adapter_version" in str(info.value)


def test_reserved_must_be_zero(write) -> None:
    with pytest.raises(MalformedPackageError, match=r"reserved"):
        _open(write(build_container(_members(), reserved=1)))


def test_too_many_members_refused_before_reading_table(write) -> None:
    data = MAGIC + struct.pack(">HHI", 2, 0xFFFF, 0)
    with pytest.raises(MalformedPackageError, match=r"claims 65535 entries"):
        _open(write(data))


def test_unknown_member(write) -> None:
    entries = _members()
    entries[2] = ("he_context2", b"ctx")
    with pytest.raises(MalformedPackageError, match=r"unknown member 'he_context2'"):
        _open(write(build_container(entries)))


def test_extra_member(write) -> None:
    entries = [*_members(), ("extra", b"x")]
    with pytest.raises(MalformedPackageError, match=r"unknown member 'extra'"):
        _open(write(build_container(entries)))


def test_duplicate_member(write) -> None:
    entries = _members()
    entries.insert(1, ("manifest.json", b"{}"))
    with pytest.raises(MalformedPackageError, match=r"duplicate member 'manifest.json'"):
        _open(write(build_container(entries)))


@pytest.mark.parametrize(
    "name",
    [b"../manifest.json", b"/etc/passwd", b"a/b", b"..\\x", b".hidden", b"C:evil", b"lora_b.he/."],
)
def test_path_tricks(write, name: bytes) -> None:
    entries = _members()
    entries[4] = (name, b"bbbbbb")
    with pytest.raises(MalformedPackageError, match=r"looks like a path"):
        _open(write(build_container(entries)))


@pytest.mark.parametrize(
    "name", [b"he_\x00context", b"he_context\x01", b"caf\xc3\xa9", b" he_context", b"\x00" * 32]
)
def test_bad_name_bytes(write, name: bytes) -> None:
    entries = _members()
    entries[2] = (name, b"ctx")
    with pytest.raises(MalformedPackageError, match=r"non-printable|empty name"):
        _open(write(build_container(entries)))


def test_missing_member(write) -> None:
    entries = _members()[:4]
    with pytest.raises(MalformedPackageError, match=r"missing member"):
        _open(write(build_container(entries)))


def test_wrong_order(write) -> None:
    entries = _members()
    entries[2], entries[3] = entries[3], entries[2]
    with pytest.raises(MalformedPackageError, match=r"canonical order"):
        _open(write(build_container(entries)))


@pytest.mark.parametrize("name", ORDER)
def test_oversized_member_refused_from_the_table(write, name: str) -> None:
    entries = _members()
    sizes = [len(d) for _, d in entries]
    sizes[ORDER.index(name)] = MEMBER_LIMITS[name] + 1
    with pytest.raises(MalformedPackageError, match=r"over the .*limit"):
        _open(write(build_container(entries, sizes=sizes)))


def test_total_limit(write) -> None:
    entries = _members()
    sizes = [len(d) for _, d in entries]
    sizes[3] = MEMBER_LIMITS["lora_a.safetensors"]
    sizes[4] = MEMBER_LIMITS["lora_b.he"]
    assert sum(sizes) > TOTAL_LIMIT
    with pytest.raises(MalformedPackageError, match=r"add up to"):
        _open(write(build_container(entries, sizes=sizes)))


def test_signature_must_be_64_bytes(write) -> None:
    with pytest.raises(MalformedPackageError, match=r"signature member is 63 bytes"):
        _open(write(build_container(_members(signature=b"\x00" * 63))))


def test_truncation_at_every_offset(write) -> None:
    data = build_container(_members())
    for cut in range(len(data)):
        with pytest.raises(MalformedPackageError, match=r"truncated|not a TSSP"):
            _open(write(data[:cut]))


def test_trailing_bytes(write) -> None:
    with pytest.raises(MalformedPackageError, match=r"unexpected bytes after"):
        _open(write(build_container(_members()) + b"\x00"))


def test_size_claims_past_end(write) -> None:
    entries = _members()
    sizes = [len(d) for _, d in entries]
    sizes[4] += 1
    with pytest.raises(MalformedPackageError, match=r"truncated"):
        _open(write(build_container(entries, sizes=sizes)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TsspError, match=r"cannot read TSSP package"):
        ContainerReader(tmp_path / "nope.tssp")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(TsspError, match=r"cannot read TSSP package"):
        ContainerReader(tmp_path)


def test_member_reads_are_bounded(write) -> None:
    with ContainerReader(write(build_container(_members()))) as reader:
        assert reader.read("lora_b.he") == b"bbbbbb"
        assert reader.read_prefix("lora_b.he", 2) == b"bb"
        assert reader.read_prefix("lora_b.he", 100) == b"bbbbbb"


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.tssp"
    os.mkfifo(fifo)
    with pytest.raises(TsspError, match="not a regular file"):
        ContainerReader(fifo)
