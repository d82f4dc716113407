"""Fail the requests of an encrypted adapter, not the server, when its key holder fails.

A key-holder failure happens inside the model forward pass, in a worker process, where an
exception would kill the engine and every other request with it. Instead:

1. the worker records the failure on a ``FailureBoard`` and stops asking the key holder for
   that adapter for the rest of the forward pass;
2. the engine core, right after the step, drops every token the step computed for that
   adapter's requests (they lack the adapter's delta), evicts their KV blocks from the prefix
   cache, and finishes those requests with ``FINISHED_ERROR``;
3. the API server turns that error into an HTTP error whose message names the cause.

The board is a folder (``TENSAFE_RUN_DIR``) shared by the processes of one vLLM instance:
the process that activates TenSafe first creates it, and the processes vLLM spawns inherit it.
Adapter records are kept per engine: one vLLM instance may run several engine cores (one per
data-parallel rank), each with its own workers and its own scheduler, and the same
``lora_int_id`` on all of them. Each executor gets an engine id (``TENSAFE_ENGINE_ID``, which
the worker processes it starts inherit), workers write under that id, and an engine core takes
only its own records: a failure seen by one engine's workers fails that engine's requests,
never is taken and lost by another engine. Request records are keyed by the request id, which
the API server makes unique across engines.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.vllm import patches

logger = logging.getLogger("vllm_tensafe.failures")

RUN_DIR_ENV = "TENSAFE_RUN_DIR"
ENGINE_ENV = "TENSAFE_ENGINE_ID"
ANONYMOUS_ENGINE = "engine"
# Request records older than this are dropped: the API server reads them within one step.
_REQUEST_RECORD_TTL = 600.0
# Set by the engine core around each step: workers that run in the engine core's own thread
# (uniprocess executor) find their engine here even when one process holds several engines.
_current_engine: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tensafe_engine", default=None
)


def _safe_key(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:200]


def new_engine_id(data_parallel_rank: int | None) -> str:
    """A fresh id for one engine core and its workers (unique across instances and ranks)."""
    return f"dp{data_parallel_rank or 0}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def current_engine_id() -> str:
    """The engine this process (or this engine-core thread) computes for."""
    return _current_engine.get() or os.environ.get(ENGINE_ENV) or ANONYMOUS_ENGINE


@functools.cache
def _forward_context_api() -> tuple[Callable[[], bool], Callable[[], object]] | None:
    try:
        return (
            patches.resolve("is_forward_context_available"),
            patches.resolve("get_forward_context"),
        )
    except (ImportError, ConfigError):
        return None


def _forward_pass() -> object | None:
    """The forward pass running now: vLLM makes a new ForwardContext for each one."""
    api = _forward_context_api()
    if api is None:
        return None  # unknown: the worker asks the key holder again rather than skip
    available, current = api
    return current() if available() else None


class FailureBoard:
    """Adapter failures from workers to their engine core, request failures to the API server.

    ``step_token`` names the forward pass running now (None: unknown). A worker skips the key
    holder for an adapter only within the forward pass in which that adapter failed, which it
    tells from memory: the common path (no failure) touches no file, and a later pass, even one
    the engine core has not seen the results of yet (a batch queue), asks again and records its
    own failure.
    """

    def __init__(self, root: Path, step_token: Callable[[], object | None] = _forward_pass) -> None:
        self.root = root
        self._adapters = root / "adapters"
        self._requests = root / "requests"
        self._adapters.mkdir(parents=True, exist_ok=True)
        self._requests.mkdir(parents=True, exist_ok=True)
        self._step_token = step_token
        # (engine id, lora_int_id) -> the forward pass that failed (weakly: it is dropped
        # when vLLM is done with it).
        self._failed: dict[tuple[str, int], Callable[[], object | None]] = {}

    def _engine_dir(self, engine_id: str) -> Path:
        return self._adapters / _safe_key(engine_id)

    # worker side
    def record_adapter_failure(
        self, lora_int_id: int, adapter: str, exc: BaseException, engine_id: str | None = None
    ) -> None:
        engine_id = engine_id or current_engine_id()
        record = {
            "lora_int_id": lora_int_id,
            "adapter": adapter,
            "error": type(exc).__name__,
            "message": str(exc),
            "time": time.time(),
            "engine": engine_id,
            "pid": os.getpid(),
        }
        folder = self._engine_dir(engine_id)
        folder.mkdir(exist_ok=True)
        # One file per event (never overwritten): two workers of one engine (tensor parallel
        # ranks) or two passes may fail the same adapter; the engine core keeps the first.
        name = f"{lora_int_id}.{os.getpid()}.{uuid.uuid4().hex[:16]}.json"
        _write_json(folder / name, record)
        token = self._step_token()
        self._failed[(engine_id, lora_int_id)] = _ref(token)

    def has_adapter_failure(self, lora_int_id: int, engine_id: str | None = None) -> bool:
        """Whether this forward pass already failed for the adapter (no file access)."""
        if not self._failed:
            return False
        key = (engine_id or current_engine_id(), lora_int_id)
        failed_in = self._failed.get(key)
        if failed_in is None:
            return False
        now = self._step_token()
        if now is not None and failed_in() is now:
            return True
        del self._failed[key]  # an earlier pass: ask the key holder again
        return False

    # engine-core side
    def take_adapter_failures(self, engine_id: str | None = None) -> dict[int, dict[str, Any]]:
        """This engine's adapter failures since the last call, the first cause of each.

        Also takes the records of workers that know no engine id (an executor whose workers
        do not inherit the environment): failing too many requests beats missing a failure.
        """
        failures: dict[int, dict[str, Any]] = {}
        for engine in dict.fromkeys((engine_id or current_engine_id(), ANONYMOUS_ENGINE)):
            self._take_from(self._engine_dir(engine), failures)
        return failures

    @staticmethod
    def _take_from(folder: Path, failures: dict[int, dict[str, Any]]) -> None:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("."):  # a record still being written
                continue
            path = folder / name
            record = _read_json(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if record is None:
                continue
            lora_int_id = int(record["lora_int_id"])
            first = failures.get(lora_int_id)
            if first is None or record.get("time", 0) < first.get("time", 0):
                failures[lora_int_id] = record

    def record_request_failure(self, request_id: str, record: dict[str, Any]) -> None:
        _write_json(self._requests / f"{_safe_key(request_id)}.json", record)

    # API-server side
    def pop_request_failure(self, request_id: str) -> dict[str, Any] | None:
        """The record of the engine request ``request_id`` or of one derived from it."""
        key = _safe_key(request_id)
        try:
            names = os.listdir(self._requests)
        except FileNotFoundError:
            return None
        found = None
        now = time.time()
        for name in names:
            stem = name.removesuffix(".json")
            path = self._requests / name
            if stem == key or stem.startswith(f"{key}-"):
                found = _read_json(path)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                with contextlib.suppress(FileNotFoundError, OSError):
                    if now - path.stat().st_mtime > _REQUEST_RECORD_TTL:
                        path.unlink()
        return found


def _ref(token: object | None) -> Callable[[], object | None]:
    if token is None:
        return lambda: None
    try:
        return weakref.ref(token)
    except TypeError:  # not weak-referenceable: compare by identity while it lives
        return lambda: token


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


_board: FailureBoard | None = None


def ensure_run_dir() -> Path:
    """Create this vLLM instance's board folder once; spawned processes inherit the variable."""
    existing = os.environ.get(RUN_DIR_ENV)
    if existing and Path(existing).is_dir():
        return Path(existing)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="tensafe-run-", dir=base))
    os.environ[RUN_DIR_ENV] = str(path)
    atexit.register(_remove_run_dir, path, os.getpid())
    return path


def _remove_run_dir(path: Path, creator: int) -> None:
    # Only the process that made it (a forked child inherits this handler). Without this,
    # every vLLM start would leave a folder in /dev/shm.
    if os.getpid() == creator:
        shutil.rmtree(path, ignore_errors=True)


def get_board() -> FailureBoard:
    global _board
    if _board is None:
        _board = FailureBoard(ensure_run_dir())
    return _board


# --- engine core ----------------------------------------------------------------------------


def install_engine_core_hook() -> None:
    """Required: without it a key-holder failure would leave the tokens computed without the
    adapter's delta in the output. Idempotent."""
    patches.check_names(["EngineCoreOutput", "EngineCoreOutputs", "FinishReason", "RequestStatus"])
    for name in ("engine_core.step", "engine_core.step_with_batch_queue"):
        patches.replace(name, _wrap_step)
    patches.replace("executor.init", _wrap_executor_init)


def _wrap_executor_init(original: Any) -> Any:
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        # Before the original starts the workers: they inherit the variable (fork or spawn).
        engine_id = new_engine_id(getattr(vllm_config.parallel_config, "data_parallel_rank", 0))
        os.environ[ENGINE_ENV] = engine_id
        self._tensafe_engine_id = engine_id
        original(self, vllm_config, *args, **kwargs)

    return __init__


def _engine_id_of(engine_core: Any) -> str:
    executor = getattr(engine_core, "model_executor", None)
    return getattr(executor, "_tensafe_engine_id", None) or current_engine_id()


def _wrap_step(original: Any) -> Any:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        engine_id = _engine_id_of(self)
        encrypted = _encrypted_requests(self.scheduler)
        token = _current_engine.set(engine_id)
        try:
            result = original(self, *args, **kwargs)
        finally:
            _current_engine.reset(token)
        if not encrypted:
            return result
        failures = get_board().take_adapter_failures(engine_id)
        if failures:
            outputs = result[0] if isinstance(result, tuple) else None
            fail_adapter_requests(self.scheduler, outputs, encrypted, failures)
        return result

    return step


@dataclass(frozen=True)
class _Tracked:
    lora_int_id: int
    block_ids: frozenset[int]


def _encrypted_requests(scheduler: Any) -> dict[str, _Tracked]:
    """Requests of encrypted adapters, with their KV blocks as they were before the step."""
    from vllm_tensafe.vllm.loader import is_tssp_path

    tracked = {}
    for req_id, request in scheduler.requests.items():
        lora = getattr(request, "lora_request", None)
        if lora is not None and is_tssp_path(lora.lora_path):
            tracked[req_id] = _Tracked(lora.lora_int_id, _block_ids(scheduler, req_id))
    return tracked


def _block_ids(scheduler: Any, req_id: str) -> frozenset[int]:
    try:
        groups = scheduler.kv_cache_manager.get_block_ids(req_id)
    except Exception:  # not scheduled yet: no blocks
        return frozenset()
    return frozenset(b for group in groups for b in group)


def fail_adapter_requests(
    scheduler: Any,
    outputs: dict[int, Any] | None,
    encrypted: dict[str, _Tracked],
    failures: dict[int, dict[str, Any]],
) -> list[str]:
    engine_core_output = patches.resolve("EngineCoreOutput")
    engine_core_outputs = patches.resolve("EngineCoreOutputs")
    finish_reason = patches.resolve("FinishReason")
    request_status = patches.resolve("RequestStatus")

    lora_of = {req_id: item.lora_int_id for req_id, item in encrypted.items()}
    failed = {req_id for req_id, lora_id in lora_of.items() if lora_id in failures}
    if not failed:
        return []
    # KV computed without the adapter's delta must never be served again from the prefix
    # cache (a later request of the same adapter and prompt would silently reuse it).
    stale = set().union(*(encrypted[req_id].block_ids for req_id in failed))
    for req_id in failed:
        if req_id in scheduler.requests:
            stale.update(_block_ids(scheduler, req_id))
    if stale:
        scheduler.kv_cache_manager.block_pool.evict_blocks(stale)
    board = get_board()
    client_of: dict[str, int] = {}
    for req_id in failed:
        request = scheduler.requests.get(req_id)
        if request is not None:
            client_of[req_id] = request.client_index
        board.record_request_failure(req_id, failures[lora_of[req_id]])
        logger.error(
            "Request %s failed: encrypted adapter %r: %s",
            req_id,
            failures[lora_of[req_id]]["adapter"],
            failures[lora_of[req_id]]["message"],
        )
    # Tokens computed with a poisoned delta must never reach the client.
    if outputs is not None:
        for client_index, batch in outputs.items():
            kept = []
            for out in batch.outputs:
                if out.request_id in failed:
                    client_of.setdefault(out.request_id, client_index)
                else:
                    kept.append(out)
            batch.outputs = kept
    active = [req_id for req_id in failed if req_id in scheduler.requests]
    if active:
        scheduler.finish_requests(active, request_status.FINISHED_ERROR)
    if outputs is not None:
        for req_id, client_index in client_of.items():
            batch = outputs.get(client_index)
            if batch is None:
                batch = engine_core_outputs()
                outputs[client_index] = batch
            batch.outputs.append(
                engine_core_output(
                    request_id=req_id, new_token_ids=[], finish_reason=finish_reason.ERROR
                )
            )
            finished: set[str] = set(batch.finished_requests or ())
            finished.add(req_id)
            batch.finished_requests = finished
    return sorted(failed)


# --- API server -----------------------------------------------------------------------------


def install_api_error_hook() -> None:
    """Optional: without it a failed encrypted-adapter request still fails, but as vLLM's
    generic HTTP 500 instead of a 503/403 naming the key holder's error."""
    patches.optional("generate.raise_if_error", _install_api_error_hook, _API_HOOK_EFFECT)


_API_HOOK_EFFECT = (
    "naming the key holder's error in the HTTP answer (a failed encrypted-adapter request "
    "still fails, as vLLM's generic HTTP 500)"
)


def _install_api_error_hook() -> None:
    from http import HTTPStatus

    generation_error = patches.resolve("GenerationError")
    retryable_error = patches.resolve("RetryableRequestError")
    graceful = _graceful_bases(generation_error)

    class EncryptedAdapterUnavailable(retryable_error, *graceful):  # type: ignore[misc,valid-type]
        """The key holder could not be reached: retrying later may succeed (HTTP 503)."""

        def __init__(self, message: str) -> None:
            _init_error(self, retryable_error, message, HTTPStatus.SERVICE_UNAVAILABLE, graceful)

    class EncryptedAdapterRefused(generation_error, *graceful):  # type: ignore[misc,valid-type]
        """The key holder refused (revoked, budget, credentials, policy): HTTP 403."""

        def __init__(self, message: str) -> None:
            _init_error(self, generation_error, message, HTTPStatus.FORBIDDEN, graceful)

    def wrap(original: Any) -> Any:
        def _raise_if_error(
            self: Any, finish_reason: str | None, request_id: str, *args: Any, **kwargs: Any
        ) -> None:
            if finish_reason == "error":
                record = get_board().pop_request_failure(request_id)
                if record is not None:
                    message = (
                        f"encrypted adapter {record['adapter']!r} failed: {record['message']}. "
                        "Nothing was generated from the base model in its place."
                    )
                    if record.get("error") == "KeyHolderUnavailableError":
                        raise EncryptedAdapterUnavailable(message)
                    raise EncryptedAdapterRefused(message)
            return original(self, finish_reason, request_id, *args, **kwargs)

        return _raise_if_error

    patches.replace("generate.raise_if_error", wrap)
    if not graceful:
        return

    def wrap_stream(original: Any) -> Any:
        # vLLM names every generation error "InternalServerError" in a stream; ours carry
        # their status, so a streamed refusal says "Forbidden" as the unstreamed one does.
        def convert(self: Any, e: Any, *args: Any, **kwargs: Any) -> str:
            if isinstance(e, (EncryptedAdapterRefused, EncryptedAdapterUnavailable)):
                return self.create_streaming_error_response(e)
            return original(self, e, *args, **kwargs)

        return convert

    patches.optional(
        "generate.streaming_generation_error",
        lambda: patches.replace("generate.streaming_generation_error", wrap_stream),
        "naming a streamed encrypted-adapter refusal's type (it still fails, typed as "
        "InternalServerError)",
    )


def _graceful_bases(generation_error: type) -> tuple[type, ...]:
    """vLLM's GracefulHTTPError where it exists: an error of that class is answered with its
    own status as the error type ("Forbidden"), not as "InternalServerError"."""
    try:
        graceful = patches.resolve("GracefulHTTPError")
    except ConfigError as exc:
        logger.info("encrypted-adapter errors keep vLLM's error type: %s", exc.cause)
        return ()
    # Where the table's stand-in is GenerationError itself (0.26), there is nothing to add.
    return () if issubclass(generation_error, graceful) else (graceful,)


def _init_error(
    error: Any, base: type[Exception], message: str, status: Any, graceful: tuple[type, ...]
) -> None:
    if graceful:
        # The two bases' __init__ take different arguments: set what each of them reads.
        Exception.__init__(error, message)
        error.message, error.http_status = message, status
    else:
        base.__init__(error, message)
    error.status_code = status
