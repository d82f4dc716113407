"""Pack -> verify -> open, and every way a package is refused when opened."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from vllm_tensafe.errors import (
    BaseModelMismatchError,
    DigestMismatchError,
    MalformedPackageError,
    SignatureError,
    TsspError,
    UnsupportedVersionError,
    UntrustedSignerError,
)
from vllm_tensafe.tssp import (
    TrustStore,
    open_package,
    open_package_unverified,
    pack_adapter,
    verify_package,
)

from .helpers import ORDER, build_container, ciphertext_index, member_spans, resign, split

Q0 = "model.layers.0.self_attn.q_proj"


def _peft(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key in raw:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = raw[key.replace("lora_A", "lora_B")]
            out[module] = (raw[key].astype(np.float64), b.astype(np.float64))
    return out


def _check_deltas(pkg: Any, adapter_dir: Path, secret_path: Path, scaling: float) -> None:
    """Decrypt through the HE engine: DeltaEngine(U = X A'^T, Enc(B')) == s X A^T B^T."""
    from vllm_tensafe.he import DeltaEngine, SecretKeySet
    from vllm_tensafe.keyholder import AdapterRef, LocalKeyHolder

    engine = DeltaEngine(pkg.public_context, LocalKeyHolder(SecretKeySet.load(secret_path, None)))
    peft = _peft(adapter_dir)
    assert set(peft) == set(pkg.modules)
    rng = np.random.default_rng(7)
    names = sorted(pkg.modules)
    xs = {n: rng.standard_normal((5, pkg.modules[n].d_in)) for n in names}
    items = [
        (xs[n] @ pkg.modules[n].lora_a.astype(np.float64).T, pkg.modules[n].encrypted_b)
        for n in names
    ]
    deltas = engine.compute(
        AdapterRef(pkg.name, pkg.public_context.key_id, pkg.manifest_digest), items
    )
    for name, delta in zip(names, deltas, strict=True):
        a, b = peft[name]
        expected = scaling * xs[name] @ a.T @ b.T
        got = np.asarray(delta, dtype=np.float64)
        assert got.shape == expected.shape
        # CKKS at scale 2^40 plus A' stored as float32: ~1e-6 relative; 1e-3 leaves room for
        # the key holder's noise flooding while still catching any wrong scale or mixing.
        np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())


def test_round_trip(
    package_path: Path,
    trust: TrustStore,
    llama_config: dict,
    adapter_dir: Path,
    he_keys: Any,
    signer: Any,
) -> None:
    summary = verify_package(package_path, trust=trust, base_model_config=llama_config)
    assert summary.signer_key_id == signer.key_id and summary.module_count == 4
    assert summary.line().startswith("OK qv.tssp: adapter 'qv'")
    pkg = open_package(package_path, trust=trust, base_model_config=llama_config)
    assert pkg.signature_verified and pkg.signer_key_id == signer.key_id
    assert (pkg.name, pkg.rank, pkg.alpha, pkg.scaling) == ("qv", 8, 16.0, 2.0)
    assert pkg.target_modules == ["q_proj", "v_proj"] and not pkg.use_rslora
    assert pkg.size_bytes == package_path.stat().st_size
    assert pkg.public_context.key_id == he_keys.context.key_id
    entry = pkg.modules[Q0]
    assert entry.lora_a.dtype == np.float32 and entry.lora_a.shape == (8, 128)
    assert (entry.d_in, entry.d_out) == (128, 128)
    a = _peft(adapter_dir)[Q0][0]
    assert not np.allclose(entry.lora_a, a, atol=1e-3)  # mixed: the host does not see A
    # ... only its row space (tolerance: A' is stored as float32).
    assert np.linalg.matrix_rank(np.vstack([a, entry.lora_a]), tol=1e-4) == 8
    # q and v of a layer share one tile (vLLM computes them in one QKV layer).
    v0 = Q0.replace("q_proj", "v_proj")
    tiles = {n: (pkg.modules[n].encrypted_b.slot_offset, pkg.modules[n].encrypted_b.tile_width)
             for n in (Q0, v0)}  # fmt: skip
    assert tiles == {Q0: (0, 128 + pkg.modules[v0].d_out), v0: (128, 128 + pkg.modules[v0].d_out)}
    _check_deltas(pkg, adapter_dir, he_keys.secret_path, 2.0)


def test_round_trip_rslora_all_linear(
    package_all_path: Path,
    trust: TrustStore,
    llama_config: dict,
    adapter_all_dir: Path,
    he_keys: Any,
) -> None:
    pkg = open_package(package_all_path, trust=trust, base_model_config=llama_config)
    assert pkg.name == "all-linear.rs" and pkg.use_rslora and pkg.scaling == pytest.approx(4.0)
    assert len(pkg.modules) == 14 and len(pkg.target_modules) == 7
    assert pkg.modules["model.layers.1.mlp.down_proj"].lora_a.shape == (4, 256)
    layer = "model.layers.1."
    tiles = {
        leaf: (pkg.modules[layer + leaf].encrypted_b.slot_offset,
               pkg.modules[layer + leaf].encrypted_b.tile_width)
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    d = {leaf: pkg.modules[layer + leaf].d_out for leaf in tiles}
    qkv = d["self_attn.q_proj"] + d["self_attn.k_proj"] + d["self_attn.v_proj"]
    assert tiles["self_attn.k_proj"] == (d["self_attn.q_proj"], qkv)
    assert tiles["mlp.up_proj"] == (d["mlp.gate_proj"], d["mlp.gate_proj"] + d["mlp.up_proj"])
    assert tiles["self_attn.o_proj"] == (0, d["self_attn.o_proj"])  # alone in its layer
    _check_deltas(pkg, adapter_all_dir, he_keys.secret_path, 4.0)


def test_no_mix(
    tmp_path: Path,
    adapter_dir: Path,
    llama_dir: Path,
    signer: Any,
    he_keys: Any,
    trust: TrustStore,
) -> None:
    out = pack_adapter(
        adapter_dir,
        llama_dir,
        signing_key=signer.key,
        public_context=he_keys.context,
        out_path=tmp_path / "plain.tssp",
        mix=False,
        progress=False,
    )
    pkg = open_package(out, trust=trust)
    assert pkg.manifest["lora"]["mixed"] is False and not pkg.mixed
    np.testing.assert_array_equal(pkg.modules[Q0].lora_a, _peft(adapter_dir)[Q0][0].astype("f4"))


def test_pack_refuses_bad_name(
    tmp_path: Path, adapter_dir: Path, llama_dir: Path, signer: Any, he_keys: Any
) -> None:
    for name in ("../x", "", "a b", "x" * 129, "-lead"):
        with pytest.raises(TsspError, match=r"adapter name"):
            pack_adapter(
                adapter_dir,
                llama_dir,
                signing_key=signer.key,
                public_context=he_keys.context,
                out_path=tmp_path / "n.tssp",
                name=name,
                progress=False,
            )
    assert not list(tmp_path.iterdir())


def test_pack_shape_mismatch(
    tmp_path: Path, adapter_dir: Path, llama_config: dict, signer: Any, he_keys: Any
) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(
        json.dumps({**llama_config, "hidden_size": 256, "head_dim": 128})
    )
    with pytest.raises(
        TsspError,
        match=r"shape mismatch for LoRA adapter: model\.layers\.0\."
        r"self_attn\.q_proj expects \(256, 256\), package has \(128, 128\)",
    ):
        pack_adapter(
            adapter_dir,
            big,
            signing_key=signer.key,
            public_context=he_keys.context,
            out_path=tmp_path / "x.tssp",
            progress=False,
        )


# --- tampering ------------------------------------------------------------------------------


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("member", "error"),
    [
        ("signature", SignatureError),
        ("he_context", DigestMismatchError),
        ("lora_a.safetensors", DigestMismatchError),
        ("lora_b.he", DigestMismatchError),
    ],
)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_member(
    package_bytes: bytes, trust: TrustStore, write, member: str, error: type, where: str
) -> None:
    offset, size = member_spans(package_bytes)[member]
    pos = {"first": offset, "middle": offset + size // 2, "last": offset + size - 1}[where]
    path = write(_flip(package_bytes, pos))
    with pytest.raises(error):
        open_package(path, trust=trust)
    with pytest.raises(error):
        verify_package(path, trust=trust)


def test_flipped_byte_in_manifest(package_bytes: bytes, trust: TrustStore, write) -> None:
    offset, size = member_spans(package_bytes)["manifest.json"]
    manifest = package_bytes[offset : offset + size]
    for pos in (manifest.index(b'"name":"qv"') + 8, manifest.index(b'"rank":8') + 7, 0, size - 1):
        with pytest.raises(
            SignatureError, match=r"^Invalid TSSP package: signature verification failed"
        ):
            open_package(write(_flip(package_bytes, offset + pos)), trust=trust)


def test_flipped_header_bytes(package_bytes: bytes, trust: TrustStore, write) -> None:
    for pos, error in [
        (0, MalformedPackageError),
        (9, UnsupportedVersionError),
        (15, MalformedPackageError),
        (16, MalformedPackageError),
        (16 + 39, MalformedPackageError),
        (16 + 40 * 4 + 39, MalformedPackageError),
    ]:
        with pytest.raises(error):
            open_package(write(_flip(package_bytes, pos)), trust=trust)


def test_truncation_at_many_offsets(package_bytes: bytes, trust: TrustStore, write) -> None:
    cuts = set(range(0, 260)) | {len(package_bytes) - k for k in range(1, 40)}
    for offset, size in member_spans(package_bytes).values():
        cuts |= {offset - 1, offset, offset + 1, offset + size // 2, offset + size - 1}
    cuts |= set(np.random.default_rng(1).integers(0, len(package_bytes), 60).tolist())
    path = write(b"")
    for cut in sorted(c for c in cuts if 0 <= c < len(package_bytes)):
        path.write_bytes(package_bytes[:cut])
        with pytest.raises(MalformedPackageError, match=r"truncated|not a TSSP"):
            open_package(path, trust=trust)


def test_appended_bytes(package_bytes: bytes, trust: TrustStore, write) -> None:
    with pytest.raises(MalformedPackageError, match=r"unexpected bytes"):
        open_package(write(package_bytes + b"\n"), trust=trust)


# --- signers --------------------------------------------------------------------------------


def test_untrusted_signer(
    tmp_path: Path,
    adapter_dir: Path,
    llama_dir: Path,
    other_signer: Any,
    he_keys: Any,
    trust: TrustStore,
) -> None:
    out = pack_adapter(
        adapter_dir,
        llama_dir,
        signing_key=other_signer.key,
        public_context=he_keys.context,
        out_path=tmp_path / "s.tssp",
        progress=False,
    )
    with pytest.raises(UntrustedSignerError, match=other_signer.key_id) as info:
        open_package(out, trust=trust)
    assert "--tensafe-trusted-keys" in str(info.value)
    with pytest.raises(UntrustedSignerError):
        verify_package(out, trust=trust)
    with pytest.raises(UntrustedSignerError):
        open_package(out, trust=TrustStore.from_files([]))
    both = TrustStore.from_files([other_signer.pub_path, trust.source(next(iter(trust.key_ids)))])
    assert open_package(out, trust=both).signer_key_id == other_signer.key_id


def test_wrong_signer_claiming_trusted_id(
    package_bytes: bytes, other_signer: Any, trust: TrustStore, write
) -> None:
    # Signed by a stranger, but the manifest claims the trusted owner's key id.
    forged = resign(package_bytes, other_signer.key)
    with pytest.raises(SignatureError, match=r"^Invalid TSSP package: signature verification"):
        open_package(write(forged), trust=trust)


def test_trusted_key_but_manifest_names_another(
    package_bytes: bytes, signer: Any, trust: TrustStore, write
) -> None:
    forged = resign(package_bytes, signer.key, edit=lambda m: m.update(signer_key_id="ab" * 32))
    with pytest.raises(SignatureError, match=r"manifest names"):
        open_package(write(forged), trust=trust)


def test_zero_signature(package_bytes: bytes, trust: TrustStore, write) -> None:
    parts = split(package_bytes)
    parts["signature"] = b"\x00" * 64
    with pytest.raises(SignatureError):
        open_package(write(build_container([(n, parts[n]) for n in ORDER])), trust=trust)


def test_trust_store_required(package_path: Path) -> None:
    with pytest.raises(TsspError, match=r"no trusted signer keys"):
        open_package(package_path, trust=None)  # type: ignore[arg-type]  # the refusal of no trust


def test_verify_off_warns_on_every_load(
    package_path: Path, caplog: pytest.LogCaptureFixture, package_bytes: bytes, write
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_tensafe.tssp")
    for _ in range(2):
        pkg = open_package_unverified(package_path)
        assert not pkg.signature_verified and pkg.signer_key_id is None
    warnings = [r for r in caplog.records if r.name == "vllm_tensafe.tssp"]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert "verification is OFF" in warnings[0].getMessage()
    # Digests are still checked without the signature.
    offset, size = member_spans(package_bytes)["lora_b.he"]
    with pytest.raises(DigestMismatchError):
        open_package_unverified(write(_flip(package_bytes, offset + size // 3)))


# --- base model -----------------------------------------------------------------------------


def test_base_model_mismatch(
    package_path: Path, trust: TrustStore, qwen2_config: dict, llama_config: dict
) -> None:
    with pytest.raises(BaseModelMismatchError, match=r"Qwen2ForCausalLM"):
        open_package(package_path, trust=trust, base_model_config=qwen2_config)
    with pytest.raises(BaseModelMismatchError, match=r"Qwen2ForCausalLM"):
        verify_package(package_path, trust=trust, base_model_config=qwen2_config)
    bigger = {**llama_config, "hidden_size": 256, "head_dim": 128}
    with pytest.raises(
        BaseModelMismatchError,
        match=r"shape mismatch for LoRA adapter: "
        r"model\.layers\.0\.self_attn\.q_proj expects \(256, 256\), package has "
        r"\(128, 128\)",
    ):
        open_package(package_path, trust=trust, base_model_config=bigger)
    pkg = open_package(package_path, trust=trust)
    pkg.check_base_model(llama_config)
    pkg.check_base_model({k: v for k, v in llama_config.items() if k != "head_dim"})  # implied
    with pytest.raises(BaseModelMismatchError, match=r"vocab_size: package 512, model 1024"):
        pkg.check_base_model({**llama_config, "vocab_size": 1024})
    with pytest.raises(BaseModelMismatchError, match=r"does not exist in this base model"):
        pkg.check_base_model({**llama_config, "num_hidden_layers": 1})
    with pytest.raises(BaseModelMismatchError, match=r"expects"):
        pkg.check_base_model({**llama_config, "num_key_value_heads": 2})
    with pytest.raises(BaseModelMismatchError, match=r"architectures"):
        pkg.check_base_model({})


# --- payloads behind a valid signature --------------------------------------------------------


def _manifest(data: bytes) -> dict[str, Any]:
    return json.loads(split(data)["manifest.json"])


def _secret_sections(secret_file: bytes) -> dict[int, bytes]:
    """Sections of an unencrypted PREFIX.secret (format: vllm_tensafe/he/keys.py docstring)."""
    assert secret_file[:8] == b"TSHESEC\x00" and secret_file[10] == 0  # no passphrase
    body, out, pos = secret_file[11:], {}, 0
    while pos < len(body):
        tag, length = struct.unpack_from("<BI", body, pos)
        out[tag] = body[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def test_context_with_secret_key_refused(
    package_bytes: bytes, signer: Any, trust: TrustStore, write, he_keys: Any
) -> None:
    secret_file = he_keys.secret_path.read_bytes()
    public = he_keys.public_path.read_bytes()
    secret_key_blob = _secret_sections(secret_file)[0x10]
    # The public context with the secret key appended as one more section (tag 0x10).
    with_secret = public + struct.pack("<BI", 0x10, len(secret_key_blob)) + secret_key_blob
    for ctx_bytes in (with_secret, secret_file):
        forged = resign(package_bytes, signer.key, members={"he_context": ctx_bytes})
        with pytest.raises(MalformedPackageError, match=r"he_context.*secret key"):
            open_package(write(forged), trust=trust)
        with pytest.raises(MalformedPackageError, match=r"he_context.*secret key"):
            verify_package(write(forged), trust=trust)


def test_garbage_context_refused(package_bytes: bytes, signer: Any, trust: TrustStore, write):
    forged = resign(package_bytes, signer.key, members={"he_context": b"\x00" * 100})
    with pytest.raises(MalformedPackageError, match=r"he_context"):
        open_package(write(forged), trust=trust)


def _lora_a(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(split(data)["lora_a.safetensors"])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("renamed", "tensor names do not match"),
        ("extra", "tensor names do not match"),
        ("missing", "tensor names do not match"),
        ("float64", "not float32"),
        ("float16", "not float32"),
        ("shape", "has shape"),
        ("nan", "non-finite"),
        ("garbage", "lora_a.safetensors"),
    ],
)
def test_bad_lora_a(
    package_bytes: bytes, signer: Any, trust: TrustStore, write, case: str, match: str
) -> None:
    tensors = _lora_a(package_bytes)
    if case == "renamed":
        tensors["model.layers.0.self_attn.k_proj"] = tensors.pop(Q0)
    elif case == "extra":
        tensors["model.layers.0.self_attn.k_proj"] = tensors[Q0]
    elif case == "missing":
        tensors.pop(Q0)
    elif case == "float64":
        tensors[Q0] = tensors[Q0].astype(np.float64)
    elif case == "float16":
        tensors[Q0] = tensors[Q0].astype(np.float16)
    elif case == "shape":
        tensors[Q0] = tensors[Q0][:4]
    elif case == "nan":
        tensors[Q0] = tensors[Q0].copy()
        tensors[Q0][0, 0] = np.nan
    blob = b"\xff" * 64 if case == "garbage" else save(tensors)
    forged = resign(package_bytes, signer.key, members={"lora_a.safetensors": blob})
    with pytest.raises(MalformedPackageError, match=match):
        open_package(write(forged), trust=trust)
    if case != "nan":  # verify checks the header, not the values
        with pytest.raises(MalformedPackageError, match=match):
            verify_package(write(forged), trust=trust)


def _blobs(data: bytes) -> list[tuple[str, bytes]]:
    manifest = _manifest(data)
    member = split(data)["lora_b.he"]
    names = sorted(manifest["modules"])
    pos = 8 + 4 + sum(2 + len(n) + 8 for n in names)
    out = []
    for n in names:
        size = manifest["modules"][n]["b_size"]
        out.append((n, member[pos : pos + size]))
        pos += size
    assert pos == len(member)
    return out


def _lora_b(blobs: list[tuple[str, bytes]]) -> bytes:
    return ciphertext_index([(n, len(b)) for n, b in blobs]) + b"".join(b for _, b in blobs)


def test_ciphertext_index_checks(package_bytes: bytes, signer: Any, trust: TrustStore, write):
    blobs = _blobs(package_bytes)
    member = _lora_b(blobs)
    assert member == split(package_bytes)["lora_b.he"]  # the spec describes what pack writes
    cases = {
        "magic": b"XSSPHEB1" + member[8:],
        "count": member[:8] + struct.pack(">I", 3) + member[12:],
        "order": _lora_b([blobs[1], blobs[0], *blobs[2:]]),
        "trailing": member + b"\x00",
        "short": member[:20],
    }
    for case, data in cases.items():
        forged = resign(package_bytes, signer.key, members={"lora_b.he": data})
        with pytest.raises(MalformedPackageError, match=r"lora_b.he"):
            open_package(write(forged), trust=trust)
        with pytest.raises(MalformedPackageError, match=r"lora_b.he"):
            verify_package(write(forged), trust=trust)
        del case


def test_swapped_blobs_refused(package_bytes: bytes, signer: Any, trust: TrustStore, write):
    # All blobs have the same size, so swapping two keeps the index valid: only the digest
    # (which the signature covers) tells the swap apart from what the signer packed.
    blobs = dict(_blobs(package_bytes))
    q1 = "model.layers.1.self_attn.q_proj"
    blobs[Q0], blobs[q1] = blobs[q1], blobs[Q0]
    member = _lora_b(sorted(blobs.items()))
    parts = split(package_bytes)
    parts["lora_b.he"] = member
    with pytest.raises(DigestMismatchError):
        open_package(write(build_container([(n, parts[n]) for n in ORDER])), trust=trust)


def test_blob_not_matching_layout(package_bytes: bytes, signer: Any, trust: TrustStore, write):
    def edit(manifest: dict[str, Any]) -> None:
        manifest["modules"][Q0]["b_layout"] = {"tampered": 1}

    forged = resign(package_bytes, signer.key, edit=edit)
    with pytest.raises(MalformedPackageError, match=f"ciphertexts of {Q0} do not match"):
        open_package(write(forged), trust=trust)


def test_garbage_blob(package_bytes: bytes, signer: Any, trust: TrustStore, write) -> None:
    blobs = _blobs(package_bytes)
    blobs[0] = (blobs[0][0], bytes(len(blobs[0][1])))
    forged = resign(package_bytes, signer.key, members={"lora_b.he": _lora_b(blobs)})
    with pytest.raises(MalformedPackageError, match=r"ciphertexts of"):
        open_package(write(forged), trust=trust)


def test_blob_of_another_module(package_bytes: bytes, signer: Any, trust: TrustStore, write):
    # v_proj's blob (d_out 64) where q_proj's (d_out 128) belongs, sizes fixed up and signed.
    blobs = dict(_blobs(package_bytes))
    v0 = "model.layers.0.self_attn.v_proj"
    blobs[Q0] = blobs[v0]

    def edit(manifest: dict[str, Any]) -> None:
        manifest["modules"][Q0]["b_size"] = len(blobs[v0])

    forged = resign(
        package_bytes, signer.key, members={"lora_b.he": _lora_b(sorted(blobs.items()))}, edit=edit
    )
    with pytest.raises(MalformedPackageError, match=r"ciphertexts of"):
        open_package(write(forged), trust=trust)


MANIFEST_EDITS = [
    ("extra_field", lambda m: m.update(extra=1), MalformedPackageError, "extra"),
    ("version", lambda m: m.update(format_version=3), UnsupportedVersionError, "version 3"),
    ("old_version", lambda m: m.update(format_version=1), UnsupportedVersionError, "re-pack"),
    ("no_adapter_version", lambda m: m.pop("adapter_version"), MalformedPackageError, "adapter"),
    ("adapter_version0", lambda m: m.update(adapter_version=0), MalformedPackageError, "adapter"),
    ("null_expiry", lambda m: m.update(not_after=None), MalformedPackageError, "not_after"),
    (
        "bad_expiry",
        lambda m: m.update(not_after="2025-02-30T00:00:00Z"),
        MalformedPackageError,
        "not_after",
    ),
    ("format", lambda m: m.update(format="zip"), MalformedPackageError, "format"),
    ("rank0", lambda m: m["lora"].update(rank=0), MalformedPackageError, "rank"),
    ("rank_str", lambda m: m["lora"].update(rank="8"), MalformedPackageError, "rank"),
    ("alpha", lambda m: m["lora"].update(alpha=-1.0), MalformedPackageError, "alpha"),
    (
        "targets",
        lambda m: m["lora"].update(target_modules=["q_proj"]),
        MalformedPackageError,
        "target_modules",
    ),
    (
        "scaling_in_b",
        lambda m: m["lora"].update(scaling_in_b=False),
        MalformedPackageError,
        "scaling_in_b",
    ),
    (
        "module_path",
        lambda m: m["modules"].update({"../../etc": m["modules"][Q0]}),
        MalformedPackageError,
        "module name",
    ),
    (
        "fingerprint",
        lambda m: m["base_model"].update(fingerprint="0" * 64),
        MalformedPackageError,
        "binding",
    ),
    (
        "binding_shape",
        lambda m: m["base_model"]["weight_shapes"].update({Q0: [64, 128]}),
        MalformedPackageError,
        "weight shape",
    ),
    ("d_in", lambda m: m["modules"][Q0].update(d_in=64), MalformedPackageError, "weight shape"),
    ("members", lambda m: m["members"].pop("he_context"), MalformedPackageError, "members"),
    (
        "digest_case",
        lambda m: m["members"]["he_context"].update(
            sha256=m["members"]["he_context"]["sha256"].upper()
        ),
        MalformedPackageError,
        "sha256",
    ),
    (
        "he_key_id",
        lambda m: m["he"].update(public_key_id="0" * 64),
        MalformedPackageError,
        "he_context does not match",
    ),
    (
        "b_size",
        lambda m: m["modules"][Q0].update(b_size=m["modules"][Q0]["b_size"] + 1),
        MalformedPackageError,
        "lora_b.he",
    ),
    ("name", lambda m: m.update(name="../evil"), MalformedPackageError, "name"),
    ("created", lambda m: m.update(created="yesterday"), MalformedPackageError, "created"),
]


@pytest.mark.parametrize(
    ("case", "edit", "error", "match"), MANIFEST_EDITS, ids=[c for c, *_ in MANIFEST_EDITS]
)
def test_signed_but_invalid_manifest(
    package_bytes: bytes,
    signer: Any,
    trust: TrustStore,
    write,
    case: str,
    edit: Any,
    error: type,
    match: str,
) -> None:
    forged = resign(package_bytes, signer.key, edit=edit)
    with pytest.raises(error, match=match):
        open_package(write(forged), trust=trust)


def test_signed_non_canonical_manifest(
    package_bytes: bytes, signer: Any, trust: TrustStore, write
) -> None:
    pretty = json.dumps(_manifest(package_bytes), indent=1, sort_keys=True).encode()
    forged = resign(package_bytes, signer.key, raw_manifest=pretty)
    with pytest.raises(MalformedPackageError, match=r"canonical"):
        open_package(write(forged), trust=trust)


def test_member_size_differs_from_manifest(
    package_bytes: bytes, signer: Any, trust: TrustStore, write
) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["members"]["he_context"]["size"] += 1

    with pytest.raises(DigestMismatchError, match=r"he_context is"):
        open_package(write(resign(package_bytes, signer.key, edit=edit)), trust=trust)


def test_missing_package(tmp_path: Path, trust: TrustStore) -> None:
    with pytest.raises(TsspError, match=r"cannot read TSSP package"):
        open_package(tmp_path / "missing.tssp", trust=trust)
    with pytest.raises(TsspError, match=r"cannot read TSSP package"):
        verify_package(tmp_path / "missing.tssp", trust=trust)
