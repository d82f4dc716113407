from __future__ import annotations

import zlib

import numpy as np
import pytest

from vllm_tensafe.he import DeltaEngine, PublicContext, SecretKeySet, generate_keys
from vllm_tensafe.keyholder import LocalKeyHolder


@pytest.fixture(scope="session")
def keys() -> tuple[SecretKeySet, PublicContext]:
    return generate_keys("default")


@pytest.fixture(scope="session")
def secret(keys: tuple[SecretKeySet, PublicContext]) -> SecretKeySet:
    return keys[0]


@pytest.fixture(scope="session")
def ctx(keys: tuple[SecretKeySet, PublicContext]) -> PublicContext:
    return keys[1]


@pytest.fixture(scope="session")
def other_keys() -> tuple[SecretKeySet, PublicContext]:
    """A second key of the same profile: ciphertexts under it are foreign."""
    return generate_keys("default")


@pytest.fixture(scope="session")
def local_holder(secret: SecretKeySet) -> LocalKeyHolder:
    return LocalKeyHolder(secret)


@pytest.fixture(scope="session")
def engine(ctx: PublicContext, local_holder: LocalKeyHolder) -> DeltaEngine:
    return DeltaEngine(ctx, local_holder)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    # Deterministic per test, different across tests.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
