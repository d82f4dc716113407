"""The shell and serving examples, run as a user would, on the tiny demo model.

pack_adapter.sh makes the owner's keys and the package; serve_local.sh starts the stock
``vllm serve``; openai_chat_stream.py queries it; tensafe_server.py and tensafe_async_engine.py
are the guide's API. Each serving example starts its own real vLLM (that is what it
demonstrates), so this module starts two. The remote key holder's example runs in
test_remote_path.py (TLS, revocation, status route).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory
from tests.support.server_process import CPU_ARGS, CPU_ENV, die_with_parent, free_port

pytestmark = pytest.mark.vllm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BIN = Path(sys.executable).parent
ENV = {**os.environ, **CPU_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


class Background:
    """An example that runs until stopped (a server), in its own process group."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._handle = open(log, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            list(argv),
            env=env or ENV,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def wait_http(self, url: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"{url} did not answer within {timeout:.0f}s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()
                try:
                    os.killpg(self.process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self._handle.close()


def _run(argv: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _json_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1])


def _chat(port: int, model: str) -> dict[str, Any]:
    proc = _run(
        [
            sys.executable,
            str(EXAMPLES / "openai_chat_stream.py"),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--model",
            model,
        ],
        timeout=300,
    )
    return _json_line(proc.stdout)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def packed(demo: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """examples/pack_adapter.sh on the demo adapter: new owner keys and demo.tssp."""
    out = tmp_path_factory.mktemp("owner")
    proc = _run(
        [
            "bash",
            str(EXAMPLES / "pack_adapter.sh"),
            str(demo.demo_adapter_dir),
            str(demo.model_dir),
            str(out),
            "demo",
        ]
    )
    assert "OK demo.tssp" in proc.stdout
    return {"model": demo.model_dir, "package": out / "demo.tssp", "owner": out / "owner"}


def test_pack_adapter_sh(packed: dict[str, Path]) -> None:
    owner = packed["owner"]
    for suffix in (".key", ".pub"):  # the owner's signing key, one for all adapters
        assert owner.with_name(f"owner{suffix}").is_file()
    for suffix in (".secret", ".public"):  # this adapter's own CKKS key
        assert owner.with_name(f"demo{suffix}").is_file()
    summary = json.loads(packed["package"].with_name("demo.inspect.json").read_text())
    assert summary["manifest"]["name"] == "demo"
    assert "valid" in summary["signature"]


def test_serve_local_sh_and_openai_streaming_chat(packed: dict[str, Path], tmp_path: Path) -> None:
    from tests.support.builders import DEMO_ANSWER

    port = free_port()
    server = Background(
        [
            "bash",
            str(EXAMPLES / "serve_local.sh"),
            str(packed["model"]),
            str(packed["package"]),
            str(packed["owner"]),
            str(port),
            "--",
            *CPU_ARGS,
        ],
        tmp_path / "serve_local.log",
    )
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health")
        answer = _chat(port, "demo")
        assert answer["text"].strip() == DEMO_ANSWER
        assert answer["chunks"] > 1  # streamed, not one block
        # serve_local.sh sets VLLM_PLUGINS=tensafe: the status route is there.
        status = _get_json(f"http://127.0.0.1:{port}/v1/tensafe/adapters")
        (adapter,) = status["adapters"]
        assert adapter["served_names"] == ["demo"] and adapter["usage"]["decrypt_calls"] > 0
    finally:
        server.stop()


def test_tensafe_server_py(packed: dict[str, Path], tmp_path: Path) -> None:
    from tests.support.builders import DEMO_ANSWER

    port = free_port()
    server = Background(
        [
            sys.executable,
            str(EXAMPLES / "tensafe_server.py"),
            "--model",
            str(packed["model"]),
            "--package",
            str(packed["package"]),
            "--trusted-key",
            str(packed["owner"].with_name("owner.pub")),
            "--he-secret",
            str(packed["owner"].with_name("demo.secret")),
            "--adapter-name",
            "secret-word",
            "--port",
            str(port),
        ],
        tmp_path / "tensafe_server.log",
    )
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health")
        health = _get_json(f"http://127.0.0.1:{port}/health")
        assert health == {"status": "healthy", "model": str(packed["model"])}
        models = {m["id"] for m in _get_json(f"http://127.0.0.1:{port}/v1/models")["data"]}
        assert models == {str(packed["model"]), "secret-word"}
        answer = _chat(port, "secret-word")
        assert answer["text"].strip() == DEMO_ANSWER
        # SIGTERM to the server alone (as a process manager sends it): it stops vLLM's engine
        # processes itself and exits.
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=90) == 0, server.tail()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _group_alive(server.process.pid):
            time.sleep(0.5)
        assert not _group_alive(server.process.pid), "engine processes left behind"
    finally:
        server.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def llama_pair(tiny_llama: Path, adapters: AdapterFactory) -> tuple[Path, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return peft, adapters.package(peft, tiny_llama, "e8")


def test_tensafe_async_engine_py(
    tiny_llama: Path, owner_keys: Any, llama_pair: tuple[Path, Path]
) -> None:
    from tests.support.builders import greedy_reference

    peft, package = llama_pair
    proc = _run(
        [
            sys.executable,
            str(EXAMPLES / "tensafe_async_engine.py"),
            "--model", str(tiny_llama),
            "--package", str(package),
            "--trusted-key", str(owner_keys.signing_pub),
            "--he-secret", str(owner_keys.he_secret),
            "--rank", "8",
        ]
    )  # fmt: skip
    out = _json_line(proc.stdout)
    ids, _ = greedy_reference(tiny_llama, peft, "Once upon a time", 10, stop_at_eos=False)
    assert out["token_ids"] == ids
    assert out["streamed_steps"] > 1


def test_tensafe_async_engine_py_refuses_a_contradiction(
    tiny_llama: Path, owner_keys: Any, llama_pair: tuple[Path, Path]
) -> None:
    _, package = llama_pair
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "tensafe_async_engine.py"),
            "--model", str(tiny_llama),
            "--package", str(package),
            "--trusted-key", str(owner_keys.signing_pub),
            "--he-secret", str(owner_keys.he_secret),
            "--rank", "16",
        ],
        capture_output=True, text=True, timeout=300, env=ENV, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "he_lora_rank=16 but the package" in proc.stderr and "has rank 8" in proc.stderr
    assert "Initializing a V1 LLM engine" not in proc.stderr  # refused before vLLM started
