"""GPU runs: one JSON summary (and the server logs) under $OUT, printed at the end of the run.

Each test adds what it measured to the ``gpu_summary`` dict; it is written to
``$OUT/gpu_summary.json`` after every test (so a run cut short still leaves its results) and
printed in pytest's terminal summary. Without ``$OUT`` it goes to pytest's temporary folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

_SUMMARY: dict[str, Any] = {}
_WHERE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def gpu_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the summary and the server logs go: $OUT when set."""
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else tmp_path_factory.mktemp("gpu")
    out.mkdir(parents=True, exist_ok=True)
    _WHERE["out"] = out
    return out


@pytest.fixture(scope="session")
def gpu_summary(gpu_out: Path) -> dict[str, Any]:
    return _SUMMARY


@pytest.fixture(autouse=True)
def _write_summary_after_each_test() -> Any:
    yield
    _write()


def _write() -> None:
    out = _WHERE.get("out")
    if out is not None and _SUMMARY:
        (out / "gpu_summary.json").write_text(
            json.dumps(_SUMMARY, indent=2, sort_keys=True, default=str) + "\n"
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SUMMARY:
        return
    _write()
    terminalreporter.section("GPU summary")
    for name, record in _SUMMARY.items():
        if isinstance(record, dict) and "headline" in record:
            terminalreporter.write_line(f"{name}: {record['headline']}")
    terminalreporter.write_line(json.dumps(_SUMMARY, indent=2, sort_keys=True, default=str))
    if "out" in _WHERE:
        terminalreporter.write_line(f"written to {_WHERE['out'] / 'gpu_summary.json'}")
