"""The CI-sized soak: benchmarks/soak.py's load, faults and resource bounds in a few minutes.

One vLLM server and one key-holder process for the whole module (benchmarks/soak.py starts
both and states every expected outcome); ``python benchmarks/soak.py --minutes 10 --faults
all`` is the long run of the same code. Tests run in file order: warm-up, steady load, each
fault while the load goes on, then the resource bounds against the warm-up snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import soak as soak_lib

pytestmark = [pytest.mark.vllm, pytest.mark.soak]

CLIENTS = 4
LOAD_SECONDS = 45


@pytest.fixture(scope="module")
def soak(artifacts: Path, tiny_llama: Path) -> Iterator[soak_lib.Soak]:
    workload = soak_lib.build_workload(artifacts / "soak", model=tiny_llama)
    with soak_lib.soak_session(workload, CLIENTS) as session:
        yield session


@pytest.fixture(scope="module")
def warm(soak: soak_lib.Soak) -> dict[str, Any]:
    return soak_lib.warm_up(soak)


def test_steady_load(soak: soak_lib.Soak, warm: dict[str, Any]) -> None:
    report = soak_lib.steady_load(soak, LOAD_SECONDS)
    print(f"soak load: {report.as_dict()}")
    assert report.errors == [], report.as_dict()
    # Every model of the rotation was served, so LoRA slots were swapped under load.
    assert set(report.by_model) == set(soak_lib.steady_models()), report.by_model
    assert report.requests >= 4 * CLIENTS


@pytest.mark.parametrize("fault", list(soak_lib.FAULTS))
def test_fault(soak: soak_lib.Soak, warm: dict[str, Any], fault: str) -> None:
    try:
        outcome = soak_lib.FAULTS[fault](soak)
    except soak_lib.SoakFailure:
        soak.recover()  # leave the key holder up for the next fault
        raise
    print(f"soak fault {fault}: {outcome}")


def test_resources_within_bounds(soak: soak_lib.Soak, warm: dict[str, Any]) -> None:
    end = soak_lib.quiescent_resources(soak.server, soak.key_holder)
    print(f"soak resources: warm {warm} end {end}")
    assert soak_lib.check_resources(warm, end) == []
