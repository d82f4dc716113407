"""HE-LoRA on a torch device: ms per step and per token for each stage of the GPU engines.

    python benchmarks/gpu_he_bench.py                     # cuda if present, else cpu
    python benchmarks/gpu_he_bench.py --device all        # cuda and cpu side by side

For one attention layer of two model shapes (Qwen2.5-0.5B: q 896 + v 128 in one tile, r 8,
d_in 896, 24 layers; Llama-3-8B: q 4096 and v 1024, r 16, d_in 4096, 32 layers) and T tokens
per call (one ciphertext per token and group), it times with the device synchronised around
each stage:

* local key holder (``GpuDeltaEngine``), B' encrypted with per-token decryption c0 + c1 s
  (the default, ``local_decrypt``) and with the secret folded into the columns
  (``--tensafe-he-fold-secret``, ``local_folded``): weights (U, norm, limbs), products (GEMM +
  exact reduction), decrypt, flood, switch (S_m), decode (FFT), assemble (gather, factors);
  for a call of more tokens than the engine has columns, which decodes the columns once:
  decode_columns, weights, combine (the float64 GEMM), flood (the slot draws), finish;
  the whole ``compute`` eagerly and, on CUDA, replayed from a CUDA graph, and the kernels one
  call launches; on CUDA also both with their stages compiled (``*_compiled``, what vLLM
  serving runs: TENSAFE_HE_COMPILE), checked against the eager result on the same inputs;
* remote key holder, host side (``GpuRemoteDeltaEngine``): re-randomisation + pad and the NTT
  on the device, copy to the host + serialisation, unpad + decode of replies, op by op and
  (on CUDA, ``remote_host_compiled``) compiled. The key holder's own work and the network are
  not included.

``estimate_step_ms`` multiplies a layer's compute by the model's layer count: the HE time one
decode step of T concurrent sequences adds (CUDA graph replay where available). Prints one JSON
document; also writes it to $OUT/gpu_he_bench.json when OUT is set, or to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

from vllm_tensafe.he import encrypt_matrix, generate_keys
from vllm_tensafe.he.gpu_engine import GpuDeltaEngine, GpuRemoteDeltaEngine, _compiled_stage
from vllm_tensafe.he.packing import fused_layouts

SHAPES: dict[str, dict[str, Any]] = {
    "qwen0.5b": {"d_in": 896, "q": 896, "kv": 128, "rank": 8, "layers": 24, "fused": True},
    "llama8b": {"d_in": 4096, "q": 4096, "kv": 1024, "rank": 16, "layers": 32, "fused": False},
}


class Timer:
    def __init__(self, device: torch.device, repeats: int, budget_s: float) -> None:
        self.device = device
        self.repeats = repeats
        self.budget_s = budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], Any]) -> float:
        """Median ms of ``fn`` after one warm-up call (fewer repeats when one call is slow)."""
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - started
        repeats = max(1, min(self.repeats, int(self.budget_s / max(first, 1e-6))))
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - started)
        return round(statistics.median(samples) * 1000.0, 4)


def build_layer(ctx: Any, spec: dict[str, Any], rng: np.random.Generator) -> tuple[list, list]:
    """Encrypted q and v of one layer (k untargeted) and their A'."""
    rank, q_out, kv_out = spec["rank"], spec["q"], spec["kv"]
    if spec["fused"]:
        layout = fused_layouts([[("q", q_out), ("v", kv_out)]], ctx.slot_count)
        mq = encrypt_matrix(ctx, rng.normal(size=(q_out, rank)) * 0.05, **_tile(layout["q"]))
        mv = encrypt_matrix(ctx, rng.normal(size=(kv_out, rank)) * 0.05, **_tile(layout["v"]))
    else:
        mq = encrypt_matrix(ctx, rng.normal(size=(q_out, rank)) * 0.05)
        mv = encrypt_matrix(ctx, rng.normal(size=(kv_out, rank)) * 0.05)
    a = [rng.normal(size=(rank, spec["d_in"])) / np.sqrt(spec["d_in"]) for _ in range(2)]
    return [mq, None, mv], [a[0], None, a[1]]


def _tile(layout: tuple[int, int]) -> dict[str, int]:
    return {"slot_offset": layout[0], "tile_width": layout[1]}


def local_stages(
    engine: GpuDeltaEngine, timer: Timer, x: torch.Tensor, slots: torch.Tensor
) -> dict[str, float]:
    def u_of() -> torch.Tensor:
        return engine.project(x)

    u = u_of()
    if engine._decodes_columns(x.shape[0]):  # a long call: the columns decoded once
        out = long_call_stages(engine, timer, u_of, slots)
    else:
        slot_row, limbs, factors = engine._weights(u, slots)
        products = engine._products(limbs)
        plain = engine.decrypt(products)
        flooded = engine.flood(plain)
        y = engine.ring.switch(flooded)
        real = engine.decode(y).real
        out = {
            "weights": timer.ms(lambda: engine._weights(u_of(), slots)),
            "products": timer.ms(lambda: engine._products(limbs)),
            "decrypt": timer.ms(lambda: engine.decrypt(products)),
            "flood": timer.ms(lambda: engine.flood(plain)),
            "switch": timer.ms(lambda: engine.ring.switch(flooded)),
            "decode": timer.ms(lambda: engine.decode(y)),
            "assemble": timer.ms(lambda: engine._assemble(real, slot_row, factors)),
        }
    out["compute_eager"] = timer.ms(lambda: engine.compute(x, slots))
    if engine.capturable:
        out["compute_graph"] = timer.ms(_captured(engine, x, slots))
    out["kernels_per_call"] = kernel_count(engine, x, slots)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
        base = torch.cuda.memory_allocated(engine.device)
        engine.compute(x, slots)
        peak = torch.cuda.max_memory_allocated(engine.device) - base
        out["transient_mib"] = round(peak / 2**20, 1)
    return out


def long_call_stages(
    engine: GpuDeltaEngine, timer: Timer, u_of: Callable[[], torch.Tensor], slots: torch.Tensor
) -> dict[str, float]:
    """The stages of a call longer than the engine's columns (docs/gpu-he.md, "Long calls"),
    each on the whole call (``compute`` runs the per-token stages in chunks of
    ``chunk_tokens``; ``compute_eager`` times that); ``finish`` is the flood and the gather."""
    u = u_of()
    columns = engine._decoded_columns(engine.table)
    slot_row, weights, factors = engine._column_weights(u, slots)
    values = torch.bmm(weights, columns)
    normals = engine.flood_source.normals(values.shape)
    return {
        "decode_columns": timer.ms(lambda: engine._decoded_columns(engine.table)),
        "weights": timer.ms(lambda: engine._column_weights(u_of(), slots)),
        "combine": timer.ms(lambda: torch.bmm(weights, columns)),
        "flood": timer.ms(lambda: engine.flood_source.normals(values.shape)),
        "finish": timer.ms(lambda: engine._finish_decoded(values, normals, slot_row, factors)),
    }


def compiled_stages(
    engine: GpuDeltaEngine, reference: GpuDeltaEngine, timer: Timer, x: torch.Tensor,
    slots: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    """The engine with compile=True: whole-call times, and its output against the eager
    engine's on the same GEMM digits and random draws (an integer error anywhere would move
    the deltas by far more than 1e-6)."""
    started = time.perf_counter()
    engine.compute(x, slots)
    timer.sync()
    out: dict[str, Any] = {
        "first_call_s_including_compile": round(time.perf_counter() - started, 1)
    }
    u = engine.project(x)
    if engine._decodes_columns(x.shape[0]):
        slot_row, weights, factors = reference._column_weights(u, slots)
        values = torch.bmm(weights, reference._decoded_columns(engine.table))
        normals = engine.flood_source.normals(values.shape)
        finish = _compiled_stage(GpuDeltaEngine, "_finish_decoded", engine.compile_backend)
        fused = finish(engine, values, normals, slot_row, factors)
        eager = reference._finish_decoded(values, normals, slot_row, factors)
    else:
        slot_row, limbs, factors = reference._weights(u, slots)
        digits = torch.bmm(limbs, engine.table)
        normals, words = engine.flood_source.draw((len(engine.groups), x.shape[0], engine.ring.n))
        finish = _compiled_stage(GpuDeltaEngine, "_finish", engine.compile_backend)
        fused = finish(engine, digits, normals, words, slot_row, factors)
        eager = reference._finish(digits, normals, words, slot_row, factors)
    out["max_abs_diff_vs_eager"] = float((fused - eager).abs().max())
    out["compute_eager"] = timer.ms(lambda: engine.compute(x, slots))
    out["compute_graph"] = timer.ms(_captured(engine, x, slots))
    out["kernels_per_call"] = kernel_count(engine, x, slots)
    return out


def kernel_count(engine: GpuDeltaEngine, x: torch.Tensor, slots: torch.Tensor) -> int:
    """CUDA kernels (and copies/memsets) one ``compute`` call launches."""
    if engine.device.type != "cuda":
        return 0
    engine.compute(x, slots)
    torch.cuda.synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.compute(x, slots)
        torch.cuda.synchronize(engine.device)
    return sum(
        1 for event in prof.events() if getattr(event, "device_type", None) == DeviceType.CUDA
    )


def _captured(engine: GpuDeltaEngine, x: torch.Tensor, slots: torch.Tensor) -> Callable[[], Any]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            engine.compute(x, slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if engine.generator is not None:
        graph.register_generator_state(engine.generator)
    with torch.cuda.graph(graph):
        engine.compute(x, slots)
    return graph.replay


def remote_stages(
    engine: GpuRemoteDeltaEngine, timer: Timer, x: torch.Tensor, slots: torch.Tensor
) -> dict[str, float]:
    """The host's side of one exchange; compiled stages where the engine compiles."""
    u = engine.project(x)
    _, limbs, _ = engine._stage("_weights", u, slots)
    products = engine._stage("_products", limbs)  # (G, T, 2, L, N)
    batch = products.flatten(0, 1)
    outgoing, rho = engine.prepare_outgoing(batch)
    replies = torch.randint(-(1 << 62), 1 << 62, rho.shape, device=rho.device)
    ntt_form = engine._stage("_ntt_form", outgoing)

    def to_host_serialise() -> list[memoryview]:
        return engine.wire_ciphertexts(ntt_form.cpu().numpy())

    return {
        "products": timer.ms(lambda: engine._stage("_products", limbs)),
        "rerandomise_pad": timer.ms(lambda: engine.prepare_outgoing(batch)),
        "ntt": timer.ms(lambda: engine._stage("_ntt_form", outgoing)),
        "to_host_serialise": timer.ms(to_host_serialise),
        "unpad_decode": timer.ms(lambda: engine._stage("unpad_evaluations", replies, rho)),
        "ciphertexts": int(batch.shape[0]),
        "bytes_out": int(batch.shape[0]) * engine.profile.ciphertext_bytes,
    }


def run_device(
    device: torch.device, tokens: list[int], shapes: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    secret, ctx = generate_keys("default")
    rng = np.random.default_rng(0)
    timer = Timer(device, args.repeats, args.budget)
    report: dict[str, Any] = {}
    for name in shapes:
        spec = SHAPES[name]
        matrices, a_primes = build_layer(ctx, spec, rng)
        kwargs = {
            "output_slices": [spec["q"], spec["kv"], spec["kv"]],
            "d_in": spec["d_in"],
            "device": device,
        }
        engines: dict[str, Any] = {
            "local_folded": GpuDeltaEngine.from_matrices(
                secret, matrices, fold_secret=True, **kwargs
            ),
            "local_decrypt": GpuDeltaEngine.from_matrices(
                secret, matrices, fold_secret=False, **kwargs
            ),
            "remote_host": GpuRemoteDeltaEngine.from_matrices(None, matrices, **kwargs),
        }
        if device.type == "cuda" and args.compile:
            for fold in (True, False):
                name_c = "local_folded_compiled" if fold else "local_decrypt_compiled"
                engines[name_c] = GpuDeltaEngine.from_matrices(
                    secret, matrices, fold_secret=fold, compile=True, **kwargs
                )
            engines["remote_host_compiled"] = GpuRemoteDeltaEngine.from_matrices(
                None, matrices, compile=True, **kwargs
            )
        for engine in engines.values():
            engine.load(0, matrices, a_primes)
        points = []
        for t in tokens:
            x = torch.randn((t, spec["d_in"]), device=device).to(torch.bfloat16)
            slots = torch.zeros(t, dtype=torch.int64, device=device)
            point: dict[str, Any] = {"T": t, "groups": len(engines["local_folded"].groups)}
            for variant, engine in engines.items():
                if variant.startswith("remote_host"):
                    stages = remote_stages(engine, timer, x, slots)
                elif variant.endswith("_compiled"):
                    reference = engines[variant.removesuffix("_compiled")]
                    stages = compiled_stages(engine, reference, timer, x, slots)
                else:
                    stages = local_stages(engine, timer, x, slots)
                point[variant] = {"ms_per_call": stages}
                point[variant]["ms_per_token"] = {
                    k: round(v / t, 4) for k, v in stages.items() if isinstance(v, float)
                }
            estimate: dict[str, Any] = {}
            for variant in (
                "local_folded", "local_decrypt", "local_folded_compiled", "local_decrypt_compiled"
            ):  # fmt: skip
                if variant in point:
                    timing = point[variant]["ms_per_call"]
                    layer_ms = timing.get("compute_graph", timing["compute_eager"])
                    estimate[variant] = round(layer_ms * spec["layers"], 3)
            folded = point["local_folded"]["ms_per_call"]
            per_layer = folded.get("compute_graph", folded["compute_eager"])
            estimate["note"] = f"{spec['layers']} layers x one q/v layer call " + (
                "(CUDA graph replay)" if "compute_graph" in folded else "(eager)"
            )
            point["estimate_step_ms"] = estimate
            points.append(point)
            print(
                f"[gpu-he-bench] {device.type} {name} T={t}: {per_layer:.3f} ms/layer folded; "
                f"per step {estimate}",
                file=sys.stderr,
            )
        report[name] = {"shape": spec, "points": points}
        del engines
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="auto", help="cuda, cpu, all, or auto (cuda if present)"
    )
    parser.add_argument("--tokens", default="1,16,64,512", help="T values on CUDA")
    parser.add_argument("--cpu-tokens", default="1,16", help="T values on the CPU")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per stage")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per stage at most")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false",
        help="skip the torch.compile variant on CUDA (its first call compiles, ~1 min)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int,
        help="torch CPU threads (1 gives steadier CPU figures on a shared machine)",
    )  # fmt: skip
    parser.add_argument("--out", help="write the JSON here as well")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    have_cuda = torch.cuda.is_available()
    if args.device == "auto":
        devices = ["cuda"] if have_cuda else ["cpu"]
    elif args.device == "all":
        devices = (["cuda"] if have_cuda else []) + ["cpu"]
    else:
        devices = [args.device]
    shapes = [s for s in args.shapes.split(",") if s]
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "profile": "default",
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if have_cuda else None,
            "platform": platform.platform(),
        },
        "notes": [
            "ms per call of one layer's q/v modules (every token its own ciphertext per group); "
            "ms_per_token = ms_per_call / T",
            "stages are timed one by one with the device synchronised: their sum exceeds "
            "compute_eager by the synchronisation and launch gaps",
            "remote_host excludes the key holder and the network",
        ],
        "results": {},
    }
    for name in devices:
        device = torch.device(name)
        tokens = [int(t) for t in (args.tokens if name == "cuda" else args.cpu_tokens).split(",")]
        report["results"][name] = run_device(device, tokens, shapes, args)
    text = json.dumps(report, indent=2)
    print(text)
    targets = [args.out] if args.out else []
    if os.environ.get("OUT"):
        targets.append(str(Path(os.environ["OUT"]) / "gpu_he_bench.json"))
    for target in targets:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
