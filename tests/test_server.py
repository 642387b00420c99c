"""The service end to end: a real `i2v serve` (tiny model) on loopback, called with the official client.

One server is shared by the module; only the tests that must render do (each tiny clip takes seconds).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import replicate
from conftest import make_image, probe
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from serverproc import MODEL, PREDICTIONS, TOKEN, ServerProcess, WebhookReceiver, data_uri

from i2v.geometry import output_size
from i2v.server.states import STATUSES, TERMINAL


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Iterator[ServerProcess]:
    # Warm-up is on with CUDA by default; here it is asked for, so the start-up path runs on CPU too.
    proc = ServerProcess(tmp_path_factory.mktemp("server") / "data", env={"I2V_WARMUP": "1"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.close()


def check_mp4(data: bytes, tmp_path: Path, source: tuple[int, int]) -> None:
    """The clip a Kling caller expects: 24 fps, 5 s (121 frames), 720p short side, the image's aspect."""
    path = tmp_path / "output.mp4"
    path.write_bytes(data)
    info = probe(path)
    assert (info["width"], info["height"]) == output_size(*source, 720)
    assert info["frames"] == 121 and info["fps"] == 24 and info["codec"] == "h264"


def test_the_worker_warms_the_model_up_at_start(server):
    assert "warmed up in" in server.log()  # the fixture waited for READY, which the worker sends after


def test_token_required(server):
    no_token = httpx.get(f"{server.base}/v1/predictions")
    assert no_token.status_code == 401
    assert no_token.json() == {
        "title": "Unauthenticated",
        "detail": "You did not pass an authentication token",
        "status": 401,
    }
    wrong = httpx.get(f"{server.base}/v1/predictions", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["title"] == "Unauthenticated"
    old_style = httpx.get(f"{server.base}/v1/predictions", headers={"authorization": f"Token {TOKEN}"})
    assert old_style.status_code == 200  # the older "Token" scheme some clients still send
    with pytest.raises(ReplicateError) as error:
        replicate.Client(api_token="nope", base_url=server.base).models.get(MODEL)
    assert error.value.status == 401
    assert httpx.get(f"{server.base}/health-check").json()["status"] == "READY"  # probes need no token


def test_invalid_requests_answer_in_replicates_shapes(server):
    with server.http() as http:
        bad = http.post(PREDICTIONS, json={"input": {"mode": "ultra", "duration": 7}})
        assert bad.status_code == 422
        body = bad.json()
        assert body["title"] == "Input validation failed" and body["status"] == 422
        fields = {f["field"]: f for f in body["invalid_fields"]}
        assert set(fields) == {"input.mode", "input.duration", "input.prompt", "input.start_image"}
        assert fields["input.prompt"]["type"] == "required" and fields["input.mode"]["type"] == "enum"
        assert "'standard' or 'pro'" in fields["input.mode"]["description"]
        assert "- input.mode: " in body["detail"]

        image = "https://example.com/a.png"
        end_needs_pro = http.post(
            PREDICTIONS, json={"input": {"prompt": "x", "start_image": image, "end_image": image}}
        )
        (field,) = end_needs_pro.json()["invalid_fields"]
        assert field["field"] == "input.end_image" and "mode 'pro'" in field["description"]

        local_path = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": "/etc/passwd"}})
        assert local_path.status_code == 422
        assert local_path.json()["invalid_fields"][0]["field"] == "input.start_image"

        unknown_key = http.post(
            PREDICTIONS, json={"input": {"prompt": "x", "start_image": image}, "priority": 1}
        )
        assert (
            unknown_key.status_code == 422 and unknown_key.json()["invalid_fields"][0]["field"] == "priority"
        )

        not_json = http.post(PREDICTIONS, content=b"{nope", headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and not_json.json()["title"] == "Invalid request"

        missing = http.get("/v1/predictions/doesnotexist")
        assert missing.status_code == 404 and missing.json()["title"] == "Not found"
        assert http.post("/v1/models/someone/else/predictions", json={"input": {}}).status_code == 404
        wrong_version = http.post(
            "/v1/predictions", json={"version": "0" * 64, "input": {"prompt": "x", "start_image": image}}
        )
        assert wrong_version.status_code == 422
        assert http.get("/v1/predictions").json()["results"] == []  # nothing invalid was queued

    with pytest.raises(ReplicateError) as error:
        server.client().predictions.create(model=MODEL, input={"prompt": "no image"})
    assert error.value.status == 422 and error.value.title == "Input validation failed"


def test_model_carries_the_generated_cog_schema(server):
    client = server.client()
    model = client.models.get(MODEL)
    assert (model.owner, model.name, model.visibility) == ("kwaivgi", "kling-v2.1", "public")
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert schema["Input"]["required"] == ["prompt", "start_image"]
    assert schema["mode"]["enum"] == ["standard", "pro"]
    assert schema["Output"] == {"type": "string", "title": "Output", "format": "uri"}
    assert client.models.get("i2v/default").latest_version.id == model.latest_version.id
    version = model.versions.get(model.latest_version.id)
    assert version.openapi_schema == model.latest_version.openapi_schema


def test_files_api(server, tmp_path):
    client = server.client()
    path = tmp_path / "frame.png"
    path.write_bytes(make_image(640, 360))
    created = client.files.create(path, metadata={"purpose": "test"})
    assert (
        created.name == "frame.png"
        and created.content_type == "image/png"
        and created.size == path.stat().st_size
    )
    assert created.checksums["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        created.metadata == {"purpose": "test"} and created.expires_at is None
    )  # retention is off by default
    assert (
        client.files.get(created.id).urls["get"]
        == created.urls["get"]
        == f"{server.base}/v1/files/{created.id}"
    )
    assert created.id in [f.id for f in client.files.list()]
    with server.http() as http:
        download = http.get(f"/v1/files/{created.id}/download")
        assert download.content == path.read_bytes() and download.headers["content-type"] == "image/png"
        assert client.files.delete(created.id) is True
        with pytest.raises(ReplicateError) as error:
            client.files.get(created.id)
        assert error.value.status == 404
        # a deleted upload's URL is refused up front, naming the field
        gone = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": created.urls["get"]}})
        assert gone.status_code == 422 and gone.json()["invalid_fields"][0]["field"] == "input.start_image"


def test_run_with_a_file_object(server, tmp_path):
    """The client uploads the file with the Files API and passes its URL; the server reads it from disk."""
    client = server.client()
    path = tmp_path / "start.png"
    path.write_bytes(make_image(640, 360, seed=1))
    with path.open("rb") as image:
        output = client.run(MODEL, input={"prompt": "a calm sea at dawn", "start_image": image, "seed": 3})
    assert isinstance(output, str) and output.startswith(f"{server.base}/outputs/")  # http: a plain string
    with server.http() as http:
        video = http.get(output)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        check_mp4(video.content, tmp_path, (640, 360))
        # https outputs become FileOutput objects, read with the client's own auth header: same request here
        assert FileOutput(output, client).read() == video.content
        part = http.get(output, headers={"range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == video.content[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(video.content)}"
    # a signed link, like Replicate's: no token needed; the token route stays behind the token
    assert httpx.get(output).content == video.content
    prediction_id = output.split("/outputs/")[1].split(".mp4")[0]
    assert httpx.get(f"{server.base}/v1/predictions/{prediction_id}/output.mp4").status_code == 401

    prediction = client.predictions.list().results[0]
    assert prediction.status == "succeeded" and prediction.output == output
    assert prediction.input["start_image"].startswith(f"{server.base}/v1/files/")
    assert (
        prediction.metrics["predict_time"] > 0
        and prediction.metrics["total_time"] >= prediction.metrics["predict_time"]
    )
    assert "seed: 3" in prediction.logs and prediction.progress.current == prediction.progress.total
    assert "negative prompt: the model's default" in prediction.logs  # the engine's log, per prediction


def test_run_with_a_url_outlasting_the_wait_window(server, http_dir, tmp_path):
    """With Prefer: wait=1 the answer comes before the clip; the client must be told `starting` and poll."""
    root, base = http_dir
    (root / "start.jpg").write_bytes(make_image(720, 480, "JPEG", seed=2))
    inputs = {
        "prompt": "a slow pan",
        "start_image": f"{base}/start.jpg",
        "aspect_ratio": "16:9",
    }  # ignored, as Kling does
    output = server.client().run(MODEL, input=inputs, wait=1)
    assert output is not None, "the client took a non-final answer as final"
    with server.http() as http:
        check_mp4(http.get(output).content, tmp_path, (720, 480))


def test_run_with_a_data_uri_and_signed_webhooks(server, receiver, tmp_path):
    client = server.client()
    version = client.models.get(MODEL).latest_version.id
    output = client.run(
        f"{MODEL}:{version}",  # through POST /v1/predictions with a version id
        input={"prompt": "leaves in the wind", "start_image": data_uri(480, 640, seed=4)},
        webhook=receiver.url,
        webhook_events_filter=["start", "logs", "completed"],
    )
    with server.http() as http:
        check_mp4(http.get(output).content, tmp_path, (480, 640))

    deadline = time.monotonic() + 30
    while (
        not (receiver.calls and receiver.bodies()[-1]["status"] == "succeeded")
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    secret = client.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    for _, headers, body in receiver.calls:
        replicate.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)
    bodies = receiver.bodies()
    assert bodies[0]["status"] == "processing"  # start
    assert bodies[-1]["status"] == "succeeded" and bodies[-1]["output"] == output
    progress = bodies[1:-1]
    assert progress and all(b["status"] == "processing" for b in progress)
    assert all("denoising" in b["logs"] or "loading" in b["logs"] for b in progress)
    # at most one progress webhook per 500 ms; arrival times jitter with the load, hence the slack
    times = [t for t, _, _ in receiver.calls[:-1]]
    assert all(later - earlier > 0.3 for earlier, later in itertools.pairwise(times))
    log_lines = bodies[-1]["logs"].count("\n")
    assert len(progress) < log_lines  # bursts of lines were folded into one webhook
    assert len({h["webhook-id"] for _, h, _ in receiver.calls}) == len(receiver.calls)


def test_bad_image_is_refused_at_create_and_a_terminal_webhook_is_retried(server):
    with pytest.raises(ReplicateError) as refused:  # the image is checked before anything is queued
        server.client().run(MODEL, input={"prompt": "x", "start_image": data_uri(200, 200)})
    assert refused.value.status == 422
    assert "input.start_image: image is 200x200; each side must be at least 300 px" in refused.value.detail
    hook = WebhookReceiver(statuses=(500,))  # the receiver is down for the first try
    try:
        prediction = server.client().predictions.create(
            model=MODEL,
            input={"prompt": "x", "start_image": data_uri(640, 360)},
            webhook=hook.url,
            webhook_events_filter=["completed"],
        )
        prediction.cancel()
        hook.wait_for(2, timeout=30)
        (first_at, first, first_body), (second_at, second, second_body) = hook.calls[:2]
        assert json.loads(second_body)["status"] == "canceled"
        assert (
            first["webhook-id"] == second["webhook-id"] and first_body == second_body
        )  # the same message again
        assert second_at - first_at >= 0.9  # after a backoff
        secret = server.client().webhooks.default.secret()
        replicate.webhooks.validate(headers=second, body=second_body, secret=secret)
    finally:
        hook.close()


def test_cancel_a_queued_prediction(server):
    """Canceling a running prediction mid-denoising is tested on a slow backend (test_hardening.py)."""
    body = {"input": {"prompt": "x", "start_image": data_uri(640, 360, seed=5)}}
    with server.http() as http:
        first = http.post(PREDICTIONS, json=body, headers={"prefer": "wait=1"})
        assert first.status_code == 201 and first.headers["preference-applied"] == "wait"
        assert first.json()["status"] == "starting"  # the wait ran out: Replicate's clients poll on this
        running = first.json()["id"]
        queued = http.post(PREDICTIONS, json=body).json()  # no Prefer: answered at once
        assert queued["status"] == "starting"
        canceled = http.post(queued["urls"]["cancel"])
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        again = http.post(queued["urls"]["cancel"])  # canceling twice changes nothing
        assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert server.wait_for(running, TERMINAL, timeout=120)["status"] == "succeeded"
    assert server.client().predictions.get(queued["id"]).status == "canceled"


def test_list_pages_newest_first(server):
    with server.http() as http:
        image = data_uri(300, 300)
        ids = [
            http.post(PREDICTIONS, json={"input": {"prompt": f"#{i}", "start_image": image}}).json()["id"]
            for i in range(101)
        ]
        for prediction_id in ids:  # only the list is under test: none of them needs to render
            http.post(f"/v1/predictions/{prediction_id}/cancel")
    client = server.client()
    first = client.predictions.list()
    assert len(first.results) == 100 and first.previous is None and first.next
    assert [p.id for p in first.results] == ids[::-1][:100]
    second = client.predictions.list(first.next)
    # Then the oldest of these and whatever the module's other tests made before (none of these again).
    rest = [p.id for p in second.results]
    assert rest[0] == ids[0] and second.previous and second.next is None
    assert not set(rest[1:]) & set(ids)
    assert [p.id for p in client.predictions.list(second.previous).results] == [p.id for p in first.results]
    every = [p.id for p in first.results + second.results]
    assert len(every) == len(set(every))


def _all_predictions(client):
    page, every = client.predictions.list(), []
    while True:
        every += page.results
        if not page.next:
            return every
        page = client.predictions.list(page.next)


def test_metrics_agree_with_the_api(server):
    client = server.client()
    # Earlier tests may leave a canceled clip still stopping: compare once nothing is moving, so the list
    # and the scrape see the same statuses.
    deadline = time.monotonic() + 120
    while any(p.status in ("starting", "processing") for p in _all_predictions(client)):
        assert time.monotonic() < deadline, "predictions of earlier tests never ended"
        time.sleep(0.2)
    page, statuses, timed = client.predictions.list(), [], 0
    while True:
        statuses += [p.status for p in page.results]
        timed += sum(p.status in TERMINAL and p.metrics["predict_time"] is not None for p in page.results)
        if not page.next:
            break
        page = client.predictions.list(page.next)
    assert httpx.get(f"{server.base}/metrics").status_code == 401  # behind a token
    # ... its own: an API token would show one tenant the whole server's traffic
    as_tenant = httpx.get(f"{server.base}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert as_tenant.status_code == 403 and "I2V_METRICS_TOKEN" in as_tenant.json()["detail"]
    samples = server.metrics()
    for status in STATUSES:
        assert samples[("i2v_predictions", (("status", status),))] == statuses.count(status), status
    assert samples[("i2v_queue_depth", ())] == statuses.count("starting")
    assert samples[("i2v_predict_time_seconds_count", ())] == timed  # those that reached a worker
    assert (
        samples[("i2v_worker_state", (("state", "READY"),))]
        + samples[("i2v_worker_state", (("state", "BUSY"),))]
        == 1
    )
