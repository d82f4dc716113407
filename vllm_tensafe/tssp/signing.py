"""Ed25519 signing keys, the trust store, and the manifest signature.

The signature is over ``b"tssp-manifest-v1\\x00" + manifest_bytes``: the prefix separates
this use of the key from any other thing the same key might ever sign, so a signature made
for something else can never pass as a manifest signature.

A key id is the hex SHA-256 of the raw 32-byte Ed25519 public key. Packages carry only the
signer's key id, never the key: trust comes from the caller's trust store alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vllm_tensafe.errors import KeyFileError
from vllm_tensafe.files import refuse_overwrite, write_private

SIGNATURE_DOMAIN = b"tssp-manifest-v1\x00"
MAX_KEY_FILE = 64 * 1024


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_manifest(private_key: Ed25519PrivateKey, manifest_bytes: bytes) -> bytes:
    return private_key.sign(SIGNATURE_DOMAIN + manifest_bytes)


def signature_valid(public_key: Ed25519PublicKey, manifest_bytes: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, SIGNATURE_DOMAIN + manifest_bytes)
    except InvalidSignature:
        return False
    return True


# --- key files -------------------------------------------------------------------------------


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise KeyFileError(
                f"{what} {str(path)!r} is {size} bytes; a PEM Ed25519 key is well under 1 KiB",
                "pass the .key/.pub file written by `vllm-tensafe keygen signing`",
            )
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read {what} {str(path)!r}: {exc.strerror or exc}",
            "check the path and its permissions",
        ) from None


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM); errors name the file."""
    p = Path(path)
    data = _read_key_file(p, "trusted key file")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"trusted key file {str(p)!r} is not a PEM public key",
            "pass the PREFIX.pub file written by `vllm-tensafe keygen signing`",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"trusted key file {str(p)!r} holds a {type(key).__name__}, not an Ed25519 key",
            "pass the PREFIX.pub file written by `vllm-tensafe keygen signing`",
        )
    return key


def load_signing_key(
    path: str | os.PathLike[str], passphrase: str | None = None
) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PKCS8 PEM, encrypted when written with a passphrase)."""
    p = Path(path)
    data = _read_key_file(p, "signing key file")
    password = passphrase.encode("utf-8") if passphrase is not None else None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        # cryptography raises TypeError for "encrypted but no password" and the reverse.
        if password is None:
            raise KeyFileError(
                f"signing key {str(p)!r} is encrypted and no passphrase was given",
                "pass --passphrase-env VAR with the passphrase in environment variable VAR",
            ) from None
        raise KeyFileError(
            f"signing key {str(p)!r} is not encrypted, but a passphrase was given",
            "drop --passphrase-env",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"cannot load signing key {str(p)!r}: wrong passphrase or not a PEM private key",
            "check the passphrase; pass the PREFIX.key file written by "
            "`vllm-tensafe keygen signing`",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"signing key {str(p)!r} holds a {type(key).__name__}, not an Ed25519 key",
            "make one with `vllm-tensafe keygen signing --out PREFIX`",
        )
    return key


def write_signing_keypair(
    prefix: str | os.PathLike[str], passphrase: str | None = None, force: bool = False
) -> tuple[Path, Path]:
    """Generate an Ed25519 key pair: PREFIX.key (PKCS8 PEM, mode 0600) and PREFIX.pub."""
    prefix_path = Path(prefix)
    key_path = prefix_path.with_name(prefix_path.name + ".key")
    pub_path = prefix_path.with_name(prefix_path.name + ".pub")
    refuse_overwrite(
        (key_path, pub_path), force, "choose another --out prefix, or pass --force to replace them"
    )
    if not prefix_path.parent.is_dir():
        raise KeyFileError(
            f"folder {str(prefix_path.parent)!r} does not exist",
            "create it first or choose another --out prefix",
        )
    private_key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private(key_path, private_pem, 0o600)
    write_private(pub_path, public_pem, 0o644)
    return key_path, pub_path


# --- trust store -----------------------------------------------------------------------------


def parse_trusted_key(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH=PATTERN``: a trusted key file, optionally pinned to adapter names.

    ``owner.pub=sql-*`` trusts owner.pub only for packages whose name matches ``sql-*``. The
    pattern is a glob over adapter names (``*``, ``?``); list a key several times to give it
    several patterns. A spec whose part after the last ``=`` is not a pattern is a plain path.
    """
    from vllm_tensafe.tssp.manifest import is_name_pattern

    text = os.fspath(spec)
    path, sep, pattern = text.rpartition("=")
    if sep and path and is_name_pattern(pattern):
        return Path(path), pattern
    return Path(text), None


class TrustStore:
    """The signer keys a caller trusts, by key id, each optionally pinned to adapter names.

    Built from PEM files only. A key without a pin may sign any adapter name; a pinned key only
    names matching one of its patterns (so a key trusted for ``sql-*`` cannot sign ``billing``).
    """

    def __init__(
        self,
        keys: dict[str, tuple[Ed25519PublicKey, str]] | None = None,
        pins: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._keys: dict[str, tuple[Ed25519PublicKey, str]] = dict(keys or {})
        # Key id -> allowed name patterns; a key absent here is unpinned.
        self._pins: dict[str, tuple[str, ...]] = dict(pins or {})

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustStore:
        """Entries are ``PATH`` or ``PATH=PATTERN`` (see ``parse_trusted_key``)."""
        keys: dict[str, tuple[Ed25519PublicKey, str]] = {}
        patterns: dict[str, set[str]] = {}
        unpinned: set[str] = set()
        for entry in paths:
            path, pattern = parse_trusted_key(entry)
            key = load_public_key(path)
            kid = key_id(key)
            keys[kid] = (key, str(path))
            if pattern is None:
                unpinned.add(kid)
            else:
                patterns.setdefault(kid, set()).add(pattern)
        # A key listed once without a pin is trusted for every name.
        pins = {kid: tuple(sorted(p)) for kid, p in patterns.items() if kid not in unpinned}
        return cls(keys, pins)

    @property
    def key_ids(self) -> set[str]:
        return set(self._keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        entry = self._keys.get(kid)
        return entry[0] if entry else None

    def source(self, kid: str) -> str | None:
        entry = self._keys.get(kid)
        return entry[1] if entry else None

    def pins(self, kid: str) -> tuple[str, ...] | None:
        """The name patterns ``kid`` may sign (None: any name)."""
        return self._pins.get(kid)

    def allows(self, kid: str, adapter_name: str) -> bool:
        """Whether ``kid`` is trusted to sign a package named ``adapter_name``."""
        from vllm_tensafe.tssp.manifest import name_matches

        if kid not in self._keys:
            return False
        patterns = self._pins.get(kid)
        return patterns is None or any(name_matches(adapter_name, p) for p in patterns)

    def keys(self) -> list[tuple[str, Ed25519PublicKey]]:
        return [(kid, entry[0]) for kid, entry in self._keys.items()]

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustStore({sorted(k[:16] for k in self._keys)})"
