"""Keys, tiny models, adapters and packages, built once per test package (they are slow-ish:
TenSEAL key generation and encryption, transformers model building)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    key_path: Path
    pub_path: Path
    key_id: str


@dataclass(frozen=True)
class HEKeys:
    secret_path: Path
    public_path: Path
    context: Any  # vllm_tensafe.he.PublicContext


@pytest.fixture(scope="package")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tssp")


@pytest.fixture(scope="package")
def llama_dir(work: Path) -> Path:
    from tests.support.builders import build_tiny_model

    return build_tiny_model(work / "llama", "llama")


@pytest.fixture(scope="package")
def qwen2_dir(work: Path) -> Path:
    from tests.support.builders import build_tiny_model

    return build_tiny_model(work / "qwen2", "qwen2")


@pytest.fixture(scope="package")
def llama_config(llama_dir: Path) -> dict[str, Any]:
    return json.loads((llama_dir / "config.json").read_text())


@pytest.fixture(scope="package")
def qwen2_config(qwen2_dir: Path) -> dict[str, Any]:
    return json.loads((qwen2_dir / "config.json").read_text())


@pytest.fixture(scope="package")
def adapter_dir(work: Path, llama_dir: Path) -> Path:
    from tests.support.builders import make_adapter

    return make_adapter(llama_dir, work / "adapter-qv")  # q_proj + v_proj, r=8, alpha=16


@pytest.fixture(scope="package")
def adapter_all_dir(work: Path, llama_dir: Path) -> Path:
    from tests.support.builders import make_adapter

    return make_adapter(
        llama_dir,
        work / "adapter-all",
        rank=4,
        alpha=8,
        target_modules="all-linear",
        use_rslora=True,
        seed=3,
    )


def _signer(work: Path, name: str) -> Signer:
    from vllm_tensafe.tssp.signing import key_id, load_signing_key, write_signing_keypair

    key_path, pub_path = write_signing_keypair(work / name)
    key = load_signing_key(key_path)
    return Signer(key, key_path, pub_path, key_id(key.public_key()))


@pytest.fixture(scope="package")
def signer(work: Path) -> Signer:
    return _signer(work, "owner")


@pytest.fixture(scope="package")
def other_signer(work: Path) -> Signer:
    return _signer(work, "stranger")


@pytest.fixture(scope="package")
def trust(signer: Signer) -> Any:
    from vllm_tensafe.tssp import TrustStore

    return TrustStore.from_files([signer.pub_path])


@pytest.fixture(scope="package")
def he_keys(work: Path) -> HEKeys:
    from vllm_tensafe.he import PublicContext, write_keypair

    secret_path, public_path = write_keypair(work / "he")
    ctx = PublicContext.from_bytes(Path(public_path).read_bytes())
    return HEKeys(Path(secret_path), Path(public_path), ctx)


@pytest.fixture(scope="package")
def package_path(
    work: Path, adapter_dir: Path, llama_dir: Path, signer: Signer, he_keys: HEKeys
) -> Path:
    from vllm_tensafe.tssp import pack_adapter

    return pack_adapter(
        adapter_dir,
        llama_dir,
        signing_key=signer.key,
        public_context=he_keys.context,
        out_path=work / "qv.tssp",
        progress=False,
    )


@pytest.fixture(scope="package")
def package_bytes(package_path: Path) -> bytes:
    return package_path.read_bytes()


@pytest.fixture(scope="package")
def package_all_path(
    work: Path, adapter_all_dir: Path, llama_dir: Path, signer: Signer, he_keys: HEKeys
) -> Path:
    from vllm_tensafe.tssp import pack_adapter

    return pack_adapter(
        adapter_all_dir,
        llama_dir,
        signing_key=signer.key,
        public_context=he_keys.context,
        out_path=work / "all.tssp",
        name="all-linear.rs",
        progress=False,
    )


@pytest.fixture
def write(tmp_path: Path):
    """write(data) -> path of a fresh .tssp file holding data."""
    counter = iter(range(1_000_000))

    def _write(data: bytes) -> Path:
        path = tmp_path / f"case-{next(counter)}.tssp"
        path.write_bytes(data)
        return path

    return _write
