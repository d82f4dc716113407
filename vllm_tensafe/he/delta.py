"""The host side of HE-LoRA: delta = U B'^T with B' encrypted, per engine step.

For each module the host has U = X A'^T (T x r, plaintext) and the encrypted columns of B'.
Per group of k tokens and per row chunk it forms

    Enc(delta_group) = sum_j encode(U[group, j] each repeated tile_width) * Enc(B'_j)

(r plaintext-ciphertext products, r - 1 additions, no rotation, no relinearisation, no rescale:
the product scale 2^(b_scale_bits + u_scale_bits) fits the data modulus). Modules packed into
one tile (q, k, v; gate, up: packing.fused_layouts) occupy disjoint slots, so their product
ciphertexts are added into one: a single ciphertext per token group for the whole layer. Every
ciphertext of the call goes to the key holder in ONE decrypt call. For a remote key holder
each is first re-randomised and padded (conceal.py), so the key holder learns nothing of U or
the delta; its replies are flooded, modulus-switched polynomials, which the host unpads and
decodes itself (ring.py). A local key holder is the host itself: nothing is concealed from it.

Bounded-norm invariant: the key holder sizes its flooding for per-token ||U_t||_2 up to
2^u_norm_bits, U_t being the concatenation over the modules of one ciphertext. A group with a
larger norm is divided by f = max_t ||U_t||_2 / 2^u_norm_bits before encoding and its delta
multiplied by f afterwards (the error grows by f, correctness does not change).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import ForeignCiphertextError, HEError, KeyHolderError
from vllm_tensafe.he.conceal import Concealer
from vllm_tensafe.he.keys import PublicContext
from vllm_tensafe.he.lincomb import MAX_RANK, LinearCombiner, fits
from vllm_tensafe.he.packing import EncryptedMatrix
from vllm_tensafe.he.residues import LayoutError
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.keyholder.local import KeyHolder, LocalKeyHolder
from vllm_tensafe.keyholder.wire import AdapterRef


@dataclass
class DeltaStats:
    """Counters for observability (monotonic; read them, do not reset them in place)."""

    compute_calls: int = 0
    decrypt_calls: int = 0
    ciphertexts_sent: int = 0
    tokens: int = 0
    products: int = 0
    gemm_products: int = 0  # of ``products``, those computed as integer GEMMs
    seconds_products: float = 0.0  # encode, multiply, conceal, serialise (host HE work)
    seconds_key_holder: float = 0.0  # the decrypt call, including the network for remote
    seconds_unmask: float = 0.0  # unpad and decode the replies

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


logger = logging.getLogger("vllm_tensafe.he")

GEMM_MIN_RANK = 8
# Covers (re-randomisation + pad) made ahead by a background thread for a remote key holder:
# about one engine step of a 24-layer model's worth (each ~0.7 MB).
CONCEAL_PREFETCH = 32


@dataclass
class _Part:
    """Where one item's rows sit in a product ciphertext."""

    item: int
    slot_offset: int
    tile_width: int
    col0: int
    rows: int
    factor: float


@dataclass
class _Job:
    row0: int
    tokens: int
    parts: list[_Part]


def fusion_sets(items: Sequence[tuple[np.ndarray, EncryptedMatrix]]) -> list[list[int]]:
    """Item indices whose product ciphertexts can be added into one: same tile, same tokens,
    disjoint slot ranges (modules packed with ``fused_layouts``). Chunked modules stay alone."""
    sets: list[list[int]] = []
    for i, (u, mat) in enumerate(items):
        placed = False
        if mat.n_chunks == 1:
            lo, hi = mat.slot_offset, mat.slot_offset + mat.d_out
            for members in sets:
                first_u, first = items[members[0]]
                if (
                    first.n_chunks == 1
                    and first.tile_width == mat.tile_width
                    and len(first_u) == len(u)
                    and all(
                        hi <= items[m][1].slot_offset
                        or items[m][1].slot_offset + items[m][1].d_out <= lo
                        for m in members
                    )
                ):
                    members.append(i)
                    placed = True
                    break
        if not placed:
            sets.append([i])
    return sets


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
        self._lock = threading.Lock()
        self._plain = seal.Plaintext()
        self._linear: LinearCombiner | None = None
        # The residue views (residues.py) are required: the replies are polynomials.
        self.ring = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
        # A local key holder is this process: nothing to conceal from it.
        local = isinstance(key_holder, LocalKeyHolder)
        self._concealer = None if local else Concealer(ctx, self.ring, prefetch=CONCEAL_PREFETCH)
        self._gemm_refused = False
        self._selectors: dict[tuple[int, int], Any] = {}
        # Scalar products go through the integer GEMM from this total rank on (below it
        # SEAL's call per product is as fast: benchmarks/he_bench.py measures both).
        self.gemm_min_rank = GEMM_MIN_RANK
        # Tiled groups (several tokens per ciphertext) as GEMM plus selector products, when
        # the profile has the scale budget and the group has at most half as many tokens as
        # columns: the GEMM path costs ~3 ms per token (reduction, selector product), SEAL's
        # ~1.4 ms per column (vector encode, product) whatever the tokens.
        self.gemm_tiled = True
        self._tmp = seal.Ciphertext(ctx.context)

    def compute(
        self, ref: AdapterRef, items: Sequence[tuple[np.ndarray, EncryptedMatrix]]
    ) -> list[np.ndarray]:
        """delta = U B'^T for every (U, B') item, through one key-holder call."""
        if ref.key_id != self.ctx.key_id:
            raise ForeignCiphertextError(
                f"adapter {ref.name!r} declares key {ref.key_id[:16]}, the engine uses "
                f"{self.ctx.key_id[:16]}",
                "use one DeltaEngine per public context",
            )
        with self._lock:
            return self._compute(ref, items)

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
        self, ref: AdapterRef, items: Sequence[tuple[np.ndarray, EncryptedMatrix]]
    ) -> list[np.ndarray]:
        us = self._check_items(items)
        outputs = [
            np.zeros((u.shape[0], mat.d_out), dtype=np.float32)
            for u, (_, mat) in zip(us, items, strict=True)
        ]
        self.stats.compute_calls += 1
        started = time.perf_counter()
        jobs: list[_Job] = []
        cts: list[Any] = []
        for u in us:
            self.stats.tokens += u.shape[0]
        for members in fusion_sets([(u, mat) for u, (_, mat) in zip(us, items, strict=True)]):
            self._fused(members, us, [items[i][1] for i in members], jobs, cts)
        if not cts:
            self.stats.seconds_products += time.perf_counter() - started
            return outputs
        scale_bits = [round(math.log2(ct.scale)) for ct in cts]
        pads: list[np.ndarray | None] = [None] * len(cts)
        if self._concealer is not None:
            concealed = [self._concealer.conceal(ct) for ct in cts]
            payload = [c.blob for c in concealed]
            pads = [c.pad_switch for c in concealed]
        self.stats.seconds_products += time.perf_counter() - started

        started = time.perf_counter()
        self.stats.decrypt_calls += 1
        self.stats.ciphertexts_sent += len(cts)
        if isinstance(self.key_holder, LocalKeyHolder):
            replies = self.key_holder.decrypt_ciphertexts(ref, cts)
        else:
            replies = self.key_holder.decrypt(ref, payload)
        self.stats.seconds_key_holder += time.perf_counter() - started

        started = time.perf_counter()
        n = self.ring.n
        if len(replies) != len(cts) or any(np.shape(r) != (n,) for r in replies):
            raise KeyHolderError(
                f"key holder returned {len(replies)} replies for {len(cts)} ciphertexts "
                "(or replies of the wrong length)",
                "check that the key holder and the host use the same profile and version",
            )
        values = self._read_replies(replies, pads, scale_bits)
        for job, vals in zip(jobs, values, strict=True):
            tiles = np.arange(job.tokens)[:, None]
            for part in job.parts:
                index = tiles * part.tile_width + (part.slot_offset + np.arange(part.rows))
                delta = vals[index]
                if part.factor != 1.0:
                    delta *= part.factor
                rows = slice(job.row0, job.row0 + job.tokens)
                outputs[part.item][rows, part.col0 : part.col0 + part.rows] = delta
        self.stats.seconds_unmask += time.perf_counter() - started
        return outputs

    def _read_replies(
        self, replies: list[np.ndarray], pads: list[np.ndarray | None], scale_bits: list[int]
    ) -> list[np.ndarray]:
        """Unpad (z = y - rho mod 2^min(m, 64)), centre and decode every reply."""
        ring, profile = self.ring, self.ctx.profile
        out: list[np.ndarray] = [np.empty(0)] * len(replies)
        for bits in sorted(set(scale_bits)):
            rows = [i for i, b in enumerate(scale_bits) if b == bits]
            m = profile.reply_exponent(bits)
            mask = np.uint64((1 << min(m, 64)) - 1)
            y = np.stack([np.asarray(replies[i], dtype=np.uint64) for i in rows])
            for k, i in enumerate(rows):
                pad = pads[i]
                if pad is not None:
                    y[k] -= pad
            z = ring.centred(y & mask, m)
            decoded = ring.decode(z, ring.reply_scale(bits, m))
            bound = min(profile.value_bound_at(bits), profile.reply_value_bound(bits)) / 2
            if not np.all(np.isfinite(decoded)) or np.abs(decoded).max() > bound:
                raise KeyHolderError(
                    "the key holder's replies decode outside the protocol range: it holds "
                    "another key, the reply was corrupted, or a delta overflowed",
                    "check that the key holder serves this package's key and version",
                )
            for k, i in enumerate(rows):
                out[i] = decoded[k]
        return out

    def _fused(
        self,
        members: list[int],
        us: list[np.ndarray],
        mats: list[EncryptedMatrix],
        jobs: list[_Job],
        cts: list[Any],
    ) -> None:
        """Products for every token group of a fusion set: one masked ciphertext per group and
        chunk, holding the rows of every member."""
        profile = self.ctx.profile
        first = mats[0]
        k = first.tokens_per_ciphertext
        total = us[members[0]].shape[0]
        for row0 in range(0, total, k):
            tokens = min(k, total - row0)
            groups = [us[i][row0 : row0 + k] for i in members]
            # The members' products add into one ciphertext, whose noise is that of the
            # concatenated U: the norm bound the key holder floods for applies to it.
            norm = float(np.sqrt(sum((g * g).sum(axis=1) for g in groups)).max())
            factor = max(1.0, norm / profile.u_norm_bound)
            if factor > 1.0:
                groups = [g / factor for g in groups]
            # Members whose U is zero for the whole group contribute an exact zero delta.
            live = [n for n, g in enumerate(groups) if np.abs(g).max() > 0.5 / profile.u_scale]
            if not live:
                continue
            accs = self._group_products([groups[n] for n in live], [mats[n] for n in live])
            col0s = [0] * len(live)
            for c in range(first.n_chunks):
                parts = []
                for slot, n in enumerate(live):
                    mat = mats[n]
                    rows = mat.chunk_rows[c]
                    offset = mat.slot_offset if mat.n_chunks == 1 else 0
                    parts.append(
                        _Part(members[n], offset, mat.tile_width, col0s[slot], rows, factor)
                    )
                    col0s[slot] += rows
                if accs[c] is not None:
                    jobs.append(_Job(row0, tokens, parts))
                    cts.append(accs[c])

    def _group_products(self, groups: list[np.ndarray], mats: list[EncryptedMatrix]) -> list[Any]:
        """One product ciphertext per chunk for a token group of a fusion set (None: zero).

        Three exact formulations, picked by cost (see docs/he-scheme.md, "Products"):
        SEAL's plaintext-ciphertext products (one encode + product per column), the integer
        GEMM over residues for one token per ciphertext, and for tiled groups the GEMM per
        token followed by one product with that token's tile selector.
        """
        ctx = self.ctx
        profile = ctx.profile
        tokens = groups[0].shape[0]
        rank = sum(m.rank for m in mats)
        if tokens == 1 and self._gemm_ready():
            weights = [np.rint(g * profile.u_scale).astype(np.int64) for g in groups]
            if rank >= self.gemm_min_rank and all(fits(w) for w in weights):
                return self._gemm(weights, mats, profile.product_scale, None)
        elif (
            self.gemm_tiled
            and self._gemm_ready()
            and profile.tiled_product_scale_bits is not None
            and 2 * tokens <= rank <= MAX_RANK
        ):
            scale = float(1 << profile.tile_u_scale_bits)  # type: ignore[operator]
            weights = [np.rint(g * scale).astype(np.int64) for g in groups]
            if all(fits(w) for w in weights):
                return self._gemm(weights, mats, None, mats[0].tile_width)
        accs: list[Any] = [None] * mats[0].n_chunks
        for group, mat in zip(groups, mats, strict=True):
            for c, product in enumerate(self._products(group, mat)):
                if product is None:
                    continue
                if accs[c] is None:
                    accs[c] = product
                else:
                    ctx.evaluator.add_inplace(accs[c], product)
        return accs

    def _gemm(
        self,
        weights: list[np.ndarray],
        mats: list[EncryptedMatrix],
        scale: float | None,
        tile_width: int | None,
    ) -> list[Any]:
        """Integer-GEMM products; ``tile_width`` set: tiled (per-token selector products)."""
        ctx = self.ctx
        combiner = self._combiner()
        tokens = weights[0].shape[0]
        out: list[Any] = []
        for c in range(mats[0].n_chunks):
            digits = None
            shape: tuple[int, ...] = ()
            for w, mat in zip(weights, mats, strict=True):
                columns = mat.residue_columns(c)
                digits = combiner.digits(w, columns, digits)
                shape = columns.shape
            products = tokens * sum(m.rank for m in mats)
            self.stats.products += products
            self.stats.gemm_products += products
            if tile_width is None:
                out.append(combiner.combine(digits, shape, scale)[0])  # type: ignore[arg-type]
                continue
            profile = ctx.profile
            per_token = combiner.combine(
                digits,  # type: ignore[arg-type]
                shape,
                profile.b_scale * float(1 << profile.tile_u_scale_bits),  # type: ignore[operator]
            )
            acc = None
            live = np.any(np.stack([w.any(axis=1) for w in weights]), axis=0)
            for t, g in enumerate(per_token):
                if not live[t]:
                    continue  # an all-zero combination: SEAL refuses the (zero) product
                selector = self._selector(tile_width, t)
                if acc is None:
                    acc = seal.Ciphertext(ctx.context)
                    ctx.evaluator.multiply_plain(g, selector, acc)
                else:
                    ctx.evaluator.multiply_plain(g, selector, self._tmp)
                    ctx.evaluator.add_inplace(acc, self._tmp)
            out.append(acc)
        return out

    def _gemm_ready(self) -> bool:
        """Whether the GEMM path can run here (it needs the residue views of residues.py)."""
        if self._linear is None and not self._gemm_refused:
            try:
                self._linear = LinearCombiner(self.ctx)
            except LayoutError as exc:
                self._gemm_refused = True
                logger.warning("integer-GEMM products unavailable, using SEAL's: %s", exc)
        return self._linear is not None

    def _combiner(self) -> LinearCombiner:
        assert self._linear is not None
        return self._linear

    def _selector(self, tile_width: int, tile: int) -> Any:
        """The plaintext that is 1 on tile ``tile`` of width ``tile_width`` and 0 elsewhere."""
        key = (tile_width, tile)
        plain = self._selectors.get(key)
        if plain is None:
            ctx = self.ctx
            values = np.zeros(ctx.slot_count)
            values[tile * tile_width : (tile + 1) * tile_width] = 1.0
            plain = seal.Plaintext()
            scale = float(1 << ctx.profile.tile_scale_bits)  # type: ignore[operator]
            ctx.encoder.encode(values.tolist(), ctx.parms_id, scale, plain)
            self._selectors[key] = plain
        return plain

    def _products(self, group: np.ndarray, mat: EncryptedMatrix) -> list[Any]:
        """sum_j encode(U[group, j] per tile) * Enc(B'_j), per chunk (None: all-zero U)."""
        ctx = self.ctx
        tokens = group.shape[0]
        u_scale = ctx.profile.u_scale
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
            else:
                # Token t's value over its whole tile; B' is zero outside the module's rows.
                ctx.encoder.encode(
                    np.repeat(column, mat.tile_width).tolist(), ctx.parms_id, u_scale, self._plain
                )
            for c in range(mat.n_chunks):
                b_ct = mat.column_ciphertext(j, c)
                if accs[c] is None:
                    accs[c] = seal.Ciphertext(ctx.context)
                    ctx.evaluator.multiply_plain(b_ct, self._plain, accs[c])
                else:
                    ctx.evaluator.multiply_plain(b_ct, self._plain, self._tmp)
                    ctx.evaluator.add_inplace(accs[c], self._tmp)
                self.stats.products += 1
        return accs
