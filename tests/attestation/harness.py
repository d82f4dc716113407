"""A key holder with attestation mounted, for tests: the composition the service will make.

``AttestingKeyHolder`` authenticates the bearer token, answers the attestation routes with
``AttestationRoutes`` and, for every other request, runs ``routes.check(caller)`` and then
forwards the request unchanged to a real key holder (``vllm-tensafe key-holder serve``) when
there is one. The caller's host identity is its token's fingerprint; its channel is the TLS
channel binding when the harness serves HTTPS.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vllm_tensafe.attestation.routes import AttestationRoutes, Caller, channel_binding


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


class AttestingKeyHolder:
    def __init__(
        self,
        routes: AttestationRoutes,
        tokens: set[str],
        *,
        upstream: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = routes
        self.tokens = {fingerprint(t): t for t in tokens}
        self.upstream = urlparse(upstream) if upstream else None
        self.tls = tls
        self.audit: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def record(self, route: str, host: str, outcome: str) -> None:
        with self._lock:
            self.audit.append((route, host, outcome))

    def start(self) -> AttestingKeyHolder:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> AttestingKeyHolder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(holder: AttestingKeyHolder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _caller(self) -> Caller | None:
            header = self.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ").strip()
            fp = fingerprint(token)
            if not header.startswith("Bearer ") or fp not in holder.tokens:
                return None
            return Caller(host=fp, token_fingerprint=fp, channel=channel_binding(self.connection))

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            self._forward("GET", b"")

        def do_POST(self) -> None:
            body = self._body()
            caller = self._caller()
            if caller is None:
                holder.record(self.path, "-", "unauthorized")
                self._send(401, json.dumps({"error": "unauthorized"}).encode())
                return
            reply = holder.routes.handle("POST", self.path, caller, body)
            if reply is not None:
                holder.record(self.path, caller.host, reply.outcome)
                self._send(reply.status, reply.json_bytes())
                return
            refused = holder.routes.check(caller)
            if refused is not None:
                holder.record(self.path, caller.host, refused.outcome)
                self._send(refused.status, refused.json_bytes())
                return
            holder.record(self.path, caller.host, "forwarded")
            self._forward("POST", body)

        def _forward(self, method: str, body: bytes) -> None:
            upstream = holder.upstream
            if upstream is None:
                self._send(502, json.dumps({"error": "no_upstream"}).encode())
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            try:
                conn.request(method, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self._send(resp.status, data, resp.getheader("Content-Type", ""))
            finally:
                conn.close()

    return Handler


class CliKeyHolder:
    """The stock key holder, ``vllm-tensafe key-holder serve`` on a free loopback port."""

    def __init__(self, secret: Path, token_file: Path) -> None:
        self.secret = secret
        self.token_file = token_file
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> CliKeyHolder:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_tensafe.cli", "key-holder", "serve", "--port", "0",
             "--he-secret", str(self.secret), "--token-file", str(self.token_file)],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self._proc.stderr is not None
        # Reading blocks until the line comes or the process ends: no polling, no deadline.
        for line in self._proc.stderr:
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].split()[0]
                break
        if not self.url:
            self.stop()
            raise RuntimeError("the key holder did not start")
        # Keep draining its log so that it never blocks on a full pipe.
        threading.Thread(target=self._proc.stderr.read, daemon=True).start()
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    def __enter__(self) -> CliKeyHolder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
