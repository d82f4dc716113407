"""Keys, signed packages and running key holders for the key-holder tests.

Every service here is a real ``KeyHolderService`` (uvicorn, real HTTP on loopback) with a
real hash-chained audit log; no vLLM is started.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vllm_tensafe.he import EncryptedMatrix, PublicContext, SecretKeySet, encrypt_matrix
from vllm_tensafe.keyholder.wire import AdapterRef

DECRYPT_TOKEN = "host-gpu1-token-0123456789abcdef"
BILLING_ONLY_TOKEN = "host-gpu2-billing-only-0123456789"
ADMIN_TOKEN = "owner-admin-token-0123456789abcd"


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Adapter:
    """One adapter of the test key holder: its key and the package digest it accepts."""

    name: str
    secret: SecretKeySet
    ctx: PublicContext
    digest: str
    matrix: EncryptedMatrix
    blob: bytes  # one protocol ciphertext (a product, as the delta engine sends)

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.ctx.key_id, self.digest)


def _adapter(name: str, seed: int) -> Adapter:
    import tenseal.sealapi as seal

    from vllm_tensafe.he import generate_keys
    from vllm_tensafe.keyholder.wire import encode_ciphertext

    secret, ctx = generate_keys("default")
    matrix = encrypt_matrix(ctx, np.random.default_rng(seed).normal(size=(128, 8)) * 0.05)
    plain = seal.Plaintext()
    ctx.encoder.encode(0.5, ctx.parms_id, ctx.profile.u_scale, plain)
    product = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(matrix.ciphertexts[0][0], plain, product)
    blob = encode_ciphertext(product)
    return Adapter(name, secret, ctx, digest_of(f"{name}-v1"), matrix, blob)


@pytest.fixture(scope="session")
def sql() -> Adapter:
    return _adapter("sql-adapter", 1)


@pytest.fixture(scope="session")
def billing() -> Adapter:
    return _adapter("billing", 2)


def policy_for(*adapters: Adapter, budgets: dict[str, int] | None = None) -> Any:
    from vllm_tensafe.keyholder.server import AdapterPolicy

    policy = AdapterPolicy()
    for adapter in adapters:
        policy.bind_manifest(adapter.name, adapter.ctx.key_id, adapter.digest, 1)
        if budgets and adapter.name in budgets:
            policy.adapters[adapter.name].budget = budgets[adapter.name]
    return policy


def tokens() -> Any:
    from vllm_tensafe.keyholder.server.tokens import TokenStore, make_token

    return TokenStore(
        [
            make_token(DECRYPT_TOKEN, "decrypt", host="gpu-1"),
            make_token(BILLING_ONLY_TOKEN, "decrypt", host="gpu-2", adapters=("billing",)),
            make_token(ADMIN_TOKEN, "admin", host="owner"),
        ]
    )


@pytest.fixture
def make_service(tmp_path: Path, sql: Adapter, billing: Adapter) -> Iterator[Callable[..., Any]]:
    """make_service(**kwargs) -> a started KeyHolderService for sql-adapter and billing."""
    from vllm_tensafe.keyholder.server import KeyHolderService

    started: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("audit_log", tmp_path / "audit.jsonl")
        policy = kwargs.pop("policy", None) or policy_for(
            sql, billing, budgets=kwargs.pop("budgets", None)
        )
        service = KeyHolderService(
            [sql.secret, billing.secret], policy, kwargs.pop("tokens", None) or tokens(), **kwargs
        )
        service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.close()


@pytest.fixture
def service(make_service: Callable[..., Any]) -> Any:
    return make_service()


def u(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).normal(size=(rows, 8))


@dataclass(frozen=True)
class Owner:
    root: Path
    signing: Path  # PREFIX (.key, .pub)
    packages: Path  # folder: sql-adapter v2 and billing, each under its own key
    # sql_v1: an older package of sql-adapter (not in the folder)
    sql_v1: Path
    sql_v2: Path
    billing: Path


def cli(*args: object) -> None:
    from vllm_tensafe.cli import main

    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="session")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Owner:
    from tests.support.builders import build_tiny_model, make_adapter

    root = tmp_path_factory.mktemp("owner")
    model = build_tiny_model(root / "model", "llama")
    adapter = make_adapter(model, root / "peft")
    cli("keygen", "signing", "--out", root / "owner")
    cli("keygen", "he", "--out", root / "sql")
    cli("keygen", "he", "--out", root / "billing")
    packages = root / "packages"
    packages.mkdir()
    old = root / "old"
    old.mkdir()
    common = ["--base-model", model, "--signing-key", root / "owner.key", "-q"]
    # Two versions of sql-adapter under its key; the records pick versions 1 and 2.
    cli(
        "pack", adapter, *common, "--he-public", root / "sql.public", "-o", old / "sql-adapter.tssp"
    )
    cli("pack", adapter, *common, "--he-public", root / "sql.public",
         "-o", packages / "sql-adapter.tssp")  # fmt: skip
    cli("pack", adapter, *common, "--he-public", root / "billing.public",
         "-o", packages / "billing.tssp")  # fmt: skip
    return Owner(
        root,
        root / "owner",
        packages,
        old / "sql-adapter.tssp",
        packages / "sql-adapter.tssp",
        packages / "billing.tssp",
    )
