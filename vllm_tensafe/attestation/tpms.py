"""Strict parsers for the TPM 2.0 structures of a quote: TPMS_ATTEST and TPMT_SIGNATURE.

Pure Python (``struct``), no TPM needed: this runs at the key holder. Everything is
big-endian as the TPM marshals it (TPM 2.0 Library, Part 2: Structures). The parsers accept
exactly one marshalled structure: a length that runs past the end, a size above the
structure's maximum, an unknown algorithm or trailing bytes is a ``MalformedQuoteError``, and
nothing else is ever raised (tests/attestation/test_fuzz.py).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_tensafe.errors import MalformedQuoteError

# TPM_GENERATED_VALUE: a restricted signing key (an AK) signs only structures that the TPM
# itself produced and that begin with this magic; a caller-supplied digest never does.
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

# TPM_ALG_ID of the PCR banks and signature hashes read here.
HASH_ALGS: dict[int, str] = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
HASH_IDS: dict[str, int] = {name: alg for alg, name in HASH_ALGS.items()}
DIGEST_SIZES: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# TPM_ALG_ID of the signature schemes an AK uses: tpm2_createak's default (RSA, RSASSA),
# RSA-PSS, and ECDSA (ECC keys).
SIG_ALGS: dict[int, str] = {0x0014: "rsassa", 0x0016: "rsapss", 0x0018: "ecdsa"}

# PC Client TPMs have 24 PCRs; the selection bitmap is 3 bytes (PCR_SELECT_MIN), some TPMs
# marshal 4. A set bit above PCR 23 is refused.
PCR_COUNT = 24
MAX_SELECT_BYTES = 4
# HASH_COUNT bounds the banks of one selection; real quotes carry one or two.
MAX_BANKS = 16
# sizeof(TPMT_HA): the largest TPM2B_NAME and TPM2B_DATA; TPM2B_DIGEST holds one digest.
MAX_NAME = 2 + 64
MAX_DATA = 2 + 64
MAX_DIGEST = 64
# An RSA signature is at most the modulus (4096 bits here); an ECC coordinate at most P-521's.
MAX_RSA_SIGNATURE = 512
MAX_ECC_PARAMETER = 66

_FIX = "send the files tpm2_quote wrote (-m message, -s signature) unchanged"


class _Reader:
    """Reads big-endian TPM fields from one buffer; every short read is a typed error."""

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedQuoteError(f"{what} is not bytes", _FIX)
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    def fail(self, reason: str) -> MalformedQuoteError:
        return MalformedQuoteError(f"malformed {self._what}: {reason} (at byte {self._pos})", _FIX)

    def take(self, size: int, field: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise self.fail(f"{field} needs {size} bytes, {len(self._data) - self._pos} left")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def tpm2b(self, field: str, max_size: int) -> bytes:
        size = self.u16(f"{field} size")
        if size > max_size:
            raise self.fail(f"{field} of {size} bytes exceeds its maximum of {max_size}")
        return self.take(size, field)

    def done(self) -> None:
        if self._pos != len(self._data):
            raise self.fail(f"{len(self._data) - self._pos} trailing bytes")


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: milliseconds the TPM has run, and its reset/restart counters."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class PcrSelection:
    """One bank of a TPML_PCR_SELECTION: the hash name and the selected PCRs, ascending."""

    bank: str
    indices: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.bank}:{','.join(str(i) for i in self.indices) or '(none)'}"


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (magic and type are checked when parsed)."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_selection: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE: RSA signatures in ``rsa``, ECDSA ones in ``ecc_r``/``ecc_s``."""

    scheme: str
    hash: str
    rsa: bytes = b""
    ecc_r: bytes = b""
    ecc_s: bytes = b""


def _hash_alg(reader: _Reader, field: str) -> str:
    alg = reader.u16(field)
    if alg not in HASH_ALGS:
        raise reader.fail(f"{field} 0x{alg:04x} is not one of {', '.join(HASH_ALGS.values())}")
    return HASH_ALGS[alg]


def _pcr_selection(reader: _Reader) -> tuple[PcrSelection, ...]:
    count = reader.u32("TPML_PCR_SELECTION count")
    if count > MAX_BANKS:
        raise reader.fail(f"{count} PCR banks selected; at most {MAX_BANKS}")
    banks: list[PcrSelection] = []
    for _ in range(count):
        bank = _hash_alg(reader, "PCR bank")
        if any(sel.bank == bank for sel in banks):
            raise reader.fail(f"PCR bank {bank} is selected twice")
        size = reader.u8("sizeofSelect")
        if not 1 <= size <= MAX_SELECT_BYTES:
            raise reader.fail(f"sizeofSelect {size} is not 1 to {MAX_SELECT_BYTES}")
        bitmap = reader.take(size, "pcrSelect")
        indices = tuple(i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1)
        if indices and indices[-1] >= PCR_COUNT:
            raise reader.fail(f"PCR {indices[-1]} selected; a TPM has PCRs 0 to {PCR_COUNT - 1}")
        banks.append(PcrSelection(bank, indices))
    return tuple(banks)


def parse_attest(data: bytes) -> Attest:
    """Parse a TPMS_ATTEST that must be a TPM-generated quote."""
    reader = _Reader(data, "TPMS_ATTEST")
    magic = reader.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise MalformedQuoteError(
            f"the quote message's magic is 0x{magic:08x}, not TPM_GENERATED_VALUE "
            f"(0x{TPM_GENERATED_VALUE:08x}): the TPM did not produce it",
            _FIX,
        )
    kind = reader.u16("type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise MalformedQuoteError(
            f"the attestation message has type 0x{kind:04x}, not TPM_ST_ATTEST_QUOTE "
            f"(0x{TPM_ST_ATTEST_QUOTE:04x}): it is not a PCR quote",
            "send the message of tpm2_quote, not of tpm2_certify or another command",
        )
    signer = reader.tpm2b("qualifiedSigner", MAX_NAME)
    extra = reader.tpm2b("extraData", MAX_DATA)
    clock = ClockInfo(
        clock=reader.u64("clock"),
        reset_count=reader.u32("resetCount"),
        restart_count=reader.u32("restartCount"),
        safe=_yes_no(reader),
    )
    firmware = reader.u64("firmwareVersion")
    selection = _pcr_selection(reader)
    digest = reader.tpm2b("pcrDigest", MAX_DIGEST)
    reader.done()
    return Attest(signer, extra, clock, firmware, selection, digest)


def _yes_no(reader: _Reader) -> bool:
    value = reader.u8("safe")
    if value not in (0, 1):
        raise reader.fail(f"TPMI_YES_NO 'safe' is {value}, not 0 or 1")
    return value == 1


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE (tpm2_quote -s, its default 'tss' format)."""
    reader = _Reader(data, "TPMT_SIGNATURE")
    alg = reader.u16("sigAlg")
    if alg not in SIG_ALGS:
        raise MalformedQuoteError(
            f"signature algorithm 0x{alg:04x} is not one of {', '.join(SIG_ALGS.values())}",
            "create the attestation key with tpm2_createak -G rsa (RSASSA) or -G ecc (ECDSA)",
        )
    scheme = SIG_ALGS[alg]
    hash_name = _hash_alg(reader, "signature hash")
    if scheme == "ecdsa":
        r = reader.tpm2b("signatureR", MAX_ECC_PARAMETER)
        s = reader.tpm2b("signatureS", MAX_ECC_PARAMETER)
        reader.done()
        return Signature(scheme, hash_name, ecc_r=r, ecc_s=s)
    sig = reader.tpm2b("RSA signature", MAX_RSA_SIGNATURE)
    reader.done()
    return Signature(scheme, hash_name, rsa=sig)


def pcr_digest(hash_name: str, values: Sequence[bytes]) -> bytes:
    """The quote's pcrDigest: the signing hash over the PCR values in selection order."""
    hasher = hashlib.new(hash_name)
    for value in values:
        hasher.update(value)
    return hasher.digest()


def marshal_attest(attest: Attest) -> bytes:
    """Marshal a quote TPMS_ATTEST (tests build hostile variants of real quotes with it)."""
    out = bytearray(struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE))
    for blob in (attest.qualified_signer, attest.extra_data):
        out += struct.pack(">H", len(blob)) + blob
    info = attest.clock_info
    out += struct.pack(
        ">QIIB", info.clock, info.reset_count, info.restart_count, 1 if info.safe else 0
    )
    out += struct.pack(">QI", attest.firmware_version, len(attest.pcr_selection))
    for sel in attest.pcr_selection:
        bitmap = bytearray(3)
        for index in sel.indices:
            bitmap[index // 8] |= 1 << (index % 8)
        out += struct.pack(">HB", HASH_IDS[sel.bank], len(bitmap)) + bitmap
    out += struct.pack(">H", len(attest.pcr_digest)) + attest.pcr_digest
    return bytes(out)
