"""The HTTP stack holds up: idle connections, slow headers, huge or malformed bodies.

The old ThreadingHTTPServer made one thread per idle connection (400 connections, 353
threads), buffered up to 256 MiB per authenticated request with unlimited concurrency, and
crashed its handler on ``Content-Length: \\xb2``.
"""

from __future__ import annotations

import http.client
import json
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.key_holder.conftest import DECRYPT_TOKEN, Adapter
from vllm_tensafe.keyholder.remote import RemoteKeyHolder
from vllm_tensafe.keyholder.wire import REQUEST_CONTENT_TYPE, encode_request


def _health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200
    return json.loads(resp.read())


def _raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _wait_closed(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_400_idle_connections_use_no_threads_and_health_still_answers(service: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", service.port), timeout=30) for _ in range(400)]
    try:
        # Half of them start a request and stall in the middle of the header.
        for sock in idle[::2]:
            sock.sendall(b"POST /v1/decrypt HTTP/1.1\r\nHost: x\r\n")
        assert _health(service.port)["status"] == "ok"
        assert threading.active_count() - threads_before < 10
        RemoteKeyHolder(service.url, DECRYPT_TOKEN).health()
    finally:
        for sock in idle:
            sock.close()
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_slow_or_silent_connections_are_closed(make_service: Callable[..., Any]) -> None:
    from vllm_tensafe.keyholder.server import Limits

    service = make_service(limits=Limits(header_timeout=1.0))
    silent = socket.create_connection(("127.0.0.1", service.port))
    slow = socket.create_connection(("127.0.0.1", service.port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the final CRLF
    deadline = time.monotonic() + 60  # generous: the deadline itself is 1 s
    assert _wait_closed(silent, deadline) and _wait_closed(slow, deadline)
    silent.close()
    slow.close()
    assert _health(service.port)["status"] == "ok"


def test_connection_cap(make_service: Callable[..., Any]) -> None:
    from vllm_tensafe.keyholder.server import Limits

    service = make_service(limits=Limits(max_connections=20))
    held = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(20)]
    try:
        extra = socket.create_connection(("127.0.0.1", service.port))
        assert _wait_closed(extra, time.monotonic() + 60)
        extra.close()
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the closed ones are gone once the loop saw them
        try:
            assert _health(service.port)["status"] == "ok"
            break
        except (AssertionError, OSError, http.client.HTTPException):
            time.sleep(0.1)
    else:
        raise AssertionError("the key holder did not answer again after the cap")


def test_oversized_body_is_refused_without_reading_it(
    make_service: Callable[..., Any], sql: Adapter
) -> None:
    from vllm_tensafe.keyholder.server import Limits

    service = make_service(limits=Limits(max_request_bytes=1 << 20))
    head = (
        "POST /v1/decrypt HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {DECRYPT_TOKEN}\r\nContent-Type: {REQUEST_CONTENT_TYPE}\r\n"
        f"Content-Length: {10 << 30}\r\n\r\n"
    ).encode()
    reply = _raw(service.port, head)
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"too_large"' in reply and b"send fewer ciphertexts" in reply
    # Chunked, with no Content-Length at all: cut off at the limit too.
    chunk = b"x" * (256 << 10)
    chunked = (
        "POST /v1/decrypt HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {DECRYPT_TOKEN}\r\nContent-Type: {REQUEST_CONTENT_TYPE}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 8
    assert _raw(service.port, chunked).startswith(b"HTTP/1.1 413")
    assert service.status("sql-adapter")["used"] == 0


@pytest.mark.parametrize("length", [b"\xb2", b"12a", b"-1", b"1e3", b"\xd9\xa3"])
def test_bad_content_length_is_a_400_and_the_service_lives_on(
    service: Any, sql: Adapter, length: bytes
) -> None:
    body = encode_request(sql.ref, [sql.blob])
    head = (
        b"POST /v1/decrypt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + DECRYPT_TOKEN.encode()
        + b"\r\nContent-Type: "
        + REQUEST_CONTENT_TYPE.encode()
        + b"\r\nContent-Length: "
        + length
        + b"\r\n\r\n"
    )
    reply = _raw(service.port, head + body)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert service.status("sql-adapter")["used"] == 0
    assert _health(service.port)["status"] == "ok"
    RemoteKeyHolder(service.url, DECRYPT_TOKEN).decrypt(sql.ref, [sql.blob])


def test_body_deadline(make_service: Callable[..., Any]) -> None:
    from vllm_tensafe.keyholder.server import Limits

    service = make_service(limits=Limits(body_timeout=1.0))
    head = (
        "POST /v1/decrypt HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {DECRYPT_TOKEN}\r\nContent-Type: {REQUEST_CONTENT_TYPE}\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    reply = _raw(service.port, head + b"x" * 10, timeout=60)  # 990 bytes never come
    assert reply.startswith(b"HTTP/1.1 408") and b'"timeout"' in reply


def test_unauthorized_large_body_still_reads_the_401(service: Any, sql: Adapter) -> None:
    """The body is read and dropped, so the client sees the 401, not a reset."""
    from vllm_tensafe.errors import KeyHolderAuthError

    holder = RemoteKeyHolder(service.url, "not-the-token-0123456789", retries=0)
    with pytest.raises(KeyHolderAuthError, match="refused the host's token"):
        holder.decrypt(sql.ref, [sql.blob] * 64)


def test_unknown_route_names_the_docs(service: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request("GET", "/v2/whatever")
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    assert resp.status == 404 and reply["error"] == "not_found"
    assert "docs/key-holder.md" in reply["fix"] and "/openapi.json" in reply["fix"]
