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
