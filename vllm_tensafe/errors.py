"""Typed errors. Every error the plugin raises names its cause and the fix.

The hierarchy is shallow on purpose (in the manner of pyca/cryptography): callers catch
`TenSafeError` for "anything this plugin refused" or one leaf for a specific cause.
"""

from __future__ import annotations


class TenSafeError(Exception):
    """Base class. ``str(err)`` is one line: the cause, then what to do about it."""

    def __init__(self, cause: str, fix: str | None = None) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(cause if not fix else f"{cause}. Fix: {fix}")


class ConfigError(TenSafeError, ValueError):
    """A TENSAFE_* variable or --tensafe-* flag has a value that cannot be used."""


class AdapterPathRefusedError(TenSafeError):
    """A runtime adapter request named a path outside the adapter folder, or a plaintext
    adapter where only encrypted packages are allowed."""


class KeyFileError(ConfigError):
    """A key file named by a flag, a setting or an argument cannot be read, or does not hold
    the key it should (an Ed25519 signing key, a trusted signer's public key)."""


class OutputExistsError(TenSafeError):
    """A command would replace a file that exists; nothing was written (``--force`` replaces)."""


# --- TSSP package errors -------------------------------------------------------------------


class TsspError(TenSafeError):
    """A TSSP package was refused. Nothing of it was used."""


class SignatureError(TsspError):
    """Signature missing or not valid for the manifest."""


class UntrustedSignerError(TsspError):
    """Valid signature, but the signer's key is not in the caller's trust store."""


class DigestMismatchError(TsspError):
    """A member's bytes do not match the digest the signed manifest lists."""


class MalformedPackageError(TsspError):
    """Truncated, oversized, unknown or duplicate members, path tricks, bad manifest."""


class UnsupportedVersionError(TsspError):
    """The package uses a format version this plugin does not read."""


class BaseModelMismatchError(TsspError):
    """The package was made for a different base model (architecture or weight shapes)."""


class PackageChangedError(TsspError):
    """The package file of a loaded adapter was replaced on disk by a different package."""


class RollbackError(TsspError):
    """A validly signed package older (lower adapter_version) than one already seen."""


class PackageExpiredError(TsspError):
    """The package's signed not_after date has passed."""


class UnsupportedAdapterError(TsspError):
    """The PEFT adapter uses a feature that cannot be served correctly (DoRA, lm_head, ...)."""


# --- HE and key-holder errors --------------------------------------------------------------


class HEError(TenSafeError):
    """A CKKS context, key or ciphertext could not be used."""


class KeyHolderError(HEError):
    """The key holder did not return a decryption; the request must fail, never degrade."""


class KeyHolderUnavailableError(KeyHolderError):
    """Not reachable, timed out, or answered with a server error after the allowed retries."""


class KeyHolderAuthError(KeyHolderError):
    """The key holder refused the host's credentials (HTTP 401/403)."""


class KeyHolderForbiddenError(KeyHolderError):
    """The key holder's policy refused the request: unknown adapter, a key or package version
    not bound to it, or a token without the scope (HTTP 403 at the key holder)."""


class AdapterRevokedError(KeyHolderError):
    """The adapter owner revoked this adapter at the key holder."""


class BudgetExhaustedError(KeyHolderError):
    """The adapter's decryption budget at the key holder is used up."""


class ProtocolVersionError(KeyHolderError):
    """Host and key holder speak different versions of the decrypt protocol."""


class ForeignCiphertextError(KeyHolderError):
    """The ciphertexts were not made under the key holder's key or parameters."""


# --- host attestation errors ---------------------------------------------------------------


class AttestationError(TenSafeError):
    """A host's TPM attestation could not be made or was refused: no decryption for it."""


class TpmError(AttestationError):
    """Host side: no TPM, tpm2-tools missing, or a TPM command failed."""


class MalformedQuoteError(AttestationError):
    """The quote bundle, TPMS_ATTEST or TPMT_SIGNATURE does not parse strictly."""


class UnknownHostError(AttestationError):
    """The key holder's attestation policy has no entry for this host (or this token)."""


class UnknownAttestationKeyError(AttestationError):
    """The quote names an attestation key the host's policy does not accept."""


class QuoteSignatureError(AttestationError):
    """The quote's signature is not valid for its message under the named attestation key."""


class NonceError(AttestationError):
    """The quote's nonce was not issued by this key holder (or it forgot it on a restart)."""


class StaleNonceError(NonceError):
    """The nonce expired, or a newer nonce was issued to the host since."""


class ReplayedQuoteError(NonceError):
    """The nonce was already used: a quote is accepted once."""


class ForeignNonceError(NonceError):
    """The nonce was issued to another host or on another connection."""


class QuoteTooOldError(AttestationError):
    """The quote is older than the host policy's maximum quote age."""


class PcrMismatchError(AttestationError):
    """The quoted PCRs are not the policy's selection, or a value differs from the policy."""


class AttestationRequiredError(AttestationError):
    """The host has no valid attestation session (none, expired, or another channel)."""
