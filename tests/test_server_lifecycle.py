"""Servers of their own: a restart loses no prediction; retention; a model that cannot load; two workers.

The model is not what these test: the restart and the two workers run the fault-injection backend, whose
`fault:slow:N` prompt keeps a prediction processing until the test acts (a state, not a timer).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from conftest import make_image, probe
from hardening import FAULT_ENV
from serverproc import PREDICTIONS, ServerProcess, data_uri

from i2v.server.states import TERMINAL


def test_restart_keeps_queued_predictions_and_fails_the_interrupted_one(
    tmp_path: Path, _cache_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, env=FAULT_ENV, model="fault-injection")
    try:
        first.wait_ready()
        start_image = data_uri(640, 360, seed=7)
        with first.http() as http:
            running = {"input": {"prompt": "fault:slow:100000", "start_image": start_image}}
            interrupted = http.post(PREDICTIONS, json=running).json()["id"]
            queued = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": start_image}})
            queued = queued.json()["id"]
        first.wait_for(interrupted, {"processing"}, timeout=60)
        assert first.wait_for(queued, {"starting"}, timeout=5)
    finally:
        first.kill()  # no goodbye: as if the machine lost power

    second = ServerProcess(data_dir, env={**FAULT_ENV, "I2V_RETENTION": "10s"}, model="fault-injection")
    try:
        second.wait_ready()
        lost = second.wait_for(interrupted, {"failed"}, timeout=10)
        assert "server stopped while this prediction was running" in lost["error"]
        done = second.wait_for(queued, TERMINAL, timeout=300)
        assert done["status"] == "succeeded", done["error"]
        with second.http() as http:
            video = http.get(done["output"])
            assert video.status_code == 200
            (tmp_path / "out.mp4").write_bytes(video.content)
            assert probe(tmp_path / "out.mp4")["frames"] == 121

            # retention (10 s here): outputs, inputs and uploads go; the record stays, marked data_removed
            upload = http.post(
                "/v1/files", files={"content": ("a.png", make_image(400, 400), "image/png")}
            ).json()
            assert upload["expires_at"] is not None
            deadline = time.monotonic() + 60
            while not (expired := http.get(f"/v1/predictions/{queued}").json())["data_removed"]:
                assert time.monotonic() < deadline, second.log_tail()
                time.sleep(0.5)
            assert expired["output"] is None and expired["input"]["start_image"] is None
            assert expired["status"] == "succeeded"
            gone = http.get(done["output"])  # the signed link lasted as long as the output: no longer
            assert gone.status_code == 403 and "expired" in gone.json()["detail"]
            assert http.get(f"/v1/predictions/{done['id']}/output.mp4").status_code == 404
            deadline = time.monotonic() + 30
            while http.get(f"/v1/files/{upload['id']}").status_code != 404:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert not any((data_dir / "outputs").iterdir())
        assert httpx.get(f"{second.base}/health-check").json()["status"] == "READY"
    finally:
        second.stop()


def test_a_model_that_cannot_load_is_reported_not_hung(tmp_path: Path, _cache_dir: Path) -> None:
    server = ServerProcess(tmp_path / "data", model="no-such-model")
    try:
        health = server.wait_ready(timeout=120, states=("SETUP_FAILED",))
        assert "unknown model 'no-such-model'" in health["setup"]["logs"]
        with server.http() as http:
            answer = http.post(
                PREDICTIONS,
                json={"input": {"prompt": "x", "start_image": data_uri(640, 360)}},
                headers={"prefer": "wait=30"},
            ).json()
        assert answer["status"] == "failed" and "unknown model 'no-such-model'" in answer["error"]
    finally:
        server.stop()


def test_one_worker_per_device_runs_predictions_side_by_side(tmp_path: Path, _cache_dir: Path) -> None:
    server = ServerProcess(
        tmp_path / "data", env={**FAULT_ENV, "I2V_DEVICES": "cpu,cpu"}, model="fault-injection"
    )
    try:
        server.wait_ready()
        body = {"input": {"prompt": "fault:slow:100000", "start_image": data_uri(640, 360, seed=8)}}
        with server.http() as http:
            ids = [http.post(PREDICTIONS, json=body).json()["id"] for _ in range(3)]
            for prediction_id in ids[:2]:
                server.wait_for(prediction_id, {"processing"}, timeout=60)
            third = http.get(f"/v1/predictions/{ids[2]}").json()
            assert third["status"] == "starting"  # one prediction at a time per worker
            assert httpx.get(f"{server.base}/health-check").json()["status"] == "BUSY"
            for prediction_id in ids:
                http.post(f"/v1/predictions/{prediction_id}/cancel")
        ended = [server.wait_for(i, {"canceled", "succeeded", "failed"}, timeout=120) for i in ids]
        assert [p["status"] for p in ended] == ["canceled"] * 3
    finally:
        server.stop()
