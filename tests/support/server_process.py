"""Start and stop a stock ``vllm serve`` subprocess (used by the demo, benchmarks and tests).

Nothing here changes how vLLM serves: it runs the ``vllm`` console script next to the current
interpreter with the arguments it is given, waits for ``/health``, and keeps the log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

# Settings that make vLLM start on a small CPU-only machine (docs/install.md).
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
CPU_ARGS = ("--dtype", "float32", "--gpu-memory-utilization", "0.5", "--max-model-len", "512")


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when the process that started it dies, even by
    SIGKILL (a test run stopped by a time limit), so that no server outlives its test and
    keeps a port or, on a GPU, its memory. vLLM shuts its engine processes down on SIGTERM.
    Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_executable() -> str:
    candidate = Path(sys.executable).with_name("vllm")
    return str(candidate) if candidate.exists() else "vllm"


class ServerStartError(RuntimeError):
    def __init__(self, message: str, log: str, returncode: int | None) -> None:
        tail = "\n".join(log.splitlines()[-40:])
        super().__init__(f"{message}; last lines of its log:\n{tail}")
        self.log = log
        self.returncode = returncode


class VllmServer:
    """``with VllmServer(model, [...]) as server: server.base_url``."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 300.0,
        cpu_defaults: bool = True,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = os.fspath(model)
        self.port = port or free_port()
        self.args = [*(CPU_ARGS if cpu_defaults else ()), *args]
        self.env = {**os.environ, **(CPU_ENV if cpu_defaults else {}), **(env or {})}
        self.startup_timeout = startup_timeout
        self._log_file = (
            open(log_path, "w+b")
            if log_path
            else tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            vllm_executable(),
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def log(self) -> str:
        self._log_file.flush()
        with open(self._log_file.name, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def start(self) -> VllmServer:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"vllm serve exited with code {code} during startup", self.log(), code
                )
            if self.healthy(timeout=2.0):
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(
            f"vllm serve did not become healthy within {self.startup_timeout:.0f}s",
            self.log(),
            None,
        )

    def healthy(self, timeout: float = 30.0) -> bool:
        """/health answers 200 within ``timeout`` seconds (generous by default: a busy server
        still counts as healthy; start() polls with a short one)."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        process = self.process
        if process is None:
            return
        # vLLM spawns engine-core and worker processes: signal the whole process group, even
        # when the leader has already exited, so no engine process is left behind.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
            while time.monotonic() < deadline:
                process.poll()
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
