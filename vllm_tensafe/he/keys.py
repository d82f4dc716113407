"""CKKS keys: the public context the host holds and the secret key set only the key holder holds.

File formats (all integers little-endian; documented in docs/he-scheme.md):

Public context (PREFIX.public, ``PublicContext.to_bytes``)::

    b"TSHEPUB\\0"  u16 version=1  sections...
    section = u8 tag | u32 length | payload
    tags, in this order: 0x01 profile name (utf-8), 0x02 SEAL EncryptionParameters,
    0x03 SEAL PublicKey. Tags 0x10 (secret key), 0x11 (relinearisation keys) and
    0x12 (Galois keys) are recognised only to be refused.

Secret key set (PREFIX.secret)::

    b"TSHESEC\\0"  u16 version=1  u8 protection
    protection 0: body
    protection 1: u8 log2(n) | u32 r | u32 p | 16-byte salt | 12-byte nonce | AES-256-GCM(body)
                  (key = scrypt(passphrase, salt, n, r, p); AAD = every byte before the sealed body)
    body = sections 0x20 (the public context bytes, verbatim) and 0x10 (SEAL SecretKey)

``key_id`` is the hex SHA-256 of the public context bytes, so the secret file pins exactly one
public context.

TenSEAL's low-level SEAL binding only saves and loads through file paths; blobs therefore pass
through a private directory (tmpfs when available, mode 0700, files deleted right after use).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import stat
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import HEError
from vllm_tensafe.files import refuse_overwrite, write_private
from vllm_tensafe.he.profiles import DEFAULT_PROFILE, HEProfile, get_profile

log = logging.getLogger(__name__)

# TenSEAL's SEAL binding (a compiled module) ships no type information: these aliases say
# which SEAL object a value is, for readers; the type checker sees Any.
SealParameters: TypeAlias = Any
SealContext: TypeAlias = Any
SealPublicKey: TypeAlias = Any
SealSecretKey: TypeAlias = Any
SealEncryptor: TypeAlias = Any

PUBLIC_MAGIC = b"TSHEPUB\x00"
SECRET_MAGIC = b"TSHESEC\x00"
FORMAT_VERSION = 1

TAG_PROFILE = 0x01
TAG_PARMS = 0x02
TAG_PUBLIC_KEY = 0x03
TAG_SECRET_KEY = 0x10
TAG_RELIN_KEYS = 0x11
TAG_GALOIS_KEYS = 0x12
TAG_PUBLIC_CONTEXT = 0x20

_FORBIDDEN_PUBLIC_TAGS = {
    TAG_SECRET_KEY: "a CKKS secret key",
    TAG_RELIN_KEYS: "relinearisation keys",
    TAG_GALOIS_KEYS: "Galois (rotation) keys",
}

PROTECTION_NONE = 0
PROTECTION_SCRYPT_AESGCM = 1
# scrypt cost: 2^15 * 8 * 128 bytes = 32 MiB and ~0.1 s per unlock; the file holds a key that
# decrypts every adapter made under it, so offline guessing must stay expensive.
_SCRYPT_LOG2_N = 15
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_MAX_LOG2_N = 22  # refuse files that would make loading itself a memory bomb

# --- SEAL blob validation --------------------------------------------------------------------

_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_COMPR_NONE = 0
_COMPR_ZSTD = 2
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 * 1024


def check_seal_blob(blob: bytes | memoryview, raw_max: int, what: str) -> None:
    """Refuse a SEAL-serialised object before SEAL parses it.

    SEAL inflates a zstd payload completely before checking it, so a tiny compressed bomb
    could exhaust memory. The zstd frame's block headers bound the inflated size without
    inflating anything; anything larger than the expected object is refused.
    """
    if len(blob) < _SEAL_HEADER.size:
        raise HEError(f"{what}: truncated SEAL object ({len(blob)} bytes)", _FIX_PRODUCER)
    magic, header_size, major, _minor, compr, reserved, size = _SEAL_HEADER.unpack_from(blob)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or reserved != 0:
        raise HEError(f"{what}: not a SEAL object (bad header)", _FIX_PRODUCER)
    if major != 4:
        raise HEError(f"{what}: SEAL format version {major} is not supported", _FIX_PRODUCER)
    if size != len(blob):
        raise HEError(
            f"{what}: SEAL header declares {size} bytes but {len(blob)} were given", _FIX_PRODUCER
        )
    if compr == _COMPR_NONE:
        inflated = size - _SEAL_HEADER.size
    elif compr == _COMPR_ZSTD:
        inflated = _zstd_inflated_bound(memoryview(blob)[_SEAL_HEADER.size :], raw_max, what)
    else:
        raise HEError(f"{what}: SEAL compression mode {compr} is not accepted", _FIX_PRODUCER)
    if inflated > raw_max:
        raise HEError(f"{what}: SEAL object inflates to more than {raw_max} bytes", _FIX_PRODUCER)


def _zstd_inflated_bound(frame: memoryview, raw_max: int, what: str) -> int:
    def bad(reason: str) -> HEError:
        return HEError(f"{what}: malformed zstd payload ({reason})", _FIX_PRODUCER)

    if len(frame) < 6 or int.from_bytes(frame[:4], "little") != _ZSTD_MAGIC:
        raise bad("no zstd frame")
    fhd = frame[4]
    fcs_flag, single_segment, reserved, checksum, dict_flag = (
        fhd >> 6,
        (fhd >> 5) & 1,
        (fhd >> 3) & 1,
        (fhd >> 2) & 1,
        fhd & 3,
    )
    if reserved or dict_flag:
        raise bad("dictionary or reserved flag set")
    pos = 5
    window = _ZSTD_BLOCK_MAX
    if not single_segment:
        wd = frame[pos]
        pos += 1
        exponent, mantissa = wd >> 3, wd & 7
        base = 1 << (10 + exponent)
        window = base + (base // 8) * mantissa
    fcs_len = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if fcs_len:
        fcs = int.from_bytes(frame[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
        if fcs > raw_max:
            raise bad("declared content size too large")
        if single_segment:
            window = fcs
        pos += fcs_len
    block_cap = min(window, _ZSTD_BLOCK_MAX)
    total = 0
    while True:
        if pos + 3 > len(frame):
            raise bad("truncated block header")
        header = int.from_bytes(frame[pos : pos + 3], "little")
        pos += 3
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 0:  # raw
            total += size
            pos += size
        elif kind == 1:  # RLE: one byte repeated `size` times
            total += size
            pos += 1
        elif kind == 2:  # compressed: inflates to at most one block
            if size > _ZSTD_BLOCK_MAX:
                raise bad("oversized compressed block")
            total += block_cap
            pos += size
        else:
            raise bad("reserved block type")
        # A compressed block counts as a full block, so an honest stream's bound exceeds its
        # real size (zstd splits into blocks smaller than the maximum), but by less than 2x;
        # a bomb's bound is orders of magnitude larger.
        if total > 2 * raw_max + _ZSTD_BLOCK_MAX:
            raise bad("inflates beyond the expected size")
        if last:
            break
    pos += 4 if checksum else 0
    if pos != len(frame):
        raise bad("trailing or missing bytes after the frame")
    return min(total, raw_max)


_FIX_PRODUCER = "send objects produced by vllm-tensafe for this key and profile"


# --- SEAL objects through files ----------------------------------------------------------------


class _SealFiles:
    """Private scratch directory for SEAL's path-only save/load."""

    def __init__(self) -> None:
        self._dir: str | None = None
        self._lock = threading.Lock()

    def _directory(self) -> str:
        with self._lock:
            if self._dir is None or not os.path.isdir(self._dir):
                base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
                # tmpfs keeps key material (briefly written while SEAL loads it) off disk.
                self._dir = tempfile.mkdtemp(prefix="tensafe-he-", dir=base)
                os.chmod(self._dir, 0o700)
                atexit.register(shutil.rmtree, self._dir, True)
            return self._dir

    def path(self) -> str:
        return os.path.join(self._directory(), uuid.uuid4().hex)

    def save(self, obj: Any) -> bytes:
        path = self.path()
        try:
            obj.save(path)
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            _unlink(path)

    def load(self, blob: bytes | memoryview, loader: Callable[[str], None]) -> None:
        path = self.path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            loader(path)
        finally:
            _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


SEAL_FILES = _SealFiles()

# Sizes used to bound SEAL objects before parsing (raw = inflated payload).
_PARMS_RAW_MAX = 4096


def _poly_bytes(profile: HEProfile, primes: int) -> int:
    return profile.poly_modulus_degree * primes * 8


def _sec_level(profile: HEProfile) -> Any:
    return seal.SEC_LEVEL_TYPE.TC192 if profile.security_bits >= 192 else seal.SEC_LEVEL_TYPE.TC128


def _expected_parms(profile: HEProfile) -> SealParameters:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(profile.poly_modulus_degree)
    parms.set_coeff_modulus(
        seal.CoeffModulus.Create(profile.poly_modulus_degree, list(profile.coeff_mod_bit_sizes))
    )
    return parms


def _moduli(parms: SealParameters) -> list[int]:
    return [m.value() for m in parms.coeff_modulus()]


def _make_context(profile: HEProfile, parms: SealParameters) -> SealContext:
    context = seal.SEALContext(parms, True, _sec_level(profile))
    if not context.parameters_set():
        raise HEError(
            f"SEAL rejects the parameters of profile {profile.name!r}: "
            f"{context.parameters_error_message()}",
            "use an unmodified vllm-tensafe profile",
        )
    return context


# --- section containers ----------------------------------------------------------------------

_SECTION = struct.Struct("<BI")


def _pack_sections(magic: bytes, sections: list[tuple[int, bytes]], prefix: bytes = b"") -> bytes:
    parts = [magic, struct.pack("<H", FORMAT_VERSION), prefix]
    for tag, payload in sections:
        parts.append(_SECTION.pack(tag, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def _parse_sections(data: memoryview, what: str, fix: str) -> list[tuple[int, memoryview]]:
    out: list[tuple[int, memoryview]] = []
    pos = 0
    while pos < len(data):
        if pos + _SECTION.size > len(data):
            raise HEError(f"{what}: truncated section header", fix)
        tag, length = _SECTION.unpack_from(data, pos)
        pos += _SECTION.size
        if pos + length > len(data):
            raise HEError(f"{what}: section 0x{tag:02x} runs past the end of the data", fix)
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


# --- public context ----------------------------------------------------------------------------


class PublicContext:
    """The host's CKKS context: parameters and public key. Never a secret, Galois or relin key."""

    profile: HEProfile
    key_id: str

    def __init__(
        self,
        profile: HEProfile,
        parms: SealParameters,
        public_key: SealPublicKey,
        raw: bytes,
    ) -> None:
        self.profile = profile
        self._raw = raw
        self.key_id = hashlib.sha256(raw).hexdigest()
        self.parms = parms
        self.context = _make_context(profile, parms)
        self.public_key = public_key
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self._encryptor: SealEncryptor | None = None
        self._lock = threading.Lock()
        # Parameters every protocol ciphertext must carry.
        self.parms_id = self.context.first_parms_id()
        self.key_parms_id = self.context.key_parms_id()
        if self.encoder.slot_count() != profile.slot_count:
            raise HEError("SEAL slot count does not match the profile", "report this as a bug")

    @property
    def slot_count(self) -> int:
        return self.profile.slot_count

    @property
    def encryptor(self) -> SealEncryptor:
        with self._lock:
            if self._encryptor is None:
                self._encryptor = seal.Encryptor(self.context, self.public_key)
            return self._encryptor

    def to_bytes(self) -> bytes:
        return self._raw

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = 64 << 20) -> PublicContext:
        try:
            return cls._from_bytes(data, max_size)
        except HEError:
            raise
        except Exception as exc:  # SEAL raises RuntimeError/ValueError/... on bad input
            raise HEError(
                f"public CKKS context could not be read: {type(exc).__name__}: {exc}",
                "use the PREFIX.public file written by `vllm-tensafe keygen he` (write_keypair)",
            ) from None

    @classmethod
    def _from_bytes(cls, data: bytes, max_size: int) -> PublicContext:
        fix = "use the PREFIX.public file written by write_keypair / the packer"
        if not isinstance(data, bytes | bytearray | memoryview):
            raise HEError(f"public context must be bytes, not {type(data).__name__}", fix)
        raw = bytes(data)
        if len(raw) > max_size:
            raise HEError(
                f"public context is {len(raw)} bytes, more than the {max_size}-byte limit", fix
            )
        if raw.startswith(SECRET_MAGIC):
            raise HEError(
                "this is a secret-key file: it holds the CKKS secret key",
                "give the host only PREFIX.public; keep PREFIX.secret at the key holder",
            )
        header = len(PUBLIC_MAGIC) + 2
        if len(raw) < header or not raw.startswith(PUBLIC_MAGIC):
            raise HEError("not a vllm-tensafe public CKKS context (bad magic)", fix)
        (version,) = struct.unpack_from("<H", raw, len(PUBLIC_MAGIC))
        if version != FORMAT_VERSION:
            raise HEError(f"public context format version {version} is not supported", fix)
        sections = _parse_sections(memoryview(raw)[header:], "public context", fix)
        for tag, _ in sections:
            if tag in _FORBIDDEN_PUBLIC_TAGS:
                raise HEError(
                    f"the public context holds {_FORBIDDEN_PUBLIC_TAGS[tag]}; a host context "
                    "must carry only parameters and the public key",
                    "regenerate the public file with write_keypair and never export other keys",
                )
        tags = [tag for tag, _ in sections]
        if tags != [TAG_PROFILE, TAG_PARMS, TAG_PUBLIC_KEY]:
            raise HEError(f"public context has sections {tags}, expected [1, 2, 3]", fix)
        try:
            name = bytes(sections[0][1]).decode("ascii")
        except UnicodeDecodeError:
            raise HEError("public context names an unreadable profile", fix) from None
        profile = get_profile(name)
        parms = _load_parms(sections[1][1], profile)
        context = _make_context(profile, parms)
        public_key = seal.PublicKey()
        blob = sections[2][1]
        check_seal_blob(
            blob, 2 * _poly_bytes(profile, len(profile.coeff_mod_bit_sizes)) + 1024, "public key"
        )
        SEAL_FILES.load(blob, lambda path: public_key.load(context, path))
        if list(public_key.parms_id()) != list(context.key_parms_id()):
            raise HEError("public key is not at the key level of its parameters", fix)
        return cls(profile, parms, public_key, raw)

    def __repr__(self) -> str:
        return f"PublicContext(profile={self.profile.name!r}, key_id={self.key_id[:16]}...)"


def _load_parms(blob: memoryview | bytes, profile: HEProfile) -> SealParameters:
    check_seal_blob(blob, _PARMS_RAW_MAX, "encryption parameters")
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    SEAL_FILES.load(blob, parms.load)
    expected = _expected_parms(profile)
    if (
        parms.scheme() != seal.SCHEME_TYPE.CKKS
        or parms.poly_modulus_degree() != expected.poly_modulus_degree()
        or _moduli(parms) != _moduli(expected)
    ):
        raise HEError(
            f"encryption parameters do not match profile {profile.name!r}",
            "make keys with write_keypair; custom CKKS parameters are not accepted",
        )
    return parms


def _public_bytes(profile: HEProfile, parms: Any, public_key: Any) -> bytes:
    return _pack_sections(
        PUBLIC_MAGIC,
        [
            (TAG_PROFILE, profile.name.encode("ascii")),
            (TAG_PARMS, SEAL_FILES.save(parms)),
            (TAG_PUBLIC_KEY, SEAL_FILES.save(public_key)),
        ],
    )


# --- secret key set ----------------------------------------------------------------------------


class SecretKeySet:
    """The CKKS secret key with its public context. For the key holder only."""

    profile: HEProfile
    key_id: str

    def __init__(self, public: PublicContext, secret_key: SealSecretKey) -> None:
        self._public = public
        self.profile = public.profile
        self.key_id = public.key_id
        self.secret_key = secret_key

    def public_context(self) -> PublicContext:
        return self._public

    def _body(self) -> bytes:
        return b"".join(
            [
                _SECTION.pack(TAG_PUBLIC_CONTEXT, len(self._public.to_bytes())),
                self._public.to_bytes(),
                *_section(TAG_SECRET_KEY, SEAL_FILES.save(self.secret_key)),
            ]
        )

    def save(self, path: str | os.PathLike[str], passphrase: str | None = None) -> None:
        body = self._body()
        if passphrase is None:
            data = SECRET_MAGIC + struct.pack("<HB", FORMAT_VERSION, PROTECTION_NONE) + body
        else:
            if not passphrase:
                raise HEError(
                    "empty passphrase", "give a non-empty passphrase, or None for no encryption"
                )
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            salt, nonce = os.urandom(16), os.urandom(12)
            header = (
                SECRET_MAGIC
                + struct.pack("<HB", FORMAT_VERSION, PROTECTION_SCRYPT_AESGCM)
                + struct.pack("<BII", _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P)
                + salt
                + nonce
            )
            key = _scrypt(passphrase, salt, _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P)
            data = header + AESGCM(key).encrypt(nonce, body, header)
        write_private(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: str | None = None) -> SecretKeySet:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise HEError(
                f"secret key file {str(path)!r} does not exist",
                "give the PREFIX.secret path written by write_keypair",
            ) from None
        except OSError as exc:
            raise HEError(
                f"secret key file {str(path)!r} cannot be read: {exc.strerror}",
                "check the path and that this user may read it",
            ) from None
        _warn_if_readable_by_others(path)
        try:
            return cls._from_file_bytes(data, passphrase, str(path))
        except HEError:
            raise
        except Exception as exc:
            raise HEError(
                f"secret key file {str(path)!r} is corrupted: {type(exc).__name__}: {exc}",
                "restore it from a backup, or make new keys and re-pack the adapters",
            ) from None

    @classmethod
    def _from_file_bytes(cls, data: bytes, passphrase: str | None, name: str) -> SecretKeySet:
        fix = "give the PREFIX.secret file written by write_keypair"
        if data.startswith(PUBLIC_MAGIC):
            raise HEError(
                f"{name!r} is a public context, not a secret key file",
                "the key holder needs PREFIX.secret (PREFIX.public goes to the host)",
            )
        head = len(SECRET_MAGIC) + 3
        if len(data) < head or not data.startswith(SECRET_MAGIC):
            raise HEError(f"{name!r} is not a vllm-tensafe secret key file", fix)
        version, protection = struct.unpack_from("<HB", data, len(SECRET_MAGIC))
        if version != FORMAT_VERSION:
            raise HEError(f"{name!r} has secret-file format version {version}", fix)
        if protection == PROTECTION_NONE:
            if passphrase:
                log.warning("secret key file %s is not encrypted; the passphrase is unused", name)
            body = data[head:]
        elif protection == PROTECTION_SCRYPT_AESGCM:
            if not passphrase:
                raise HEError(
                    f"secret key file {name!r} is encrypted and no passphrase was given",
                    "set TENSAFE_HE_SECRET_PASSPHRASE (or --passphrase-env VAR) to its passphrase",
                )
            params = struct.Struct("<BII")
            if len(data) < head + params.size + 28 + 16:
                raise HEError(f"secret key file {name!r} is truncated", fix)
            log2_n, r, p = params.unpack_from(data, head)
            if not (10 <= log2_n <= _SCRYPT_MAX_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
                raise HEError(f"secret key file {name!r} has implausible scrypt parameters", fix)
            salt_at = head + params.size
            salt, nonce = data[salt_at : salt_at + 16], data[salt_at + 16 : salt_at + 28]
            sealed_at = salt_at + 28
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            key = _scrypt(passphrase, salt, log2_n, r, p)
            try:
                body = AESGCM(key).decrypt(nonce, data[sealed_at:], data[:sealed_at])
            except InvalidTag:
                raise HEError(
                    f"wrong passphrase for secret key file {name!r} (or the file was altered)",
                    "give the passphrase used when the keys were written",
                ) from None
        else:
            raise HEError(f"{name!r} uses unknown protection {protection}", fix)
        sections = _parse_sections(memoryview(body), f"secret key file {name!r}", fix)
        if [tag for tag, _ in sections] != [TAG_PUBLIC_CONTEXT, TAG_SECRET_KEY]:
            raise HEError(f"secret key file {name!r} has unexpected sections", fix)
        public = PublicContext.from_bytes(bytes(sections[0][1]))
        secret_key = seal.SecretKey()
        blob = sections[1][1]
        check_seal_blob(
            blob,
            _poly_bytes(public.profile, len(public.profile.coeff_mod_bit_sizes)) + 1024,
            "secret key",
        )
        SEAL_FILES.load(blob, lambda path: secret_key.load(public.context, path))
        keys = cls(public, secret_key)
        keys._check_pair()
        keys._check_noise_model()
        return keys

    def _check_noise_model(self) -> None:
        bound = self.profile.secret_embedding_bound
        peak = secret_embedding_max(self.secret_key, self._public)
        if peak > bound:
            raise HEError(
                f"the secret key's canonical embedding reaches {peak:.0f}, above the "
                f"{bound:.0f} that profile {self.profile.name!r} sizes its noise flooding for",
                "generate a new key pair with this vllm-tensafe version (generation rejects "
                "such keys)",
            )

    def _check_pair(self) -> None:
        """A secret file could pair a key with someone else's public context: check they match."""
        ctx = self._public
        plain = seal.Plaintext()
        ctx.encoder.encode(1.0, ctx.parms_id, 2.0**30, plain)
        ct = seal.Ciphertext(ctx.context)
        ctx.encryptor.encrypt(plain, ct)
        out = seal.Plaintext()
        seal.Decryptor(ctx.context, self.secret_key).decrypt(ct, out)
        value = ctx.encoder.decode_double(out)[0]
        if abs(value - 1.0) > 1e-3:
            raise HEError(
                "the secret key does not belong to the public key stored with it",
                "the file is corrupted; restore it or make new keys",
            )

    def __repr__(self) -> str:
        return f"SecretKeySet(profile={self.profile.name!r}, key_id={self.key_id[:16]}...)"


def _section(tag: int, payload: bytes) -> tuple[bytes, bytes]:
    return _SECTION.pack(tag, len(payload)), payload


def _scrypt(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "secret key file %s is accessible to group/others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )


# --- key generation ------------------------------------------------------------------------------


def secret_key_coefficients(secret_key: SealSecretKey, ctx: PublicContext) -> np.ndarray:
    """The ternary coefficients of s (inverse NTT of the key's first RNS component)."""
    n = ctx.profile.poly_modulus_degree
    modulus = ctx.context.key_context_data().parms().coeff_modulus()[0]
    q = modulus.value()
    plain = secret_key.data()
    residues = [plain[i] for i in range(n)]
    util = seal._sealapi_cpp.util
    tables = util.NTTTables(n.bit_length() - 1, modulus)
    # SEAL's binding calls the lazy inverse NTT: outputs are in [0, 2q).
    coeffs = np.array(util.inverse_ntt_negacyclic_harvey(residues, tables), dtype=np.uint64)
    coeffs %= np.uint64(q)
    signed = coeffs.astype(np.int64)
    signed[coeffs > np.uint64(q // 2)] -= np.int64(q)
    if np.abs(signed).max() > 1:
        raise HEError("the secret key is not ternary", "generate keys with vllm-tensafe")
    return signed.astype(np.int8)


def secret_embedding_max(secret_key: SealSecretKey, ctx: PublicContext) -> float:
    """max |s(zeta)| over the primitive 2N-th roots of unity zeta."""
    s = secret_key_coefficients(secret_key, ctx).astype(np.float64)
    n = s.shape[0]
    # s(exp(i pi k / N)) for all k in [0, 2N): one FFT of s padded to 2N; odd k are the roots.
    values = np.fft.ifft(np.concatenate([s, np.zeros(n)])) * (2 * n)
    return float(np.abs(values[1::2]).max())


def generate_keys(profile: str = DEFAULT_PROFILE) -> tuple[SecretKeySet, PublicContext]:
    """Fresh CKKS keys. Only a secret and a public key: no relinearisation or Galois keys."""
    prof = get_profile(profile)
    parms = _expected_parms(prof)
    context = _make_context(prof, parms)
    for _ in range(64):
        keygen = seal.KeyGenerator(context)
        secret_key = keygen.secret_key()
        public_key = seal.PublicKey()
        keygen.create_public_key(public_key)
        raw = _public_bytes(prof, parms, public_key)
        public = PublicContext(prof, parms, public_key, raw)
        # ~1 key in 2000 has a slot of s(zeta) beyond the bound the flooding is sized for.
        if secret_embedding_max(secret_key, public) <= prof.secret_embedding_bound:
            return SecretKeySet(public, secret_key), public
    raise HEError(  # pragma: no cover - probability ~2^-700
        "could not generate a key inside the profile's noise model", "report this as a bug"
    )


def write_keypair(
    prefix: str | os.PathLike[str],
    profile: str = DEFAULT_PROFILE,
    passphrase: str | None = None,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write PREFIX.secret (mode 0600, optionally passphrase-sealed) and PREFIX.public.

    An existing pair is replaced only with ``force`` (OutputExistsError otherwise): a secret
    key that an adapter still needs is gone for good once replaced.
    """
    prefix = Path(prefix)
    secret_path = prefix.with_name(prefix.name + ".secret")
    public_path = prefix.with_name(prefix.name + ".public")
    refuse_overwrite(
        (secret_path, public_path),
        force,
        "choose another prefix, or pass --force only if no adapter still needs the old key",
    )
    if not prefix.parent.is_dir():
        raise HEError(
            f"folder {str(prefix.parent)!r} does not exist", "create it or choose another prefix"
        )
    secret, public = generate_keys(profile)
    secret.save(secret_path, passphrase)
    write_private(public_path, public.to_bytes(), 0o644)
    return secret_path, public_path
