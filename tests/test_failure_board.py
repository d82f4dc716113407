"""The failure board between workers and engine cores, with two engines of one vLLM instance.

With ``--data-parallel-size 2`` two engine cores share one ``TENSAFE_RUN_DIR`` and the same
``lora_int_id`` for an adapter. Records keyed by ``lora_int_id`` alone let one engine core take
(and delete) the other's failure, and the engine that missed it returns tokens computed without
the adapter's delta. tests/e2e/test_data_parallel.py shows the outcome on a real server; these
tests show the board's rules directly, including the old keying losing a record.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vllm_tensafe.errors import AdapterRevokedError, KeyHolderUnavailableError
from vllm_tensafe.vllm import failures
from vllm_tensafe.vllm.failures import ANONYMOUS_ENGINE, ENGINE_ENV, FailureBoard

ENGINE_A = "dp0-100-aaaaaaaaaaaa"
ENGINE_B = "dp1-101-bbbbbbbbbbbb"


class Passes:
    """Stands in for vLLM's ForwardContext: one object per forward pass."""

    def __init__(self) -> None:
        self.current: object | None = object()

    def next(self) -> None:
        self.current = object()

    def __call__(self) -> object | None:
        return self.current


@pytest.fixture
def passes() -> Passes:
    return Passes()


def _boards(root: Path, passes: Passes) -> tuple[FailureBoard, FailureBoard, FailureBoard]:
    """Worker of engine A, worker of engine B, and an engine core: three processes' boards."""
    return (FailureBoard(root, passes), FailureBoard(root, passes), FailureBoard(root, passes))


def test_each_engine_takes_only_its_own_failures(tmp_path: Path, passes: Passes) -> None:
    worker_a, worker_b, core = _boards(tmp_path, passes)
    worker_a.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), ENGINE_A)
    worker_b.record_adapter_failure(2, "e-y", AdapterRevokedError("revoked"), ENGINE_B)
    worker_b.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), ENGINE_B)

    taken_a = core.take_adapter_failures(ENGINE_A)
    assert set(taken_a) == {1} and taken_a[1]["engine"] == ENGINE_A
    # Engine A's take left engine B's records alone, both of them.
    taken_b = core.take_adapter_failures(ENGINE_B)
    assert set(taken_b) == {1, 2} and {r["engine"] for r in taken_b.values()} == {ENGINE_B}
    # Taken once: the next step of either engine sees nothing.
    assert core.take_adapter_failures(ENGINE_A) == {}
    assert core.take_adapter_failures(ENGINE_B) == {}


def test_one_engine_id_for_both_loses_a_failure(tmp_path: Path, passes: Passes) -> None:
    """The old keying (one namespace for every engine): engine A's core takes engine B's
    record, and engine B, which computed the tokens without the delta, never learns of it."""
    worker_a, worker_b, core = _boards(tmp_path, passes)
    shared = "one-namespace"
    worker_b.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), shared)
    stolen = core.take_adapter_failures(shared)  # engine A's step ends first
    assert set(stolen) == {1}
    assert core.take_adapter_failures(shared) == {}  # engine B's step: nothing to fail
    assert worker_a.take_adapter_failures(ENGINE_A) == {}  # and per-engine ids do not share


def test_first_cause_is_kept_across_workers_of_one_engine(tmp_path: Path, passes: Passes) -> None:
    rank0, rank1, core = _boards(tmp_path, passes)  # two tensor-parallel ranks of engine A
    rank0.record_adapter_failure(1, "e-x", KeyHolderUnavailableError("down first"), ENGINE_A)
    rank1.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked later"), ENGINE_A)
    taken = core.take_adapter_failures(ENGINE_A)
    assert taken[1]["error"] == "KeyHolderUnavailableError"
    assert taken[1]["message"].startswith("down first")
    assert os.listdir(tmp_path / "adapters" / ENGINE_A) == []


def test_worker_skips_only_within_the_failed_pass(tmp_path: Path, passes: Passes) -> None:
    worker, _, core = _boards(tmp_path, passes)
    assert not worker.has_adapter_failure(1, ENGINE_A)
    worker.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), ENGINE_A)
    assert worker.has_adapter_failure(1, ENGINE_A)  # later layers of the same pass
    assert not worker.has_adapter_failure(2, ENGINE_A)  # another adapter: asked as usual
    assert not worker.has_adapter_failure(1, ENGINE_B)  # the same id on another engine
    passes.next()
    # A later pass asks again, even before the engine core took the first record (a batch
    # queue runs the next pass before the last one's results are processed) ...
    assert not worker.has_adapter_failure(1, ENGINE_A)
    worker.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked again"), ENGINE_A)
    # ... and its own failure is recorded too, so neither pass's requests are missed.
    assert len(os.listdir(tmp_path / "adapters" / ENGINE_A)) == 2
    assert set(core.take_adapter_failures(ENGINE_A)) == {1}


def test_no_file_access_in_a_layer_call(
    tmp_path: Path, passes: Passes, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _, _ = _boards(tmp_path, passes)
    worker.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), ENGINE_A)

    def no_fs(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a layer call touched the file system")

    for name in ("stat", "lstat", "listdir", "scandir", "open", "access"):
        monkeypatch.setattr(os, name, no_fs)
    monkeypatch.setattr(Path, "exists", no_fs)
    assert worker.has_adapter_failure(1, ENGINE_A)
    assert not worker.has_adapter_failure(2, ENGINE_A)
    passes.next()
    assert not worker.has_adapter_failure(1, ENGINE_A)
    assert not worker.has_adapter_failure(1, ENGINE_A)


def test_outside_a_forward_pass_nothing_is_skipped(tmp_path: Path) -> None:
    worker = FailureBoard(tmp_path, lambda: None)
    worker.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), ENGINE_A)
    assert not worker.has_adapter_failure(1, ENGINE_A)  # unknown pass: ask, never skip


def test_records_of_workers_without_an_engine_id_are_taken(tmp_path: Path, passes: Passes) -> None:
    worker, _, core = _boards(tmp_path, passes)
    worker.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"), ANONYMOUS_ENGINE)
    assert set(core.take_adapter_failures(ENGINE_A)) == {1}


def test_engine_id_from_environment_and_engine_core(
    tmp_path: Path, passes: Passes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENGINE_ENV, ENGINE_B)
    worker, _, core = _boards(tmp_path, passes)
    worker.record_adapter_failure(1, "e-x", AdapterRevokedError("revoked"))  # a worker process
    assert core.take_adapter_failures(ENGINE_A) == {}
    token = failures._current_engine.set(ENGINE_A)  # an in-process worker inside A's step
    try:
        assert failures.current_engine_id() == ENGINE_A
    finally:
        failures._current_engine.reset(token)
    assert set(core.take_adapter_failures()) == {1}  # this process's engine: B


def test_each_executor_gets_its_own_engine_id(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    class Executor:
        def __init__(self, vllm_config: Any) -> None:
            # Where vLLM starts the worker processes: they inherit this environment.
            seen.append((os.environ[ENGINE_ENV], self._tensafe_engine_id))

    monkeypatch.delenv(ENGINE_ENV, raising=False)
    init = failures._wrap_executor_init(Executor.__init__)
    monkeypatch.setattr(Executor, "__init__", init)
    for rank in (0, 1):
        Executor(SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_rank=rank)))
    (env0, own0), (env1, own1) = seen
    assert env0 == own0 and env1 == own1 and own0 != own1
    assert own0.startswith("dp0-") and own1.startswith("dp1-")


def test_step_sets_the_engine_for_in_process_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines in one process (uniprocess executors): each step's workers record under
    the engine that is stepping, whatever the environment says."""
    monkeypatch.setenv(ENGINE_ENV, "whatever-was-set-last")
    monkeypatch.setattr(failures, "_board", FailureBoard(tmp_path, lambda: None))
    recorded: list[str] = []

    def original_step(self: Any) -> tuple[dict, bool]:
        recorded.append(failures.current_engine_id())
        return {}, True

    step = failures._wrap_step(original_step)
    for engine_id in (ENGINE_A, ENGINE_B):
        core = SimpleNamespace(
            model_executor=SimpleNamespace(_tensafe_engine_id=engine_id),
            scheduler=SimpleNamespace(requests={}),
        )
        step(core)
    assert recorded == [ENGINE_A, ENGINE_B]
    assert failures.current_engine_id() == "whatever-was-set-last"
