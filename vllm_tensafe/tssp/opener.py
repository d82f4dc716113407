"""Open and verify TSSP packages (the serving host's side).

Order of checks, each a precondition for the next, so that no byte of a package reaches a
parser of payload formats (safetensors, SEAL) before it is known to be what the signer made:

1. container structure and size limits (format.py) -> MalformedPackageError, UnsupportedVersionError
2. signature over the exact manifest bytes by a key in the caller's trust store
   -> SignatureError, UntrustedSignerError
3. canonical manifest + schema + self-consistency (manifest.py, base_model.py); the signer's
   name pin (a key trusted for ``sql-*`` cannot sign ``billing``) -> UntrustedSignerError;
   expiry (``not_after``) -> PackageExpiredError
4. size and SHA-256 of every other member against the manifest -> DigestMismatchError
5. (optional) base-model binding against the caller's config.json -> BaseModelMismatchError
6. payloads: public context (must hold no secret key), A' tensors, ciphertext index and blobs,
   each cross-checked against the manifest -> MalformedPackageError

With a ``VersionLedger`` (versions.py), a package older than the highest ``adapter_version``
already accepted for its name is refused last -> RollbackError, and a newer one raises the mark.

Every failure is a TsspError subclass whose message names the cause and the fix; any other
exception escaping a parser is converted, so callers never see anything else.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from vllm_tensafe.errors import (
    DigestMismatchError,
    HEError,
    MalformedPackageError,
    PackageExpiredError,
    SignatureError,
    TenSafeError,
    TsspError,
    UntrustedSignerError,
)
from vllm_tensafe.tssp import lora_a
from vllm_tensafe.tssp.base_model import check_binding, validate_binding
from vllm_tensafe.tssp.ciphertexts import BlobRef, index_size, parse_index
from vllm_tensafe.tssp.format import (
    DIGESTED_MEMBERS,
    HE_CONTEXT,
    LORA_A,
    LORA_B,
    MANIFEST,
    MEMBER_LIMITS,
    SIGNATURE,
    ContainerReader,
)
from vllm_tensafe.tssp.manifest import (
    HEX64_RE,
    Manifest,
    parse_canonical_json,
    parse_utc,
    validate_manifest,
)
from vllm_tensafe.tssp.signing import TrustStore, signature_valid

if TYPE_CHECKING:
    from vllm_tensafe.he import EncryptedMatrix, PublicContext
    from vllm_tensafe.settings import TenSafeSettings
    from vllm_tensafe.tssp.versions import VersionLedger

_T = TypeVar("_T")

logger = logging.getLogger("vllm_tensafe.tssp")

_FIX_RECREATE = "re-create the package with `vllm-tensafe pack`"
_FIX_INTACT = "do not use this file; get an intact copy from the adapter owner"
_FIX_TRUST = (
    "pass the signer's public key: --tensafe-trusted-keys PUB[,PUB...] (TENSAFE_TRUSTED_KEYS) "
    "for vllm serve, --trusted-keys for vllm-tensafe verify"
)


@dataclass(frozen=True)
class ModuleEntry:
    """One LoRA module: A' in plaintext, B' as ciphertexts. delta(x) = B' (A' x)."""

    name: str
    lora_a: np.ndarray  # (r, d_in) float32, A' (mixed)
    encrypted_b: EncryptedMatrix  # B' = s B R^-1, (d_out, r): the scaling s is already in it
    d_in: int
    d_out: int


@dataclass(frozen=True)
class TsspPackage:
    """An opened, verified package. ``scaling`` is informational: it is already in B'."""

    path: Path
    name: str
    signer_key_id: str | None  # None only when opened with open_package_unverified
    manifest: dict[str, Any]
    manifest_digest: str  # SHA-256 (hex) of the signed manifest bytes: names this version
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, ModuleEntry]
    public_context: PublicContext
    base_binding: dict[str, Any]
    signature_verified: bool
    size_bytes: int
    mixed: bool = True
    adapter_version: int = 1
    not_after: str | None = None

    def check_base_model(self, config: dict[str, Any]) -> None:
        """Raise BaseModelMismatchError unless ``config`` (HF config.json) is the bound model."""
        check_binding(self.base_binding, config)


@dataclass(frozen=True)
class PackageSummary:
    """What ``verify_package`` established about a package (no payload deserialised)."""

    path: Path
    name: str
    signer_key_id: str
    signer_key_source: str | None
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    target_modules: list[str]
    module_count: int
    ciphertext_count: int
    base_architecture: str
    base_fingerprint: str
    base_model_checked: bool
    he_profile: str
    created: str
    size_bytes: int
    manifest: dict[str, Any] = field(repr=False)
    manifest_digest: str = ""
    adapter_version: int = 1
    not_after: str | None = None

    def line(self) -> str:
        base = f"{self.base_architecture} {self.base_fingerprint[:12]}"
        if self.base_model_checked:
            base += " (matches --base-model)"
        return (
            f"OK {self.path.name}: adapter {self.name!r} version {self.adapter_version}, "
            f"signed by trusted key "
            f"{self.signer_key_id[:16]} ({self.signer_key_source}), rank {self.rank}, "
            f"{self.module_count} modules ({', '.join(self.target_modules)}), base {base}, "
            f"HE profile {self.he_profile}, {self.size_bytes} bytes"
        )


@dataclass
class _Authenticated:
    manifest: Manifest
    manifest_dict: dict[str, Any]
    manifest_digest: str
    signer_key_id: str | None
    signer_key_source: str | None
    verified: bool


# --- steps -----------------------------------------------------------------------------------


def _claimed_signer(manifest_bytes: bytes) -> str | None:
    """Best-effort read of the signer key id from an unauthenticated manifest (for messages)."""
    try:
        claimed = parse_canonical_json(manifest_bytes).get("signer_key_id")
    except TsspError:
        return None
    return claimed if isinstance(claimed, str) and HEX64_RE.match(claimed) else None


def _authenticate(
    reader: ContainerReader, trust_store: TrustStore | None, verify_signature: bool
) -> _Authenticated:
    manifest_bytes = reader.read(MANIFEST)
    signature = reader.read(SIGNATURE)
    signer: str | None = None
    if verify_signature:
        if trust_store is None:
            raise TsspError(
                "no trusted signer keys were given, so the package cannot be verified", _FIX_TRUST
            )
        # Try every trusted key: the package's own claim of who signed it is not trusted
        # until a trusted key confirms it.
        for kid, key in trust_store.keys():
            if signature_valid(key, manifest_bytes, signature):
                signer = kid
                break
        if signer is None:
            claimed = _claimed_signer(manifest_bytes)
            if claimed is not None and claimed not in trust_store:
                raise UntrustedSignerError(
                    f"Invalid TSSP package: signer key {claimed} is not trusted",
                    "if you trust this signer, add its .pub file to --tensafe-trusted-keys "
                    "(TENSAFE_TRUSTED_KEYS; for vllm-tensafe verify: --trusted-keys)",
                )
            raise SignatureError(
                "Invalid TSSP package: signature verification failed (the manifest or its "
                "signature was changed, or it was not signed by "
                f"{'key ' + claimed if claimed else 'a trusted key'})",
                _FIX_INTACT,
            )
    else:
        logger.warning(
            "TSSP signature verification is OFF: loading %s without checking who made it "
            "(TENSAFE_VERIFY_SIGNATURE=false). Anyone who can write this file controls the "
            "adapter. Never run like this in production.",
            reader.path,
        )
    manifest_dict = parse_canonical_json(manifest_bytes)
    manifest = validate_manifest(manifest_dict)
    if signer is not None and manifest.signer_key_id != signer:
        raise SignatureError(
            f"Invalid TSSP package: signature verification failed (signed by trusted key "
            f"{signer}, but the manifest names {manifest.signer_key_id})",
            _FIX_INTACT,
        )
    if (
        signer is not None
        and trust_store is not None
        and not trust_store.allows(signer, manifest.name)
    ):
        raise UntrustedSignerError(
            f"Invalid TSSP package: signer key {signer} ({trust_store.source(signer)}) is "
            f"trusted only for adapter names {', '.join(trust_store.pins(signer) or ())}; "
            f"this package is named {manifest.name!r}",
            "get the package signed by a key trusted for this name, or add a pin for it: "
            "--tensafe-trusted-keys PUB=PATTERN (for vllm-tensafe verify: --trusted-keys)",
        )
    _check_expiry(manifest)
    validate_binding(manifest.base_model.model_dump())
    source = trust_store.source(signer) if (trust_store is not None and signer) else None
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    return _Authenticated(manifest, manifest_dict, digest, signer, source, signer is not None)


def _check_expiry(manifest: Manifest) -> None:
    if manifest.not_after is not None and datetime.now(UTC) > parse_utc(manifest.not_after):
        raise PackageExpiredError(
            f"Invalid TSSP package: adapter {manifest.name!r} version "
            f"{manifest.adapter_version} expired at {manifest.not_after} (its signed not_after)",
            "ask the adapter owner for a newer package",
        )


def _observe_version(versions: VersionLedger | None, auth: _Authenticated, path: object) -> None:
    if versions is not None:
        versions.observe(
            auth.manifest.name,
            auth.manifest.adapter_version,
            auth.manifest_digest,
            f"package {Path(str(path)).name}",
        )


def _check_sizes(reader: ContainerReader, manifest: Manifest) -> None:
    for name in DIGESTED_MEMBERS:
        listed = manifest.members[name].size
        actual = reader.layout.members[name].size
        if listed != actual:
            raise DigestMismatchError(
                f"Invalid TSSP package: member {name} is {actual} bytes, the signed manifest "
                f"says {listed}",
                _FIX_INTACT,
            )


def _digest_error(name: str) -> DigestMismatchError:
    return DigestMismatchError(
        f"Invalid TSSP package: member {name} does not match its SHA-256 digest in the signed "
        "manifest (it was changed or corrupted)",
        _FIX_INTACT,
    )


def _load_context(data: bytes, manifest: Manifest) -> PublicContext:
    from vllm_tensafe.he import PublicContext

    try:
        ctx = PublicContext.from_bytes(data, max_size=MEMBER_LIMITS[HE_CONTEXT])
    except Exception as exc:  # HEError, or anything the HE library let through
        reason = exc.cause if isinstance(exc, HEError) else type(exc).__name__
        raise MalformedPackageError(
            f"Invalid TSSP package: he_context is not a usable public CKKS context ({reason})",
            _FIX_RECREATE,
        ) from None
    he = manifest.he
    profile = ctx.profile
    actual = (
        ctx.key_id,
        profile.name,
        int(profile.poly_modulus_degree),
        [int(b) for b in profile.coeff_mod_bit_sizes],
    )
    if actual != (he.public_key_id, he.profile, he.poly_modulus_degree, he.coeff_mod_bit_sizes):
        raise MalformedPackageError(
            "Invalid TSSP package: he_context does not match the HE parameters in the manifest",
            _FIX_RECREATE,
        )
    return ctx


def _a_shapes(manifest: Manifest) -> dict[str, tuple[int, int]]:
    return {name: (manifest.lora.rank, m.d_in) for name, m in manifest.modules.items()}


def _b_sizes(manifest: Manifest) -> dict[str, int]:
    return {name: m.b_size for name, m in manifest.modules.items()}


def _load_matrices(
    ctx: PublicContext, data: memoryview, refs: list[BlobRef], manifest: Manifest
) -> dict[str, EncryptedMatrix]:
    import json

    from vllm_tensafe.he import EncryptedMatrix

    out: dict[str, EncryptedMatrix] = {}
    rank = manifest.lora.rank
    for ref in refs:
        module = manifest.modules[ref.name]
        blob = bytes(data[ref.offset : ref.offset + ref.size])
        try:
            enc = EncryptedMatrix.from_bytes(ctx, blob, d_out=module.d_out, rank=rank)
            layout = json.loads(json.dumps(enc.layout(), sort_keys=True))
            shape_ok = (int(enc.d_out), int(enc.rank)) == (module.d_out, rank)
        except Exception as exc:  # HEError, or anything the HE library let through
            reason = exc.cause if isinstance(exc, HEError) else type(exc).__name__
            raise MalformedPackageError(
                f"Invalid TSSP package: ciphertexts of {ref.name} cannot be read ({reason})",
                _FIX_RECREATE,
            ) from None
        if not shape_ok or layout != module.b_layout:
            raise MalformedPackageError(
                f"Invalid TSSP package: ciphertexts of {ref.name} do not match the manifest layout",
                _FIX_RECREATE,
            )
        out[ref.name] = enc
    return out


def _guard(path: str | os.PathLike[str], exc: BaseException) -> MalformedPackageError:
    # A parser below raised something that is not ours: the input is what is wrong (our own
    # checks ran first), so report it as a malformed package rather than leak the type.
    return MalformedPackageError(
        f"Invalid TSSP package: {Path(path).name} could not be read "
        f"({type(exc).__name__}: {str(exc)[:200]})",
        _FIX_RECREATE,
    )


# --- public API ------------------------------------------------------------------------------


def open_package(
    path: str | os.PathLike[str],
    *,
    trust: TrustStore,
    base_model_config: dict[str, Any] | None = None,
    versions: VersionLedger | None = None,
) -> TsspPackage:
    """Verify and load a package. Nothing is deserialised before it is authenticated.

    ``trust``: the signer keys the caller trusts (and their name pins). ``versions``: refuse a
    package older than the highest version seen for its name (and record this one), after
    every other check passed.
    """
    return _recorded(_open, path, trust, True, base_model_config, versions)


def open_package_unverified(
    path: str | os.PathLike[str],
    *,
    base_model_config: dict[str, Any] | None = None,
    versions: VersionLedger | None = None,
) -> TsspPackage:
    """Load a package WITHOUT checking who signed it: local experiments only.

    Every other check still runs (structure, digests against the manifest, binding, payloads);
    a warning is logged, because anyone who can write the file controls the adapter.
    """
    return _recorded(_open, path, None, False, base_model_config, versions)


def open_configured(
    path: str | os.PathLike[str],
    settings: TenSafeSettings,
    *,
    trust: TrustStore | None = None,
    base_model_config: dict[str, Any] | None = None,
    versions: VersionLedger | None = None,
) -> TsspPackage:
    """Open a package as the host's settings say: verified against ``trust`` (default: the
    settings' trusted keys), or unverified where ``TENSAFE_VERIFY_SIGNATURE=false``."""
    if not settings.verify_signature:
        return open_package_unverified(path, base_model_config=base_model_config, versions=versions)
    if trust is None:
        trust = TrustStore.from_files(settings.trusted_keys)
    return open_package(path, trust=trust, base_model_config=base_model_config, versions=versions)


def _recorded(step: Callable[..., _T], path: str | os.PathLike[str], *args: Any) -> _T:
    """Run one of the public checks: record its outcome as the verification metric, and turn
    anything that is not a TenSafeError into a MalformedPackageError."""
    from vllm_tensafe import observability

    try:
        result = step(path, *args)
    except TenSafeError as exc:  # TsspError, or ConfigError from the version ledger
        observability.record_tssp_verification(observability.verification_outcome(exc))
        raise
    except (Exception, RecursionError) as exc:
        observability.record_tssp_verification(observability.verification_outcome(exc))
        raise _guard(path, exc) from exc
    observability.record_tssp_verification("ok")
    return result


def _open(
    path: str | os.PathLike[str],
    trust_store: TrustStore | None,
    verify_signature: bool,
    base_model_config: dict[str, Any] | None,
    versions: VersionLedger | None,
) -> TsspPackage:
    with ContainerReader(path) as reader:
        auth = _authenticate(reader, trust_store, verify_signature)
        manifest = auth.manifest
        _check_sizes(reader, manifest)
        data: dict[str, bytes] = {}
        for name in DIGESTED_MEMBERS:
            data[name] = reader.read(name)
            if hashlib.sha256(data[name]).hexdigest() != manifest.members[name].sha256:
                raise _digest_error(name)
        size = reader.layout.total_size
    binding = manifest.base_model.model_dump()
    if base_model_config is not None:
        check_binding(binding, base_model_config)

    ctx = _load_context(data.pop(HE_CONTEXT), manifest)
    a_tensors = lora_a.decode(data.pop(LORA_A), _a_shapes(manifest))
    b_data = memoryview(data.pop(LORA_B))
    refs = parse_index(
        bytes(b_data[: index_size(list(manifest.modules))]), len(b_data), _b_sizes(manifest)
    )
    matrices = _load_matrices(ctx, b_data, refs, manifest)

    modules = {
        name: ModuleEntry(
            name=name,
            lora_a=a_tensors[name],
            encrypted_b=matrices[name],
            d_in=m.d_in,
            d_out=m.d_out,
        )
        for name, m in manifest.modules.items()
    }
    lora = manifest.lora
    _observe_version(versions, auth, path)
    return TsspPackage(
        path=Path(path),
        name=manifest.name,
        signer_key_id=auth.signer_key_id,
        manifest=auth.manifest_dict,
        manifest_digest=auth.manifest_digest,
        rank=lora.rank,
        alpha=lora.alpha,
        scaling=lora.scaling,
        use_rslora=lora.use_rslora,
        target_modules=list(lora.target_modules),
        modules=modules,
        public_context=ctx,
        base_binding=binding,
        signature_verified=auth.verified,
        size_bytes=size,
        mixed=lora.mixed,
        adapter_version=manifest.adapter_version,
        not_after=manifest.not_after,
    )


def verify_package(
    path: str | os.PathLike[str],
    *,
    trust: TrustStore,
    base_model_config: dict[str, Any] | None = None,
    versions: VersionLedger | None = None,
) -> PackageSummary:
    """Everything ``open_package`` checks except deserialising the ciphertexts.

    Large members are hashed as a stream, so verifying needs little memory whatever the
    package size.
    """
    return _recorded(_verify, path, trust, base_model_config, versions)


def _verify(
    path: str | os.PathLike[str],
    trust: TrustStore,
    base_model_config: dict[str, Any] | None,
    versions: VersionLedger | None,
) -> PackageSummary:
    with ContainerReader(path) as reader:
        auth = _authenticate(reader, trust, True)
        manifest = auth.manifest
        _check_sizes(reader, manifest)
        for name in DIGESTED_MEMBERS:
            if reader.sha256(name) != manifest.members[name].sha256:
                raise _digest_error(name)
        # Digests match, so these reads return the signed bytes (barring a concurrent writer,
        # which open_package, reading each member once, is immune to).
        ctx_bytes = reader.read(HE_CONTEXT)
        a_shapes = _a_shapes(manifest)
        a_info = reader.layout.members[LORA_A]
        a_head_len = lora_a.header_length(reader.read_prefix(LORA_A, 8), a_info.size)
        lora_a.check_header(reader.read_prefix(LORA_A, a_head_len), a_info.size, a_shapes)
        b_info = reader.layout.members[LORA_B]
        need = min(b_info.size, index_size(list(manifest.modules)))
        parse_index(reader.read_prefix(LORA_B, need), b_info.size, _b_sizes(manifest))
        size = reader.layout.total_size
    binding = manifest.base_model.model_dump()
    if base_model_config is not None:
        check_binding(binding, base_model_config)
    _load_context(ctx_bytes, manifest)
    _observe_version(versions, auth, path)
    assert auth.signer_key_id is not None  # verify always checks the signature
    return PackageSummary(
        path=Path(path),
        name=manifest.name,
        signer_key_id=auth.signer_key_id,
        signer_key_source=auth.signer_key_source,
        rank=manifest.lora.rank,
        alpha=manifest.lora.alpha,
        scaling=manifest.lora.scaling,
        use_rslora=manifest.lora.use_rslora,
        target_modules=list(manifest.lora.target_modules),
        module_count=len(manifest.modules),
        ciphertext_count=sum(m.ciphertexts for m in manifest.modules.values()),
        base_architecture=manifest.base_model.architecture,
        base_fingerprint=manifest.base_model.fingerprint,
        base_model_checked=base_model_config is not None,
        he_profile=manifest.he.profile,
        created=manifest.created,
        size_bytes=size,
        manifest=auth.manifest_dict,
        manifest_digest=auth.manifest_digest,
        adapter_version=manifest.adapter_version,
        not_after=manifest.not_after,
    )


@dataclass(frozen=True)
class SignedManifest:
    """What a key holder needs of a package: its authenticated identity, not its payloads."""

    path: Path
    name: str
    adapter_version: int
    not_after: str | None
    key_id: str  # the CKKS public key id the package's B' is encrypted under
    manifest_digest: str
    signer_key_id: str


def read_signed_manifest(path: str | os.PathLike[str], *, trust: TrustStore) -> SignedManifest:
    """Container structure, signature by a trusted key (and its name pin), schema and expiry
    of a package's manifest. The members are not read: a key holder binds names, keys and
    manifest digests, and never needs the ciphertexts."""
    try:
        with ContainerReader(path) as reader:
            auth = _authenticate(reader, trust, True)
    except TenSafeError:  # TsspError, or ConfigError from the version ledger
        raise
    except (Exception, RecursionError) as exc:
        raise _guard(path, exc) from exc
    manifest = auth.manifest
    assert auth.signer_key_id is not None
    return SignedManifest(
        path=Path(path),
        name=manifest.name,
        adapter_version=manifest.adapter_version,
        not_after=manifest.not_after,
        key_id=manifest.he.public_key_id,
        manifest_digest=auth.manifest_digest,
        signer_key_id=auth.signer_key_id,
    )


def read_manifest_digest(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(adapter name, CKKS key id, manifest digest) of a package, NOT authenticated: what a host
    puts in its decrypt requests (open_package authenticates the same bytes)."""
    try:
        with ContainerReader(path) as reader:
            manifest_bytes = reader.read(MANIFEST)
        manifest = validate_manifest(parse_canonical_json(manifest_bytes))
    except TenSafeError:  # TsspError, or ConfigError from the version ledger
        raise
    except (Exception, RecursionError) as exc:
        raise _guard(path, exc) from exc
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    return manifest.name, manifest.he.public_key_id, digest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a package, structurally checked but NOT authenticated (for display)."""
    try:
        with ContainerReader(path) as reader:
            manifest_dict = parse_canonical_json(reader.read(MANIFEST))
        validate_manifest(manifest_dict)
        return manifest_dict
    except TenSafeError:  # TsspError, or ConfigError from the version ledger
        raise
    except (Exception, RecursionError) as exc:
        raise _guard(path, exc) from exc


def inspect_package(
    path: str | os.PathLike[str], *, trust: TrustStore | None = None
) -> dict[str, Any]:
    """A JSON-able description of a package, for people. Needs no trust.

    Holds the manifest (key ids, shapes, layout, digests), member sizes, whether each digest
    matches, and the signature status. Never key material or ciphertext bytes: the manifest
    holds none, and no member payload is copied into the report.
    """
    try:
        return _inspect(path, trust)
    except TenSafeError:  # TsspError, or ConfigError from the version ledger
        raise
    except (Exception, RecursionError) as exc:
        raise _guard(path, exc) from exc


def _inspect(path: str | os.PathLike[str], trust: TrustStore | None) -> dict[str, Any]:
    if trust is not None:
        summary = verify_package(path, trust=trust)
        signature = f"valid, trusted key {summary.signer_key_id} ({summary.signer_key_source})"
    else:
        signature = "not checked (pass --trusted-keys to verify)"
    with ContainerReader(path) as reader:
        manifest_bytes = reader.read(MANIFEST)
        manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
        manifest_dict = parse_canonical_json(manifest_bytes)
        manifest = validate_manifest(manifest_dict)
        digests: dict[str, str] = {}
        for name in DIGESTED_MEMBERS:
            listed = manifest.members[name]
            ok = (
                reader.layout.members[name].size == listed.size
                and reader.sha256(name) == listed.sha256
            )
            digests[name] = "ok" if ok else "MISMATCH"
        members = {name: info.size for name, info in reader.layout.members.items()}
        version = reader.layout.version
        size = reader.layout.total_size
    return {
        "path": str(path),
        "format_version": version,
        "manifest_digest": manifest_digest,
        "size_bytes": size,
        "signature": signature,
        "member_sizes": members,
        "member_digests": digests,
        "manifest": manifest_dict,
    }
