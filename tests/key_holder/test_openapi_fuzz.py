"""The key holder's HTTP API fuzzed from its own OpenAPI document (schemathesis).

Real HTTP against a running service on loopback, a bounded number of examples per route (so
the time is bounded too, whatever the machine's load): never a 5xx, responses conform to the
document, and without a token every route but /health answers 401.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.key_holder.conftest import ADMIN_TOKEN, DECRYPT_TOKEN, policy_for, tokens  # noqa: E402
from vllm_tensafe.keyholder.wire import REQUEST_CONTENT_TYPE  # noqa: E402

EXAMPLES = 25  # per route and auth mode


@schemathesis.serializer(REQUEST_CONTENT_TYPE)
def _binary(ctx: Any, value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, sql: Any, billing: Any) -> Iterator[Any]:
    from vllm_tensafe.keyholder.server import KeyHolderService, Limits

    folder: Path = tmp_path_factory.mktemp("fuzz")
    service = KeyHolderService(
        [sql.secret, billing.secret],
        policy_for(sql, billing),
        tokens(),
        audit_log=folder / "audit.jsonl",
        limits=Limits(body_timeout=10, busy_timeout=10),
    )
    service.start()
    yield service
    service.close()


@pytest.fixture(scope="module")
def api(running: Any) -> Any:
    return schemathesis.openapi.from_url(f"{running.url}/openapi.json")


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _fuzz(api: Any, check: Callable[[Any], None]) -> list[str]:
    """Run ``check(case)`` on generated cases of every operation, valid and invalid ones.

    (schemathesis's pytest plugin does not run under this pytest; its strategies do.)
    """
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    seen = []
    for result in api.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                check(case)

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (GET /health has no parameters at all).
                assert mode is GenerationMode.NEGATIVE
    return seen


def test_no_token_is_always_401(api: Any, running: Any) -> None:
    def check(case: Any) -> None:
        response = case.call(base_url=running.url)
        if case.path == "/health":
            assert response.status_code in (200, 405)
        else:
            assert response.status_code == 401, (case.method, case.path, response.text[:300])
            assert response.json()["error"] == "unauthorized"

    assert len(_fuzz(api, check)) == 7


@pytest.mark.parametrize("token", [ADMIN_TOKEN, DECRYPT_TOKEN], ids=["admin", "decrypt"])
def test_never_a_server_error_and_as_documented(api: Any, running: Any, token: str) -> None:
    def check(case: Any) -> None:
        case.call_and_validate(
            base_url=running.url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS
        )

    _fuzz(api, check)


def test_the_document_describes_every_route(api: Any, running: Any) -> None:
    raw = api.raw_schema
    assert set(raw["paths"]) == {
        "/health",
        "/v1/decrypt",
        "/v1/check",
        "/v1/adapters",
        "/v1/adapters/{adapter}",
        "/v1/adapters/{adapter}/revoke",
        "/v1/adapters/{adapter}/unrevoke",
    }
    decrypt = raw["paths"]["/v1/decrypt"]["post"]
    assert REQUEST_CONTENT_TYPE in decrypt["requestBody"]["content"]
    assert "application/vnd.tensafe.reply-v2" in decrypt["responses"]["200"]["content"]
    assert decrypt["security"] == [{"bearer": []}]
    assert "security" not in raw["paths"]["/health"]["get"]
