"""docs/threat-model.md, demonstrated: what an active host CAN do with what it legitimately holds.

The host holds A' in plaintext and gets decrypted deltas back. From r tokens it recovers B'
and so the adapter's whole linear map B'·A' = s·B·A. This is the documented limit of HE-LoRA
in a plaintext forward pass; the test keeps the claim honest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tests.conftest import AdapterFactory, Keys


def test_host_extracts_the_adapter_function_from_r_tokens(
    tiny_llama: Path, adapters: AdapterFactory, owner_keys: Keys
) -> None:
    from vllm_tensafe.he import DeltaEngine, SecretKeySet
    from vllm_tensafe.keyholder import AdapterRef, LocalKeyHolder
    from vllm_tensafe.tssp import TrustStore, open_package

    peft_dir = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    package = open_package(
        adapters.package(peft_dir, tiny_llama, "e8"),
        trust=TrustStore.from_files([owner_keys.signing_pub]),
    )
    engine = DeltaEngine(
        package.public_context, LocalKeyHolder(SecretKeySet.load(owner_keys.he_secret))
    )
    name = "model.layers.0.self_attn.q_proj"
    entry = package.modules[name]
    rank = package.rank

    # What the host sees: r tokens of its own choosing (any in general position), their U from
    # the plaintext A', and the decrypted deltas the key holder returns.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rank, entry.d_in))
    u = x @ entry.lora_a.astype(np.float64).T
    ref = AdapterRef(package.name, package.public_context.key_id, package.manifest_digest)
    (delta,) = engine.compute(ref, [(u, entry.encrypted_b)])
    b_prime = np.linalg.solve(u, delta.astype(np.float64)).T  # (d_out, r)
    extracted = b_prime @ entry.lora_a.astype(np.float64)  # the adapter's linear map

    # The owner's secret: s·B·A from the PEFT files the host never saw.
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    prefix = f"base_model.model.{name}"
    a = weights[f"{prefix}.lora_A.weight"].astype(np.float64)
    b = weights[f"{prefix}.lora_B.weight"].astype(np.float64)
    true_map = (config["lora_alpha"] / config["r"]) * b @ a

    assert np.abs(extracted - true_map).max() < 1e-3 * np.abs(true_map).max()
    # ...while A' alone is not A: the mixing hid A itself, not the function.
    assert not np.allclose(entry.lora_a, a, atol=1e-3)
