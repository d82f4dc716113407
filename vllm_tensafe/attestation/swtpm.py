"""A software TPM (Debian's ``swtpm``) for tests and for trying attestation on a laptop.

``SoftwareTpm(state_dir).start()`` runs ``swtpm socket --tpm2`` on two free loopback ports;
``boot(measurements)`` restarts it (PCRs back to zero, persistent keys kept, as on a reboot)
and extends the given measurements, so a test makes "booted" states whose PCR values it can
also compute itself (``expected_pcrs``). A software TPM proves nothing about a machine: a
policy must never accept its attestation key for a real host.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from vllm_tensafe.attestation.tpm import TpmTools
from vllm_tensafe.attestation.tpms import DIGEST_SIZES
from vllm_tensafe.errors import TpmError

APT_PACKAGES = ("swtpm", "swtpm-tools", "tpm2-tools")
START_DEADLINE = 30.0
_TOOLS = ("swtpm", "tpm2_createek", "tpm2_createak", "tpm2_quote", "tpm2_pcrextend")


def missing_tools() -> list[str]:
    """The programs a software TPM test needs that are not installed."""
    return [tool for tool in _TOOLS if shutil.which(tool) is None]


def expected_pcrs(
    measurements: Mapping[int, Sequence[bytes]], bank: str = "sha256"
) -> dict[int, bytes]:
    """PCR values after extending each measurement's digest into zeroed PCRs, in order."""
    out: dict[int, bytes] = {}
    for index, events in measurements.items():
        value = bytes(DIGEST_SIZES[bank])
        for event in events:
            value = hashlib.new(bank, value + hashlib.new(bank, event).digest()).digest()
        out[index] = value
    return out


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on loopback (swtpm's server and control ports)."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        sockets = []
        try:
            for p in (port, port + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise TpmError("no two adjacent free loopback ports for swtpm", "free some ports")


class SoftwareTpm:
    """One ``swtpm`` process; state (and so persistent keys) survives ``boot()``."""

    def __init__(self, state_dir: str | Path) -> None:
        missing = missing_tools()
        if missing:
            raise TpmError(
                f"software TPM tools missing: {', '.join(missing)}",
                f"apt-get install {' '.join(APT_PACKAGES)}",
            )
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.state_dir / "swtpm.log"

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tools(self) -> TpmTools:
        return TpmTools(self.tcti)

    def start(self) -> SoftwareTpm:
        last = ""
        for _ in range(5):  # a port taken between the check and swtpm's bind: new ports
            self.port = _free_port_pair()
            with self._log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [
                        "swtpm", "socket", "--tpm2",
                        "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                        "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                        "--flags", "not-need-init,startup-clear",
                        "--tpmstate", f"dir={self.state_dir}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            if self._wait_ready():
                return self
            last = self._log.read_text(errors="replace")[-500:]
            self.stop()
        raise TpmError(f"swtpm did not start: {last.strip() or 'no output'}", "see swtpm.log")

    def _wait_ready(self) -> bool:
        """Wait (generously) until the TPM answers a command, or the process died."""
        deadline = time.monotonic() + START_DEADLINE
        tools = self.tools()
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                tools.run("tpm2_getcap", "properties-fixed")
                return True
            except TpmError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # An orderly TPM2_Shutdown first: the TPM counts every unorderly one against its
            # dictionary-attack limit, and a few restarts would lock the AK out.
            try:
                TpmTools(self.tcti, timeout=10).run("tpm2_shutdown")
            except TpmError:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def boot(self, measurements: Mapping[int, Sequence[bytes]], bank: str = "sha256") -> None:
        """Restart the TPM (a reboot: PCRs zero, keys kept) and measure ``measurements``."""
        self.stop()
        self.start()
        tools = self.tools()
        for index, events in measurements.items():
            for event in events:
                digest = hashlib.new(bank, event).hexdigest()
                tools.run("tpm2_pcrextend", f"{index}:{bank}={digest}")

    def extend(self, index: int, event: bytes, bank: str = "sha256") -> None:
        """Measure one more event after boot (as a running system would)."""
        digest = hashlib.new(bank, event).hexdigest()
        self.tools().run("tpm2_pcrextend", f"{index}:{bank}={digest}")

    def __enter__(self) -> SoftwareTpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
