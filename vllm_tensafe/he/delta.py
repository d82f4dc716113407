"""The host side of HE-LoRA: delta = U B'^T with B' encrypted, per engine step.

For each module the host has U = X A'^T (T x r, plaintext) and the encrypted columns of B'.
Per group of k tokens and per row chunk it forms

    Enc(delta_group) = sum_j encode(U[group, j] each repeated chunk_rows) * Enc(B'_j)

(r plaintext-ciphertext products, r - 1 additions, no rotation, no relinearisation, no rescale:
the product scale 2^(b_scale_bits + u_scale_bits) fits the data modulus). It adds a fresh
uniform mask M in [-2^mask_bits, 2^mask_bits] to every slot, sends every ciphertext of the call
to the key holder in ONE decrypt call, and subtracts M from what comes back.

Bounded-norm invariant: the key holder sizes its flooding for per-token ||U_t||_2 up to
2^u_norm_bits. A group with a larger norm is divided by f = max_t ||U_t||_2 / 2^u_norm_bits
before encoding and its delta multiplied by f afterwards (the error grows by f, correctness
does not change).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import ForeignCiphertextError, HEError, KeyHolderError
from vllm_tensafe.he.flooding import uniform_mask
from vllm_tensafe.he.keyholder import KeyHolder, LocalKeyHolder
from vllm_tensafe.he.keys import PublicContext
from vllm_tensafe.he.packing import EncryptedMatrix, ciphertext_to_bytes


@dataclass
class DeltaStats:
    """Counters for observability (monotonic; read them, do not reset them in place)."""

    compute_calls: int = 0
    decrypt_calls: int = 0
    ciphertexts_sent: int = 0
    tokens: int = 0
    products: int = 0
    seconds_products: float = 0.0  # encode, multiply, mask, serialise (host HE work)
    seconds_key_holder: float = 0.0  # the decrypt call, including the network for remote
    seconds_unmask: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class _Job:
    item: int
    row0: int
    tokens: int
    col0: int
    rows: int
    factor: float
    mask: np.ndarray


class DeltaEngine:
    """Computes HE-LoRA deltas for one public context through one key holder."""

    def __init__(self, ctx: PublicContext, key_holder: KeyHolder) -> None:
        if not isinstance(ctx, PublicContext):
            raise HEError(
                f"DeltaEngine needs a PublicContext, got {type(ctx).__name__}",
                "load it with PublicContext.from_bytes",
            )
        self.ctx = ctx
        self.key_holder = key_holder
        self.stats = DeltaStats()
        self._local = isinstance(key_holder, LocalKeyHolder)
        self._lock = threading.Lock()
        self._plain = seal.Plaintext()
        self._mask_plain = seal.Plaintext()
        self._tmp = seal.Ciphertext(ctx.context)

    def compute(
        self, adapter_id: str, items: Sequence[tuple[np.ndarray, EncryptedMatrix]]
    ) -> list[np.ndarray]:
        with self._lock:
            return self._compute(adapter_id, items)

    # ------------------------------------------------------------------------------------

    def _check_items(self, items: Sequence[tuple[np.ndarray, EncryptedMatrix]]) -> list[np.ndarray]:
        us = []
        for i, item in enumerate(items):
            try:
                u, mat = item
            except (TypeError, ValueError):
                raise HEError(
                    f"item {i} is not a (U, EncryptedMatrix) pair", "pass [(U, matrix), ...]"
                ) from None
            if not isinstance(mat, EncryptedMatrix):
                raise HEError(
                    f"item {i}: expected an EncryptedMatrix, got {type(mat).__name__}",
                    "load B' with EncryptedMatrix.from_bytes",
                )
            if mat.ctx.key_id != self.ctx.key_id:
                raise ForeignCiphertextError(
                    f"item {i}: B' was encrypted under key {mat.ctx.key_id[:16]}, the engine "
                    f"uses {self.ctx.key_id[:16]}",
                    "use one DeltaEngine per public context",
                )
            arr = np.asarray(u)
            if arr.ndim != 2 or arr.shape[1] != mat.rank or arr.dtype.kind not in "fiu":
                raise HEError(
                    f"item {i}: U has shape {arr.shape} dtype {arr.dtype}, expected "
                    f"(tokens, {mat.rank}) float",
                    "pass U = X @ A'^T for this module",
                )
            arr = arr.astype(np.float64, copy=False)
            if not np.all(np.isfinite(arr)):
                raise HEError(f"item {i}: U contains NaN or infinite values", "check X and A'")
            us.append(arr)
        return us

    def _compute(
        self, adapter_id: str, items: Sequence[tuple[np.ndarray, EncryptedMatrix]]
    ) -> list[np.ndarray]:
        us = self._check_items(items)
        profile = self.ctx.profile
        outputs = [
            np.zeros((u.shape[0], mat.d_out), dtype=np.float32)
            for u, (_, mat) in zip(us, items, strict=True)
        ]
        self.stats.compute_calls += 1
        started = time.perf_counter()
        jobs: list[_Job] = []
        cts: list[Any] = []
        for i, (u, (_, mat)) in enumerate(zip(us, items, strict=True)):
            self.stats.tokens += u.shape[0]
            k = mat.tokens_per_ciphertext
            for row0 in range(0, u.shape[0], k):
                group = u[row0 : row0 + k]
                norm = float(np.sqrt((group * group).sum(axis=1)).max())
                factor = max(1.0, norm / profile.u_norm_bound)
                self._group(
                    i, row0, group / factor if factor > 1.0 else group, factor, mat, jobs, cts
                )
        if not cts:
            self.stats.seconds_products += time.perf_counter() - started
            return outputs
        if not self._local:
            payload: list[Any] = [ciphertext_to_bytes(ct) for ct in cts]
        self.stats.seconds_products += time.perf_counter() - started

        started = time.perf_counter()
        self.stats.decrypt_calls += 1
        self.stats.ciphertexts_sent += len(cts)
        if self._local:
            assert isinstance(self.key_holder, LocalKeyHolder)
            values = self.key_holder._decrypt_ciphertexts(adapter_id, self.ctx.key_id, cts)
        else:
            values = self.key_holder.decrypt(adapter_id, self.ctx.key_id, payload)
        self.stats.seconds_key_holder += time.perf_counter() - started

        started = time.perf_counter()
        slots = self.ctx.slot_count
        if len(values) != len(cts) or any(np.shape(v) != (slots,) for v in values):
            raise KeyHolderError(
                f"key holder returned {len(values)} results for {len(cts)} ciphertexts "
                "(or results of the wrong length)",
                "check that key holder and host use the same profile and version",
            )
        for job, vals in zip(jobs, values, strict=True):
            used = job.tokens * job.rows
            delta = (np.asarray(vals[:used], dtype=np.float64) - job.mask[:used]).reshape(
                job.tokens, job.rows
            )
            if job.factor != 1.0:
                delta *= job.factor
            outputs[job.item][job.row0 : job.row0 + job.tokens, job.col0 : job.col0 + job.rows] = (
                delta
            )
        self.stats.seconds_unmask += time.perf_counter() - started
        return outputs

    def _group(
        self,
        item: int,
        row0: int,
        group: np.ndarray,
        factor: float,
        mat: EncryptedMatrix,
        jobs: list[_Job],
        cts: list[Any],
    ) -> None:
        ctx = self.ctx
        profile = ctx.profile
        tokens = group.shape[0]
        u_scale = profile.u_scale
        # A plaintext that encodes to the zero polynomial makes SEAL's product "transparent"
        # (and SEAL refuses it); such a column contributes nothing, so it is skipped.
        negligible = 0.5 / u_scale
        accs: list[Any] = [None] * mat.n_chunks
        for j in range(mat.rank):
            column = group[:, j]
            if np.abs(column).max() <= negligible:
                continue
            if tokens == 1:
                # A constant polynomial: exact, and no FFT; it also serves every chunk.
                ctx.encoder.encode(float(column[0]), ctx.parms_id, u_scale, self._plain)
            for c, rows in enumerate(mat.chunk_rows):
                if tokens > 1:
                    ctx.encoder.encode(
                        np.repeat(column, rows).tolist(), ctx.parms_id, u_scale, self._plain
                    )
                b_ct = mat.ciphertexts[j][c]
                if accs[c] is None:
                    accs[c] = seal.Ciphertext(ctx.context)
                    ctx.evaluator.multiply_plain(b_ct, self._plain, accs[c])
                else:
                    ctx.evaluator.multiply_plain(b_ct, self._plain, self._tmp)
                    ctx.evaluator.add_inplace(accs[c], self._tmp)
                self.stats.products += 1
        col0 = 0
        for c, rows in enumerate(mat.chunk_rows):
            acc = accs[c]
            if acc is not None:
                mask = uniform_mask(ctx.slot_count, profile.mask_bound)
                ctx.encoder.encode(mask.tolist(), ctx.parms_id, acc.scale, self._mask_plain)
                ctx.evaluator.add_plain_inplace(acc, self._mask_plain)
                jobs.append(_Job(item, row0, tokens, col0, rows, factor, mask))
                cts.append(acc)
            # else: U is zero for the whole group, delta is exactly zero; nothing to decrypt.
            col0 += rows
