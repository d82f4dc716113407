"""The host's client: TLS (CA, subjectAltName, client certificates), refusals with the right
type, and failure messages that name the actual cause."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.key_holder.conftest import DECRYPT_TOKEN, Adapter
from vllm_tensafe.errors import (
    ConfigError,
    KeyHolderAuthError,
    KeyHolderForbiddenError,
    KeyHolderUnavailableError,
)
from vllm_tensafe.keyholder.remote import RemoteKeyHolder


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The documented command's output, plus a second CA and a certificate for another name."""
    from vllm_tensafe.cli import main

    good = tmp_path_factory.mktemp("tls")
    assert main(["key-holder", "cert", "--out", str(good), "--host", "127.0.0.1",
                 "--host", "localhost", "--client", "gpu-1"]) == 0  # fmt: skip
    other = tmp_path_factory.mktemp("other-ca")
    assert main(["key-holder", "cert", "--out", str(other), "--host", "127.0.0.1",
                 "--client", "gpu-1"]) == 0  # fmt: skip
    wrong_name = tmp_path_factory.mktemp("wrong-name")
    assert main(["key-holder", "cert", "--out", str(wrong_name), "--host", "kh.example"]) == 0
    return {
        "ca": good / "ca.pem",
        "cert": good / "server.pem",
        "key": good / "server.key",
        "client": good / "client-gpu-1.pem",
        "client_key": good / "client-gpu-1.key",
        "other_ca": other / "ca.pem",
        "other_client": other / "client-gpu-1.pem",
        "other_client_key": other / "client-gpu-1.key",
        "wrong_name_ca": wrong_name / "ca.pem",
        "wrong_name_cert": wrong_name / "server.pem",
        "wrong_name_key": wrong_name / "server.key",
    }


def _tls(certs: dict[str, Path], prefix: str = "", client_ca: bool = False) -> Any:
    from vllm_tensafe.keyholder.server import TLSConfig

    return TLSConfig(
        certs[f"{prefix}cert"], certs[f"{prefix}key"], certs["ca"] if client_ca else None
    )


def test_remote_delta_is_correct(make_service: Callable[..., Any], sql: Adapter) -> None:
    """Through HTTP, re-randomised and padded requests, the key holder's flooded replies: the
    delta is U B'^T within the profile's tolerance, and large batches split over requests."""
    import numpy as np

    from tests.he.helpers import make_lora
    from vllm_tensafe.he import DeltaEngine, encrypt_matrix

    service = make_service()
    rng = np.random.default_rng(3)
    lora = make_lora(rng, 896, 8, rslora=True)
    x = rng.normal(size=(9, 48))
    remote = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    engine = DeltaEngine(sql.ctx, remote)
    items = [(lora.u(x), encrypt_matrix(sql.ctx, lora.b_mixed))]
    (delta,) = engine.compute(sql.ref, items)
    assert np.abs(delta - lora.delta(x)).max() <= sql.ctx.profile.tolerance
    remote.max_request_bytes = 1  # one ciphertext per request
    (split,) = engine.compute(sql.ref, items)
    assert np.abs(split - lora.delta(x)).max() <= sql.ctx.profile.tolerance
    assert service.status("sql-adapter")["decrypt_requests"] > 2


def test_key_holder_from_settings(service: Any, tmp_path: Path) -> None:
    from vllm_tensafe.keyholder import key_holder_from_settings
    from vllm_tensafe.settings import TenSafeSettings

    token_file = tmp_path / "token"
    token_file.write_text(DECRYPT_TOKEN + "\n")
    remote = key_holder_from_settings(
        TenSafeSettings(
            key_holder="remote", key_holder_url=service.url, key_holder_token_file=token_file
        )
    )
    assert isinstance(remote, RemoteKeyHolder) and remote.kind == "remote"
    assert remote.health()["status"] == "ok"
    token_file.write_text("")
    with pytest.raises(ConfigError, match="holds 0 tokens"):
        key_holder_from_settings(
            TenSafeSettings(
                key_holder="remote", key_holder_url=service.url, key_holder_token_file=token_file
            )
        )


def test_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"plain HTTP to kh.example, which is not loopback"):
        RemoteKeyHolder("http://kh.example:8443", DECRYPT_TOKEN)
    for url in ("http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"):
        RemoteKeyHolder(url, DECRYPT_TOKEN)  # loopback is allowed


def test_tls_with_the_documented_certificate(
    make_service: Callable[..., Any], certs: dict[str, Path], sql: Adapter
) -> None:
    service = make_service(tls=_tls(certs))
    assert service.url.startswith("https://")
    for host in ("127.0.0.1", "localhost"):
        url = service.url.replace("127.0.0.1", host)
        holder = RemoteKeyHolder(url, DECRYPT_TOKEN, ca_file=certs["ca"])
        assert holder.health()["tls"] is True
        holder.decrypt(sql.ref, [sql.blob])


def test_wrong_ca_names_the_ca(make_service: Callable[..., Any], certs: dict[str, Path]) -> None:
    service = make_service(tls=_tls(certs))
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN, ca_file=certs["other_ca"])
    with pytest.raises(KeyHolderUnavailableError, match=r"not trusted by .*other-ca") as info:
        holder.health()
    assert "TENSAFE_KEY_HOLDER_CA" in str(info.value)


def test_wrong_subject_alt_name_names_the_san(
    make_service: Callable[..., Any], certs: dict[str, Path]
) -> None:
    service = make_service(tls=_tls(certs, "wrong_name_"))
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN, ca_file=certs["wrong_name_ca"])
    with pytest.raises(
        KeyHolderUnavailableError, match=r"does not name 127.0.0.1 in its subjectAlt"
    ):
        holder.health()


def test_https_to_a_plain_http_key_holder(service: Any) -> None:
    holder = RemoteKeyHolder(service.url.replace("http:", "https:"), DECRYPT_TOKEN, retries=0)
    with pytest.raises(KeyHolderUnavailableError, match="does not speak TLS"):
        holder.health()


def test_client_certificates(
    make_service: Callable[..., Any],
    certs: dict[str, Path],
    sql: Adapter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = make_service(tls=_tls(certs, client_ca=True))
    ok = RemoteKeyHolder(
        service.url,
        DECRYPT_TOKEN,
        ca_file=certs["ca"],
        client_cert=certs["client"],
        client_key=certs["client_key"],
    )
    ok.decrypt(sql.ref, [sql.blob])
    none = RemoteKeyHolder(service.url, DECRYPT_TOKEN, ca_file=certs["ca"], retries=0)
    with pytest.raises(KeyHolderAuthError, match="requires a client certificate"):
        none.decrypt(sql.ref, [sql.blob])
    with caplog.at_level(logging.DEBUG):
        foreign = RemoteKeyHolder(
            service.url,
            DECRYPT_TOKEN,
            ca_file=certs["ca"],
            client_cert=certs["other_client"],
            client_key=certs["other_client_key"],
            retries=0,
        )
        with pytest.raises((KeyHolderAuthError, KeyHolderUnavailableError)) as info:
            foreign.health()
        assert "TENSAFE_KEY_HOLDER_CA" not in str(info.value)
        # A plain-HTTP probe of the TLS port.
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(100)
        ok.health()  # the key holder still serves
    # Expected network errors: no traceback in the key holder's log.
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_no_tracebacks_without_uvloop_either(
    make_service: Callable[..., Any],
    certs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # the stdlib asyncio loop
    service = make_service(tls=_tls(certs, client_ca=True))
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(100)
        foreign = RemoteKeyHolder(
            service.url,
            DECRYPT_TOKEN,
            ca_file=certs["ca"],
            client_cert=certs["other_client"],
            client_key=certs["other_client_key"],
            retries=0,
        )
        with pytest.raises((KeyHolderAuthError, KeyHolderUnavailableError)):
            foreign.health()
        RemoteKeyHolder(
            service.url,
            DECRYPT_TOKEN,
            ca_file=certs["ca"],
            client_cert=certs["client"],
            client_key=certs["client_key"],
        ).health()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_a_403_is_a_refusal_not_an_outage(service: Any, sql: Adapter) -> None:
    from vllm_tensafe.keyholder.wire import AdapterRef

    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    with pytest.raises(KeyHolderForbiddenError) as info:
        holder.decrypt(AdapterRef("nope", sql.ctx.key_id, sql.digest), [sql.blob])
    assert not isinstance(info.value, KeyHolderUnavailableError)


def test_shutting_down_says_so(service: Any, sql: Adapter) -> None:
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN, retries=0)
    holder.health()  # an open keep-alive connection, as a serving host has
    service.stopping = True  # what stop() sets before the server drains
    with pytest.raises(KeyHolderUnavailableError, match="is shutting down") as info:
        holder.decrypt(sql.ref, [sql.blob])
    assert "TENSAFE_KEY_HOLDER_CA" not in str(info.value)
    service.stopping = False


def test_stopped_key_holder_is_unreachable(service: Any, sql: Adapter) -> None:
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN, timeout=5, retries=1)
    holder.decrypt(sql.ref, [sql.blob])  # leaves a keep-alive connection open
    service.stop()
    with pytest.raises(KeyHolderUnavailableError, match="unreachable after 2 attempts") as info:
        holder.decrypt(sql.ref, [sql.blob])
    assert "TENSAFE_KEY_HOLDER_CA" not in str(info.value)


def test_hung_key_holder_times_out(sql: Adapter) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts into the backlog, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(KeyHolderUnavailableError, match=r"did not answer within 0.5s"):
            RemoteKeyHolder(url, DECRYPT_TOKEN, timeout=0.5, retries=3).decrypt(sql.ref, [sql.blob])
    finally:
        listener.close()


def test_other_server_errors_are_unavailable(sql: Adapter) -> None:
    class Broken(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(KeyHolderUnavailableError, match="HTTP 502"):
            RemoteKeyHolder(url, DECRYPT_TOKEN).decrypt(sql.ref, [sql.blob])
    finally:
        server.shutdown()
        server.server_close()
