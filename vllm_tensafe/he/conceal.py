"""What the host does to every ciphertext before it leaves for a remote key holder.

Before protocol v2 the host added a slot mask to c0 only. That hid nothing from the key holder
(docs/threat-model.md, "What was wrong before"): c1 of a product is a public integer combination
of the package's c1 polynomials, which the adapter owner made, so solving for the weights gave
U = x A'^T exactly; and the decryption outside the mask's subspace gave it again. Now each
outgoing ciphertext is

1. re-randomised: (c0, c1) += (pk0 v, pk1 v + e1), a fresh public-key encryption of zero at the
   data level (v ternary, e1 a centred binomial of std 3.24, never reused): c1 becomes an RLWE
   sample, pseudorandom even to whoever holds the secret key;
2. padded: c0 += R with R uniform mod Q. The key holder's decryption D + R is then uniform
   whatever D is: a one-time pad on the polynomial. The host keeps rho = S_m(R) and subtracts
   it from the reply (ring.py).

The encryption of zero needs no e0 on c0: R already makes c0 uniform, and decryption gives
D + e v + e1 s + R, whose extra noise (std ~2^8.4 per coefficient) the profile's noise bound
includes. Building it at the data level (one NTT of three polynomials and one SEAL product)
costs a fraction of SEAL's ``encrypt_zero``, which encrypts at the special prime and switches
down.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.he.keys import PublicContext
from vllm_tensafe.he.residues import (
    ciphertext_from_residues,
    ciphertext_residues,
    plaintext_residues,
)
from vllm_tensafe.he.ring import Ring


@dataclass
class Concealed:
    """One ciphertext as it leaves the host, and what the host keeps to read the reply."""

    blob: bytes  # wire bytes (keyholder.encode_ciphertext's format)
    pad_switch: np.ndarray  # rho = S_m(R), uint64 (N,)


@dataclass
class _Cover:
    """What one ciphertext gets added: (pk0 v + R, pk1 v + e1), and rho = S_m(R) for every
    reply exponent m of the profile. Made for one ciphertext, used by it alone."""

    c0: np.ndarray  # (L, N) NTT form
    c1: np.ndarray  # (L, N) NTT form
    pad_switch: dict[int, np.ndarray]


class _CoverMaker:
    """Makes covers; one per thread (its Ring and SEAL scratch objects are its own)."""

    def __init__(self, ctx: PublicContext, public_key: Any, exponents: list[int]) -> None:
        self.ctx = ctx
        self.ring = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
        self.public_key = public_key
        self.exponents = exponents
        self.v = seal.Plaintext()
        ctx.encoder.encode(1.0, ctx.parms_id, 1.0, self.v)  # an NTT-form plaintext to reuse
        self.zero = seal.Ciphertext(ctx.context)

    def make(self) -> _Cover:
        ring = self.ring
        pad = ring.uniform(1)  # R in coefficient form
        (c0, c1), pad_ntt = self.encryption_of_zero(pad)
        ring.add(c0, pad_ntt)
        return _Cover(c0, c1, {m: ring.switch(pad[0], m) for m in self.exponents})

    def encryption_of_zero(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pk0 v, pk1 v + e1) in NTT form (2, L, N), and ``extra`` (1, L, N) transformed in
        the same SEAL call (one NTT of three polynomials)."""
        ring = self.ring
        fresh = np.concatenate(
            [ring.residues_of(ring.ternary(1)), ring.residues_of(ring.errors(1)), extra]
        )
        v, e1, extra_ntt = ring.transform(fresh, to_ntt=True)
        plaintext_residues(self.v, ring.primes)[...] = v
        self.ctx.evaluator.multiply_plain(self.public_key, self.v, self.zero)
        zero = ciphertext_residues(self.zero).copy()  # (pk0 v, pk1 v)
        ring.add(zero[1], e1)
        return zero, extra_ntt


class Concealer:
    """Re-randomises and pads ciphertexts of one public context (see the module docstring).

    With ``prefetch`` > 0 a background thread makes that many covers ahead of use (each is
    still made for exactly one ciphertext and never drawn twice), so the NTTs and sampling run
    while the engine waits on the model or the network; when none is ready, one is made
    inline.
    """

    def __init__(self, ctx: PublicContext, ring: Ring, *, prefetch: int = 0) -> None:
        self.ctx = ctx
        self.ring = ring
        profile = ctx.profile
        # The public key lives at the key level (data primes + special prime); an encryption
        # of zero at the data level only needs its first L residue rows.
        pk = ciphertext_residues(ctx.public_key.data())[:, : ring.primes, :]
        self._public_key = ciphertext_from_residues(ctx.context, ctx.parms_id, pk, 1.0)
        self._exponents = {
            bits: profile.reply_exponent(bits) for bits in profile.accepted_scale_bits
        }
        self._inline = _CoverMaker(ctx, self._public_key, list(self._exponents.values()))
        self._lock = threading.Lock()
        self._prefetch = int(prefetch)
        self._queue: queue.Queue[_Cover] = queue.Queue(maxsize=max(1, self._prefetch))
        self._thread: threading.Thread | None = None
        self._pid = 0

    def conceal(self, ct: Any) -> Concealed:
        """Re-randomise and pad ``ct`` IN PLACE (it is the engine's own product) and return
        its wire bytes with rho."""
        from vllm_tensafe.keyholder.wire import encode_ciphertext

        m = self._exponents[round(math.log2(ct.scale))]
        cover = self._take()
        residues = ciphertext_residues(ct)
        self.ring.add(residues[0], cover.c0)
        self.ring.add(residues[1], cover.c1)
        return Concealed(encode_ciphertext(ct), cover.pad_switch[m])

    def _take(self) -> _Cover:
        if self._prefetch:
            self._ensure_thread()
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
        with self._lock:
            return self._inline.make()

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._thread is not None and self._pid == pid:
            return
        with self._lock:
            if self._thread is None or self._pid != pid:  # none yet, or forked since
                self._queue = queue.Queue(maxsize=self._prefetch)
                maker = _CoverMaker(self.ctx, self._public_key, list(self._exponents.values()))
                self._thread = threading.Thread(
                    target=self._fill,
                    args=(maker, self._queue),
                    name="tensafe-conceal",
                    daemon=True,
                )
                self._pid = pid
                self._thread.start()

    @staticmethod
    def _fill(maker: _CoverMaker, covers: queue.Queue[_Cover]) -> None:
        while True:
            covers.put(maker.make())  # blocks while the queue is full
