"""The guide's API without starting vLLM: validation, the package checks, environment, engine
arguments, TSSPService. (tests/e2e/test_compat_serving.py runs it against a real vLLM.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AdapterFactory, Keys
from vllm_tensafe.api import (
    PackageHandle,
    TenSafeAsyncEngine,
    TenSafeVLLMConfig,
    TenSafeVLLMServer,
    TSSPService,
)
from vllm_tensafe.api.config import ATTESTATION_REFUSAL
from vllm_tensafe.errors import (
    BaseModelMismatchError,
    ConfigError,
    TsspError,
    UntrustedSignerError,
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("TENSAFE_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="module")
def package(tiny_llama: Path, adapters: AdapterFactory) -> Path:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return adapters.package(peft, tiny_llama, "e8")


@pytest.fixture(scope="module")
def foreign_package(tiny_llama: Path, adapters: AdapterFactory, stranger_keys: Keys) -> Path:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return adapters.package(peft, tiny_llama, "stranger-e8", keys=stranger_keys)


def _config(tiny_llama: Path, package: Path, keys: Keys, **kw: object) -> TenSafeVLLMConfig:
    return TenSafeVLLMConfig(
        model=str(tiny_llama),
        he_lora_adapter_path=str(package),
        trusted_keys=[str(keys.signing_pub)],
        he_secret=str(keys.he_secret),
        **kw,
    )


def test_import_stays_cheap() -> None:
    code = (
        "import sys, vllm_tensafe\n"
        "assert vllm_tensafe.TenSafeVLLMConfig and vllm_tensafe.TSSPService\n"
        "heavy = [m for m in ('vllm', 'tenseal', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_guide_defaults() -> None:
    config = TenSafeVLLMConfig(model="meta-llama/Llama-3-8B-Instruct")
    assert config.tensor_parallel_size == 1
    assert config.gpu_memory_utilization == 0.9
    assert config.enable_he_lora is True
    assert config.max_model_len == 4096  # as the guide documents
    assert config.max_num_seqs == 256 and config.block_size is None  # vLLM's choice
    assert config.verify_tssp_signature is True and config.require_attestation is False
    assert config.adapter_name == "he-lora" and config.key_holder == "local"


def test_attestation_without_tpm_and_remote_key_holder_is_refused_not_pretended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("TENSAFE_KEY_HOLDER_URL", "TENSAFE_KEY_HOLDER_TOKEN_FILE", "TENSAFE_TPM_AK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as info:
        TenSafeVLLMConfig(model="m", require_attestation=True)
    message = str(info.value)
    assert "key_holder='remote', key_holder_url, key_holder_token_file, tpm_ak" in message
    assert "are not configured" in message and "require_attestation=False" in message
    assert ATTESTATION_REFUSAL.split(";")[0] in message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"he_scheme": "ckks"}, "no field 'he_scheme'"),
        ({"he_lora_adapter_path": "adapter.bin"}, "is not a .tssp package"),
        ({"enable_he_lora": False, "he_lora_adapter_path": "a.tssp"}, "enable_he_lora=False"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"he_lora_rank": 0}, "he_lora_rank"),
        ({"key_holder": "cloud"}, "key_holder"),
        ({"adapter_name": "../x"}, "adapter_name"),
        ({"engine_kwargs": {"max_lora_rank": 8}}, "use the config fields"),
    ],
)
def test_bad_values_are_one_clear_config_error(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        TenSafeVLLMConfig(model="m", **kwargs)
    assert needle in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.usefixtures("clean_env")
def test_check_package_accepts_a_matching_config(
    tiny_llama: Path, package: Path, owner_keys: Keys
) -> None:
    config = _config(
        tiny_llama,
        package,
        owner_keys,
        he_lora_rank=8,
        he_lora_alpha=16,
        he_lora_target_modules=["v_proj", "q_proj"],
    )
    opened = config.check_package()
    assert opened is not None and opened.rank == 8 and opened.signature_verified
    assert config.max_lora_rank() == 8


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"he_lora_rank": 16}, "he_lora_rank=16 but the package"),
        ({"he_lora_alpha": 32.0}, "he_lora_alpha=32 but the package"),
        ({"he_lora_target_modules": ["q_proj", "k_proj"]}, "targets ['q_proj', 'v_proj']"),
    ],
)
def test_check_package_refuses_contradictions(
    tiny_llama: Path, package: Path, owner_keys: Keys, kwargs: dict[str, object], needle: str
) -> None:
    config = _config(tiny_llama, package, owner_keys, **kwargs)
    with pytest.raises(ConfigError) as info:
        config.check_package()
    assert needle in str(info.value)
    assert "has rank 8" in str(info.value) or "rank" not in needle


@pytest.mark.usefixtures("clean_env")
def test_check_package_refuses_an_untrusted_signer(
    tiny_llama: Path, foreign_package: Path, owner_keys: Keys
) -> None:
    with pytest.raises(TsspError, match="not trusted"):
        _config(tiny_llama, foreign_package, owner_keys).check_package()


@pytest.mark.usefixtures("clean_env")
def test_missing_trust_or_key_holder_is_a_config_error(tiny_llama: Path, package: Path) -> None:
    config = TenSafeVLLMConfig(model=str(tiny_llama), he_lora_adapter_path=str(package))
    with pytest.raises(ConfigError, match="he_secret"):
        config.check_package()
    remote = TenSafeVLLMConfig(model=str(tiny_llama), key_holder="remote")
    with pytest.raises(ConfigError, match="key_holder_url"):
        remote.apply_environment()
    assert "TENSAFE_ENABLED" not in os.environ  # nothing written when invalid


@pytest.mark.usefixtures("clean_env")
def test_apply_environment_writes_what_the_processes_read(
    tiny_llama: Path, package: Path, owner_keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSAFE_KEY_HOLDER_TIMEOUT", "4")  # not in the config: stays in charge
    settings = _config(tiny_llama, package, owner_keys).apply_environment()
    assert os.environ["TENSAFE_ENABLED"] == "true"
    assert os.environ["TENSAFE_TRUSTED_KEYS"] == str(owner_keys.signing_pub)
    assert os.environ["TENSAFE_HE_SECRET"] == str(owner_keys.he_secret)
    assert os.environ["TENSAFE_VERIFY_SIGNATURE"] == "true"
    assert settings.enabled and settings.key_holder_timeout == 4.0

    from vllm_tensafe.settings import load_settings

    assert load_settings() == settings


@pytest.mark.usefixtures("clean_env")
def test_to_engine_args_is_stock_async_engine_args(
    tiny_llama: Path, package: Path, owner_keys: Keys
) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    config = _config(
        tiny_llama,
        package,
        owner_keys,
        max_model_len=512,
        dtype="float32",
        block_size=32,
        max_num_seqs=8,
        engine_kwargs={"enforce_eager": True},
    )
    args = config.to_engine_args()
    assert type(args) is AsyncEngineArgs
    assert args.model == str(tiny_llama) and args.enable_lora and args.max_lora_rank == 8
    assert (args.max_model_len, args.dtype, args.block_size) == (512, "float32", 32)
    assert args.max_num_seqs == 8 and args.enforce_eager
    request = config.lora_request()
    assert (request.lora_name, request.lora_int_id, request.lora_path) == (
        "he-lora",
        1,
        str(package),
    )
    plain = TenSafeVLLMConfig(model=str(tiny_llama), enable_he_lora=False).to_engine_args()
    assert not plain.enable_lora


@pytest.mark.usefixtures("clean_env")
def test_server_cli_args_are_vllm_serve_args(
    tiny_llama: Path, package: Path, owner_keys: Keys
) -> None:
    server = TenSafeVLLMServer(_config(tiny_llama, package, owner_keys, max_model_len=256))
    args = server.cli_args()
    assert args.model == str(tiny_llama) and args.enable_lora and args.max_model_len == 256
    assert [(m.name, m.path) for m in args.lora_modules] == [("he-lora", str(package))]
    with pytest.raises(ConfigError, match="serve"):
        _ = server.app


async def test_generate_before_initialize_is_a_clear_error() -> None:
    engine = TenSafeAsyncEngine(TenSafeVLLMConfig(model="m"))
    with pytest.raises(ConfigError, match="initialize"):
        async for _ in engine.generate("hi", "r1"):
            pass


@pytest.mark.usefixtures("clean_env")
def test_tssp_service_load_and_verify(
    tiny_llama: Path,
    package: Path,
    foreign_package: Path,
    owner_keys: Keys,
    tmp_path: Path,
    tiny_qwen2: Path,
) -> None:
    service = TSSPService([owner_keys.signing_pub])
    handle = service.load_package(package)
    assert isinstance(handle, PackageHandle) and handle.size_bytes == package.stat().st_size

    # Success returns what was established; a refusal raises (no result to forget to check).
    summary = service.verify_package(handle)
    assert summary.rank == 8 and summary.signer_key_source == str(owner_keys.signing_pub)

    with pytest.raises(UntrustedSignerError, match="not trusted"):
        service.verify_package(foreign_package)

    with pytest.raises(TsspError, match="no trusted signer keys"):
        TSSPService().verify_package(package)
    assert TSSPService().verify_package(package, trusted_keys=[owner_keys.signing_pub]).rank == 8

    tampered = tmp_path / "tampered.tssp"
    shutil.copy(package, tampered)
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(TsspError, match="Invalid TSSP package"):
        service.verify_package(service.load_package(tampered))

    other_base = TSSPService([owner_keys.signing_pub], base_model=tiny_qwen2)
    with pytest.raises(BaseModelMismatchError):
        other_base.verify_package(package)

    with pytest.raises(TsspError):
        service.load_package(tmp_path / "missing.tssp")
