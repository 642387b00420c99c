"""Memory and routing in a real `i2v serve`: a budget that holds one tiny model at a time, a budget that
holds no pro model (refused at create), and two workers with their own modes (fault-injection backend)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hardening import fault_server
from serverproc import PREDICTIONS, ServerProcess, data_uri

from i2v.backends import resolve
from i2v.server.states import TERMINAL
from i2v.settings import Settings


def tiny_bytes(name: str) -> int:
    cls, spec = resolve(f"tiny-{name}", Settings().tiny_dir)
    return sum(part.size.bytes for part in cls.parts(spec, "cpu").values())


def create(server: ServerProcess, mode: str, prompt: str = "the sea") -> dict:
    with server.http() as http:
        response = http.post(
            PREDICTIONS, json={"input": {"prompt": prompt, "start_image": data_uri(400, 300), "mode": mode}}
        )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Iterator[ServerProcess]:
    standard, pro = tiny_bytes("wan2.2-ti2v-5b"), tiny_bytes("ltx-2")
    budget = max(standard, pro) + min(standard, pro) // 2  # either tiny model, never both
    proc = ServerProcess(tmp_path_factory.mktemp("memory") / "data", env={"I2V_GPU_MEMORY": str(budget)})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_standard_pro_standard_pro_on_a_budget_for_one_all_succeed_and_say_what_moved(one_at_a_time):
    server = one_at_a_time
    created = [create(server, mode) for mode in ("standard", "pro", "standard", "pro")]
    done = [server.wait_for(p["id"], TERMINAL) for p in created]
    assert [p["status"] for p in done] == ["succeeded"] * 4, [p.get("error") for p in done]
    standard, pro = "tiny-wan2.2-ti2v-5b", "tiny-ltx-2"
    expected = [
        None,
        f"moved {standard} to CPU memory",
        f"moved {pro} to CPU memory",
        f"moved {standard} to CPU memory",
    ]
    for prediction, moved in zip(done, expected, strict=True):
        lines = [line for line in prediction["logs"].splitlines() if line.startswith("memory:")]
        if moved is None:
            assert lines == []
        else:
            assert any(moved in line and " s) to make room for " in line for line in lines), lines
    assert any(f"moved {standard} from CPU memory back" in line for line in done[2]["logs"].splitlines())
    assert server.log_path.read_text().count("memory: moved") == 5  # the worker's own log says the same
    (worker,) = server.http().get("/health-check").json()["workers"]
    assert worker["holds"] == [pro] and worker["memory_budget"].endswith("MB")


def test_a_mode_no_worker_can_hold_is_refused_at_create(tmp_path: Path, _cache_dir: Path):
    budget = tiny_bytes("wan2.2-ti2v-5b") * 3 // 2  # the tiny TI2V-5B fits; the tiny LTX-2 does not
    proc = ServerProcess(tmp_path / "data", env={"I2V_GPU_MEMORY": str(budget)})
    try:
        health = proc.wait_ready()
        serves = {(s["mode"], s["preset"]): s for s in health["workers"][0]["serves"]}
        assert serves["standard", "default"]["durations"] == [5, 10]
        assert (
            serves["pro", "default"]["durations"] == [] and "tiny-ltx-2" in serves["pro", "default"]["reason"]
        )
        with proc.http() as http:
            refused = http.post(
                PREDICTIONS, json={"input": {"prompt": "x", "start_image": data_uri(400, 300), "mode": "pro"}}
            )
            assert refused.status_code == 422
            (field,) = refused.json()["invalid_fields"]
            assert field["field"] == "input.mode"
            assert "no worker can hold mode 'pro'" in field["description"]
            assert "what would fit: mode standard" in field["description"]
            assert http.get("/v1/predictions").json()["results"] == []  # nothing was queued
        assert "this worker can serve" in proc.log_path.read_text()
    finally:
        proc.stop()


def test_two_workers_with_modes_get_their_own_traffic_in_order(tmp_path: Path, _cache_dir: Path):
    proc = fault_server(tmp_path / "data", I2V_DEVICES="standard@cpu,pro@cpu")
    try:
        health = proc.wait_ready(timeout=120, states=("READY",))
        assert [w["modes"] for w in health["workers"]] == [["standard"], ["pro"]]
        modes = ["standard", "pro"] * 3
        created = [create(proc, mode, prompt=f"clip {i}") for i, mode in enumerate(modes)]
        done = [proc.wait_for(p["id"], TERMINAL) for p in created]
        assert {p["status"] for p in done} == {"succeeded"}
        for mode, worker in (("standard", "0 (standard@cpu)"), ("pro", "1 (pro@cpu)")):
            mine = [p for p, m in zip(done, modes, strict=True) if m == mode]
            assert all(f"running on worker {worker}" in p["logs"] for p in mine)
            started = sorted(mine, key=lambda p: p["started_at"])
            assert [p["id"] for p in started] == [p["id"] for p in mine]  # FIFO within the mode
    finally:
        proc.stop()
