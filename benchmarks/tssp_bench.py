"""TSSP pack / verify / open cost for a 7B-shaped adapter; prints one JSON object.

The adapter is synthetic (random A and B) and the base model is a config.json only: packing
reads no base weights. Default shape: Llama-2-7B (hidden 4096, 32 layers, 32 KV heads),
LoRA r=16 on q_proj and v_proj, i.e. 64 modules and, with the default HE profile (4096
slots), 16 ciphertexts per module.

    python benchmarks/tssp_bench.py [--workdir DIR] [--layers 32] [--rank 16] [--profile default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "torch_dtype": "float16",
}


def write_synthetic(workdir: Path, layers: int, rank: int, targets: list[str]) -> tuple[Path, Path]:
    from safetensors.numpy import save_file

    base = workdir / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps({**LLAMA2_7B, "num_hidden_layers": layers}))
    adapter = workdir / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": targets,
                "bias": "none",
                "use_rslora": False,
                "use_dora": False,
                "base_model_name_or_path": "synthetic/llama-2-7b-shape",
            }
        )
    )
    rng = np.random.default_rng(0)
    d = LLAMA2_7B["hidden_size"]
    tensors = {}
    for layer in range(layers):
        for proj in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d)) / d**0.5).astype(
                np.float32
            )
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d, rank)) * 0.01).astype(
                np.float32
            )
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return base, adapter


def run(workdir: Path, layers: int, rank: int, profile: str) -> dict[str, Any]:
    from vllm_tensafe.he import PublicContext, write_keypair
    from vllm_tensafe.tssp import TrustStore, open_package, pack_adapter, verify_package
    from vllm_tensafe.tssp.adapter import load_base_config
    from vllm_tensafe.tssp.signing import load_signing_key, write_signing_keypair

    targets = ["q_proj", "v_proj"]
    base, adapter = write_synthetic(workdir, layers, rank, targets)
    key_path, pub_path = write_signing_keypair(workdir / "owner", force=True)
    t0 = time.perf_counter()
    _secret, public = write_keypair(workdir / "he", profile=profile)
    keygen_s = time.perf_counter() - t0
    ctx = PublicContext.from_bytes(Path(public).read_bytes())
    out = workdir / "bench7b.tssp"

    t0 = time.perf_counter()
    pack_adapter(
        adapter,
        base,
        signing_key=load_signing_key(key_path),
        public_context=ctx,
        out_path=out,
        progress=sys.stderr.isatty(),
    )
    pack_s = time.perf_counter() - t0

    trust = TrustStore.from_files([pub_path])
    config = load_base_config(base)
    t0 = time.perf_counter()
    summary = verify_package(out, trust=trust, base_model_config=config)
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pkg = open_package(out, trust=trust, base_model_config=config)
    open_s = time.perf_counter() - t0

    plain = (adapter / "adapter_model.safetensors").stat().st_size
    size = out.stat().st_size
    return {
        "shape": f"Llama-2-7B-like: d=4096, {layers} layers, r={rank} on {'+'.join(targets)}",
        "modules": len(pkg.modules),
        "ciphertexts": summary.ciphertext_count,
        "he_profile": profile,
        "he_keygen_s": round(keygen_s, 2),
        "pack_s": round(pack_s, 2),
        "verify_s": round(verify_s, 2),
        "open_s": round(open_s, 2),
        "verify_plus_open_s": round(verify_s + open_s, 2),
        "package_bytes": size,
        "plaintext_safetensors_bytes": plain,
        "size_ratio": round(size / plain, 1),
        "bytes_per_ciphertext": round(
            summary.manifest["members"]["lora_b.he"]["size"] / summary.ciphertext_count
        ),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--profile", default="default")
    args = parser.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.workdir, args.layers, args.rank, args.profile)
    else:
        with tempfile.TemporaryDirectory(prefix="tssp-bench-") as tmp:
            result = run(Path(tmp), args.layers, args.rank, args.profile)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
