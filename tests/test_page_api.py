"""The web page's read-only routes (server/page_api.py) and `urls.web`, on the app in-process.

The app runs without its lifespan: the routes answer from the store and the outputs folder, nothing is
dispatched. Predictions are written to the store as the service leaves them when they end.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from i2v.progress import Progress, StageClock, format_stage_times, parse_stage_times
from i2v.server.app import create_app
from i2v.server.config import ServerConfig
from i2v.server.limits import token_owner
from i2v.server.states import CANCELED, SUCCEEDED
from i2v.server.store import PredictionRow, utcnow
from i2v.video import write_mp4

TOKEN, OTHER = "t", "u"


@pytest.fixture
def app(tmp_path: Path):
    return create_app(ServerConfig(data_dir=tmp_path, tokens=(TOKEN, OTHER)))


def client(app, token: str = TOKEN) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1:9", headers={"authorization": f"Bearer {token}"})


def add(
    app, pid: str, *, status=SUCCEEDED, predict_time=10.0, logs="", owner=TOKEN, **input
) -> PredictionRow:
    now = utcnow()
    row = PredictionRow(
        id=pid,
        model="kwaivgi/kling-v2.1",
        version="v",
        input={"prompt": "x", "start_image": "data:,", **input},
        status=status,
        output=f"{pid}.mp4" if status == SUCCEEDED else None,
        logs=logs,
        created_at=now - timedelta(seconds=predict_time + 1),
        started_at=now - timedelta(seconds=predict_time),
        completed_at=now,
        predict_time=predict_time,
        base_url="http://127.0.0.1:9",
        attempts=1,
        webhook_events_filter=[],
        data_removed=False,
        cancel_requested=False,
        owner=token_owner(owner),
    )
    app.state.service.store.add(row)
    return row


def test_stage_clock_lines_round_trip():
    now = iter([0.0, 0.5, 1.0, 4.0, 4.5, 6.0])
    clock = StageClock(lambda: next(now))
    for progress in [
        Progress("loading inputs"),
        Progress("loading model"),
        Progress("denoising", 0, 2),
        Progress("denoising", 1, 2),  # the same stage goes on: no clock reading
        Progress("decoding"),
        Progress("encoding video"),
    ]:
        clock(progress)
    times = clock.finish()
    assert times == {
        "loading inputs": 0.5,
        "loading model": 0.5,
        "denoising": 3.0,
        "decoding": 0.5,
        "encoding video": 1.5,
    }
    line = format_stage_times(times)
    assert line == (
        "stage times: loading inputs 0.50 s, loading model 0.50 s, denoising 3.00 s, "
        "decoding 0.50 s, encoding video 1.50 s"
    )
    assert parse_stage_times(f"denoising\n{line}\nseed: 3\n") == times
    assert parse_stage_times("denoising\nseed: 3\n") is None
    assert parse_stage_times("stage times: garbage\n") is None


def test_poster_is_the_first_frame_for_its_owner_only(app, tmp_path: Path):
    add(app, "clip")
    frames = np.zeros((3, 360, 640, 3), dtype=np.uint8)
    frames[0, :, :, 0] = 255  # the first frame red, the rest black
    write_mp4(frames, tmp_path / "outputs" / "clip.mp4", size=(640, 360), fps=24, preset="ultrafast")
    answer = client(app).get("/v1/predictions/clip/poster.jpg")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/jpeg"
    assert "private" in answer.headers["cache-control"]
    image = Image.open(io.BytesIO(answer.content))
    assert image.size == (640, 360)
    red, green, blue = np.asarray(image.convert("RGB")).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 40 and blue < 40
    assert client(app).get("/v1/predictions/clip/poster.jpg").content == answer.content  # kept
    assert client(app, OTHER).get("/v1/predictions/clip/poster.jpg").status_code == 404
    assert TestClient(app).get("/v1/predictions/clip/poster.jpg").status_code == 401
    add(app, "nothing", status=CANCELED)
    assert client(app).get("/v1/predictions/nothing/poster.jpg").status_code == 404
    (tmp_path / "outputs" / "clip.mp4").unlink()  # expired or removed: no poster either
    assert client(app).get("/v1/predictions/clip/poster.jpg").status_code == 404


def test_estimate_is_the_median_of_similar_clips_with_stage_shares(app):
    api = client(app)
    empty = api.get("/v1/i2v/estimate", params={"mode": "pro", "duration": 10}).json()
    assert empty == {
        "mode": "pro",
        "duration": 10,
        "preset": None,
        "basis": "none",
        "count": 0,
        "predict_time": None,
        "stages": [],
    }
    line = format_stage_times({"loading model": 2.0, "denoising": 6.0, "encoding video": 2.0})
    for i, seconds in enumerate([10.0, 30.0, 20.0]):
        add(app, f"std{i}", predict_time=seconds, logs=f"denoising\n{line}\nseed: 1\n")
    add(app, "fast", predict_time=4.0, preset="fast")
    add(app, "pro", predict_time=99.0, mode="pro")
    add(app, "ten", predict_time=77.0, duration=10)
    add(app, "canceled", status=CANCELED, predict_time=1.0)
    add(app, "others", predict_time=20.0, owner=OTHER)  # every token's clips count: same hardware

    same = api.get("/v1/i2v/estimate").json()
    assert same["basis"] == "same inputs" and same["count"] == 4
    assert same["predict_time"] == 20.0
    assert same["stages"] == [
        {"name": "loading model", "share": 0.2},
        {"name": "denoising", "share": 0.6},
        {"name": "encoding video", "share": 0.2},
    ]
    assert api.get("/v1/i2v/estimate", params={"preset": "fast"}).json()["predict_time"] == 4.0
    turbo = api.get("/v1/i2v/estimate", params={"preset": "turbo"}).json()
    assert turbo["basis"] == "same mode and duration" and turbo["count"] == 5
    assert api.get("/v1/i2v/estimate", params={"mode": "pro"}).json()["predict_time"] == 99.0
    assert api.get("/v1/i2v/estimate", params={"duration": "10"}).json()["predict_time"] == 77.0
    bad = api.get("/v1/i2v/estimate", params={"duration": "7"})
    assert bad.status_code == 422 and bad.json()["invalid_fields"][0]["field"] == "duration"
    assert TestClient(app).get("/v1/i2v/estimate").status_code == 401


def test_prediction_links_to_its_page(app):
    add(app, "clip")
    body = client(app).get("/v1/predictions/clip").json()
    assert body["urls"]["web"] == "http://127.0.0.1:9/?prediction=clip"
