"""Rollback protection, signer pinning, expiry and one CKKS key per adapter at pack time.

Before format version 2, two validly signed packages of one name both verified (an old one
could replace a new one), and a second trusted key could sign any adapter name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vllm_tensafe.cli import main
from vllm_tensafe.errors import PackageExpiredError, RollbackError, TsspError, UntrustedSignerError
from vllm_tensafe.tssp import TrustStore, VersionLedger, open_package, pack_adapter, verify_package


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory,
    adapter_dir: Path,
    llama_dir: Path,
    signer: Any,
    he_keys: Any,
) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("versions")
    return {
        v: pack_adapter(
            adapter_dir,
            llama_dir,
            signing_key=signer.key,
            public_context=he_keys.context,
            out_path=out / f"sql-adapter-v{v}.tssp",
            name="sql-adapter",
            adapter_version=v,
            progress=False,
        )
        for v in (1, 2)
    }


def test_without_a_ledger_both_versions_verify(
    versions: dict[int, Path], trust: TrustStore
) -> None:
    """The attack: both are validly signed. Only the ledger tells them apart."""
    assert verify_package(versions[2], trust=trust).adapter_version == 2
    assert verify_package(versions[1], trust=trust).adapter_version == 1


def test_older_package_refused_after_a_newer_one(
    versions: dict[int, Path], trust: TrustStore, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "versions.json"
    ledger = VersionLedger(path)
    package = open_package(versions[2], trust=trust, versions=ledger)
    assert package.adapter_version == 2 and len(package.manifest_digest) == 64
    open_package(versions[2], trust=trust, versions=ledger)  # the same one again: fine
    with pytest.raises(RollbackError, match="adapter_version 1, older than version 2") as info:
        verify_package(versions[1], trust=trust, versions=VersionLedger(path))
    assert "higher --adapter-version" in str(info.value)
    # Persisted: a new process (a restart) remembers it.
    assert VersionLedger(path).highest("sql-adapter") == 2


def test_older_first_then_newer_raises_the_mark(
    versions: dict[int, Path], trust: TrustStore, tmp_path: Path
) -> None:
    ledger = VersionLedger(tmp_path / "v.json")
    verify_package(versions[1], trust=trust, versions=ledger)
    verify_package(versions[2], trust=trust, versions=ledger)
    assert ledger.highest("sql-adapter") == 2


def test_corrupt_ledger_is_refused_not_reset(
    versions: dict[int, Path], trust: TrustStore, tmp_path: Path
) -> None:
    from vllm_tensafe.errors import ConfigError

    path = tmp_path / "v.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is corrupt"):
        verify_package(versions[1], trust=trust, versions=VersionLedger(path))


def test_signer_pinned_to_other_names(versions: dict[int, Path], signer: Any) -> None:
    pinned = TrustStore.from_files([f"{signer.pub_path}=billing"])
    with pytest.raises(
        UntrustedSignerError, match="trusted only for adapter names billing"
    ) as info:
        verify_package(versions[2], trust=pinned)
    assert "named 'sql-adapter'" in str(info.value)
    assert verify_package(versions[2], trust=TrustStore.from_files([f"{signer.pub_path}=sql-*"]))
    # Listed once without a pin, the key is trusted for every name.
    both = TrustStore.from_files([f"{signer.pub_path}=billing", signer.pub_path])
    assert verify_package(versions[2], trust=both)


def test_expired_package(
    adapter_dir: Path, llama_dir: Path, signer: Any, he_keys: Any, trust: TrustStore, tmp_path: Path
) -> None:
    path = pack_adapter(
        adapter_dir,
        llama_dir,
        signing_key=signer.key,
        public_context=he_keys.context,
        out_path=tmp_path / "old.tssp",
        not_after="2001-01-01T00:00:00Z",
        progress=False,
    )
    with pytest.raises(PackageExpiredError, match="expired at 2001-01-01T00:00:00Z"):
        verify_package(path, trust=trust)
    with pytest.raises(TsspError, match="not a UTC date-time"):
        pack_adapter(
            adapter_dir,
            llama_dir,
            signing_key=signer.key,
            public_context=he_keys.context,
            out_path=tmp_path / "bad.tssp",
            not_after="tomorrow",
            progress=False,
        )


def _pack(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["pack", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pack_refuses_a_key_bound_to_another_adapter(
    adapter_dir: Path,
    llama_dir: Path,
    signer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vllm_tensafe.he import write_keypair

    write_keypair(tmp_path / "k")
    common = [adapter_dir, "--base-model", llama_dir, "--signing-key", signer.key_path,
              "--he-public", tmp_path / "k.public", "-q"]  # fmt: skip
    code, out, _ = _pack(capsys, *common, "-o", tmp_path / "first.tssp")
    assert code == 0 and "version 1" in out
    assert "CKKS ciphertexts" in out and "x the adapter's" in out  # why the package is large
    code, _, err = _pack(capsys, *common, "-o", tmp_path / "second.tssp")
    assert code == 1 and "already encrypts adapter 'first'" in err and "keygen he" in err
    code, _, _ = _pack(capsys, *common, "--allow-shared-key", "-o", tmp_path / "second.tssp")
    assert code == 0
    # Re-packing a name picks the next version; an older explicit one is refused.
    common.append("--allow-shared-key")  # the key now encrypts 'second' too
    code, out, _ = _pack(capsys, *common, "-o", tmp_path / "first.tssp", "--force")
    assert code == 0 and "'first' version 2" in out, out
    code, _, err = _pack(
        capsys, *common, "-o", tmp_path / "first.tssp", "--force", "--adapter-version", "1"
    )
    assert code == 1 and "already packed with version 2" in err and "--adapter-version 3" in err


def test_inspect_json_into_a_closed_pipe(package_path: Path) -> None:
    """`vllm-tensafe inspect --json | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("vllm-tensafe")
    proc = subprocess.run(
        f"'{cli}' inspect --json '{package_path}' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.strip() == "{"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
