"""tests.support.server_process: a server started for a test dies with the process that
started it, even when that process is killed (a test run stopped by its time limit), so that no
``vllm serve`` keeps a port or GPU memory after its test (seen on the GPU machine: a killed
pytest left a server holding 44 GB, and the next server could not start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from tests.support.server_process import die_with_parent
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleep, start_new_session=True, preexec_fn=die_with_parent)
    control = subprocess.Popen(sleep, start_new_session=True)  # as before: outlives it
    print(child.pid, control.pid, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_server_dies_with_its_parent_even_when_the_parent_is_killed() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, env=env, text=True
    )
    assert parent.stdout is not None
    child, control = (int(pid) for pid in parent.stdout.readline().split())
    try:
        assert _alive(child) and _alive(control)
        parent.kill()  # SIGKILL: no finaliser, no fixture teardown runs
        parent.wait()
        # Waiting for an event, not timing it: the kernel sends SIGTERM at the parent's exit.
        deadline = time.monotonic() + 60
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
        assert _alive(control)  # without die_with_parent a child outlives the killed parent
    finally:
        for pid in (child, control):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
