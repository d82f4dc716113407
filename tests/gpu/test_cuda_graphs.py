"""On a CUDA GPU: encrypted adapters under vLLM's default compilation (torch.compile + CUDA
graphs) answer exactly as the plaintext adapter of the same weights, never as the base model,
with the HE work on the GPU.

Run on the GPU machine (docs/install.md, "On a CUDA GPU"), bf16::

    pytest tests/gpu/test_cuda_graphs.py -x -q

What it does, with as few servers as possible (two, plus one that must not start):

1. checks the vLLM patch table against the running vLLM (seconds; stops here if it does not
   fit), and that the splitting HE op refuses to run inside a CUDA graph capture (no server);
2. ``vllm serve ... -cc '{"cudagraph_mode": "FULL"}'`` with TenSafe on (and no
   ``--lora-target-modules``: the HE op then cannot be captured) must exit with the refusal in
   its first seconds, before loading weights;
3. ONE ``vllm serve`` with vLLM's default compilation (no ``--enforce-eager``) and
   ``--lora-target-modules`` set, local key holder: the torch HE engine on the GPU, captured in
   vLLM's FULL_AND_PIECEWISE graphs (``tensafe::he_lora_delta_device``), serving the base
   model, the demo adapter as a plaintext LoRA (``plain``) and its TSSP package (``enc``):
   greedy answers, one at a time and all at once, compared;
4. the same with a remote key holder (the key-holder service on this host): the torch engine
   on the GPU outside the graphs (PIECEWISE, ``tensafe::he_lora_delta`` split out).

The demo adapter (tests.support.builders.train_demo_adapter) is trained until every answer token
wins by a logit margin of 1.0; bf16 and the HE path move logits by far less, so greedy tokens
must be identical. (A random adapter's top-2 logits are often closer than bf16's rounding:
exact token equality would then test the float format, not the plugin.) On GPUs vLLM is not
batch-invariant, so base-model answers are only checked for not being the adapter's.

Results go to ``$OUT/gpu_summary.json`` (and the server logs to ``$OUT/*.log``) when ``$OUT``
is set, and are printed at the end of the run: which cudagraph mode and which HE engine ran,
the HE counters, the answers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.builders import LORA_TARGETS_ALL_LINEAR

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BASE, PLAIN, ENC = "base", "plain", "enc"
REMOTE_TOKEN = "gpu-test-host-token"
RENDERINGS = ("completion", "chat")
REPEATS = 4  # copies of each request in the concurrent round: batches mix all three models
MAX_TOKENS = 16  # the demo answer is 8 tokens and EOS
GPU_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_PLUGINS": "tensafe",  # also loads the status route (HE usage counters)
    "VLLM_LOGGING_LEVEL": "INFO",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
GPU_ARGS = (
    "--dtype",
    "bfloat16",  # vLLM's GPU LoRA kernels refuse float32
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "16",  # few CUDA graph sizes to capture: a faster start
    "--gpu-memory-utilization",
    "0.3",
)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_setup(demo: Any, adapters: Any, owner_keys: Any) -> dict[str, Any]:
    package = adapters.package(demo.demo_adapter_dir, demo.model_dir, "demo-gpu")
    return {
        "model": demo.model_dir,
        "plain": demo.demo_adapter_dir,
        "package": package,
        "keys": owner_keys,
    }


def tensafe_args(setup: dict[str, Any]) -> list[str]:
    keys = setup["keys"]
    return [
        "--served-model-name",
        BASE,
        *GPU_ARGS,
        "--enable-tensafe",
        "--tensafe-trusted-keys",
        str(keys.signing_pub),
        "--tensafe-he-secret",
        str(keys.he_secret),
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--lora-modules",
        f"{PLAIN}={setup['plain']}",
        f"{ENC}={setup['package']}",
    ]


def start_server(
    setup: dict[str, Any],
    gpu_out: Path,
    name: str,
    extra: list[str],
    args: list[str] | None = None,
) -> Any:
    from tests.support.server_process import VllmServer

    server = VllmServer(
        setup["model"],
        [*(tensafe_args(setup) if args is None else args), *extra],
        env=GPU_ENV,
        cpu_defaults=False,
        startup_timeout=900,
        log_path=gpu_out / f"vllm-{name}.log",
    )
    started = time.monotonic()
    server.start()
    server.startup_seconds = round(time.monotonic() - started, 1)
    return server


# --- requests -------------------------------------------------------------------------------


def post(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(
            f"{path} {body.get('model')}: HTTP {exc.code} {exc.read()!r}"
        ) from None


def ask(base_url: str, model: str, rendering: str) -> tuple[tuple[int, ...], str]:
    """Greedy answer to the demo prompt: (token ids, text)."""
    from tests.support.builders import DEMO_PROMPT

    common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    if rendering == "completion":
        choice = post(base_url, "/v1/completions", {**common, "prompt": DEMO_PROMPT})["choices"][0]
        text = choice["text"]
    else:
        body = {**common, "messages": [{"role": "user", "content": DEMO_PROMPT}]}
        choice = post(base_url, "/v1/chat/completions", body)["choices"][0]
        text = choice["message"]["content"]
    return tuple(choice.get("token_ids") or ()), text.strip()


def ask_all(base_url: str, jobs: list[tuple[str, str]]) -> list[tuple[tuple[int, ...], str]]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(ask, base_url, model, rendering) for model, rendering in jobs]
        return [future.result(timeout=600) for future in futures]


def adapter_status(base_url: str) -> dict[str, Any]:
    """The workers' status per adapter (GET /v1/tensafe/adapters); {"error": ...} if the route
    does not answer (the answers, not the counters, are what the test is about)."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/tensafe/adapters", timeout=60) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {a["name"]: a for a in body.get("adapters", [])}


def he_usage(base_url: str) -> dict[str, Any]:
    status = adapter_status(base_url)
    if "error" in status:
        return status
    return {name: a["usage"] for name, a in status.items()}


def graph_facts(log: str) -> dict[str, Any]:
    """What the log says about compilation and CUDA graphs: TenSafe's lines and vLLM's."""
    lines = log.splitlines()
    return {
        "guard": [line.split("] ", 1)[-1] for line in lines if "TenSafe graph guard:" in line],
        "worker": [
            line.split("] ", 1)[-1] for line in lines if "TenSafe graph check in worker" in line
        ],
        "mode_change": [
            line.split("] ", 1)[-1] for line in lines if "TenSafe: CUDA graphs" in line
        ],
        "vllm_cudagraph_mode": sorted(
            set(re.findall(r"'cudagraph_mode': <CUDAGraphMode\.(\w+)", log))
        ),
        "vllm_captures": sorted(set(re.findall(r"Capturing CUDA graphs \([^)]*\)", log))),
        "graph_capturing_finished": [
            line.split("] ", 1)[-1] for line in lines if "Graph capturing finished" in line
        ],
        # Which HE engine the worker chose and why, and the captured engines' size.
        "he_plan": [line.split("] ", 1)[-1] for line in lines if "TenSafe: HE engine" in line],
        "he_engines": [
            line.split("] ", 1)[-1] for line in lines if "TenSafe: device HE engines" in line
        ],
    }


def check_server(server: Any, name: str, gpu_summary: dict[str, Any]) -> dict[str, Any]:
    """Sequential then concurrent answers; returns (and records) what was seen."""
    from tests.support.builders import DEMO_ANSWER

    url = server.base_url
    record: dict[str, Any] = {"startup_seconds": server.startup_seconds, "args": server.args}
    gpu_summary[name] = record
    usage_before = he_usage(url)
    sequential = {(m, r): ask(url, m, r) for m in (BASE, PLAIN, ENC) for r in RENDERINGS}
    record["sequential"] = {f"{m}/{r}": text for (m, r), (_, text) in sequential.items()}
    usage_after = he_usage(url)
    record["he_usage"] = {"before": usage_before, "after": usage_after}
    record["graphs"] = graph_facts(server.log())

    for rendering in RENDERINGS:
        plain_ids, plain_text = sequential[(PLAIN, rendering)]
        enc_ids, enc_text = sequential[(ENC, rendering)]
        base_text = sequential[(BASE, rendering)][1]
        assert plain_text == DEMO_ANSWER, f"{name}: the plaintext adapter answered {plain_text!r}"
        assert (enc_ids, enc_text) == (plain_ids, plain_text), (
            f"{name} {rendering}: encrypted {enc_text!r} {enc_ids} != plaintext "
            f"{plain_text!r} {plain_ids} (base: {base_text!r})"
        )
        assert enc_text != base_text, f"{name} {rendering}: encrypted answered as base"
    # The HE op really ran for these requests (a graph replay would not have counted).
    calls = usage_after.get("demo-gpu", {}).get("he_calls", 0)
    calls_before = usage_before.get("demo-gpu", {}).get("he_calls", 0)
    if "error" not in usage_after:
        assert calls > calls_before, f"{name}: no HE delta was computed ({usage_after})"

    jobs = [(m, r) for m in (BASE, PLAIN, ENC) for r in RENDERINGS] * REPEATS
    rounds = []
    for _ in range(2):
        answers = ask_all(url, jobs)
        mismatches = []
        for (model, rendering), got in zip(jobs, answers, strict=True):
            if model == BASE:
                # Not batch-invariant on GPUs: only check no adapter leaked into it.
                if got[1] == DEMO_ANSWER:
                    mismatches.append(f"base/{rendering} answered {got[1]!r}")
            elif got != sequential[(model, rendering)]:
                mismatches.append(f"{model}/{rendering}: {got} != {sequential[(model, rendering)]}")
        rounds.append({"requests": len(jobs), "mismatches": mismatches})
    record["concurrent"] = rounds
    status = adapter_status(url)
    record["status"] = status.get("demo-gpu", status)
    assert all(not r["mismatches"] for r in rounds), f"{name}: {rounds}"
    worker = record["graphs"]["worker"][0] if record["graphs"]["worker"] else "no worker line"
    engine = record["status"].get("he_engine", "?") if isinstance(record["status"], dict) else "?"
    record["headline"] = (
        f"OK: enc == plain == {DEMO_ANSWER!r} ({', '.join(RENDERINGS)}), != base; "
        f"{2 * len(jobs)} concurrent requests as one at a time; HE calls {calls_before} -> "
        f"{calls}; HE engine {engine}; started in {server.startup_seconds}s; "
        f"{worker.split(': ', 1)[-1]}"
    )
    return record


# --- 1. the table and the op, no server ---------------------------------------------------------


def test_the_patch_table_fits_this_vllm(gpu_summary: dict[str, Any]) -> None:
    from vllm_tensafe.vllm import patches, versions

    problems = [str(p) for p in patches.check_all()]
    gpu_summary["vllm"] = {
        "version": versions.running_version(),
        "series": versions.running_series(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "table_problems": problems,
    }
    assert versions.check_vllm_version() in versions.TESTED
    assert problems == []


def test_the_op_refuses_to_run_inside_a_cuda_graph_capture(gpu_summary: dict[str, Any]) -> None:
    from vllm_tensafe.errors import ConfigError
    from vllm_tensafe.vllm import layers

    layers._LAYERS["gpu-capture-test"] = types.SimpleNamespace(_tensafe_slots={})
    x = torch.randn(4, 16, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(4, 8, device="cuda", dtype=torch.bfloat16)
    torch.ops.tensafe.he_lora_delta(x, out, "gpu-capture-test")  # eager: fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ConfigError) as info, torch.cuda.graph(graph):
        torch.ops.tensafe.he_lora_delta(x, out, "gpu-capture-test")
    gpu_summary["op_under_capture"] = str(info.value)
    assert "ran inside a CUDA graph capture" in str(info.value)


# --- 2. a FULL-only mode is refused before anything loads ------------------------------------


def test_full_cuda_graphs_are_refused_at_once(
    demo_setup: dict[str, Any], gpu_out: Path, gpu_summary: dict[str, Any]
) -> None:
    from tests.support.server_process import free_port, vllm_executable

    log_path = gpu_out / "vllm-full-refused.log"
    command = [
        vllm_executable(),
        "serve",
        str(demo_setup["model"]),
        "--port",
        str(free_port()),
        *tensafe_args(demo_setup),
        "-cc",
        '{"cudagraph_mode": "FULL"}',
    ]
    started = time.monotonic()
    done = subprocess.run(
        command,
        env={**os.environ, **GPU_ENV},
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    seconds = round(time.monotonic() - started, 1)
    output = done.stdout + done.stderr
    log_path.write_text(output)
    refusal = [
        line[line.index("vllm-tensafe: error:") :]
        for line in output.splitlines()
        if "vllm-tensafe: error:" in line  # vLLM 0.26 prefixes "(APIServer pid=N) "
    ]
    gpu_summary["full_refused"] = {
        "returncode": done.returncode,
        "seconds": seconds,
        "message": refusal,
        "headline": f"exit {done.returncode} after {seconds}s: "
        + (refusal[0][:110] if refusal else "NO REFUSAL LINE"),
    }
    assert done.returncode == 2, output[-3000:]
    assert refusal and "CUDA graph mode FULL (requested with -cc.cudagraph_mode=FULL)" in refusal[0]
    assert "--enforce-eager" in refusal[0]
    # Refused in the API server: no engine process started, no weights loaded.
    assert "Loading weights" not in output and "Model loading took" not in output


# --- 3. vLLM's default compilation, local key holder: the HE op inside the CUDA graphs ---------


class TestCapturedInCudaGraphs:
    @pytest.fixture(scope="class")
    def server(self, demo_setup: dict[str, Any], gpu_out: Path) -> Any:
        # The demo adapter is all-linear: the device engines are built for these modules
        # before vLLM captures its graphs.
        targets = ["--lora-target-modules", *LORA_TARGETS_ALL_LINEAR]
        server = start_server(demo_setup, gpu_out, "captured", targets)
        try:
            yield server
        finally:
            server.stop()

    def test_encrypted_equals_plaintext_sequential_and_concurrent(
        self, server: Any, gpu_summary: dict[str, Any]
    ) -> None:
        record = check_server(server, "captured_default_compilation", gpu_summary)
        graphs = record["graphs"]
        # vLLM kept its default graphs, FULL decode graphs included, with the HE op inside.
        assert graphs["worker"], "the worker did not log its graph check"
        worker = graphs["worker"][0]
        assert "cudagraph_mode=FULL_AND_PIECEWISE" in worker, worker
        assert "tensafe::he_lora_delta_device inside the CUDA graphs" in worker, worker
        assert "compilation mode=VLLM_COMPILE" in worker, worker
        assert graphs["mode_change"] == [], graphs["mode_change"]
        plan = graphs["he_plan"]
        assert any(
            "HE engine torch-cuda, HE op captured in CUDA graphs" in line for line in plan
        ), plan
        assert record["status"]["he_engine"] == "torch-cuda"
        assert record["status"]["he_graphs"] == "captured"


# --- 4. vLLM's default compilation, remote key holder: the HE op split out ---------------------


class TestRemoteKeyHolderOnGpu:
    @pytest.fixture(scope="class")
    def key_holder(self, demo_setup: dict[str, Any], gpu_out: Path) -> Any:
        from tests.support.server_process import free_port
        from vllm_tensafe.he import SecretKeySet
        from vllm_tensafe.keyholder.server import AdapterPolicy, KeyHolderService, TokenStore
        from vllm_tensafe.tssp import TrustStore

        keys = demo_setup["keys"]
        port = free_port()
        service = KeyHolderService(
            SecretKeySet.load(keys.he_secret),
            AdapterPolicy.from_packages(
                [demo_setup["package"]], TrustStore.from_files([keys.signing_pub])
            ),
            TokenStore.from_secrets([REMOTE_TOKEN]),
            port=port,
            audit_log=gpu_out / "key-holder-audit.jsonl",
        )
        assert service.start() == port
        token = gpu_out / "host.token"
        token.write_text(REMOTE_TOKEN + "\n")
        try:
            yield {"url": f"http://127.0.0.1:{port}", "token": token}
        finally:
            service.close()

    @pytest.fixture(scope="class")
    def server(self, demo_setup: dict[str, Any], gpu_out: Path, key_holder: dict) -> Any:
        args = [
            arg
            for arg in tensafe_args(demo_setup)
            if arg not in ("--tensafe-he-secret", str(demo_setup["keys"].he_secret))
        ]
        remote = [
            "--tensafe-key-holder", "remote",
            "--tensafe-key-holder-url", key_holder["url"],
            "--tensafe-key-holder-token-file", str(key_holder["token"]),
        ]  # fmt: skip
        server = start_server(demo_setup, gpu_out, "remote", remote, args=args)
        try:
            yield server
        finally:
            server.stop()

    def test_encrypted_equals_plaintext_sequential_and_concurrent(
        self, server: Any, gpu_summary: dict[str, Any]
    ) -> None:
        record = check_server(server, "remote_default_compilation", gpu_summary)
        worker = record["graphs"]["worker"][0]
        assert "cudagraph_mode=PIECEWISE" in worker, worker
        assert "tensafe::he_lora_delta in splitting_ops" in worker, worker
        plan = record["graphs"]["he_plan"]
        assert any("HE engine torch-cuda, HE op outside CUDA graphs" in line for line in plan), plan
        assert record["status"]["he_engine"] == "torch-cuda"
        usage = record["status"]["usage"]
        assert usage["key_holder_seconds"] > 0 and usage["ciphertexts_sent"] > 0
