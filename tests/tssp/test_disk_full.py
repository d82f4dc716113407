"""Disk full while packing: a typed error that says so, and no partial package left behind.

The output goes to a small tmpfs mounted for the test (as root), sized so that the disk fills
either while the ciphertexts are spooled or while the container is written; a package already
at the output path must stay as it was. Where mounting is not allowed, the same cases run with
the file layer's writes failing with ENOSPC past the same number of bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_tensafe.errors import TsspError
from vllm_tensafe.tssp import open_package, pack_adapter


class SmallDisk:
    """A folder on a file system of ``size`` bytes: a real tmpfs, or simulated writes."""

    def __init__(
        self, path: Path, size: int, monkeypatch: pytest.MonkeyPatch, existing: bytes | None
    ) -> None:
        self.path = path
        path.mkdir()
        self.mounted = _mount_tmpfs(path, size)
        if existing is not None:
            (path / "out.tssp").write_bytes(existing)
        if not self.mounted:
            _limit_writes(monkeypatch, path, size - len(existing or b""))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def _mount_tmpfs(path: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def _limit_writes(monkeypatch: pytest.MonkeyPatch, folder: Path, free: int) -> None:
    """Files opened under ``folder`` through os.fdopen (the packer's file layer) fail with
    ENOSPC once ``free`` bytes have been written to them in all."""
    left = {"bytes": free}
    real_fdopen = os.fdopen

    class Limited:
        def __init__(self, handle: Any) -> None:
            self._handle = handle

        def write(self, data: bytes) -> int:
            left["bytes"] -= len(data)
            if left["bytes"] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

        def __enter__(self) -> Limited:
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.close()

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(fd, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        return Limited(handle) if target.startswith(f"{folder}{os.sep}") else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    disks: list[SmallDisk] = []

    def make(size: int, existing: bytes | None = None) -> SmallDisk:
        disk = SmallDisk(tmp_path / f"disk{len(disks)}", size, monkeypatch, existing)
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.close()


def _pack(adapter_dir: Path, llama_dir: Path, signer: Any, he_keys: Any, out: Path) -> Path:
    return pack_adapter(
        adapter_dir,
        llama_dir,
        signing_key=signer.key,
        public_context=he_keys.context,
        out_path=out,
        progress=False,
    )


@pytest.mark.parametrize("full_at", ["spooling the ciphertexts", "writing the container"])
def test_disk_full_leaves_no_partial_package(
    small_disk: Any,
    adapter_dir: Path,
    llama_dir: Path,
    signer: Any,
    he_keys: Any,
    package_path: Path,
    full_at: str,
) -> None:
    size = package_path.stat().st_size
    old = package_path.read_bytes()
    if full_at == "spooling the ciphertexts":
        disk = small_disk(256 * 1024)  # smaller than one module's ciphertexts
        existing = None
    else:
        # The old package and the spooled ciphertexts fit, the new container does not.
        disk = small_disk(int(size * 2.5), existing=old)
        existing = old
    out = disk.path / "out.tssp"
    with pytest.raises(TsspError) as info:
        _pack(adapter_dir, llama_dir, signer, he_keys, out)
    message = str(info.value)
    assert "No space left on device" in message and "no partial package" in message, message
    assert str(out) in message and "Fix:" in message
    left = sorted(p.name for p in disk.path.iterdir() if p.name != "lost+found")
    if existing is None:
        assert left == [], left
    else:
        assert left == ["out.tssp"], left
        assert out.read_bytes() == existing  # the older package is untouched and complete


def test_the_same_pack_fits_on_a_larger_disk(
    small_disk: Any, adapter_dir: Path, llama_dir: Path, signer: Any, he_keys: Any,
    package_path: Path, trust: Any,
) -> None:  # fmt: skip
    """The guard: the sizes above fail for lack of space, not for another reason."""
    disk = small_disk(int(package_path.stat().st_size * 3))
    out = _pack(adapter_dir, llama_dir, signer, he_keys, disk.path / "out.tssp")
    assert sorted(p.name for p in disk.path.iterdir()) == ["out.tssp"]
    assert open_package(out, trust=trust).name == "out"
