"""Soak: sustained streaming load and injected faults against one real vLLM with encrypted LoRA.

One stock ``vllm serve --enable-tensafe`` on a tiny local model (nothing is downloaded), with two
encrypted adapters, one plaintext adapter and the base model in rotation, ``--max-loras 2`` so
that LoRA slots (and the worker's adapter cache) are swapped under load, and the remote key
holder (``vllm-tensafe key-holder serve``) as its own process. Everything listens on loopback
only, and the run stops by itself.

* Load: N client threads (the official ``openai`` client) stream completions for the given
  time. Every answer must equal the same request answered alone (greedy, ``ignore_eos``): a
  lost, truncated or cross-adapter answer is an error.
* Resources: RSS, open files and threads of every vLLM process and of the key holder, after a
  warm-up and again at the end (both after the traffic has drained); the bounds are below.
* Faults (``--faults``): each is injected while the load goes on and has one expected outcome,
  checked here (see ``FAULTS``).

    python benchmarks/soak.py --minutes 10 --clients 8                 # load only
    python benchmarks/soak.py --minutes 10 --clients 8 --faults all    # load, then each fault
    python benchmarks/soak.py --minutes 2 --clients 4 --faults key-holder-restart,revocation

Prints one JSON object on stdout (progress on stderr) and exits non-zero if anything failed.
tests/e2e/test_soak.py runs a two-minute version of the same code in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The tiny-model builders and the server process live with the tests (tests/support/), not in
# the package: run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clients import openai_client
from tests.support.server_process import VllmServer, free_port
from vllm_tensafe.cli import main as tensafe_cli

BASE = "tiny-llama"
ENCRYPTED = ("e-a", "e-b")  # in the steady rotation
PLAINTEXT = "p-c"
FAULT_ADAPTERS = ("e-revoke", "e-budget")  # encrypted, used only by their fault
PROMPTS = ("Once upon a time", "The secret of the garden", "What is the secret word?", "Hello")
MAX_TOKENS = 12
# Adapters whose answers are another's (same weights): references come from the twin.
TWINS = {"e-revoke": "e-a", "e-budget": "e-a", "rt-a": "e-a", "rt-b": "e-b"}
# A stream cut short by a fault streams at most this many tokens first (references of this
# length are computed before each fault, while every adapter is healthy).
PREFIX_TOKENS = 32
# Streams that a fault interrupts are long enough that no scheduling delay of this process
# lets them finish before the fault lands (they are cut short by it, so they cost little).
LONG_TOKENS = 400
TOKEN = "soak-host-token-0123456789abcdef"
KEY_HOLDER_TIMEOUT = 10.0
# Stated bounds, per process, end of the run against the warm-up snapshot (both quiescent).
RSS_GROWTH_FACTOR = 1.25
RSS_GROWTH_SLACK_MIB = 128.0
FD_GROWTH = 8
THREAD_GROWTH = 4


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class SoakFailure(AssertionError):
    """An outcome other than the one stated for the load or a fault."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SoakFailure(message)


def wait_for(what: str, check: Callable[[], bool], deadline_s: float = 180.0) -> None:
    """Wait on a condition (never a fixed sleep), failing with ``what`` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise SoakFailure(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(0.1)


# --- the key holder: every start goes through KeyHolderProcess.start() ------------------------


def _serve_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "vllm_tensafe.cli", "key-holder", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout


@dataclass(frozen=True)
class KeyHolderFlavour:
    """What the installed ``key-holder serve`` takes (its flags are evolving)."""

    knows_adapters: bool  # --adapters/--trusted-keys/--audit-log, one --he-secret per key

    @classmethod
    def detect(cls) -> KeyHolderFlavour:
        text = _serve_help()
        return cls(knows_adapters="--audit-log" in text and "--adapters" in text)


class KeyHolderProcess:
    """``vllm-tensafe key-holder serve`` on loopback as a child process that faults can kill,
    freeze and restart on the same port."""

    def __init__(self, workload: Workload, port: int | None = None) -> None:
        self.workload = workload
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workload.workdir / "key-holder.log"
        self.revoked_file = workload.workdir / "revoked.txt"
        self.revoked_file.write_text("")
        self.audit_log = workload.workdir / "key-holder-audit.jsonl"
        self.audit_log.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self, budget: int | None) -> list[str]:
        w = self.workload
        cmd = [sys.executable, "-m", "vllm_tensafe.cli", "key-holder", "serve"]
        for secret in dict.fromkeys(w.he_secrets.values()):
            cmd += ["--he-secret", str(secret)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--token-file", str(w.key_holder_tokens), "--revoked-file", str(self.revoked_file)]
        if budget is not None:
            cmd += ["--budget", str(budget)]
        if w.flavour.knows_adapters:
            cmd += ["--adapters", str(w.package_dir), "--trusted-keys", str(w.signing_pub)]
            cmd += ["--audit-log", str(self.audit_log)]
        return cmd

    def start(self, budget: int | None = None) -> None:
        """Start (or restart) it; ``budget``: ciphertexts per adapter for this run of it."""
        assert self.process is None or self.process.poll() is not None
        with open(self.log_path, "ab") as handle:
            self.process = subprocess.Popen(
                self.command(budget),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=os.environ.copy(),
            )
        wait_for("the key holder's /health", self.healthy, 120)

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                raise SoakFailure(f"key holder exited:\n{self.tail()}")
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to open connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)  # the kernel still accepts connections: "slow"

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def revoke(self, adapter: str) -> None:
        with open(self.revoked_file, "a", encoding="utf-8") as handle:
            handle.write(adapter + "\n")

    def tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""


# --- models, keys, packages ------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    workdir: Path
    model: Path
    signing_pub: Path
    he_secrets: dict[str, Path]  # adapter name -> secret of the key it is packed under
    packages: dict[str, Path]  # encrypted adapters, by name (all in package_dir)
    package_dir: Path
    plain: Path
    adapter_dir: Path  # the runtime folder (TENSAFE_ADAPTER_DIR)
    host_token: Path
    key_holder_tokens: Path
    flavour: KeyHolderFlavour


def _cli(*argv: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON report
        code = tensafe_cli(list(argv))
    if code:
        raise SoakFailure(f"vllm-tensafe {' '.join(argv[:2])} failed with {code}")


def build_workload(workdir: Path, model: Path | None = None) -> Workload:
    """Everything the soak serves, built once per folder (builders are idempotent)."""
    from tests.support.builders import build_tiny_model, make_adapter

    workdir.mkdir(parents=True, exist_ok=True)
    flavour = KeyHolderFlavour.detect()
    model = model or build_tiny_model(workdir / "tiny-llama", "llama", seed=0)
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    if not (keys / "owner.key").exists():
        _cli("keygen", "signing", "--out", str(keys / "owner"))

    def he_key(name: str) -> Path:
        # One CKKS key per adapter where the key holder enforces it; else the owner's one key.
        prefix = keys / (f"he-{name}" if flavour.knows_adapters else "he-owner")
        if not prefix.with_suffix(".secret").exists():
            _cli("keygen", "he", "--out", str(prefix))
        return prefix

    a = make_adapter(model, workdir / "peft" / "a", rank=8, alpha=16, seed=11)
    b = make_adapter(model, workdir / "peft" / "b", rank=8, alpha=16, seed=31)
    # The fault-only adapters are e-a's weights under their own name (and key): their
    # references are e-a's answers, computed while e-a is healthy (see TWINS).
    peft = {"e-a": a, "e-b": b, "e-revoke": a, "e-budget": a}
    plain = make_adapter(model, workdir / "peft" / "c", rank=8, alpha=16, seed=61)
    from vllm_tensafe.tssp.format import FORMAT_VERSION

    # Per format version: packages cached by an older version would be refused.
    package_dir = workdir / f"packages-v{FORMAT_VERSION}"
    package_dir.mkdir(exist_ok=True)
    packages, secrets = {}, {}
    for name, adapter in peft.items():
        prefix = he_key(name)
        out = package_dir / f"{name}.tssp"
        if not out.exists():
            _cli(
                "pack", str(adapter), "--base-model", str(model),
                "--signing-key", str(keys / "owner.key"),
                "--he-public", str(prefix.with_suffix(".public")),
                "-o", str(out), "--name", name, "--quiet",
            )  # fmt: skip
        packages[name] = out
        secrets[name] = prefix.with_suffix(".secret")
    adapter_dir = workdir / "runtime-adapters"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter_dir.mkdir()
    host_token = workdir / "host-token"
    host_token.write_text(TOKEN + "\n")
    key_holder_tokens = workdir / "key-holder-tokens"
    key_holder_tokens.write_text(TOKEN + "\n")
    for secret_file in (host_token, key_holder_tokens):
        secret_file.chmod(0o600)
    return Workload(
        workdir=workdir,
        model=model,
        signing_pub=keys / "owner.pub",
        he_secrets=secrets,
        packages=packages,
        package_dir=package_dir,
        plain=plain,
        adapter_dir=adapter_dir,
        host_token=host_token,
        key_holder_tokens=key_holder_tokens,
        flavour=flavour,
    )


def vllm_server(workload: Workload, key_holder: KeyHolderProcess, max_loras: int) -> VllmServer:
    w = workload
    args = [
        "--served-model-name", BASE,
        "--enable-tensafe",
        "--tensafe-trusted-keys", str(w.signing_pub),
        "--tensafe-key-holder", "remote",
        "--tensafe-key-holder-url", key_holder.url,
        "--tensafe-key-holder-token-file", str(w.host_token),
        "--tensafe-key-holder-timeout", str(KEY_HOLDER_TIMEOUT),
        "--tensafe-key-holder-retries", "1",
        "--tensafe-adapter-dir", str(w.adapter_dir),
        "--max-loras", str(max_loras),
        "--max-lora-rank", "8",
        "--max-num-seqs", "32",
        "--lora-modules",
        *(f"{name}={path}" for name, path in w.packages.items()),
        f"{PLAINTEXT}={w.plain}",
    ]  # fmt: skip
    return VllmServer(
        w.model,
        args,
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
        startup_timeout=900,
        log_path=w.workdir / "vllm.log",
    )


# --- requests ---------------------------------------------------------------------------------


@dataclass
class Answer:
    model: str
    prompt: str
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    started: float = 0.0
    first_chunk: float | None = None
    ended: float = 0.0


def stream(
    client: Any, model: str, prompt: str, max_tokens: int, first: threading.Event | None = None
) -> Answer:
    """One streamed completion; the error (if any) is kept, never raised."""
    answer = Answer(model, prompt, max_tokens, started=time.monotonic())
    try:
        chunks = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        for chunk in chunks:
            for choice in chunk.choices:
                answer.tokens.extend(getattr(choice, "token_ids", None) or ())
            if answer.tokens and answer.first_chunk is None:
                answer.first_chunk = time.monotonic()
                if first is not None:
                    first.set()
    except Exception as exc:  # the outcome under test: kept and classified by the caller
        answer.error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        status = getattr(exc, "status_code", None)
        if status is not None:
            answer.error = f"HTTP {status} {answer.error}"
    answer.ended = time.monotonic()
    return answer


def complete(client: Any, model: str, prompt: str, max_tokens: int) -> Answer:
    """One completion without streaming: a refusal is an HTTP status (kept, never raised)."""
    answer = Answer(model, prompt, max_tokens, started=time.monotonic())
    try:
        reply = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        answer.tokens = list(reply.choices[0].token_ids)
    except Exception as exc:  # the outcome under test
        status = getattr(exc, "status_code", None)
        answer.error = f"HTTP {status} " if status is not None else ""
        answer.error += f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
    answer.ended = time.monotonic()
    return answer


def make_client(server: VllmServer) -> Any:
    return openai_client(f"{server.base_url}/v1", timeout=600)


class References:
    """Each (model, prompt, max_tokens) answered alone, computed once (greedy: a fixed answer).

    A reference for fewer tokens is the prefix of a longer one, so prefixes are served from
    the longest answer known."""

    def __init__(self, server: VllmServer) -> None:
        self.client = make_client(server)
        self._known: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()

    def get(self, model: str, prompt: str, max_tokens: int) -> list[int]:
        model = TWINS.get(model, model)
        with self._lock:
            known = self._known.get((model, prompt), [])
            if len(known) >= max_tokens:
                return known[:max_tokens]
            answer = stream(self.client, model, prompt, max_tokens)
            expect(
                answer.error is None and len(answer.tokens) == max_tokens,
                f"reference {model!r}/{prompt!r} failed: {answer.error}",
            )
            self._known[(model, prompt)] = answer.tokens
            return answer.tokens


# --- steady load -----------------------------------------------------------------------------


@dataclass
class LoadReport:
    clients: int
    seconds: float
    requests: int = 0
    tokens: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    by_model: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "tokens": self.tokens,
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "by_model": self.by_model,
        }


class Traffic:
    """N client threads streaming ``jobs`` round-robin until stopped; every answer checked."""

    def __init__(
        self,
        server: VllmServer,
        references: References,
        models: Sequence[str],
        clients: int,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self.server = server
        self.references = references
        self.jobs = [(m, p) for p in PROMPTS for m in models]
        self.clients = clients
        self.max_tokens = max_tokens
        self.report = LoadReport(clients=clients, seconds=0.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    def _client_loop(self, index: int) -> None:
        client = make_client(self.server)
        try:
            i = index
            while not self._stop.is_set():
                model, prompt = self.jobs[i % len(self.jobs)]
                i += self.clients
                answer = stream(client, model, prompt, self.max_tokens)
                want = self.references.get(model, prompt, self.max_tokens)
                with self._lock:
                    self.report.requests += 1
                    self.report.tokens += len(answer.tokens)
                    self.report.by_model[model] = self.report.by_model.get(model, 0) + 1
                    if answer.error is not None or answer.tokens != want:
                        self.report.errors.append(
                            {"model": model, "prompt": prompt, "error": answer.error,
                             "got": answer.tokens[:16], "want": want[:16]}
                        )  # fmt: skip
        finally:
            client.close()

    def start(self) -> Traffic:
        self._started = time.monotonic()
        for index in range(self.clients):
            thread = threading.Thread(target=self._client_loop, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=900)
            expect(not thread.is_alive(), "a client thread did not finish its last request")
        self.report.seconds = time.monotonic() - self._started
        return self.report

    def wait_requests(self, count: int) -> None:
        wait_for(f"{count} requests of traffic", lambda: self.report.requests >= count, 600)

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


# --- resources ------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def resources(server: VllmServer, key_holder: KeyHolderProcess) -> dict[str, dict[str, float]]:
    """RSS (MiB), open files and threads of every vLLM process and of the key holder."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    assert server.process is not None
    procs = [("vllm", p) for p in _tree(server.process.pid)]
    procs += [("key-holder", p) for p in _tree(key_holder.pid)[:1]]
    for role, proc in procs:
        try:
            with proc.oneshot():
                # The key holder is restarted by faults: one label for all its processes.
                label = role if role == "key-holder" else f"{role}:{proc.name()}:{proc.pid}"
                out[label] = {
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "fds": proc.num_fds(),
                    "threads": proc.num_threads(),
                }
        except psutil.NoSuchProcess:
            continue
    return out


def quiescent_resources(server: VllmServer, key_holder: KeyHolderProcess) -> dict[str, Any]:
    """A snapshot once open files and threads stop changing (connections closing, workers
    parking), so that two snapshots compare like with like."""
    previous: dict[str, Any] = {}
    snapshot: dict[str, Any] = {}

    def settled() -> bool:
        nonlocal previous, snapshot
        snapshot = resources(server, key_holder)
        counts = {k: (v["fds"], v["threads"]) for k, v in snapshot.items()}
        stable = counts == previous
        previous = counts
        if not stable:
            time.sleep(1.0)  # compare one second apart
        return stable

    wait_for("open files and threads to settle", settled, 120)
    return snapshot


def check_resources(warm: dict[str, Any], end: dict[str, Any]) -> list[str]:
    """Violations of the stated bounds, per process present in both snapshots."""
    problems = []
    for label, before in warm.items():
        after = end.get(label)
        if after is None:
            problems.append(f"{label} is gone")
            continue
        limit = before["rss_mib"] * RSS_GROWTH_FACTOR + RSS_GROWTH_SLACK_MIB
        if after["rss_mib"] > limit:
            problems.append(f"{label}: RSS {after['rss_mib']} MiB > bound {limit:.0f} MiB")
        if after["fds"] > before["fds"] + FD_GROWTH:
            problems.append(f"{label}: open files {before['fds']} -> {after['fds']}")
        if after["threads"] > before["threads"] + THREAD_GROWTH:
            problems.append(f"{label}: threads {before['threads']} -> {after['threads']}")
    return problems


# --- faults ---------------------------------------------------------------------------------


@dataclass
class Soak:
    """One server, one key holder, the references and the steady traffic models."""

    workload: Workload
    server: VllmServer
    key_holder: KeyHolderProcess
    references: References
    clients: int

    def recover(self) -> None:
        """After a failed fault: the key holder running and answering again."""
        process = self.key_holder.process
        if process is not None and process.poll() is None:
            self.key_holder.thaw()
            return
        self.key_holder.start()

    def http(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{self.server.base_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def background(self, models: Sequence[str]) -> Traffic:
        return Traffic(self.server, self.references, models, max(2, self.clients // 2))

    def long_streams(self, models: Sequence[str]) -> tuple[list[threading.Thread], list[Answer]]:
        """One long stream per model; returns once every one has streamed a token."""
        answers: list[Answer] = []
        threads, events = [], []
        for i, model in enumerate(models):
            first = threading.Event()
            events.append(first)

            def run(model: str = model, prompt: str = PROMPTS[i % 2], first=first) -> None:
                client = make_client(self.server)
                try:
                    answers.append(stream(client, model, prompt, LONG_TOKENS, first))
                finally:
                    first.set()
                    client.close()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            threads.append(thread)
        wait_for("every long stream's first token", lambda: all(e.is_set() for e in events), 600)
        return threads, answers

    @staticmethod
    def join(threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join(timeout=900)
            expect(not thread.is_alive(), "a stream did not end")

    def prepare(self, models: Sequence[str]) -> None:
        """References of PREFIX_TOKENS for the long streams, before the fault."""
        for model in models:
            for prompt in PROMPTS[:2]:
                self.references.get(model, prompt, PREFIX_TOKENS)

    def check_cut_short(self, answers: list[Answer], *words: str) -> list[dict[str, Any]]:
        """Every stream failed with an error naming ``words`` soon after the fault, and
        what it streamed before is its own answer's prefix (never a base answer)."""
        out = []
        for answer in answers:
            expect(answer.error is not None, f"{answer.model} finished despite the fault")
            lowered = answer.error.lower()
            expect(
                all(w in lowered for w in words) and answer.model in answer.error,
                f"{answer.model} failed with an unexpected error: {answer.error}",
            )
            expect(
                len(answer.tokens) <= PREFIX_TOKENS,
                f"{answer.model} streamed {len(answer.tokens)} tokens past the fault",
            )
            want = self.references.get(answer.model, answer.prompt, PREFIX_TOKENS)
            expect(
                answer.tokens == want[: len(answer.tokens)],
                f"{answer.model}: the tokens streamed before the fault are not its own",
            )
            out.append({"model": answer.model, "tokens_before_error": len(answer.tokens)})
        return out

    def check_served(self, models: Sequence[str]) -> None:
        client = make_client(self.server)
        try:
            for model in models:
                answer = stream(client, model, PROMPTS[0], MAX_TOKENS)
                want = self.references.get(model, PROMPTS[0], MAX_TOKENS)
                expect(
                    answer.error is None and answer.tokens == want,
                    f"{model} after the fault: {answer.error or answer.tokens}",
                )
        finally:
            client.close()

    def check_background(self, report: LoadReport) -> dict[str, Any]:
        expect(report.requests > 0, "no background request completed during the fault")
        expect(not report.errors, f"unaffected requests failed: {report.errors[:3]}")
        return {"background_requests": report.requests}


def fault_key_holder_restart(soak: Soak) -> dict[str, Any]:
    """Key holder killed (SIGKILL) with encrypted streams in flight and restarted: the
    streams fail with the key-holder error after a correct prefix (never a base answer),
    requests meanwhile fail with 503, base and plaintext requests are unaffected, and after
    the restart encrypted requests succeed without restarting vLLM."""
    server_pid = soak.server.process.pid  # type: ignore[union-attr]
    soak.prepare(ENCRYPTED)
    with soak.background([BASE, PLAINTEXT]).running() as bg:
        threads, answers = soak.long_streams(ENCRYPTED)
        soak.key_holder.kill()
        soak.join(threads)
        cut = soak.check_cut_short(answers, "key holder")
        with contextlib.closing(make_client(soak.server)) as client:
            down = complete(client, ENCRYPTED[0], PROMPTS[0], MAX_TOKENS)
        expect(
            down.error is not None and "503" in down.error and not down.tokens,
            f"a request while the key holder is down: {down.error or down.tokens}",
        )
        bg.wait_requests(bg.report.requests + 2)
    soak.key_holder.start()
    soak.check_served(ENCRYPTED)
    expect(soak.server.process.pid == server_pid and soak.server.healthy(), "vLLM restarted")
    return {"streams": cut, "while_down": down.error, **soak.check_background(bg.report)}


def fault_key_holder_slow(soak: Soak) -> dict[str, Any]:
    """Key holder frozen (SIGSTOP) past --tensafe-key-holder-timeout: in-flight encrypted
    streams fail with the timeout after a correct prefix, other requests are unaffected, and
    once it answers again (SIGCONT) encrypted requests succeed."""
    soak.prepare(ENCRYPTED)
    with soak.background([BASE, PLAINTEXT]).running() as bg:
        threads, answers = soak.long_streams(ENCRYPTED)
        soak.key_holder.freeze()
        try:
            soak.join(threads)
        finally:
            soak.key_holder.thaw()
        cut = soak.check_cut_short(answers, "key holder", "did not answer")
        bg.wait_requests(bg.report.requests + 2)
    soak.check_served(ENCRYPTED)
    return {"streams": cut, **soak.check_background(bg.report)}


def fault_revocation(soak: Soak) -> dict[str, Any]:
    """An adapter revoked while its streams run: they fail with "revoked" after a correct
    prefix, new requests of it are refused (403), and the other encrypted adapter keeps
    being served (it shares the key holder, not the revocation)."""
    name = "e-revoke"
    soak.prepare([name])
    with soak.background([ENCRYPTED[0], BASE]).running() as bg:
        threads, answers = soak.long_streams([name, name])
        # Frozen while the line is written, so no stream can run on past the revocation.
        soak.key_holder.freeze()
        try:
            soak.key_holder.revoke(name)
        finally:
            soak.key_holder.thaw()
        soak.join(threads)
        cut = soak.check_cut_short(answers, "revoked")
        with contextlib.closing(make_client(soak.server)) as client:
            after = complete(client, name, PROMPTS[0], MAX_TOKENS)
        expect(
            after.error is not None and "403" in after.error and not after.tokens,
            f"{name} after its revocation: {after.error or after.tokens}",
        )
        bg.wait_requests(bg.report.requests + 2)
    return {"streams": cut, "after": after.error, **soak.check_background(bg.report)}


def fault_budget(soak: Soak) -> dict[str, Any]:
    """An adapter's decryption budget running out mid-stream: the key holder is restarted
    with a small per-adapter budget; the stream of the budgeted adapter fails with the budget
    error after a correct prefix; base and plaintext requests are unaffected. The key holder
    then runs without a budget again."""
    name = "e-budget"
    budget = 24  # ciphertexts: a few decode steps
    soak.prepare([name])
    soak.key_holder.stop()
    soak.key_holder.start(budget=budget)
    try:
        with soak.background([BASE, PLAINTEXT]).running() as bg:
            threads, answers = soak.long_streams([name])
            soak.join(threads)
            cut = soak.check_cut_short(answers, "budget")
            bg.wait_requests(bg.report.requests + 2)
    finally:
        soak.key_holder.stop()
        soak.key_holder.start()
    soak.check_served(ENCRYPTED)
    return {"budget": budget, "streams": cut, **soak.check_background(bg.report)}


def fault_unload_in_use(soak: Soak) -> dict[str, Any]:
    """An adapter loaded at runtime (from the adapter folder) and unloaded while its streams
    run: the streams finish with their full, correct answer; after the unload its name is
    unknown (404); loading it again serves it again."""
    package = soak.workload.adapter_dir / "runtime-a.tssp"
    shutil.copy(soak.workload.packages[ENCRYPTED[0]], package)
    name = "rt-a"  # not runtime-a: the on-demand resolver must not bring it back by name

    def load() -> None:
        code, body = soak.http(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": package.name}
        )
        expect(code == 200, f"load {name}: {code} {body}")

    load()
    tokens = 64
    client = make_client(soak.server)
    results: list[Answer] = []
    first = threading.Event()
    thread = threading.Thread(
        target=lambda: results.append(stream(client, name, PROMPTS[0], tokens, first)), daemon=True
    )
    thread.start()
    wait_for(f"{name}'s first token", first.is_set, 600)
    code, body = soak.http("/v1/unload_lora_adapter", {"lora_name": name})
    unloaded_at = time.monotonic()
    expect(code == 200, f"unload {name}: {code} {body}")
    soak.join([thread])
    (answer,) = results
    want = soak.references.get(ENCRYPTED[0], PROMPTS[0], tokens)  # the same package
    expect(answer.error is None and answer.tokens == want, f"{name} in flight: {answer.error}")
    after = stream(client, name, PROMPTS[0], MAX_TOKENS)
    expect(after.error is not None and "404" in after.error, f"{name} after unload: {after}")
    load()
    again = stream(client, name, PROMPTS[0], MAX_TOKENS)
    expect(again.error is None and again.tokens == want[:MAX_TOKENS], f"{name} reloaded: {again}")
    soak.http("/v1/unload_lora_adapter", {"lora_name": name})
    client.close()
    return {"in_flight_at_unload": answer.ended > unloaded_at, "after_unload": after.error}


def fault_package_replaced(soak: Soak) -> dict[str, Any]:
    """The package file of a loaded adapter replaced on disk (a new file renamed over it, as
    a deploy does), first by bytes that are not a package, then by another valid package,
    then restored. vLLM reads the path again whenever the adapter was evicted from its cache
    (--max-loras 2, five adapters in rotation). Expected: each request gets the loaded
    package's own answer, or fails with an error that names the package problem (never a
    base answer, never the other package's answer); the server stays up; once the file is
    restored, the adapter is served again."""
    package = soak.workload.adapter_dir / "runtime-b.tssp"
    original_bytes = soak.workload.packages[ENCRYPTED[1]].read_bytes()
    package.write_bytes(original_bytes)
    name = "rt-b"
    code, body = soak.http("/v1/load_lora_adapter", {"lora_name": name, "lora_path": package.name})
    expect(code == 200, f"load {name}: {code} {body}")
    original = soak.references.get(name, PROMPTS[0], MAX_TOKENS)
    client = make_client(soak.server)
    outcomes: dict[str, list[str]] = {}

    def replace(data: bytes) -> None:
        tmp = package.with_name(f".{package.name}.new")
        tmp.write_bytes(data)
        os.replace(tmp, package)

    def ask_after_eviction(label: str, problem: str | None) -> None:
        seen = []
        for _ in range(3):
            # Three other adapters first: with two slots and a two-adapter cache, rt-b is
            # evicted and its path read again on its next request.
            for other in (*ENCRYPTED, PLAINTEXT):
                stream(client, other, PROMPTS[1], 2)
            answer = stream(client, name, PROMPTS[0], MAX_TOKENS)
            if answer.error is None:
                expect(answer.tokens == original, f"{name} with {label}: not its own answer")
                seen.append("original")
                continue
            expect(
                problem is not None and problem in answer.error and "base model" in answer.error,
                f"{name} with {label}: unexpected error {answer.error}",
            )
            expect(not answer.tokens, f"{name} with {label}: tokens before the error")
            seen.append("refused")
        outcomes[label] = seen
        expect(soak.server.healthy(), f"server unhealthy after {label}")

    with soak.background([BASE]).running() as bg:
        replace(b"TSSP but not a package" * 64)
        ask_after_eviction("bytes that are not a package", "Invalid TSSP package")
        replace(soak.workload.packages[ENCRYPTED[0]].read_bytes())
        ask_after_eviction("another valid package", "changed on disk")
        replace(original_bytes)
        ask_after_eviction("the original restored", None)
        bg.wait_requests(bg.report.requests + 2)
    expect("refused" in outcomes["bytes that are not a package"], "the broken file was never read")
    expect(outcomes["the original restored"][-1] == "original", "not served after the restore")
    soak.http("/v1/unload_lora_adapter", {"lora_name": name})
    client.close()
    soak.check_served([*ENCRYPTED, PLAINTEXT])
    return {"outcomes": outcomes, **soak.check_background(bg.report)}


def fault_runtime_churn(soak: Soak, cycles: int = 12) -> dict[str, Any]:
    """Adapters loaded, used and unloaded at runtime again and again (each load is a new
    adapter id for vLLM): every answer is right, and the worker's memory stays bounded by
    the adapters vLLM keeps, not by how many were ever loaded."""
    package = soak.workload.adapter_dir / "churn.tssp"
    shutil.copy(soak.workload.packages[ENCRYPTED[0]], package)
    want = soak.references.get(ENCRYPTED[0], PROMPTS[0], MAX_TOKENS)
    client = make_client(soak.server)

    def worker_rss() -> float:
        return max(
            v["rss_mib"]
            for k, v in resources(soak.server, soak.key_holder).items()
            if "Worker" in k
        )

    def cycle(i: int) -> None:
        name = f"churn-{i}"
        code, body = soak.http(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": package.name}
        )
        expect(code == 200, f"load {name}: {code} {body}")
        answer = stream(client, name, PROMPTS[0], MAX_TOKENS)
        expect(answer.error is None and answer.tokens == want, f"{name}: {answer.error}")
        code, body = soak.http("/v1/unload_lora_adapter", {"lora_name": name})
        expect(code == 200, f"unload {name}: {code} {body}")
        for other in (*ENCRYPTED, PLAINTEXT):  # push it out of vLLM's adapter cache
            stream(client, other, PROMPTS[1], 2)

    for i in range(2):  # vLLM's cache and the allocator reach their steady size first
        cycle(i)
    before = worker_rss()
    for i in range(2, cycles):
        cycle(i)
    after = worker_rss()
    client.close()
    package_mib = package.stat().st_size / 2**20
    # Each cycle loads a new copy of a package_mib package: keeping them would add that much
    # per cycle. Bound: two packages' worth, whatever the number of cycles.
    expect(
        after - before <= 2 * package_mib + RSS_GROWTH_SLACK_MIB / 2,
        f"worker RSS {before:.0f} -> {after:.0f} MiB over {cycles - 2} load/unload cycles "
        f"of a {package_mib:.0f} MiB package",
    )
    return {"cycles": cycles, "worker_rss_mib": [round(before), round(after)]}


FAULTS: dict[str, Callable[[Soak], dict[str, Any]]] = {
    "key-holder-restart": fault_key_holder_restart,
    "key-holder-slow": fault_key_holder_slow,
    "revocation": fault_revocation,
    "budget": fault_budget,
    "unload-in-use": fault_unload_in_use,
    "package-replaced": fault_package_replaced,
    "runtime-churn": fault_runtime_churn,
}


# --- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def soak_session(workload: Workload, clients: int, max_loras: int = 2) -> Iterator[Soak]:
    """Key holder, then vLLM; both stopped on the way out."""
    key_holder = KeyHolderProcess(workload)
    key_holder.start()
    try:
        server = vllm_server(workload, key_holder, max_loras)
        log(f"starting vLLM (log: {workload.workdir / 'vllm.log'})")
        with server:
            yield Soak(workload, server, key_holder, References(server), clients)
    finally:
        key_holder.stop()


def steady_models() -> list[str]:
    return [BASE, *ENCRYPTED, PLAINTEXT]


def warm_up(soak: Soak) -> dict[str, Any]:
    """References for every steady job, one round of load at full concurrency (pools grown),
    then the quiescent snapshot the end of the run is compared with."""
    for model in steady_models():
        for prompt in PROMPTS:
            soak.references.get(model, prompt, MAX_TOKENS)
    traffic = Traffic(soak.server, soak.references, steady_models(), soak.clients)
    with traffic.running():
        traffic.wait_requests(2 * soak.clients)
    expect(not traffic.report.errors, f"warm-up errors: {traffic.report.errors[:3]}")
    return quiescent_resources(soak.server, soak.key_holder)


def steady_load(soak: Soak, seconds: float) -> LoadReport:
    traffic = Traffic(soak.server, soak.references, steady_models(), soak.clients)
    with traffic.running():
        deadline = time.monotonic() + seconds
        wait_for("the end of the load period", lambda: time.monotonic() >= deadline, seconds + 60)
    return traffic.report


def run(args: argparse.Namespace) -> dict[str, Any]:
    workload = build_workload(Path(args.workdir).resolve())
    faults = list(FAULTS) if args.faults == "all" else [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise SystemExit(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    report: dict[str, Any] = {"clients": args.clients, "minutes": args.minutes, "faults": {}}
    with soak_session(workload, args.clients) as soak:
        report["warm"] = warm_up(soak)
        log(f"load: {args.clients} clients for {args.minutes} min")
        load = steady_load(soak, args.minutes * 60)
        report["load"] = load.as_dict()
        for name in faults:
            log(f"fault: {name}")
            try:
                report["faults"][name] = {"ok": True, **FAULTS[name](soak)}
            except SoakFailure as exc:
                log(f"fault {name}: FAILED: {exc}")
                report["faults"][name] = {"ok": False, "failure": str(exc)}
                soak.recover()
        report["end"] = quiescent_resources(soak.server, soak.key_holder)
    report["resource_problems"] = check_resources(report["warm"], report["end"])
    report["bounds"] = {
        "rss": f"end <= warm * {RSS_GROWTH_FACTOR} + {RSS_GROWTH_SLACK_MIB:.0f} MiB",
        "fds": f"end <= warm + {FD_GROWTH}",
        "threads": f"end <= warm + {THREAD_GROWTH}",
    }
    report["ok"] = (
        not load.errors
        and all(f["ok"] for f in report["faults"].values())
        and not report["resource_problems"]
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="steady load (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="streaming clients (default 8)")
    parser.add_argument(
        "--faults", default="", help=f"comma-separated, or 'all': {', '.join(FAULTS)}"
    )
    parser.add_argument("--workdir", default="bench-out/soak")
    parser.add_argument("--out", help="write the JSON here as well")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
