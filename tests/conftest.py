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

E2E_DIR = Path(__file__).parent / "e2e"
# pytest-timeout per test (fixture setup included) for tests that start vLLM: a module's first
# test also pays for its server start (up to VllmServer's 300 s startup timeout).
VLLM_TEST_TIMEOUT = 1200


# Tests that start no vLLM but take seconds each (measured on the 2-core CI machine): the
# fast lane (scripts/test.sh --fast, marker "slow" deselected) skips them, the full suite runs
# them. Node-id prefixes, so a parametrized family is one entry.
SLOW_TESTS = (
    "tests/test_graph_safety.py::test_every_route_builds_a_guarded_config",  # ~18 s
    "tests/test_settings.py::test_register_is_cheap_and_idempotent_when_disabled",  # ~13 s
    "tests/tssp/test_fuzz.py::test_every_single_byte_flip_in_header_and_table_is_refused",
    "tests/tssp/test_fuzz.py::test_resigned_mutated_payloads",  # ~11 s each
    "tests/he/test_key_holder_privacy.py::test_attacks_learn_nothing_from_v2_requests[fused",
    "tests/he/test_key_holder_privacy.py::test_attacks_learn_nothing_from_v2_requests[prefill",
    "tests/key_holder/test_openapi_fuzz.py::",  # ~18 s (schemathesis)
    "tests/key_holder/test_remote_client.py::test_client_certificates",  # ~10 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e carries the vllm marker (the fast lane deselects by it),
    tests that start vLLM get a longer timeout than the default in pyproject.toml, and the
    tests in SLOW_TESTS get the slow marker."""
    unmarked = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(E2E_DIR) and item.get_closest_marker("vllm") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests under tests/e2e start a real vLLM and must be marked "
            "@pytest.mark.vllm (or pytestmark = pytest.mark.vllm): " + ", ".join(unmarked)
        )
    for item in items:
        if item.get_closest_marker("vllm") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(VLLM_TEST_TIMEOUT))
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _vllm_needs_the_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test without the vllm marker that starts a server fails at once: the fast lane
    (``-m "not vllm"``) must never start one, and the lock rule depends on the marker."""
    if request.node.get_closest_marker("vllm") is None:
        from tests.support.server_process import VllmServer

        def refuse(self: VllmServer) -> VllmServer:
            raise AssertionError(
                f"{request.node.nodeid} starts vLLM but is not marked @pytest.mark.vllm"
            )

        monkeypatch.setattr(VllmServer, "start", refuse)


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


@pytest.fixture(autouse=True)
def _no_leaked_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without the TENSAFE_* settings an earlier test left in os.environ.

    The plugin and the guide's API write their settings into os.environ on purpose (vLLM's
    engine and worker processes read them from there), so a test that starts an engine in
    this process leaves them behind; a later test building settings would read them, and its
    outcome would depend on the order the tests ran in. The run's version ledger stays.
    """
    from vllm_tensafe.settings import TenSafeSettings, env_name

    keep = {env_name("version_file")}
    names = {env_name(field) for field in TenSafeSettings.model_fields}
    names |= {"TENSAFE_RUN_DIR", "TENSAFE_ENGINE_ID"}
    for name in names - keep:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def base_config() -> object:
    """vLLM's default VllmConfig, which the graph-guard tests give compilation settings."""
    return pytest.importorskip("vllm.config").VllmConfig()


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
