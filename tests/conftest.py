"""Session fixtures: tiny models, PEFT adapters, keys and TSSP packages, built once per run.

Everything is made here from seeds (nothing is downloaded). Test modules that start a real
vLLM share these artifacts; each module starts its own server once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_tensafe.cli import main as tensafe_cli


@dataclass(frozen=True)
class Keys:
    signing_key: Path
    signing_pub: Path
    he_secret: Path
    he_public: Path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # TENSAFE_TEST_ARTIFACTS keeps models and packages between local runs (they are seeded).
    keep = os.environ.get("TENSAFE_TEST_ARTIFACTS")
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_llama(artifacts: Path) -> Path:
    from tests.support.builders import build_tiny_model

    return build_tiny_model(artifacts / "tiny-llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(artifacts: Path) -> Path:
    from tests.support.builders import build_tiny_model

    return build_tiny_model(artifacts / "tiny-qwen2", "qwen2", seed=0)


def _keys(folder: Path, name: str) -> Keys:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / name
    if not (folder / f"{name}.key").exists():
        assert tensafe_cli(["keygen", "signing", "--out", str(prefix)]) == 0
    if not (folder / f"{name}.secret").exists():
        assert tensafe_cli(["keygen", "he", "--out", str(prefix)]) == 0
    return Keys(
        signing_key=folder / f"{name}.key",
        signing_pub=folder / f"{name}.pub",
        he_secret=folder / f"{name}.secret",
        he_public=folder / f"{name}.public",
    )


def adapter_keys(artifacts: Path, owner: Keys, name: str) -> Keys:
    """The owner's signing key with a CKKS key pair of this adapter's own."""
    folder = artifacts / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / f"{name}.secret").exists():
        assert tensafe_cli(["keygen", "he", "--out", str(folder / name)]) == 0
    return Keys(
        signing_key=owner.signing_key,
        signing_pub=owner.signing_pub,
        he_secret=folder / f"{name}.secret",
        he_public=folder / f"{name}.public",
    )


@pytest.fixture(scope="session", autouse=True)
def _version_ledger(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The hosts' rollback ledger (highest adapter_version per name) of this test run only,
    not the user's ~/.local/state: test packages of one name are re-made between runs."""
    os.environ.setdefault(
        "TENSAFE_VERSION_FILE", str(tmp_path_factory.mktemp("state") / "adapter-versions.json")
    )


@pytest.fixture(scope="session")
def owner_keys(artifacts: Path) -> Keys:
    """The adapter owner's signing key and CKKS key pair (the host trusts this signer)."""
    return _keys(artifacts / "keys", "owner")


@pytest.fixture(scope="session")
def stranger_keys(artifacts: Path) -> Keys:
    """Someone the host does not trust."""
    return _keys(artifacts / "keys", "stranger")


class AdapterFactory:
    """Builds PEFT adapters and their TSSP packages, each once per session."""

    def __init__(self, root: Path, keys: Keys) -> None:
        self.root = root
        self.keys = keys

    def peft(
        self,
        model_dir: Path,
        name: str,
        *,
        rank: int = 8,
        alpha: float = 16,
        targets: str | tuple[str, ...] = ("q_proj", "v_proj"),
        use_rslora: bool = False,
        seed: int = 1,
    ) -> Path:
        from tests.support.builders import make_adapter

        return make_adapter(
            model_dir,
            self.root / "peft" / name,
            rank=rank,
            alpha=alpha,
            target_modules=targets,
            use_rslora=use_rslora,
            seed=seed,
        )

    def package(
        self,
        adapter_dir: Path,
        model_dir: Path,
        name: str,
        keys: Keys | None = None,
        folder: str = "",
    ) -> Path:
        from vllm_tensafe.tssp.format import FORMAT_VERSION

        keys = keys or self.keys
        # Per format version: packages cached by an older version would be refused.
        out = self.root / f"tssp-v{FORMAT_VERSION}" / folder / f"{name}.tssp"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            code = tensafe_cli(
                [
                    "pack",
                    str(adapter_dir),
                    "--base-model",
                    str(model_dir),
                    "--signing-key",
                    str(keys.signing_key),
                    "--he-public",
                    str(keys.he_public),
                    "-o",
                    str(out),
                    "--name",
                    name,
                    "--quiet",
                    # One owner key for many test adapters: fine for a local key holder; the
                    # remote key-holder tests give each adapter its own key (adapter_keys).
                    "--allow-shared-key",
                ]
            )
            assert code == 0
        return out


@pytest.fixture(scope="session")
def adapters(artifacts: Path, owner_keys: Keys) -> AdapterFactory:
    return AdapterFactory(artifacts, owner_keys)


@pytest.fixture(scope="session")
def demo(artifacts: Path):  # type: ignore[no-untyped-def]
    from tests.support.builders import build_demo

    return build_demo(artifacts / "demo")
