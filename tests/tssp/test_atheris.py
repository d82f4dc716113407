"""The TSSP opener under atheris: coverage-guided, time-bounded, typed errors only.

``TENSAFE_FUZZ_SECONDS`` sets the fuzzing time (default 30 s, what CI spends); longer runs
are the same command with a larger value. libFuzzer's own findings (an untyped exception, a
crash, an input slower than its per-input timeout, memory past its limit) end the run with a
non-zero status and the input saved under the work folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 only")

FUZZER = Path(__file__).with_name("fuzz_opener.py")
SECONDS = int(os.environ.get("TENSAFE_FUZZ_SECONDS", "30"))


@pytest.mark.timeout(SECONDS + 600)
def test_opener_under_atheris(package_path: Path, signer: Any, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZER),
            "--package",
            str(package_path),
            "--signing-key",
            str(signer.key_path),
            "--trusted-pub",
            str(signer.pub_path),
            "--seconds",
            str(SECONDS),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        check=False,
    )
    log = proc.stdout + proc.stderr
    findings = sorted(
        p.name
        for p in tmp_path.iterdir()
        if p.name.split("-")[0] in {"crash", "timeout", "oom", "leak", "slow"}
    )
    assert proc.returncode == 0 and not findings, f"{findings}\n{log[-6000:]}"
    runs = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs and int(runs.group(1)) > 0, log[-3000:]
    # Coverage guidance is on (the opener's modules are instrumented): edges were counted.
    cov = re.findall(r"\bcov: (\d+) ft: (\d+) corp: (\d+)", log)
    assert cov, log[-3000:]
    print(
        f"atheris: {runs.group(1)} inputs in {runs.group(2)} s, cov {cov[-1][0]} "
        f"ft {cov[-1][1]} corpus {cov[-1][2]}"
    )
