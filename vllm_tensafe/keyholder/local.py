"""Key holders: whoever holds the CKKS secret key and decrypts the host's delta batches.

``KeyHolder`` is what the host's delta engine (he/delta.py) talks to. ``LocalKeyHolder`` runs
in the host process (the key is in host memory: adapters are protected at rest and in transit
only); the key-holder service (server/) runs one per key too, behind its policy.
``RemoteKeyHolder`` (remote.py) is the host's client of that service: the host never holds the
key; every decryption is authenticated, checked against the key holder's adapter policy,
metered, audited and revocable.

A key holder never returns a partial, zero or stale result: it returns every reply or raises a
KeyHolderError.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import ForeignCiphertextError
from vllm_tensafe.he.flooding import flood_coefficients
from vllm_tensafe.he.keys import SecretKeySet
from vllm_tensafe.he.packing import check_ciphertext
from vllm_tensafe.he.residues import plaintext_residues
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.keyholder.wire import AdapterRef, decode_ciphertext


class KeyHolder(abc.ABC):
    """Decrypts batches of the delta engine's ciphertexts for one CKKS key."""

    kind: str

    @abc.abstractmethod
    def decrypt(
        self, ref: AdapterRef, ciphertexts: Sequence[bytes | memoryview]
    ) -> list[np.ndarray]:
        """One reply per ciphertext: S_m of its flooded decryption, a uint64 array of N."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections or key material."""

    def __enter__(self) -> KeyHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalKeyHolder(KeyHolder):
    """Decrypts in this process: decrypt, inverse NTT, flood, modulus switch (ring.py).

    It never decodes: what it returns is the flooded decryption switched to 64-bit
    coefficients, a polynomial that says nothing about the key beyond the flood's
    statistical distance, and (on the remote path, where the host pads every request)
    nothing about the request either.
    """

    kind = "local"

    def __init__(self, secret: SecretKeySet) -> None:
        self._secret = secret
        self.ctx = secret.public_context()
        self.profile = self.ctx.profile
        self.key_id = secret.key_id
        # Tests switch this off to show what flooding prevents; nothing else may.
        self._flood = True
        self._decryptor = seal.Decryptor(self.ctx.context, secret.secret_key)
        self._ring = Ring(self.ctx.context, self.ctx.parms_id, self.profile.poly_modulus_degree)
        self._plain = seal.Plaintext()
        self._lock = threading.Lock()
        self.ciphertexts_decrypted = 0

    def _check_key(self, ref: AdapterRef) -> None:
        if ref.key_id != self.key_id:
            raise ForeignCiphertextError(
                f"ciphertexts declare key {ref.key_id[:16]}, this key holder holds "
                f"{self.key_id[:16]}",
                "route the adapter to the key holder of the key it was packed with",
            )

    def decrypt(
        self, ref: AdapterRef, ciphertexts: Sequence[bytes | memoryview]
    ) -> list[np.ndarray]:
        self._check_key(ref)
        loaded = [
            decode_ciphertext(self.ctx, blob, f"ciphertext {i}")
            for i, blob in enumerate(ciphertexts)
        ]
        return self._decrypt_checked(loaded)

    def decrypt_ciphertexts(self, ref: AdapterRef, ciphertexts: Sequence[Any]) -> list[np.ndarray]:
        """In-process path: SEAL ciphertext objects, no serialisation."""
        self._check_key(ref)
        for i, ct in enumerate(ciphertexts):
            check_ciphertext(
                ct,
                self.ctx,
                self.profile.accepted_scales,
                f"ciphertext {i}",
                ForeignCiphertextError,
            )
        return self._decrypt_checked(ciphertexts)

    def _decrypt_checked(self, ciphertexts: Sequence[Any]) -> list[np.ndarray]:
        profile, ring = self.profile, self._ring
        if not ciphertexts:
            return []
        with self._lock:
            decrypted = np.empty((len(ciphertexts), ring.primes, ring.n), dtype=np.uint64)
            scale_bits = []
            for i, ct in enumerate(ciphertexts):
                self._decryptor.decrypt(ct, self._plain)
                decrypted[i] = _plain_residues(self._plain, ring)
                scale_bits.append(round(math.log2(ct.scale)))
            coefficients = ring.transform(decrypted, to_ntt=False)
            out: list[np.ndarray] = [np.empty(0, dtype=np.uint64)] * len(ciphertexts)
            for bits in sorted(set(scale_bits)):
                rows = [i for i, b in enumerate(scale_bits) if b == bits]
                x = coefficients[rows]
                if self._flood:
                    sigma = profile.flood_coefficient_sigma(bits)
                    ring.add(x, flood_coefficients(ring, sigma, len(rows)))
                replies = ring.switch(x, profile.reply_exponent(bits))
                for row, reply in zip(rows, replies, strict=True):
                    out[row] = reply
            self.ciphertexts_decrypted += len(out)
        return out

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalKeyHolder(key_id={self.key_id[:16]}...)"


def _plain_residues(plain: Any, ring: Ring) -> np.ndarray:
    return plaintext_residues(plain, ring.primes)
