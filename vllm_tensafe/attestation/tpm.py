"""Host side: TPM 2.0 quotes through tpm2-tools (Debian's ``tpm2-tools`` package).

``TpmQuoter(TpmTools(tcti), ak).quote(nonce, bank, pcrs)`` runs ``tpm2_quote`` with the key
holder's nonce as qualifying data and returns the ``QuoteBundle`` the key holder verifies.
``create_attestation_key`` enrols a host: an endorsement key (``tpm2_createek``), an
attestation key under it (``tpm2_createak``: a restricted signing key, so the TPM signs only
structures it generated itself), persisted at a handle (``tpm2_evictcontrol``).

The TCTI names the TPM: ``device:/dev/tpmrm0`` (the kernel's resource manager, the default),
``tabrmd:`` or ``swtpm:host=127.0.0.1,port=N`` (a software TPM: for tests only, it proves
nothing about a machine).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_tensafe.attestation.bundle import QuoteBundle
from vllm_tensafe.attestation.policy import AttestationKey
from vllm_tensafe.attestation.tpms import DIGEST_SIZES, PCR_COUNT
from vllm_tensafe.errors import TpmError

logger = logging.getLogger("vllm_tensafe.attestation")

DEFAULT_TCTI = "device:/dev/tpmrm0"
APT_PACKAGES = "tpm2-tools (and swtpm swtpm-tools for a software TPM in tests)"
# An RSA-2048 key generation on a slow TPM takes tens of seconds; a quote about one.
TOOL_TIMEOUT = 120.0
_PERSISTENT = re.compile(r"^0x81[0-9a-fA-F]{6}$")
KEY_TYPES = {"rsa": ("rsa", "rsassa"), "ecc": ("ecc", "ecdsa")}


def is_persistent_handle(ak: str) -> bool:
    return bool(_PERSISTENT.match(ak))


class TpmTools:
    """Runs tpm2-tools commands against one TPM (its TCTI)."""

    def __init__(self, tcti: str = DEFAULT_TCTI, *, timeout: float = TOOL_TIMEOUT) -> None:
        if not tcti or any(ch.isspace() for ch in tcti):
            raise TpmError(
                f"TPM TCTI {tcti!r} is empty or contains spaces",
                "set TENSAFE_TPM_TCTI to e.g. device:/dev/tpmrm0",
            )
        self.tcti = tcti
        self.timeout = timeout

    def check_device(self) -> None:
        """Refuse at once when the TCTI names a TPM device file that does not exist."""
        kind, _, conf = self.tcti.partition(":")
        if kind == "device":
            path = conf or "/dev/tpmrm0"
            if not os.path.exists(path):
                raise TpmError(
                    f"no TPM on this host: {path} does not exist (TCTI {self.tcti})",
                    "run on a host with a TPM 2.0 (enabled in the firmware; `ls /dev/tpm*`), "
                    "or point TENSAFE_TPM_TCTI at it",
                )

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        if shutil.which(tool) is None:
            raise TpmError(
                f"{tool} is not installed (needed to talk to the TPM)",
                f"install Debian's {APT_PACKAGES}: apt-get install tpm2-tools",
            )
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        try:
            done = subprocess.run(
                [tool, *args], env=env, capture_output=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise TpmError(
                f"{tool} did not finish within {self.timeout:g}s on TPM {self.tcti}",
                "check that the TPM is not busy or locked out (tpm2_getcap properties-variable)",
            ) from None
        if done.returncode != 0:
            raise TpmError(
                f"{tool} failed on TPM {self.tcti}: {_last_error(done.stderr)}",
                _fix_for(done.stderr, self.tcti),
            )
        return done

    def flush_transient(self) -> None:
        """Flush transient objects: without a resource manager they stay loaded and the
        TPM's three object slots fill up (TPM_RC_OBJECT_MEMORY)."""
        self.run("tpm2_flushcontext", "-t")

    def uses_resource_manager(self) -> bool:
        return self.tcti.startswith(("device:/dev/tpmrm", "tabrmd"))


def _last_error(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    errors = [line for line in lines if line.startswith("ERROR")] or [ln for ln in lines if ln]
    # "ERROR: Unable to run tpm2_x" closes every failure; the line before it says why.
    useful = [line for line in errors if not line.startswith("ERROR: Unable to run")]
    return (useful or errors or ["no error message"])[-1]


def _fix_for(stderr: bytes, tcti: str) -> str:
    text = stderr.decode("utf-8", "replace")
    if "Could not load tcti" in text or "Failed to instantiate TCTI" in text:
        return (
            f"the TPM at TCTI {tcti} cannot be opened: check that it exists, that this user may "
            "use it (group tss for /dev/tpmrm0), and TENSAFE_TPM_TCTI"
        )
    if "handle is not correct" in text or "0x18b" in text.lower():
        return (
            "the attestation key is not in the TPM: enrol the host "
            "(vllm-tensafe attestation enrol) and set TENSAFE_TPM_AK to its handle"
        )
    if "lockout" in text.lower():
        return "the TPM is in dictionary-attack lockout: wait, or reset it with its owner"
    return "see the tpm2-tools message; the TPM refused the command"


@dataclass(frozen=True)
class EnrolledKey:
    """An attestation key in the TPM: where it is, and its public key for the policy."""

    ak: str
    key: AttestationKey


class TpmQuoter:
    """Quotes PCRs with one attestation key (a persistent handle or a context file)."""

    def __init__(self, tools: TpmTools, ak: str, *, hash_name: str = "sha256") -> None:
        if not ak:
            raise TpmError(
                "no attestation key is configured",
                "enrol the host (vllm-tensafe attestation enrol) and set TENSAFE_TPM_AK",
            )
        if not is_persistent_handle(ak) and not Path(ak).is_file():
            raise TpmError(
                f"attestation key {ak!r} is neither a persistent handle (0x81xxxxxx) nor a "
                "context file",
                "set TENSAFE_TPM_AK to the handle that vllm-tensafe attestation enrol printed",
            )
        self.tools = tools
        self.ak = ak
        self.hash_name = hash_name
        self._public: AttestationKey | None = None

    def public_key(self) -> AttestationKey:
        """The AK's public key, read from the TPM (once)."""
        if self._public is None:
            self.tools.check_device()
            with tempfile.TemporaryDirectory(prefix="tensafe-tpm-") as tmp:
                out = Path(tmp) / "ak.pem"
                self.tools.run("tpm2_readpublic", "-c", self.ak, "-f", "pem", "-o", str(out))
                self._after_context_use()
                self._public = AttestationKey.from_pem(out.read_bytes(), f"TPM key {self.ak}")
        return self._public

    def read_pcrs(self, bank: str, indices: Sequence[int]) -> dict[int, bytes]:
        selection = _selection(bank, indices)
        self.tools.check_device()
        with tempfile.TemporaryDirectory(prefix="tensafe-tpm-") as tmp:
            out = Path(tmp) / "pcrs.bin"
            self.tools.run("tpm2_pcrread", f"{bank}:{selection}", "-o", str(out))
            return _split_values(out.read_bytes(), bank, sorted(set(indices)))

    def quote(self, nonce: bytes, bank: str, indices: Sequence[int]) -> QuoteBundle:
        """A quote over ``bank:indices`` with ``nonce`` as qualifying data (extraData)."""
        if not 1 <= len(nonce) <= 64:
            raise TpmError(
                f"a quote nonce is 1 to 64 bytes, not {len(nonce)}",
                "pass the nonce the key holder issued",
            )
        selection = _selection(bank, indices)
        public = self.public_key()
        with tempfile.TemporaryDirectory(prefix="tensafe-tpm-") as tmp:
            msg, sig, pcrs = (Path(tmp) / name for name in ("quote.msg", "quote.sig", "pcrs"))
            self.tools.run(
                "tpm2_quote",
                "-c", self.ak,
                "-l", f"{bank}:{selection}",
                "-q", nonce.hex(),
                "-g", self.hash_name,
                "-m", str(msg),
                "-s", str(sig),
                "-o", str(pcrs),
                "-F", "values",
            )  # fmt: skip
            self._after_context_use()
            values = _split_values(pcrs.read_bytes(), bank, sorted(set(indices)))
            return QuoteBundle.build(
                ak_public=public.pem(),
                message=msg.read_bytes(),
                signature=sig.read_bytes(),
                bank=bank,
                pcrs=values,
            )

    def _after_context_use(self) -> None:
        if not is_persistent_handle(self.ak) and not self.tools.uses_resource_manager():
            self.tools.flush_transient()


def _selection(bank: str, indices: Sequence[int]) -> str:
    if bank not in DIGEST_SIZES:
        raise TpmError(f"unknown PCR bank {bank!r}", f"use one of {', '.join(DIGEST_SIZES)}")
    if not indices or any(not 0 <= int(i) < PCR_COUNT for i in indices):
        raise TpmError(
            f"PCR selection {list(indices)} is empty or outside 0 to {PCR_COUNT - 1}",
            "quote the PCRs the key holder's nonce reply names",
        )
    return ",".join(str(int(i)) for i in sorted(set(indices)))


def _split_values(data: bytes, bank: str, indices: list[int]) -> dict[int, bytes]:
    size = DIGEST_SIZES[bank]
    if len(data) != size * len(indices):
        raise TpmError(
            f"the TPM returned {len(data)} bytes of {bank} PCR values for {len(indices)} PCRs",
            f"check that the TPM has an active {bank} PCR bank (tpm2_getcap pcrs)",
        )
    return {index: data[n * size : (n + 1) * size] for n, index in enumerate(indices)}


def create_attestation_key(
    tools: TpmTools, handle: str, *, key_type: str = "rsa", hash_name: str = "sha256"
) -> EnrolledKey:
    """Create an EK and an AK under it, and persist the AK at ``handle`` (0x81xxxxxx).

    The EK is transient (re-created from the TPM's endorsement seed whenever needed); only
    the AK is persisted. An occupied handle is refused, never overwritten.
    """
    if not is_persistent_handle(handle):
        raise TpmError(
            f"{handle!r} is not a persistent handle (0x81000000 to 0x81ffffff)",
            "pick a free one, e.g. 0x81010002 (tpm2_getcap handles-persistent lists those used)",
        )
    if key_type not in KEY_TYPES:
        raise TpmError(f"unknown key type {key_type!r}", f"use one of {', '.join(KEY_TYPES)}")
    tools.check_device()
    used = tools.run("tpm2_getcap", "handles-persistent").stdout.decode("utf-8", "replace")
    if handle.lower() in used.lower():
        raise TpmError(
            f"persistent handle {handle} is already in use in the TPM",
            "pick another --handle, or remove the old key with tpm2_evictcontrol -C o -c "
            f"{handle} if it is no longer needed",
        )
    alg, scheme = KEY_TYPES[key_type]
    with tempfile.TemporaryDirectory(prefix="tensafe-enrol-") as tmp:
        ek, ak = str(Path(tmp) / "ek.ctx"), str(Path(tmp) / "ak.ctx")
        pem = Path(tmp) / "ak.pem"
        tools.run("tpm2_createek", "-c", ek, "-G", "rsa", "-u", str(Path(tmp) / "ek.pub"))
        tools.run(
            "tpm2_createak",
            "-C", ek,
            "-c", ak,
            "-G", alg,
            "-g", hash_name,
            "-s", scheme,
            "-u", str(pem),
            "-f", "pem",
            "-n", str(Path(tmp) / "ak.name"),
        )  # fmt: skip
        if not tools.uses_resource_manager():
            tools.flush_transient()
        tools.run("tpm2_evictcontrol", "-C", "o", "-c", ak, handle)
        if not tools.uses_resource_manager():
            tools.flush_transient()
        key = AttestationKey.from_pem(pem.read_bytes(), f"TPM key {handle}")
    logger.info("attestation key %s persisted at %s", key.fingerprint[:16], handle)
    return EnrolledKey(handle, key)
