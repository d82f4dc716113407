"""The key holder's attestation routes fuzzed from its own OpenAPI document (schemathesis), on
the real service with an attestation policy: never a 5xx, answers as documented, 401 without
a token, and a host without a session never gets a decryption whatever it sent. Bounded
examples per route, so the time is bounded too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import given  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.key_holder.test_openapi_fuzz import CHECKS, FUZZ  # noqa: E402

from .helpers import SoftAk  # noqa: E402
from .service import TOKEN, token_store  # noqa: E402

ROUTES = ("/v1/attestation/nonce", "/v1/attestation/quote")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, sql: Any) -> Iterator[Any]:
    from tests.key_holder.conftest import policy_for
    from vllm_tensafe.attestation import AttestationPolicy, AttestationVerifier
    from vllm_tensafe.attestation.routes import AttestationRoutes
    from vllm_tensafe.keyholder.server import KeyHolderService, Limits

    folder: Path = tmp_path_factory.mktemp("fuzz")
    policy = AttestationPolicy.from_mapping(
        {"hosts": {"host-a": {"attestation_keys": [SoftAk().key.pem()], "pcrs": {"7": "00" * 32}}}}
    )
    service = KeyHolderService(
        [sql.secret],
        policy_for(sql),
        token_store(),
        audit_log=folder / "audit.jsonl",
        limits=Limits(body_timeout=10, busy_timeout=10),
        attestation=AttestationRoutes(AttestationVerifier(policy)),
    )
    service.start()
    yield service
    service.close()


def _operations(running: Any) -> list[Any]:
    api = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    found = [r.ok() for r in api.get_all_operations() if r.ok().path in ROUTES]
    assert sorted(op.path for op in found) == sorted(ROUTES)
    return found


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "host-token"])
def test_attestation_routes_never_fail_and_answer_as_documented(
    running: Any, sql: Any, token: str | None
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for operation in _operations(running):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call_and_validate(
                    base_url=running.url, headers=headers, checks=CHECKS
                )
                if token is None:
                    assert response.status_code == 401
                else:
                    # Nothing fuzzed is a quote the host's (software) AK signed.
                    assert case.path != ROUTES[1] or response.status_code != 200

            run()
    # Whatever was sent, this host has no session: its decryptions are refused.
    from vllm_tensafe.errors import AttestationRequiredError
    from vllm_tensafe.keyholder.remote import RemoteKeyHolder

    client = RemoteKeyHolder(running.url, TOKEN, retries=0)
    try:
        with pytest.raises(AttestationRequiredError):
            client.decrypt(sql.ref, [sql.blob])
    finally:
        client.close()
