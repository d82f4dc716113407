"""HE-LoRA deltas with the ciphertexts resident on a torch device (a GPU; any device works).

``GpuDeltaEngine`` serves one vLLM LoRA layer (its output slices, e.g. q/k/v of qkv_proj) for up
to ``max_slots`` adapter slots. At ``load`` it converts every column ciphertext Enc(B'_j) of the
slot's modules to coefficient form (SEAL, on the CPU, once), uploads the residues and prepares
the exact-GEMM tables (torch_ring.ProductTables). Per call, every token gets its own ciphertext
per *group* (modules that share one tile, as ``vllm-tensafe pack`` places them, or one row chunk
of a module wider than the slots):

    Enc(delta_t) = sum_j round(u_tj * 2^u_scale_bits) * Enc(B'_j)     (exact, integer GEMM)

and then, with the **local** key holder (one trust domain: the secret key is in this process),
decrypt (c0 + c1 * s), flood, modulus switch S_m, centre and decode: docs/v2-math's key-holder
and host steps, bit-identical to them where they are integer arithmetic, all on the device.
By default B' stays encrypted in device memory and every token's product is decrypted with the
secret key (c0 + c1 * s by FFT). With ``fold_secret`` the decryption is applied once to the
columns at load instead: Dec is linear, so sum_j w_j Dec(B'_j) = Dec(sum_j w_j B'_j) exactly, and
the per-token work drops the c1 polynomial and the FFT product; but the columns held on the
device are then Dec(B'_j), i.e. B' in the clear up to CKKS noise, which anyone who can read the
device memory reads (docs/gpu-he.md). A call of more tokens than the engine has columns (a
prefill) decrypts and decodes the columns once instead and combines their slot values with a
float64 GEMM, the profile's flood drawn per slot, where it is i.i.d. Gaussian
(``_decoded_columns``, ``_finish_decoded``; within the tolerance, not bit-identical).

With a **remote** key holder (``GpuRemoteDeltaEngine``) the device computes the products, the
re-randomisation (c + (pk0 v, pk1 v + e1)), the pad (c0 + R, rho = S_m(R)) and the NTT of the
outgoing ciphertexts; only those are copied to the host (as v2 wire bytes), the key holder's
replies y come back, and z = y - rho, the centring and the decoding run on the device again.

CUDA graphs (``capturable``): the local path has static shapes for a given token count, no host
synchronisation and no data-dependent Python; everything that changes between steps lives in
persistent buffers written in place: the GEMM tables, A', the per-slot output index and the
loaded flags (``load``/``unload`` write them between steps, like vLLM's stacked LoRA weights),
and the token-to-slot indices, which are vLLM's own punica buffer. The flood's randomness comes
from a torch Philox generator (see ``PhiloxFlood`` for why that is acceptable here and how a
capture registers it). See docs/gpu-he.md.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import tenseal.sealapi as seal
import torch

from vllm_tensafe.errors import ForeignCiphertextError, HEError, KeyHolderError
from vllm_tensafe.he.csprng import random_words
from vllm_tensafe.he.delta import DeltaStats
from vllm_tensafe.he.keys import PublicContext, SecretKeySet, secret_key_coefficients
from vllm_tensafe.he.packing import EncryptedMatrix
from vllm_tensafe.he.residues import (
    check_layout,
    ciphertext_from_residues,
    ciphertext_residues,
    data_moduli,
    set_ntt_form,
)
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.he.torch_ring import (
    CkksDecoder,
    FloodParameters,
    ForwardNTT,
    LimbPlan,
    Moduli,
    ModulusSwitch,
    NegacyclicFFT,
    ProductTables,
    ResidueArithmetic,
    flood_residues,
    limb_plan,
    normal_from_words,
    signed_to_residue,
    slot_positions,
)
from vllm_tensafe.keyholder.wire import encode_residue_batch

logger = logging.getLogger("vllm_tensafe.he.gpu")

_FIX_LAYOUT = "pack every adapter of one layer with the same vllm-tensafe version and targets"


# --- SEAL <-> coefficient-form residues (CPU, at load and for outgoing ciphertexts) -------------


def coefficient_residues(ctx: PublicContext, ct: Any) -> np.ndarray:
    """(2, L, N) uint64 coefficient-form residues of an NTT-form data-level ciphertext (a copy;
    ``ct`` is left untouched)."""
    out = seal.Ciphertext(ctx.context)
    ctx.evaluator.transform_from_ntt(ct, out)
    return np.array(ciphertext_residues(out), copy=True)


def ntt_ciphertext(ctx: PublicContext, residues: np.ndarray, scale: float) -> Any:
    """A SEAL NTT-form ciphertext from (2, L, N) coefficient-form residues."""
    ct = ciphertext_from_residues(ctx.context, ctx.parms_id, residues, scale)
    set_ntt_form(ct, False)
    ctx.evaluator.transform_to_ntt_inplace(ct)
    return ct


def public_key_coefficients(ctx: PublicContext) -> np.ndarray:
    """(2, L, N) uint64: the public key's data-prime rows (its first L), coefficient form."""
    check_layout()
    key = ctx.public_key.data()
    rows = np.array(ciphertext_residues(key)[:, : ctx.profile.data_primes], copy=True)
    ct = ciphertext_from_residues(ctx.context, ctx.parms_id, rows, 1.0)
    return coefficient_residues(ctx, ct)


def column_coefficients(mat: EncryptedMatrix, chunk: int) -> np.ndarray:
    """(rank, 2, L, N) uint64 coefficient-form residues of one chunk's columns.

    Converted once per matrix and chunk and kept on the matrix (as much memory as its
    ciphertexts): an adapter that vLLM moves between slots is bound again without SEAL work.
    """
    cache: dict[int, np.ndarray] = mat.__dict__.setdefault("_tensafe_coefficients", {})
    columns = cache.get(chunk)
    if columns is None:
        columns = np.stack(
            [
                coefficient_residues(mat.ctx, mat.column_ciphertext(j, chunk))
                for j in range(mat.rank)
            ]
        )
        cache[chunk] = columns
    return columns


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.int64)).to(device)


# --- the ring of one public context on one device ------------------------------------------------


class DeviceRing:
    """Constants of one CKKS context on one device: primes, FFT product, switch, decoder."""

    def __init__(self, ctx: PublicContext, device: torch.device | str) -> None:
        check_layout()
        self.ctx = ctx
        self.profile = ctx.profile
        self.device = torch.device(device)
        self.n = self.profile.poly_modulus_degree
        self.moduli = Moduli(tuple(data_moduli(ctx.context, ctx.parms_id)), self.n, self.device)
        self.arith = ResidueArithmetic(self.moduli)
        self.fft = NegacyclicFFT(self.arith)
        self.decoder = CkksDecoder(self.n, self.device)
        # Every token has its own ciphertext: products are scalar (scale 2^product_scale_bits).
        self.scale_bits = self.profile.product_scale_bits
        self.switch = ModulusSwitch(self.moduli, self.profile.reply_exponent(self.scale_bits))
        self.delta_prime = self.switch.delta_prime(self.scale_bits)
        self.flood = FloodParameters.for_sigma(
            self.profile.flood_coefficient_sigma(self.scale_bits)
        )
        # The columns Dec(B'_j) themselves have scale 2^b_scale_bits. They are rounded before
        # the weights apply, so a rounding error of one column is multiplied by |u_j| (up to
        # 2^u_norm_bits) and is the same in every call: two switches read each coefficient to
        # 2^-64 (column_values), far below the flood whatever U, instead of the replies' 2^-32.
        b_bits = self.profile.b_scale_bits
        column_m = self.profile.reply_exponent(b_bits)
        if column_m < 64:  # the words below are read mod 2^64 (true of every shipped profile)
            raise HEError(
                f"profile {self.profile.name}: column switch exponent {column_m} < 64",
                "use a vllm-tensafe profile",
            )
        self.column_switch = ModulusSwitch(self.moduli, column_m)
        self.column_delta_prime = self.column_switch.delta_prime(b_bits)
        self.column_fraction_switch = ModulusSwitch(self.moduli, column_m + 32)
        self.column_fraction_delta_prime = self.column_fraction_switch.delta_prime(b_bits)
        self._pk_spectra: torch.Tensor | None = None
        self._ntt: ForwardNTT | None = None

    @property
    def ntt(self) -> ForwardNTT:
        """SEAL's forward NTT on the device (built on first use: only outgoing ciphertexts of
        the remote path need it)."""
        if self._ntt is None:
            util = seal._sealapi_cpp.util
            log_n = self.n.bit_length() - 1
            roots = [
                util.NTTTables(log_n, seal._sealapi_cpp.Modulus(q)).get_root()
                for q in self.moduli.values
            ]
            self._ntt = ForwardNTT(self.arith, roots)
        return self._ntt

    @property
    def shape(self) -> tuple[int, int]:
        return (self.moduli.count, self.n)

    def upload(self, residues: np.ndarray) -> torch.Tensor:
        return _to_device(residues, self.device)

    def secret_spectrum(self, secret: SecretKeySet) -> torch.Tensor:
        if secret.key_id != self.ctx.key_id:
            raise ForeignCiphertextError(
                f"secret key {secret.key_id[:16]} does not belong to context "
                f"{self.ctx.key_id[:16]}",
                "give the engine the key pair the adapter was packed with",
            )
        s = torch.from_numpy(secret_key_coefficients(secret.secret_key, self.ctx).astype(np.int64))
        return self.fft.spectrum(s.to(self.device))

    def decrypt(self, ct: torch.Tensor, s_spectrum: torch.Tensor) -> torch.Tensor:
        """(..., 2, L, N) residues -> c0 + c1 * s (..., L, N), coefficient form."""
        c0, c1 = ct.unbind(dim=-3)
        return self.arith.add(c0, self.fft.multiply(c1, s_spectrum))

    def public_key_spectra(self) -> torch.Tensor:
        """(2, L, limbs, N/2): the public key's limb spectra (computed once)."""
        if self._pk_spectra is None:
            pk = self.upload(public_key_coefficients(self.ctx))
            self._pk_spectra = self.fft.limb_spectra(pk)
        return self._pk_spectra

    def rerandomise(
        self,
        ct: torch.Tensor,
        v: torch.Tensor,
        e: torch.Tensor,
        spectra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2, L, N) + (pk0 * v + e0, pk1 * v + e1): v (B, N) ternary, e (B, 2, N) small;
        ``spectra``: ``public_key_spectra()`` (passed in by compiled callers)."""
        if spectra is None:
            spectra = self.public_key_spectra()  # (2, L, limbs, h)
        v_spec = self.fft.spectrum(v)[:, None, None, None, :]  # (B, 1, 1, 1, h)
        pkv = self.fft.from_spectra(spectra.unsqueeze(0) * v_spec)  # (B, 2, L, N)
        noise = signed_to_residue(e.unsqueeze(-2), self.arith.q)  # (B, 2, 1->L, N)
        return self.arith.add(self.arith.add(ct, pkv), noise)

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """Words z mod M -> float64 coefficients of the value polynomial (z centred / Delta')."""
        return self.switch.centre(z).double() * (1.0 / self.delta_prime)

    def column_values(self, plain: torch.Tensor) -> torch.Tensor:
        """Decryptions of columns (scale 2^b_scale_bits), (..., L, N) residues -> (..., N/2)
        float64: the real parts of their evaluations (what ``decode`` gives a product).

        Each coefficient x / 2^b is read in two words: hi = S_m(x) = round(x 2^m / Q) (value
        times Delta' ~ 2^32, centred: |value| Delta' < 2^63 for every B' the packer accepts)
        and the next 32 bits, r = S_(m+32)(x) - hi * 2^32 (mod 2^64, in fact |r| < 2^32: both
        switches are within 1 of exact), so hi / Delta' + r / (Delta' 2^32) is the value to
        about 2^-64 plus float64's rounding."""
        hi = self.column_switch.centre(self.column_switch(plain))
        fraction = self.column_fraction_switch(plain) - hi * (1 << 32)  # wraps mod 2^64
        coeffs = hi.double() * (1.0 / self.column_delta_prime) + fraction.double() * (
            1.0 / self.column_fraction_delta_prime
        )
        return self.decoder.evaluations(coeffs).real


# --- flood randomness for the local key holder ------------------------------------------------


class PhiloxFlood:
    """Flood randomness from torch's Philox4x32-10 generator on the device.

    Why this is acceptable for the *local* key holder only: the flood defends the secret key
    against a party that makes ciphertexts and sees their decryptions without holding the key
    (IND-CPA-D). Here the replies never leave the process that holds the secret key, so the
    flood's unpredictability protects nothing that an observer of the replies could not read
    directly; what the flood must be is Gaussian and independent for the precision analysis,
    which Philox (a counter-based generator that passes BigCrush) gives. It is *not* a CSPRNG:
    its 64-bit seed could be searched by someone who sees many outputs, so anything that leaves
    the trust domain (the remote path's re-randomisation and pad) draws from the CPU CSPRNG
    (csprng.py, through ring.py's samplers) instead.

    The generator is dedicated (seeded from os.urandom), so vLLM's sampling stream is left
    alone. A CUDA graph capture must register it: ``graph.register_generator_state(gen)``
    before capturing (torch >= 2.5); ``generator="default"`` uses the device's default
    generator instead, which torch registers with every capture by itself.
    """

    def __init__(self, device: torch.device, generator: torch.Generator | str | None = None):
        self.device = device
        if generator == "default":
            gen = None
        elif isinstance(generator, torch.Generator):
            gen = generator
        else:
            gen = torch.Generator(device=device)
            gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        self.generator = gen

    def draw(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """N(0, 1) doubles and uniform 64-bit words, both of ``shape``."""
        kw: dict[str, Any] = {"device": self.device, "generator": self.generator}
        normals = torch.randn(shape, dtype=torch.float64, **kw)
        words = torch.randint(-(1 << 63), (1 << 63) - 1, shape, dtype=torch.int64, **kw)
        return normals, words

    def normals(self, shape: tuple[int, ...]) -> torch.Tensor:
        """N(0, 1) doubles of ``shape`` (the flood of decoded columns, drawn per slot)."""
        return torch.randn(shape, dtype=torch.float64, device=self.device, generator=self.generator)


class KeystreamWords:
    """Uniform 64-bit words from the CPU CSPRNG (csprng.py: AES-256-CTR), on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def words(self, count: int) -> torch.Tensor:
        array = random_words(count).view(np.int64)
        tensor = torch.from_numpy(array.copy())
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def draw(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """As PhiloxFlood.draw, from the CSPRNG (not capturable: the words are uploaded)."""
        count = math.prod(shape)
        words = self.words(2 * count).view(2, *shape)
        return normal_from_words(words[0]), words[1]

    def normals(self, shape: tuple[int, ...]) -> torch.Tensor:
        """As PhiloxFlood.normals, from the CSPRNG (``shape[-1]`` even: Box-Muller pairs)."""
        return normal_from_words(self.words(math.prod(shape)).view(shape))


# --- layer layout: which ciphertext group carries which output rows ---------------------------


@dataclass(frozen=True)
class Member:
    """One module (an output slice of the layer) or one row chunk of it, in a group."""

    slice: int
    chunk: int


def adapter_groups(matrices: Sequence[EncryptedMatrix | None]) -> list[list[Member]]:
    """The ciphertext groups of one adapter's matrices for one layer: modules that share a
    tile (same tile width, disjoint slot ranges, one chunk) form one group; every chunk of a
    module wider than the slots is a group of its own."""
    groups: list[list[Member]] = []
    tiles: list[tuple[int, list[tuple[int, int]]]] = []  # (tile width, slot ranges) per group
    for s, mat in enumerate(matrices):
        if mat is None:
            continue
        if mat.n_chunks > 1:
            for c in range(mat.n_chunks):
                groups.append([Member(s, c)])
                tiles.append((-1, []))
            continue
        lo, hi = mat.slot_offset, mat.slot_offset + mat.d_out
        for members, (width, ranges) in zip(groups, tiles, strict=True):
            if width == mat.tile_width and all(hi <= a or b <= lo for a, b in ranges):
                members.append(Member(s, 0))
                ranges.append((lo, hi))
                break
        else:
            groups.append([Member(s, 0)])
            tiles.append((mat.tile_width, [(lo, hi)]))
    return groups


def layer_groups_for(
    output_slices: Sequence[int], slot_count: int, targeted: Sequence[bool] | None = None
) -> list[list[Member]]:
    """The groups ``vllm-tensafe pack`` gives a layer whose ``targeted`` slices carry LoRA
    (all of them by default), without an adapter at hand: for building an engine before any
    adapter is loaded (vLLM captures its CUDA graphs at startup). The targeted slices share one
    tile when their widths fit the slots (packing.fused_layouts); a slice wider than the slots
    takes one group per chunk. Adapters that target a subset fit these groups too."""
    flags = [True] * len(output_slices) if targeted is None else list(targeted)
    chosen = [s for s, flag in enumerate(flags) if flag]
    if not chosen:
        raise HEError("no targeted slice in this layer", "pass targeted= with at least one True")
    widths = [output_slices[s] for s in chosen]
    if len(chosen) > 1 and sum(widths) <= slot_count:
        return [[Member(s, 0) for s in chosen]]
    groups = []
    for s in chosen:
        chunks = max(1, -(-output_slices[s] // slot_count))
        groups.extend([Member(s, c)] for c in range(chunks))
    return groups


def _layer_defaults(matrices: Sequence[EncryptedMatrix | None], kwargs: dict[str, Any]) -> None:
    """output_slices and max_rank from one adapter's matrices (slices it leaves out need
    output_slices from the caller: their width is not in the package)."""
    if "output_slices" not in kwargs:
        if any(m is None for m in matrices):
            raise HEError(
                "a slice without an encrypted module has no known width",
                "pass output_slices= (the layer's output slice sizes)",
            )
        kwargs["output_slices"] = [m.d_out for m in matrices if m is not None]
    kwargs.setdefault("max_rank", max(m.rank for m in matrices if m is not None))


# torch.compile'd stages, shared by every engine of the process: (class, stage, backend) -> fn.
_COMPILED_STAGES: dict[tuple[str, str, str], Any] = {}
_COMPILED_LOCK = threading.Lock()
# Backends whose compile failed in this process: every engine then runs op by op.
_COMPILE_FAILED: set[str] = set()


def _compiled_stage(cls: type, name: str, backend: str) -> Any:
    """``cls.<name>`` compiled (the engine is its first argument; shapes that change between
    calls, such as the token count, become dynamic after their second value). Dynamo guards on
    the engine's constants (profile, slots, groups), not on its identity, so every layer engine
    of one shape shares the compiled code."""
    key = (cls.__qualname__, name, backend)
    with _COMPILED_LOCK:
        fn = _COMPILED_STAGES.get(key)
        if fn is None:
            fn = torch.compile(getattr(cls, name), dynamic=None, backend=backend)
            _COMPILED_STAGES[key] = fn
        return fn


@dataclass
class _SlotState:
    adapter_id: str
    ref: Any
    groups_used: list[bool]


class GpuDeltaEngine:
    """Exact HE-LoRA deltas of one LoRA layer on a torch device, local key holder.

    ``groups`` fixes the ciphertext groups of the layer (``adapter_groups`` of a typical
    adapter's matrices; ``from_matrices`` builds the engine from one adapter). Every adapter
    loaded later must fit them: each of its modules in a group that lists it, modules sharing
    a group on disjoint slots, ranks at most ``max_rank``.
    """

    def __init__(
        self,
        secret: SecretKeySet | None,
        ctx: PublicContext,
        *,
        output_slices: Sequence[int],
        groups: Sequence[Sequence[Member]],
        d_in: int | None = None,
        max_slots: int = 1,
        max_rank: int = 16,
        device: torch.device | str = "cpu",
        fold_secret: bool = False,
        shards: Sequence[tuple[int, int]] | None = None,
        rows: Sequence[Sequence[int] | np.ndarray] | None = None,
        generator: torch.Generator | str | None = None,
        ring: DeviceRing | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        chunk_tokens: int = 512,
    ) -> None:
        if not isinstance(ctx, PublicContext):
            raise HEError(
                f"GpuDeltaEngine needs a PublicContext, got {type(ctx).__name__}",
                "load it with PublicContext.from_bytes",
            )
        self.ctx = ctx
        self.profile = ctx.profile
        self.ring = ring if ring is not None else DeviceRing(ctx, device)
        self.device = self.ring.device
        self.stats = DeltaStats()
        self.output_slices = [int(d) for d in output_slices]
        if rows is None:
            ranges = (
                [(0, d) for d in self.output_slices]
                if shards is None
                else [(int(a), int(b)) for a, b in shards]
            )
            if len(ranges) != len(self.output_slices):
                raise HEError("one shard (start, size) per output slice", "pass layer shard ranges")
            rows = [np.arange(start, start + size) for start, size in ranges]
        # Per output slice: the rows of the full module (B' row numbers) that this engine's
        # output holds, in order (a tensor-parallel rank's shard; vLLM's slice_lora_b says which).
        self.rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
        if len(self.rows) != len(self.output_slices) or any(
            r.size and (r.min() < 0 or r.max() >= d)
            for r, d in zip(self.rows, self.output_slices, strict=True)
        ):
            raise HEError(
                "one row list per output slice, each within the slice's full size",
                "pass the rows vLLM's slice_lora_b keeps for this rank",
            )
        self.out_features = sum(r.size for r in self.rows)
        self.groups = [list(g) for g in groups]
        if not self.groups:
            raise HEError("a layer engine needs at least one ciphertext group", _FIX_LAYOUT)
        self.max_slots = int(max_slots)
        self.max_rank = int(max_rank)
        self.members = max(len(g) for g in self.groups)
        self.rank = self.members * self.max_rank  # GEMM columns per group and slot
        self.d_in = d_in
        self.chunk_tokens = max(1, int(chunk_tokens))
        self._setup(secret, fold_secret, generator)
        # A call of more tokens than this decodes the columns of every slot once (max_slots *
        # rank decryptions) instead of decrypting one product per token and group.
        self.column_decode_tokens = self.max_slots * self.rank
        # The stages around the GEMM and the random draw are pure tensor code: compiled, their
        # ~200 elementwise kernels fuse into ~25 (launch latency dominates at small T, even
        # replayed from a CUDA graph). One compiled function per stage serves every engine of
        # the process (``_compiled_stage``): the engine is an argument, not captured, so
        # dropping an engine frees its device memory at once and 32 layers compile once.
        self.compiled = bool(compile)
        self.compile_backend = compile_backend

    # --- construction ----------------------------------------------------------------------

    def _setup(
        self,
        secret: SecretKeySet | None,
        fold_secret: bool,
        generator: torch.Generator | str | None,
    ) -> None:
        ring, profile = self.ring, self.profile
        weight_bits = profile.u_scale_bits + profile.u_norm_bits + 1
        self.plan: LimbPlan = limb_plan(weight_bits, self.rank, ring.moduli.bits)
        self.tables = ProductTables(ring.arith, self.plan)
        self.fold_secret = bool(fold_secret) and secret is not None
        self.polys = 1 if self.fold_secret else 2
        self._s_spectrum = ring.secret_spectrum(secret) if secret is not None else None
        self.flood_source: PhiloxFlood | KeystreamWords = (
            KeystreamWords(self.device)
            if generator == "keystream"
            else PhiloxFlood(self.device, generator)
        )
        size = self.polys * ring.moduli.count * ring.n
        g_count, s_count = len(self.groups), self.max_slots
        # Persistent buffers (written in place by load/unload; read by compute).
        self.table = torch.zeros(
            (g_count, s_count * self.slot_rows, self.plan.residue_limbs * size),
            dtype=torch.float64,
            device=self.device,
        )
        n_slices = len(self.output_slices)
        self.a_prime = (
            torch.zeros(
                (s_count, n_slices, self.max_rank, self.d_in),
                dtype=torch.float64,
                device=self.device,
            )
            if self.d_in
            else None
        )
        half = ring.n // 2
        self._sentinel = g_count * half
        # Row s: for every output column, its position in the (G * N/2) evaluations (or the
        # zero sentinel); the last row serves tokens without an encrypted adapter.
        self.index = torch.full(
            (s_count + 1, self.out_features), self._sentinel, dtype=torch.int64, device=self.device
        )
        self.column_group = torch.zeros(
            (s_count + 1, self.out_features), dtype=torch.int64, device=self.device
        )
        self.loaded = torch.zeros(s_count, dtype=torch.bool, device=self.device)
        self._slots: dict[int, _SlotState] = {}
        self._positions = slot_positions(ring.n)
        # Constant index tensors of compute (made here: no host-to-device copy per call).
        self._slot_ids = torch.arange(s_count, device=self.device)
        self._member_slices = torch.tensor(
            [[m.slice for m in g] + [g[0].slice] * (self.members - len(g)) for g in self.groups],
            device=self.device,
        )  # (G, members)
        self._present = torch.tensor(
            [[1.0] * len(g) + [0.0] * (self.members - len(g)) for g in self.groups],
            dtype=torch.float64,
            device=self.device,
        )
        self._member_index = {
            m: (g, i) for g, members in enumerate(self.groups) for i, m in enumerate(members)
        }

    @classmethod
    def from_matrices(
        cls,
        secret: SecretKeySet | None,
        matrices: Sequence[EncryptedMatrix | None],
        **kwargs: Any,
    ) -> GpuDeltaEngine:
        """An engine whose groups are those of ``matrices`` (one adapter's, for one layer)."""
        first = next((m for m in matrices if m is not None), None)
        if first is None:
            raise HEError("no encrypted module in this layer", "target the layer with the adapter")
        _layer_defaults(matrices, kwargs)
        return cls(secret, first.ctx, groups=adapter_groups(matrices), **kwargs)

    @property
    def capturable(self) -> bool:
        """Whether ``compute`` may be captured in a CUDA graph (static shapes, no host sync)."""
        return (
            self.device.type == "cuda"
            and self._s_spectrum is not None
            and isinstance(self.flood_source, PhiloxFlood)
        )

    @property
    def generator(self) -> torch.Generator | None:
        """The flood's generator (register it with a CUDA graph before capturing)."""
        return getattr(self.flood_source, "generator", None)

    # --- adapters ----------------------------------------------------------------------------

    def load(
        self,
        slot: int,
        matrices: Sequence[EncryptedMatrix | None],
        a_primes: Sequence[np.ndarray | torch.Tensor | None] | None = None,
        *,
        adapter_id: str = "",
        ref: Any = None,
    ) -> None:
        """Put one adapter's modules of this layer into ``slot`` (between engine steps)."""
        if not 0 <= slot < self.max_slots:
            raise HEError(f"slot {slot} is outside 0..{self.max_slots - 1}", "use a free slot")
        if len(matrices) != len(self.output_slices):
            raise HEError(
                f"{len(matrices)} matrices for a layer of {len(self.output_slices)} slices",
                "pass one EncryptedMatrix or None per output slice",
            )
        placement = self._placement(matrices)
        tables = self._slot_tables(matrices, placement)
        rows = self.slot_rows
        index, column_group = self._slot_index(matrices, placement)
        with torch.no_grad():
            for g, table in enumerate(tables):
                target = self.table[g, slot * rows : (slot + 1) * rows]
                if table is None:
                    target.zero_()
                else:
                    target.copy_(table)
            if self.a_prime is not None:
                self.a_prime[slot].zero_()
                for s, a in enumerate(a_primes or []):
                    if a is None:
                        continue
                    a_t = torch.as_tensor(a, dtype=torch.float64)
                    self.a_prime[slot, s, : a_t.shape[0]].copy_(a_t)
            self.index[slot].copy_(index)
            self.column_group[slot].copy_(column_group)
            self.loaded[slot] = True
        used = [table is not None for table in tables]
        self._slots[slot] = _SlotState(adapter_id, ref, used)

    @property
    def slot_rows(self) -> int:
        """Rows of ``table`` per slot and group: the weight limbs of each of its columns."""
        return self.plan.weight_limbs * self.rank

    def groups_used(self, slot: int) -> int:
        """Ciphertext groups the adapter in ``slot`` fills (0: none loaded): one ciphertext
        per token and group."""
        state = self._slots.get(slot)
        return 0 if state is None else sum(state.groups_used)

    def unload(self, slot: int) -> None:
        rows = self.slot_rows
        with torch.no_grad():
            self.index[slot].fill_(self._sentinel)
            self.loaded[slot] = False
            # Zeroed, not only flagged: a long call decodes every slot's columns (a graph
            # cannot skip the empty ones), and an unloaded adapter's must not be among them.
            self.table[:, slot * rows : (slot + 1) * rows].zero_()
        self._slots.pop(slot, None)

    def _placement(
        self, matrices: Sequence[EncryptedMatrix | None]
    ) -> dict[Member, tuple[int, int]]:
        """(group, member position) for every module chunk of this adapter; refuses one that
        does not fit the engine's groups."""
        placement: dict[Member, tuple[int, int]] = {}
        ranges: dict[int, list[tuple[int, int]]] = {}
        for s, mat in enumerate(matrices):
            if mat is None:
                continue
            if mat.ctx.key_id != self.ctx.key_id:
                raise ForeignCiphertextError(
                    f"slice {s}: B' was encrypted under key {mat.ctx.key_id[:16]}, the engine "
                    f"uses {self.ctx.key_id[:16]}",
                    "use one engine per public context",
                )
            if mat.rank > self.max_rank:
                raise HEError(
                    f"slice {s}: rank {mat.rank} exceeds the engine's max rank {self.max_rank}",
                    "build the engine with max_rank of the largest adapter (--max-lora-rank)",
                )
            d_out = self.output_slices[s]
            if mat.d_out != d_out:
                raise HEError(
                    f"slice {s}: B' has {mat.d_out} rows, the layer slice {d_out}", _FIX_LAYOUT
                )
            for c in range(mat.n_chunks):
                member = Member(s, c)
                where = self._member_index.get(member)
                if where is None:
                    raise HEError(
                        f"slice {s} chunk {c} is in no ciphertext group of this layer engine",
                        _FIX_LAYOUT,
                    )
                lo = 0 if mat.n_chunks > 1 else mat.slot_offset
                hi = lo + mat.chunk_rows[c]
                taken = ranges.setdefault(where[0], [])
                if any(not (hi <= a or b <= lo) for a, b in taken):
                    raise HEError(
                        f"slice {s} overlaps another module's slots in group {where[0]}",
                        _FIX_LAYOUT,
                    )
                taken.append((lo, hi))
                placement[member] = where
        return placement

    def _column_residues(self, mat: EncryptedMatrix, chunk: int) -> torch.Tensor:
        """(rank, 2, L, N) coefficient-form residues of one chunk's columns, on the device."""
        return self.ring.upload(column_coefficients(mat, chunk))

    def _slot_tables(
        self,
        matrices: Sequence[EncryptedMatrix | None],
        placement: dict[Member, tuple[int, int]],
    ) -> list[torch.Tensor | None]:
        ring = self.ring
        size_shape = (self.polys, *ring.shape)
        columns: list[torch.Tensor | None] = [None] * len(self.groups)
        for member, (g, position) in placement.items():
            mat = matrices[member.slice]
            assert mat is not None
            residues = self._column_residues(mat, member.chunk)
            if self.fold_secret:
                assert self._s_spectrum is not None
                residues = ring.decrypt(residues, self._s_spectrum).unsqueeze(1)
            if columns[g] is None:
                columns[g] = torch.zeros(
                    (self.rank, *size_shape), dtype=torch.int64, device=self.device
                )
            start = position * self.max_rank
            columns[g][start : start + mat.rank] = residues  # type: ignore[index]
        return [None if c is None else self.tables.build(c) for c in columns]

    def _slot_index(
        self,
        matrices: Sequence[EncryptedMatrix | None],
        placement: dict[Member, tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.ring.n // 2
        index = np.full(self.out_features, self._sentinel, dtype=np.int64)
        column_group = np.zeros(self.out_features, dtype=np.int64)
        offset = 0
        for s, rows in enumerate(self.rows):
            size = rows.size
            mat = matrices[s]
            if mat is not None:
                if mat.n_chunks > 1:
                    chunks, slots = rows // half, rows % half
                else:
                    chunks, slots = np.zeros_like(rows), rows + mat.slot_offset
                groups = np.array([placement[Member(s, int(c))][0] for c in chunks])
                positions = np.array(self._positions)[slots]
                index[offset : offset + size] = groups * half + positions
                column_group[offset : offset + size] = groups
            offset += size
        return torch.from_numpy(index).to(self.device), torch.from_numpy(column_group).to(
            self.device
        )

    # --- per step ------------------------------------------------------------------------------

    def compute(self, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """Deltas (T, out_features) float32 for activations x (T, d_in) and the tokens' adapter
        slots (T or more entries; -1 or an empty slot: zero delta). Uses the loaded A'."""
        return self.compute_u(self.project(x), token_slots)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """U = x A'^T for every slot and slice: (T, max_slots, slices, max_rank), float64 (no
        TF32 or bf16 rounding of U, whatever the matmul settings of the process)."""
        if self.a_prime is None:
            raise HEError("this engine holds no A'", "build it with d_in=, or call compute_u")
        a = self.a_prime.view(-1, self.a_prime.shape[-1])
        u = x.double() @ a.T
        return u.view(x.shape[0], self.max_slots, len(self.output_slices), -1)

    def compute_u(self, u: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """As ``compute`` from U = x A'^T for every slot: (T, max_slots, slices, max_rank)."""
        tokens = u.shape[0]
        self.stats.compute_calls += 1
        self.stats.tokens += tokens
        slots = token_slots[:tokens]
        # More tokens than columns: decrypt and decode the columns once and combine their slot
        # values (a float64 GEMM), flooded per slot, instead of one product, decryption and
        # decoding per token (docs/gpu-he.md, "Long calls"). The decoded columns live only for
        # this call; the key spectrum beside the table decrypts them at any time anyway.
        decoded = (
            self._stage("_decoded_columns", self.table) if self._decodes_columns(tokens) else None
        )
        chunk = self.chunk_tokens
        if tokens <= chunk:
            return self._compute_chunk(u, slots, decoded)
        # Long prefills in pieces: the transient memory is ~20 MB per token and group.
        return torch.cat(
            [
                self._compute_chunk(u[i : i + chunk], slots[i : i + chunk], decoded)
                for i in range(0, tokens, chunk)
            ]
        )

    def _decodes_columns(self, tokens: int) -> bool:
        """Whether a call of ``tokens`` decodes the columns instead of the products. A pure
        function of the token count, so that a CUDA graph capture takes the path its warm-up
        calls took (and compiled: nothing may compile under capture)."""
        has_key = self.fold_secret or self._s_spectrum is not None
        return has_key and tokens > self.column_decode_tokens

    def _compute_chunk(
        self, u: torch.Tensor, slots: torch.Tensor, decoded: torch.Tensor | None = None
    ) -> torch.Tensor:
        if decoded is not None:
            slot_row, weights, factors = self._stage("_column_weights", u, slots)
            values = torch.bmm(weights, decoded)  # (G, T, N/2) slot values
            normals = self.flood_source.normals(values.shape)
            return self._stage("_finish_decoded", values, normals, slot_row, factors)
        slot_row, limbs, factors = self._stage("_weights", u, slots)
        digits = torch.bmm(limbs, self.table)  # exact float64 digit sums
        normals, words = self.flood_source.draw((len(self.groups), u.shape[0], self.ring.n))
        return self._stage("_finish", digits, normals, words, slot_row, factors)

    def _stage(self, name: str, *args: Any) -> Any:
        """Run the pure method ``name``: compiled when the engine compiles (and compiling has
        not failed in this process), else op by op."""
        if self.compiled and self.compile_backend not in _COMPILE_FAILED:
            try:
                return _compiled_stage(type(self), name, self.compile_backend)(self, *args)
            except Exception as exc:  # any compiler failure: the eager stages
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                self.compiled = False
                with _COMPILED_LOCK:
                    first = self.compile_backend not in _COMPILE_FAILED
                    _COMPILE_FAILED.add(self.compile_backend)
                if first:  # one warning per process, not one per layer
                    logger.warning(
                        "torch.compile of the HE engine's stages failed (%s: %s); the engines "
                        "of this process run them op by op (same results, slower). Set "
                        "TENSAFE_HE_COMPILE=false to skip the attempt.",
                        type(exc).__name__,
                        str(exc).splitlines()[0][:300] if str(exc) else "",
                    )
        self.compiled = False
        return getattr(self, name)(*args)

    def _finish(
        self,
        digits: torch.Tensor,
        normals: torch.Tensor,
        words: torch.Tensor,
        slot_row: torch.Tensor,
        factors: torch.Tensor,
    ) -> torch.Tensor:
        """Everything after the GEMM, given the flood's random draws (a pure function of its
        inputs and the engine's buffers: ``compile=True`` fuses it)."""
        residues = self.tables.reduce(digits, (self.polys, *self.ring.shape))
        flooded = self.ring.arith.add(self.decrypt(residues), self._flood_residues(normals, words))
        evaluations = self.decode(self.ring.switch(flooded))
        return self._assemble(evaluations.real, slot_row, factors)

    def _finish_decoded(
        self,
        values: torch.Tensor,
        normals: torch.Tensor,
        slot_row: torch.Tensor,
        factors: torch.Tensor,
    ) -> torch.Tensor:
        """``_finish`` for slot values combined from ``_decoded_columns``: the flood added per
        slot. A slot's real part is a sum of N coefficients with |zeta^k| = 1 and no two of
        the N/2 slots conjugate, so the coefficient flood (i.i.d. Gaussian, std sigma_c) gives
        i.i.d. Gaussian slots of std sigma_c sqrt(N/2) / scale, which is ``flood_sigma`` by
        its definition (profiles.HEProfile.flood_coefficient_sigma): the profile's flood,
        drawn in the slots directly (tests/he/test_torch_ring.py measures both paths). The
        per-token path also rounds to 2^-32 per coefficient at the switch (+1 % of the
        default profile's flood); these values are exact to about 2^-64."""
        noise = normals * self.profile.flood_sigma
        return self._assemble(values + noise, slot_row, factors)

    def _column_weights(
        self, u: torch.Tensor, token_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_weights`` for decoded columns: the same integer weights as float64 values
        w / 2^u_scale_bits (exact), (G, T, S * R), beside the index rows and norm factors."""
        slot_row, weights, factors = self._integer_weights(u, token_slots)
        values = weights.double() * (1.0 / self.profile.u_scale)
        return slot_row, values.reshape(len(self.groups), u.shape[0], -1), factors

    def _weights(
        self, u: torch.Tensor, token_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer GEMM weights (G, T, S * A * R), the tokens' index rows and norm factors."""
        slot_row, weights, factors = self._integer_weights(u, token_slots)
        limbs = self.tables.weight_limbs(weights)  # (G, T, S, A * R)
        return slot_row, limbs.reshape(len(self.groups), u.shape[0], -1), factors

    def _integer_weights(
        self, u: torch.Tensor, token_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """round(U * 2^u_scale_bits) per group (G, T, S, R) int64, the tokens' index rows and
        the norm factors."""
        profile = self.profile
        s_count = self.max_slots
        slots = token_slots.long()
        valid = (slots >= 0) & (slots < s_count)
        slot_row = torch.where(valid, slots, s_count)
        onehot = (slot_row.unsqueeze(1) == self._slot_ids) & self.loaded.unsqueeze(0)
        u = u.double() * onehot[:, :, None, None]  # zero outside the token's slot
        # Per group: the member slices' U side by side, max_rank columns each (chunks of one
        # slice share its U).
        grouped = u[:, :, self._member_slices] * self._present[:, :, None]  # (T, S, G, m, r)
        grouped = grouped.permute(2, 0, 1, 3, 4).reshape(len(self.groups), u.shape[0], s_count, -1)
        # Bounded-norm invariant per ciphertext (delta.py): ||u_t|| <= 2^u_norm_bits.
        norms = grouped.square().sum(dim=(2, 3)).sqrt()  # (G, T)
        factors = torch.clamp(norms / profile.u_norm_bound, min=1.0)
        scaled = grouped / factors[:, :, None, None]
        weights = torch.round(scaled * profile.u_scale).long()  # (G, T, S, R)
        return slot_row, weights, factors

    def _decoded_columns(self, table: torch.Tensor) -> torch.Tensor:
        """The GEMM table (G, S * A * R, K * P * L * N) -> every column's slot values
        (G, S * R, N/2) float64: its residues from the table's unshifted rows, decrypted
        (c0 + c1 * s; already so when folded), read to ~2^-64 and decoded
        (DeviceRing.column_values). Dec and the decoding are linear, so
        sum_j (w_j / 2^u) values_j is the per-token path's slot value up to that path's own
        switch rounding (2^-32 per coefficient)."""
        g_count, s_count = len(self.groups), self.max_slots
        # Rows a = 0 hold each column's residue limbs unshifted: reduced, they give it back.
        per_slot = table.view(g_count, s_count, self.slot_rows, -1)[:, :, : self.rank]
        columns = self.tables.reduce(per_slot, (self.polys, *self.ring.shape))  # (G,S,R,P,L,N)
        if self.fold_secret:
            plain = columns.select(-3, 0)
        else:
            assert self._s_spectrum is not None
            plain = self.ring.decrypt(columns, self._s_spectrum)  # (G, S, R, L, N)
        return self.ring.column_values(plain).reshape(g_count, s_count * self.rank, -1)

    def _products(self, weight_limbs: torch.Tensor) -> torch.Tensor:
        """(G, T, S * A * R) weight limbs -> (G, T, P, L, N) product residues."""
        digits = torch.bmm(weight_limbs, self.table)
        return self.tables.reduce(digits, (self.polys, *self.ring.shape))

    # The local key holder's steps, one method each (benchmarks/gpu_he_bench.py times them).

    def decrypt(self, residues: torch.Tensor) -> torch.Tensor:
        """(G, T, P, L, N) products -> (G, T, L, N) decryptions (a view when folded)."""
        if self.fold_secret:
            return residues[:, :, 0]
        if self._s_spectrum is None:
            raise HEError("the local key holder path needs the secret key", "pass secret=")
        return self.ring.decrypt(residues, self._s_spectrum)

    def flood(self, plain: torch.Tensor) -> torch.Tensor:
        """x + F mod q with a fresh flood per ciphertext (docs/v2-math, key holder step 2)."""
        normals, words = self.flood_source.draw((*plain.shape[:-2], self.ring.n))
        return self.ring.arith.add(plain, self._flood_residues(normals, words))

    def _flood_residues(self, normals: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        flood = self.ring.flood
        high, low = flood.high_parts(normals), flood.low_parts_from_words(words)
        return flood_residues(self.ring.arith, high, low, flood.k)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """Switched words z (..., N) -> evaluations (..., N/2) of the value polynomial."""
        return self.ring.decoder.evaluations(self.ring.coefficients(y))

    def _assemble(
        self, values: torch.Tensor, slot_row: torch.Tensor, factors: torch.Tensor
    ) -> torch.Tensor:
        """(G, T, N/2) real parts of the evaluations -> (T, out_features) deltas of every
        token's slot."""
        tokens = slot_row.shape[0]
        values = values.permute(1, 0, 2).reshape(tokens, -1)
        values = torch.cat([values, values.new_zeros(tokens, 1)], dim=1)
        index = self.index[slot_row]  # (T, out)
        delta = torch.gather(values, 1, index)
        factor = torch.gather(factors.T, 1, self.column_group[slot_row])
        return (delta * factor).float()


# Outgoing ciphertexts' randomness drawn ahead per public context: about one decode step of a
# 32-layer model with two targeted groups per layer (each ~330 KB on the host).
COVER_PREFETCH = 64


class OutgoingCovers:
    """(v, e1, R) for outgoing ciphertexts of one public context, from the CPU CSPRNG.

    Sampling them (ring.py's rejection samplers over AES-CTR words) costs the host about as
    much as copying the ciphertexts out; a daemon thread keeps ``prefetch`` sets ready so the
    engine step only takes them. Each set is drawn for one ciphertext and handed out once;
    when none is ready, the missing ones are drawn inline. One instance per context and
    process (``for_context``), shared by every layer engine of that key; a forked child starts
    its own thread (the CSPRNG renews its key in the child too).
    """

    _shared: ClassVar[dict[str, OutgoingCovers]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, ctx: PublicContext, *, prefetch: int = COVER_PREFETCH) -> None:
        self.sampler = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
        self.prefetch = int(prefetch)
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray, np.ndarray]] = queue.Queue(
            maxsize=max(1, self.prefetch)
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @classmethod
    def for_context(cls, ctx: PublicContext, *, prefetch: int = COVER_PREFETCH) -> OutgoingCovers:
        with cls._shared_lock:
            covers = cls._shared.get(ctx.key_id)
            if covers is None or covers.prefetch != prefetch:
                covers = cls(ctx, prefetch=prefetch)
                cls._shared[ctx.key_id] = covers
            return covers

    def start(self) -> None:
        """Start drawing ahead (idempotent; again in a forked child)."""
        if self.prefetch:
            self._ensure_thread()

    def draw(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fresh sets, drawn now: ternary v (count, N), e1 (count, N), R (count, L, N)."""
        sampler = self.sampler
        return sampler.ternary(count), sampler.errors(count), sampler.uniform(count)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` sets, the prefetched ones first."""
        ready: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if self.prefetch:
            self._ensure_thread()
            while len(ready) < count:
                try:
                    ready.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        if len(ready) < count:
            ready.append(self.draw(count - len(ready)))
        if len(ready) == 1:
            return ready[0]
        return tuple(np.concatenate(parts) for parts in zip(*ready, strict=True))  # type: ignore[return-value]

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._thread is not None and self._pid == pid:
            return
        with self._lock:
            if self._thread is None or self._pid != pid:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(
                    target=self._fill, args=(self._queue,), name="tensafe-covers", daemon=True
                )
                self._pid = pid
                self._thread.start()

    def _fill(self, covers: queue.Queue[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        while True:
            covers.put(self.draw(1))  # blocks while the queue is full


class GpuRemoteDeltaEngine(GpuDeltaEngine):
    """The remote-key-holder path: products, re-randomisation and pad on the device; the
    outgoing ciphertexts (and nothing else) go to the host, the replies come back.

    ``key_holder.decrypt(ref, blobs) -> list[np.ndarray]`` is keyholder.KeyHolder's v2 call (one
    uint64 array of N coefficients per ciphertext); ``ref`` is the slot's AdapterRef, given at
    load.
    Not capturable: it synchronises with the host and calls the key holder.
    """

    def __init__(
        self,
        ctx: PublicContext,
        key_holder: Any,
        *,
        cover_prefetch: int = COVER_PREFETCH,
        **kwargs: Any,
    ) -> None:
        kwargs["fold_secret"] = False
        super().__init__(None, ctx, **kwargs)
        self.key_holder = key_holder
        self.covers = OutgoingCovers.for_context(ctx, prefetch=cover_prefetch)
        self.covers.start()  # ready by the first step
        self.seconds_serialise = 0.0
        self._ntt = self.ring.ntt  # built here (SEAL's roots): the compiled stage only runs it
        self.ring.public_key_spectra()

    @classmethod
    def from_matrices(  # type: ignore[override]
        cls, key_holder: Any, matrices: Sequence[EncryptedMatrix | None], **kwargs: Any
    ) -> GpuRemoteDeltaEngine:
        first = next((m for m in matrices if m is not None), None)
        if first is None:
            raise HEError("no encrypted module in this layer", "target the layer with the adapter")
        _layer_defaults(matrices, kwargs)
        return cls(first.ctx, key_holder, groups=adapter_groups(matrices), **kwargs)

    @property
    def capturable(self) -> bool:
        return False

    def _compute_chunk(
        self, u: torch.Tensor, slots: torch.Tensor, decoded: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The host holds no secret: it never decodes columns (_decodes_columns is false).
        assert decoded is None
        tokens = u.shape[0]
        started = time.perf_counter()
        slot_row, weights, factors = self._stage("_weights", u, slots)
        residues = self._stage("_products", weights)  # (G, T, 2, L, N)
        evaluations = torch.zeros(
            (len(self.groups), tokens, self.ring.n // 2), dtype=torch.complex128, device=self.device
        )
        rows = slot_row.cpu().tolist()  # host sync: which ciphertexts leave
        for slot, state in self._slots.items():
            pairs = [
                (g, t)
                for t, row in enumerate(rows)
                if row == slot
                for g, used in enumerate(state.groups_used)
                if used
            ]
            if not pairs:
                continue
            g_idx = torch.tensor([g for g, _ in pairs], device=self.device)
            t_idx = torch.tensor([t for _, t in pairs], device=self.device)
            outgoing, rho = self.prepare_outgoing(residues[g_idx, t_idx])
            self.stats.seconds_products += time.perf_counter() - started
            replies = self._exchange(state, outgoing)
            started = time.perf_counter()
            evaluations[g_idx, t_idx] = self._stage("unpad_evaluations", replies, rho)
        out = self._stage("_assemble", evaluations.real, slot_row, factors)
        self.stats.seconds_unmask += time.perf_counter() - started
        return out

    def prepare_outgoing(self, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, L, N) product residues -> re-randomised, padded residues and rho (B, N).

        The randomness is conceal.py's, drawn by ring.py's samplers from the CPU CSPRNG and
        uploaded: v ternary, e1 a centred binomial (c0 needs no error: R makes it uniform),
        R uniform mod Q. It leaves the trust domain, so no device generator is used for it.
        A background thread draws it ahead of use (``OutgoingCovers``).
        """
        count = ct.shape[0]
        ternary, errors, uniform = self.covers.take(count)
        v = self._upload(ternary)
        e1 = self._upload(errors)
        pad = self._upload(uniform.view(np.int64))
        return self._stage("_conceal", ct, v, e1, pad, self.ring.public_key_spectra())

    def _conceal(
        self, ct: torch.Tensor, v: torch.Tensor, e1: torch.Tensor, pad: torch.Tensor,
        pk_spectra: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Re-randomise and pad (a pure function of its inputs: compiled with the engine)."""
        e = torch.stack([torch.zeros_like(e1), e1], dim=1)
        return self.pad(self.ring.rerandomise(ct, v, e, pk_spectra), pad)

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        # A plain (pageable) copy: pinning a fresh buffer per call costs more than it saves
        # for these few hundred KB.
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def pad(self, ct: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c0 += R (coefficient form); rho = S_m(R)."""
        c0 = self.ring.arith.add(ct[:, 0], pad)
        return torch.stack([c0, ct[:, 1]], dim=1), self.ring.switch(pad)

    def serialise(self, outgoing: torch.Tensor) -> list[memoryview]:
        """Coefficient-form (B, 2, L, N) -> v2 wire ciphertexts: the NTT runs on the device,
        only the NTT-form residues cross to the host."""
        return self.wire_ciphertexts(self._stage("_ntt_form", outgoing).cpu().numpy())

    def wire_ciphertexts(self, ntt_form: np.ndarray) -> list[memoryview]:
        """(B, 2, L, N) NTT-form residues on the host -> v2 wire ciphertexts (views of one
        buffer; no SEAL object per ciphertext)."""
        return encode_residue_batch(ntt_form.view(np.uint64), self.profile.product_scale_bits)

    def _ntt_form(self, outgoing: torch.Tensor) -> torch.Tensor:
        return self._ntt(outgoing)

    def unpad_evaluations(self, replies: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """Replies y (B, N) words -> evaluations of (y - rho) / Delta' (B, N/2)."""
        ring = self.ring
        z = ring.switch.wrap(replies - rho)
        return ring.decoder.evaluations(ring.coefficients(z))

    def _exchange(self, state: _SlotState, outgoing: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        blobs = self.serialise(outgoing)
        self.seconds_serialise += time.perf_counter() - started
        started = time.perf_counter()
        self.stats.decrypt_calls += 1
        self.stats.ciphertexts_sent += len(blobs)
        replies = self.key_holder.decrypt(state.ref, blobs)
        self.stats.seconds_key_holder += time.perf_counter() - started
        n = self.ring.n
        if len(replies) != len(blobs) or any(np.shape(r) != (n,) for r in replies):
            raise KeyHolderError(
                f"key holder returned {len(replies)} replies for {len(blobs)} ciphertexts "
                "(or replies of the wrong length)",
                "check that key holder and host speak protocol v2 with the same profile",
            )
        array = np.stack([np.asarray(r, dtype=np.uint64) for r in replies]).view(np.int64)
        return torch.from_numpy(array).to(self.device)
