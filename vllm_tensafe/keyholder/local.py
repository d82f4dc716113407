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
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import ForeignCiphertextError
from vllm_tensafe.he.flooding import flood_coefficients
from vllm_tensafe.he.keys import SecretKeySet
from vllm_tensafe.he.packing import check_ciphertext
from vllm_tensafe.he.residues import plaintext_residues
from vllm_tensafe.he.ring import Ring, block_rows
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

    A batch is worked in blocks of a few ciphertexts (``block``: their temporaries stay in the
    core's cache), each start to finish by one of ``workers`` threads with its own SEAL
    decryptor and scratch ciphertexts, so that concurrent requests (several hosts or
    tensor-parallel ranks) share the threads instead of queueing on one lock. SEAL's calls
    hold the GIL and numpy's loops release it: how much the threads overlap depends on the
    machine (on 2 cores they measured no faster than one; docs/benchmarks.md, "Key holder").
    Replies are those of a one-thread key holder.
    """

    kind = "local"

    def __init__(self, secret: SecretKeySet, *, workers: int | None = None) -> None:
        self._secret = secret
        self.ctx = secret.public_context()
        self.profile = self.ctx.profile
        self.key_id = secret.key_id
        # Tests switch this off to show what flooding prevents; nothing else may.
        self._flood = True
        self.workers = max(1, int(workers) if workers else default_workers())
        n = self.profile.poly_modulus_degree
        # Blocks of at least two: SEAL's inverse NTT runs on a ciphertext of two polynomials.
        self.block = max(2, block_rows(n))
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._ensure_process()
        self.ciphertexts_decrypted = 0

    def _ensure_process(self) -> None:
        """Workers and threads of this process: a forked child makes its own (a worker checked
        out by a parent's thread at the fork would never come back)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid != pid:
                idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
                for _ in range(self.workers):
                    idle.put(_Worker(self.ctx, self._secret.secret_key))
                self._idle, self._pool, self._pid = idle, None, pid

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
        if not ciphertexts:
            return []
        self._ensure_process()
        step = self.block
        blocks = [ciphertexts[i : i + step] for i in range(0, len(ciphertexts), step)]
        if len(blocks) == 1 or self.workers == 1:
            parts = [self._decrypt_block(block) for block in blocks]
        else:
            parts = list(self._executor().map(self._decrypt_block, blocks))
        out = [reply for part in parts for reply in part]
        with self._lock:
            self.ciphertexts_decrypted += len(out)
        return out

    def _decrypt_block(self, block: Sequence[Any]) -> list[np.ndarray]:
        worker = self._idle.get()  # blocks while every worker is busy
        try:
            return worker.decrypt(block, self.profile, flood=self._flood)
        finally:
            self._idle.put(worker)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tensafe-decrypt")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"LocalKeyHolder(key_id={self.key_id[:16]}...)"


def default_workers() -> int:
    """Decryption threads of a key holder: up to 4, fewer on a smaller machine."""
    return max(1, min(4, os.cpu_count() or 1))


class _Worker:
    """One thread's SEAL objects: a decryptor, a plaintext and the ring's scratch ciphertexts
    (none of them may be used by two threads at once)."""

    def __init__(self, ctx: Any, secret_key: Any) -> None:
        self.decryptor = seal.Decryptor(ctx.context, secret_key)
        self.ring = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
        self.plain = seal.Plaintext()

    def decrypt(self, block: Sequence[Any], profile: Any, *, flood: bool) -> list[np.ndarray]:
        ring = self.ring
        decrypted = np.empty((len(block), ring.primes, ring.n), dtype=np.uint64)
        scale_bits = []
        for i, ct in enumerate(block):
            self.decryptor.decrypt(ct, self.plain)
            decrypted[i] = plaintext_residues(self.plain, ring.primes)
            scale_bits.append(round(math.log2(ct.scale)))
        coefficients = ring.transform(decrypted, to_ntt=False)
        out: list[np.ndarray] = [np.empty(0, dtype=np.uint64)] * len(block)
        for bits in sorted(set(scale_bits)):
            rows = [i for i, b in enumerate(scale_bits) if b == bits]
            x = coefficients if len(rows) == len(block) else coefficients[rows]
            if flood:
                sigma = profile.flood_coefficient_sigma(bits)
                ring.add(x, flood_coefficients(ring, sigma, len(rows)))
            replies = ring.switch(x, profile.reply_exponent(bits))
            for row, reply in zip(rows, replies, strict=True):
                out[row] = reply
        return out
