"""The benchmarks still start: each one's --help, and the way he_bench starts its key holder.

The benchmarks are not run in CI (they measure, they do not assert); this only catches a
benchmark that no longer imports or parses its arguments after the package moved things.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_help(script: Path) -> None:
    proc = _run([str(script), "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_he_bench_key_holder_command_exists() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import he_bench
    finally:
        sys.path.pop(0)
    proc = _run(["-c", he_bench.SERVE, "key-holder", "serve", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--he-secret" in proc.stdout
