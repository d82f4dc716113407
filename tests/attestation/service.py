"""The real key holder (``KeyHolderService``: FastAPI on uvicorn, TLS, hash-chained audit log)
with an attestation policy, and a raw HTTPS connection to attack it with.

Tokens: host A has two decrypt tokens (``TOKEN``, ``SECOND_TOKEN``, both ``host=host-a``),
host Z one (``UNLISTED_TOKEN``, ``host=host-z``, in no policy), the owner an admin token.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_tensafe.attestation import QuoteBundle, TpmQuoter
from vllm_tensafe.attestation.client import Attester
from vllm_tensafe.attestation.routes import NONCE_PATH, QUOTE_PATH
from vllm_tensafe.keyholder.remote import RemoteKeyHolder
from vllm_tensafe.keyholder.wire import REQUEST_CONTENT_TYPE, AdapterRef, encode_request

TOKEN = "host-a-token-0123456789abcdef"
SECOND_TOKEN = "host-a-second-token-0123456789"
UNLISTED_TOKEN = "host-z-token-0123456789abcdef"
ADMIN_TOKEN = "owner-admin-token-0123456789abcd"


def token_store() -> Any:
    from vllm_tensafe.keyholder.server.tokens import TokenStore, make_token

    return TokenStore(
        [
            make_token(TOKEN, "decrypt", host="host-a"),
            make_token(SECOND_TOKEN, "decrypt", host="host-a"),
            make_token(UNLISTED_TOKEN, "decrypt", host="host-z"),
            make_token(ADMIN_TOKEN, "admin", host="owner"),
        ]
    )


@dataclass
class RunningKeyHolder:
    service: Any  # KeyHolderService
    ca: Path
    audit: Path
    opened: list[Any] = field(default_factory=list)  # closed before the service stops

    @property
    def url(self) -> str:
        return str(self.service.url)

    def events(self, route: str | None = None) -> list[dict[str, Any]]:
        """The audit log's events (its file, as the operator reads it)."""
        lines = self.audit.read_text().splitlines()
        events = [json.loads(line)["event"] for line in lines if line.strip()]
        return [e for e in events if route is None or e.get("route") == route]

    def outcomes(self, route: str) -> list[str]:
        return [str(e["outcome"]) for e in self.events(route)]

    def wire(self, token: str = TOKEN) -> Wire:
        wire = Wire(self.url, token, self.ca)
        self.opened.append(wire)
        return wire

    def client(self, attester: Attester | None = None, token: str = TOKEN) -> RemoteKeyHolder:
        client = RemoteKeyHolder(self.url, token, ca_file=self.ca, attester=attester, retries=0)
        self.opened.append(client)
        return client

    def close(self) -> None:
        for opened in self.opened:
            opened.close()
        self.service.close()


class Wire:
    """One HTTPS connection with one token: what a host (or an attacker holding the host's
    token) sends, byte for byte; never reconnects behind the test's back."""

    def __init__(self, url: str, token: str, ca: Path) -> None:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        self.token = token
        self.conn = http.client.HTTPSConnection(
            host, int(port), timeout=60, context=ssl.create_default_context(cafile=str(ca))
        )
        self.conn.connect()
        self.conn.auto_open = 0  # a dropped connection raises instead of reopening

    def _post(self, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": ctype}
        self.conn.request("POST", path, body=body, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def post_json(self, path: str, payload: Any) -> tuple[int, dict[str, Any]]:
        status, data = self._post(path, json.dumps(payload).encode(), "application/json")
        return status, json.loads(data) if data else {}

    def nonce(self) -> dict[str, Any]:
        status, challenge = self.post_json(NONCE_PATH, {})
        assert status == 200, challenge
        return challenge

    def quote_for(self, quoter: TpmQuoter, challenge: dict[str, Any]) -> QuoteBundle:
        return quoter.quote(
            bytes.fromhex(challenge["nonce"]), challenge["pcr_bank"], challenge["pcrs"]
        )

    def send_quote(self, bundle: QuoteBundle | dict[str, Any]) -> tuple[int, dict[str, Any]]:
        payload = bundle.to_json() if isinstance(bundle, QuoteBundle) else bundle
        return self.post_json(QUOTE_PATH, payload)

    def attest(self, quoter: TpmQuoter) -> dict[str, Any]:
        status, reply = self.send_quote(self.quote_for(quoter, self.nonce()))
        assert status == 200, reply
        return reply["session"]

    def decrypt(self, ref: AdapterRef, blobs: Sequence[bytes]) -> tuple[int, dict[str, Any]]:
        """The decrypt route; the JSON refusal, or {} for a served (binary) reply."""
        status, data = self._post("/v1/decrypt", encode_request(ref, blobs), REQUEST_CONTENT_TYPE)
        return status, ({} if status == 200 else json.loads(data))

    def close(self) -> None:
        self.conn.close()
