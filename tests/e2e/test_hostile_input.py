"""Hostile adapter names and ``lora_path``s against the stock OpenAI server, runtime loading on.

One ``vllm serve --enable-tensafe --tensafe-adapter-dir DIR`` with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``. Next to DIR lies a canary: a valid, trusted package
(the same bytes the server serves as ``static-e8``), so a broken containment check would load
and serve it. Every hostile request must get a clear 4xx; inotify shows that nothing outside
DIR is ever opened or read, and the refusals for an existing and a missing outside file are
byte for byte the same answer.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import OpenWatch, complete
from tests.support.clients import openai_client
from tests.support.server_process import VllmServer

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
OUTSIDE = "lora_path must name an adapter inside the adapter folder"
PLAINTEXT = "loads only encrypted .tssp packages at runtime"


@pytest.fixture(scope="module")
def layout(
    tiny_llama: Path, adapters: AdapterFactory, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    package = adapters.package(peft, tiny_llama, "e8")
    top = tmp_path_factory.mktemp("hostile")
    folder = top / "adapters"
    folder.mkdir()
    shutil.copy(package, folder / "e8.tssp")
    shutil.copytree(peft, folder / "plain")
    (folder / "garbage.tssp").write_bytes(b"TSSP" + bytes(range(256)) * 8)
    canary = top / "canary.tssp"
    shutil.copy(package, canary)
    elsewhere = top / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(package, elsewhere / "x.tssp")
    (folder / "out-rel.tssp").symlink_to("../canary.tssp")
    (folder / "out-abs.tssp").symlink_to(canary)
    (folder / "out-dir").symlink_to(elsewhere)
    (folder / "inside-link.tssp").symlink_to("e8.tssp")
    return {
        "folder": folder,
        "canary": canary,
        "elsewhere": elsewhere,
        "package": package,
        "missing": top / "no-such.tssp",
    }


@pytest.fixture(scope="module")
def server(tiny_llama: Path, owner_keys: Keys, layout: dict[str, Path]) -> Iterator[VllmServer]:
    args = [
        "--served-model-name",
        BASE,
        "--enable-tensafe",
        "--tensafe-trusted-keys",
        str(owner_keys.signing_pub),
        "--tensafe-he-secret",
        str(owner_keys.he_secret),
        "--tensafe-adapter-dir",
        str(layout["folder"]),
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--lora-modules",
        f"static-e8={layout['package']}",  # outside the folder: configured by the operator
    ]
    with VllmServer(tiny_llama, args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def watch(layout: dict[str, Path], server: VllmServer) -> Iterator[OpenWatch]:
    # Started after the server: from here on nothing may open the canary or list elsewhere/.
    watcher = OpenWatch(layout["canary"], layout["elsewhere"], layout["elsewhere"] / "x.tssp")
    yield watcher
    watcher.close()


@pytest.fixture(scope="module")
def client(server: VllmServer) -> Any:
    return openai_client(f"{server.base_url}/v1", timeout=300)


def _post(server: VllmServer, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{server.base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _message(body: bytes) -> str:
    return json.loads(body)["error"]["message"]


def _load(server: VllmServer, name: str, path: str) -> tuple[int, bytes]:
    return _post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def test_the_canary_would_be_served(layout: dict[str, Path], client: Any) -> None:
    """The attack target is real: the canary's bytes are a package this server serves."""
    assert layout["canary"].read_bytes() == layout["package"].read_bytes()
    assert (
        complete(client, "static-e8", "Once upon a time").token_ids
        != complete(client, BASE, "Once upon a time").token_ids
    )


def test_paths_outside_the_folder_are_refused_alike(
    server: VllmServer, layout: dict[str, Path], watch: OpenWatch
) -> None:
    folder = layout["folder"]
    hostile = [
        "../canary.tssp",
        "./../canary.tssp",
        "e8.tssp/../../canary.tssp",
        f"{folder}/../canary.tssp",
        str(layout["canary"]),  # exists
        str(layout["missing"]),  # does not exist
        "/etc/passwd",
        "/etc/no-such-file.tssp",
        "out-rel.tssp",  # links inside the folder that lead out
        "out-abs.tssp",
        "out-dir/x.tssp",
        "x" * 100_000 + ".tssp",
        "e8.tssp\x00.tssp",
        ".",
        str(folder),
    ]
    answers = {path: _load(server, f"hostile-{i}", path) for i, path in enumerate(hostile)}
    for path, (status, body) in answers.items():
        assert status == 403, (path[:80], status, body[:300])
        assert _message(body).startswith(OUTSIDE), (path[:80], body[:300])
        assert "canary" not in _message(body) and "exist" not in _message(body)
    # Not one byte tells an existing outside file from a missing one.
    assert answers[str(layout["canary"])][1] == answers[str(layout["missing"])][1]
    assert len({body for _, body in answers.values()}) == 1
    assert watch.events() == []
    models = _post_get(server, "/v1/models")
    assert not any(m["id"].startswith("hostile-") for m in models["data"])


def _post_get(server: VllmServer, path: str) -> Any:
    with urllib.request.urlopen(f"{server.base_url}{path}", timeout=300) as response:
        return json.loads(response.read())


def test_plaintext_adapters_are_refused(server: VllmServer, watch: OpenWatch) -> None:
    status, body = _load(server, "plain", "plain")
    assert status == 403 and PLAINTEXT in _message(body), body
    assert "--tensafe-allow-plaintext-lora" in _message(body)
    assert watch.events() == []


def test_hostile_adapter_names(server: VllmServer, client: Any, watch: OpenWatch) -> None:
    from openai import APIStatusError

    for name in ("../../canary", "a/b", "x" * 100_000, "bad\nname", ".hidden", "e8..x"):
        status, body = _load(server, name, "e8.tssp")
        assert status == 403 and "plain adapter name" in _message(body), (name[:40], body[:300])
    # The same names (and the link names) asked for as a model: unknown, nothing loaded.
    for model in ("../canary", "out-rel", "out-abs", "x" * 50_000, "a\nb", "no-such-adapter"):
        with pytest.raises(APIStatusError) as info:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        assert info.value.status_code == 404, (model[:40], info.value)
    assert watch.events() == []
    assert complete(client, BASE, "Once upon a time").token_ids


def test_bad_package_inside_the_folder(server: VllmServer) -> None:
    status, body = _load(server, "garbage", "garbage.tssp")
    assert status == 400, body
    assert "TSSP" in _message(body) or "package" in _message(body), body


def test_contained_load_serves_and_unloads(
    server: VllmServer, client: Any, watch: OpenWatch
) -> None:
    want = complete(client, "static-e8", "Once upon a time").token_ids
    for name, path in (("rt-e8", "e8.tssp"), ("rt-link", "inside-link.tssp")):
        status, body = _load(server, name, path)
        assert status == 200, body
        assert complete(client, name, "Once upon a time").token_ids == want
        status, body = _post(server, "/v1/unload_lora_adapter", {"lora_name": name})
        assert status == 200, body
    # On demand by name: model NAME is DIR/NAME.tssp.
    assert complete(client, "e8", "Once upon a time").token_ids == want
    # The operator's static adapter (outside the folder) is not the runtime API's to remove.
    status, body = _post(server, "/v1/unload_lora_adapter", {"lora_name": "static-e8"})
    assert status == 403 and "not loaded from the adapter folder" in _message(body), body
    assert complete(client, "static-e8", "Once upon a time").token_ids == want
    assert watch.events() == []
    assert server.healthy()
