"""Host attestation with TPM 2.0 quotes (docs/attestation.md).

The host proves to the remote key holder what it booted: a TPM quote over the PCRs that the
key holder's policy names, with a nonce the key holder issued, signed by the host's enrolled
attestation key. The key holder verifies the quote in pure Python (no TPM on its side) and
binds a session (token, TLS channel, AK) that its decryptions then require.

* host side: ``TpmTools``, ``TpmQuoter``, ``create_attestation_key`` (tpm2-tools), and
  ``client.Attester``, which ``RemoteKeyHolder`` (vllm_tensafe/he/remote.py) drives;
* key-holder side: ``AttestationPolicy``, ``AttestationVerifier`` (``issue_nonce``,
  ``verify_and_bind``, ``require``), ``QuoteBundle``, and ``routes.AttestationRoutes``, which
  the key-holder service (vllm_tensafe/he/service/) mounts with ``--attestation-policy``;
* ``tpms``: the strict TPMS_ATTEST / TPMT_SIGNATURE parsers.

Nothing here imports vLLM or TenSEAL.
"""

from vllm_tensafe.attestation.bundle import QuoteBundle
from vllm_tensafe.attestation.policy import AttestationKey, AttestationPolicy, HostPolicy
from vllm_tensafe.attestation.tpm import (
    DEFAULT_TCTI,
    EnrolledKey,
    TpmQuoter,
    TpmTools,
    create_attestation_key,
)
from vllm_tensafe.attestation.verifier import AttestationVerifier, Challenge, Session

__all__ = [
    "DEFAULT_TCTI",
    "AttestationKey",
    "AttestationPolicy",
    "AttestationVerifier",
    "Challenge",
    "EnrolledKey",
    "HostPolicy",
    "QuoteBundle",
    "Session",
    "TpmQuoter",
    "TpmTools",
    "create_attestation_key",
]
