"""Hostile input, faults and access rules, against a real `i2v serve` on the fault-injection backend.

The backend (tests/fault_backends.py, registered through I2V_EXTRA_BACKENDS) renders black frames at once,
so these tests exercise the service, not the model; its prompt asks for a fault where one is wanted.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import make_image
from hardening import BAD_IMAGES, fault_server
from replicate.exceptions import ReplicateError
from serverproc import MODEL, PREDICTIONS, TOKEN, ServerProcess, data_uri

from i2v.server.states import TERMINAL

OTHER_TOKEN = "other-token"  # the second token ServerProcess configures
MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Iterator[ServerProcess]:
    proc = fault_server(
        tmp_path_factory.mktemp("hardening") / "data",
        I2V_MAX_BODY_BYTES=str(MAX_BODY),
        I2V_WEBHOOK_RETRY_DELAYS="0.2,0.2",
    )
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.stop()


def create(
    http: httpx.Client, prompt: str = "x", wait: int | None = None, **inputs: object
) -> httpx.Response:
    headers = {"prefer": f"wait={wait}"} if wait else {}
    body = {"input": {"prompt": prompt, "start_image": data_uri(400, 400), **inputs}}
    return http.post(PREDICTIONS, json=body, headers=headers)


def as_other(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.base, headers={"authorization": f"Bearer {OTHER_TOKEN}"}, timeout=30)


def field_error(response: httpx.Response, field: str = "input.start_image") -> str:
    body = response.json()
    fields = {f["field"]: f["description"] for f in body.get("invalid_fields") or []}
    assert field in fields, body
    return fields[field]


# bad images: a clear 4xx at create, as an upload, a data URI or a URL


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_images_are_refused_at_create(server, http_dir, kind):
    data, words = BAD_IMAGES[kind]
    folder, base = http_dir
    (folder / "bad.bin").write_bytes(data)
    with server.http() as http:
        upload = http.post("/v1/files", files={"content": ("bad.png", data, "image/png")})
        assert upload.status_code == 201  # the Files API takes any file, as Replicate's does
        refs = {
            "upload": upload.json()["urls"]["get"],
            "data-uri": "data:image/png;base64," + base64.b64encode(data).decode(),
            "url": f"{base}/bad.bin",
        }
        for how, ref in refs.items():
            answer = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": ref}})
            assert answer.status_code == 422, (how, answer.text)
            assert words in field_error(answer), (how, answer.json())
        pro = {"prompt": "x", "mode": "pro", "start_image": data_uri(400, 400), "end_image": refs["data-uri"]}
        answer = http.post(PREDICTIONS, json={"input": pro})
        assert answer.status_code == 422 and words in field_error(answer, "input.end_image")


def test_urls_that_cannot_be_fetched_or_are_refused_fail_at_create(server, http_dir):
    _, base = http_dir
    cases = {
        f"{base}/missing.png": "HTTP 404",
        "http://169.254.169.254/latest/meta-data/": "link-local",
        "http://10.1.2.3/a.png": "private network",
        "http://[::ffff:192.168.0.1]/a.png": "private network",
        "http://0.0.0.0/a.png": "unspecified",
        "ftp://example.com/a.png": "must be an http(s) URL",
        "file:///etc/passwd": "must be an http(s) URL",
        "http://no-such-host.invalid/a.png": "could not resolve host",
    }
    with server.http() as http:
        for url, words in cases.items():
            answer = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": url}})
            assert answer.status_code == 422, (url, answer.text)
            assert words in field_error(answer), (url, answer.json())
        # webhooks follow the same rules: the server must not be made to POST into its own network
        body = {
            "input": {"prompt": "x", "start_image": data_uri(400, 400)},
            "webhook": "http://169.254.169.254/",
        }
        answer = http.post(PREDICTIONS, json=body)
        assert answer.status_code == 422 and "link-local" in field_error(answer, "webhook")
        assert http.get("/v1/predictions").json()["results"] == [] or all(
            p["input"]["start_image"] not in cases for p in http.get("/v1/predictions").json()["results"]
        )  # nothing refused was recorded


def test_a_good_url_is_fetched_once_at_create_and_not_by_the_worker(server, http_dir):
    folder, base = http_dir
    image = folder / "fine.png"
    image.write_bytes(make_image(480, 640))
    with server.http() as http:
        created = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": f"{base}/fine.png"}})
        assert created.status_code == 201
        image.unlink()  # gone before the worker runs: it must use the bytes checked at create
        done = server.wait_for(created.json()["id"], TERMINAL, timeout=60)
    assert done["status"] == "succeeded", done["error"]
    assert done["input"]["start_image"] == f"{base}/fine.png"  # the prediction keeps what was sent


def test_the_official_client_sees_422_and_runs_unchanged(server, tmp_path):
    client = server.client()
    with pytest.raises(ReplicateError) as error:
        client.run(MODEL, input={"prompt": "x", "start_image": io_bytes(BAD_IMAGES["truncated-png"][0])})
    assert error.value.status == 422 and "input.start_image" in str(error.value.detail)
    output = client.run(MODEL, input={"prompt": "x", "start_image": io_bytes(make_image(640, 400))})
    with server.http() as http:
        video = http.get(output)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"


def io_bytes(data: bytes) -> io.BytesIO:
    stream = io.BytesIO(data)
    stream.name = "image.png"
    return stream


# request limits: body size


def test_bodies_over_the_limits_get_413(server):
    with server.http() as http:
        big = {"input": {"prompt": "x", "start_image": "data:image/png;base64," + "A" * MAX_BODY}}
        declared = http.post(PREDICTIONS, json=big)
        assert declared.status_code == 413 and "limited to" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"input": {"prompt": "'
            for _ in range(MAX_BODY // 65536 + 2):
                yield b"x" * 65536
            yield b'"}}'

        chunked = http.post(PREDICTIONS, content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413

        # an image input over the 10 MB image limit, uploaded through the Files API (which allows 100 MB)
        huge = os.urandom(10 * 2**20 + 1)
        upload = http.post("/v1/files", files={"content": ("huge.png", huge, "image/png")})
        assert upload.status_code == 201
        answer = http.post(
            PREDICTIONS, json={"input": {"prompt": "x", "start_image": upload.json()["urls"]["get"]}}
        )
        assert answer.status_code == 413 and "larger than 10 MB" in field_error(answer)

    # an upload declared over the Files API limit is refused before its body is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 999999999\r\n\r\n"
        )  # fmt: skip
        assert sock.recv(200).startswith(b"HTTP/1.1 413")


# faults


def test_out_of_gpu_memory_fails_with_what_to_reduce_and_the_worker_stays_up(server):
    with server.http() as http:
        oom = create(http, "fault:oom", wait=30, mode="pro", duration=10).json()
        assert oom["status"] == "failed"
        # It names the model and its placement, and what to change (the budget, where one is set).
        assert oom["error"].startswith("out of GPU memory running fault-injection (all parts on the device)")
        assert "use mode standard" in oom["error"] and "duration 5" in oom["error"]
        assert "I2V_PRESET=low-vram" in oom["error"] and "I2V_GPU_MEMORY" in oom["error"]
        after = create(http, wait=30).json()
        assert after["status"] == "succeeded", after["error"]
    assert httpx.get(f"{server.base}/health-check").json()["status"] == "READY"


def test_cancel_mid_denoising_with_the_official_client(server):
    with server.http() as http:
        running = create(http, "fault:slow").json()["id"]  # 20 steps of 0.2 s
        deadline = time.monotonic() + 60
        while "1/20 denoising" not in http.get(f"/v1/predictions/{running}").json()["logs"]:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
    server.client().predictions.cancel(running)
    final = server.wait_for(running, TERMINAL, timeout=60)
    assert final["status"] == "canceled" and final["output"] is None
    assert "20/20 denoising" not in final["logs"] and "encoding video" not in final["logs"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.base}/health-check").json()["status"] != "READY":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_full_disk_fails_the_prediction_and_serves_no_partial_file(server):
    outputs = server.data_dir / "outputs"
    with server.http() as http:
        full = create(http, "fault:disk-full", wait=30).json()
        assert full["status"] == "failed" and full["output"] is None
        assert "could not write the video" in full["error"] and "disk may be full" in full["error"]
        assert http.get(f"/v1/predictions/{full['id']}/output.mp4").status_code == 404
        assert not [p.name for p in outputs.iterdir() if full["id"] in p.name or p.name.endswith(".partial")]
        after = create(http, wait=30).json()
        assert after["status"] == "succeeded", after["error"]


def test_webhook_receiver_down_retries_then_gives_up_and_the_prediction_is_unaffected(server):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    with server.http() as http:
        body = {"input": {"prompt": "x", "start_image": data_uri(400, 400)}, "webhook": dead}
        done = http.post(PREDICTIONS, json=body, headers={"prefer": "wait=30"}).json()
    assert done["status"] == "succeeded", done["error"]
    with sqlite3.connect(server.data_dir / "i2v.db") as db:
        deadline = time.monotonic() + 20
        while True:
            rows = db.execute(
                "SELECT event, state, attempts FROM webhook_deliveries WHERE prediction_id = ? AND terminal",
                (done["id"],),
            ).fetchall()
            if rows and rows[0][1] != "pending":
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
    assert rows == [("completed", "failed", 3)]  # the first try and the two configured retries
    assert "giving up after 3 attempts" in server.log()


def _worker_pid(server_pid: int) -> int:
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise LookupError("no worker process")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_worker_killed_mid_prediction_fails_it_and_the_queue_behind_runs(server):
    with server.http() as http:
        running = create(http, "fault:slow").json()["id"]
        queued = [create(http).json()["id"] for _ in range(3)]
        server.wait_for(running, {"processing"}, timeout=30)
        os.kill(_worker_pid(server.process.pid), signal.SIGKILL)  # as the kernel's OOM killer would
        lost = server.wait_for(running, TERMINAL, timeout=30)
        assert lost["status"] == "failed" and "worker process died" in lost["error"]
        done = [server.wait_for(i, TERMINAL, timeout=120) for i in queued]
        assert [d["status"] for d in done] == ["succeeded"] * 3, [d["error"] for d in done]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_server_killed_with_predictions_queued_runs_them_all_after_restart(tmp_path, _cache_dir):
    """SIGKILL the server with a prediction running and nine queued; restart with I2V_RETRY_ON_RESTART=1.

    The interrupted one runs again (attempt 2) and succeeds; the worker is then killed under a queued one
    (attempt 1), which runs again too; every queued prediction ends succeeded. (Without the setting an
    interrupted prediction fails: tests/test_server_lifecycle.py and the worker-kill test above.)
    """
    data_dir = tmp_path / "data"
    first = fault_server(data_dir)
    try:
        first.wait_ready(timeout=120)
        with first.http() as http:
            interrupted = create(http, "fault:slow").json()["id"]
            first.wait_for(interrupted, {"processing"}, timeout=30)
            queued = [create(http, "fault:slow").json()["id"]] + [create(http).json()["id"] for _ in range(8)]
    finally:
        first.kill()  # SIGKILL: no goodbye, as if the machine lost power
    second = fault_server(data_dir, I2V_RETRY_ON_RESTART="1")
    try:
        second.wait_ready(timeout=120)
        again = second.wait_for(interrupted, TERMINAL, timeout=60)
        assert again["status"] == "succeeded", again["error"]
        assert "the server restarted while this prediction ran; running it again" in again["logs"]
        second.wait_for(queued[0], {"processing"}, timeout=30)
        os.kill(_worker_pid(second.process.pid), signal.SIGKILL)
        done = [second.wait_for(i, TERMINAL, timeout=120) for i in queued]
        assert [d["status"] for d in done] == ["succeeded"] * 9, [d["error"] for d in done]
        assert "the worker process died while this prediction ran; running it again" in done[0]["logs"]
        with second.http() as http:
            listed = {p["id"] for p in http.get("/v1/predictions").json()["results"]}
        assert listed == {interrupted, *queued}
    finally:
        second.stop()


# secrets and access


def test_one_token_cannot_see_anothers_predictions_or_files(server):
    with server.http() as mine, as_other(server) as theirs:
        prediction = create(mine, wait=30).json()
        assert prediction["status"] == "succeeded"
        upload = mine.post(
            "/v1/files", files={"content": ("a.png", make_image(400, 400), "image/png")}
        ).json()
        pid, fid = prediction["id"], upload["id"]
        for method, path in [
            ("GET", f"/v1/predictions/{pid}"),
            ("POST", f"/v1/predictions/{pid}/cancel"),
            ("GET", f"/v1/predictions/{pid}/output.mp4"),
            ("GET", f"/v1/files/{fid}"),
            ("GET", f"/v1/files/{fid}/download"),
            ("DELETE", f"/v1/files/{fid}"),
        ]:
            answer = theirs.request(method, path)
            assert answer.status_code == 404, (method, path, answer.status_code)
        assert pid not in {p["id"] for p in theirs.get("/v1/predictions").json()["results"]}
        assert fid not in {f["id"] for f in theirs.get("/v1/files").json()["results"]}
        used = theirs.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": upload["urls"]["get"]}})
        assert used.status_code == 422 and "does not exist" in field_error(used)
        # the owner still has everything
        assert mine.get(f"/v1/predictions/{pid}/output.mp4").status_code == 200
        assert mine.get(f"/v1/files/{fid}/download").content == make_image(400, 400)
        assert pid in {p["id"] for p in mine.get("/v1/predictions").json()["results"]}


TRAVERSALS = [
    "/v1/files/..%2F..%2Fi2v.db/download",
    "/v1/files/..%2fi2v.db",
    "/v1/files/%2e%2e/download",
    "/v1/files/%2e%2e%2f%2e%2e%2fi2v.db/download",
    "/v1/files/....%2F%2Fi2v.db/download",
    "/v1/files/..\\..\\i2v.db/download",
    "/v1/predictions/..%2F..%2Fi2v.db/output.mp4",
    "/v1/predictions/%2e%2e%2fi2v/output.mp4",
    "/v1/files/../../i2v.db/download",
    "/v1/files/%00/download",
    "/web/..%2F..%2Fserver%2Fconfig.py",
]


def test_file_routes_are_immune_to_path_traversal(server):
    for path in TRAVERSALS:  # sent as they are: http.client does not tidy the path
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", path, headers={"authorization": f"Bearer {TOKEN}"})
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        assert answer.status in (400, 404), (path, answer.status)
        assert b"SQLite" not in body and b"import" not in body, path


def test_nothing_but_health_and_the_page_is_readable_without_a_token(server):
    with server.http() as http:
        schema = http.get("/openapi.json").json()
    open_paths = {"/health-check", "/"}
    checked = 0
    for path, operations in schema["paths"].items():
        concrete = path.replace("{owner}", "kwaivgi").replace("{name}", "kling-v2.1")
        for placeholder in ("{prediction_id}", "{file_id}", "{vid}"):
            concrete = concrete.replace(placeholder, "abc")
        for method in operations:
            answer = httpx.request(method.upper(), f"{server.base}{concrete}", timeout=10)
            if path in open_paths:
                assert answer.status_code == 200, path
            else:
                assert answer.status_code == 401, (method, path, answer.status_code)
                checked += 1
    for path in ("/openapi.json", "/metrics", "/v1/webhooks/default/secret"):
        assert httpx.get(f"{server.base}{path}").status_code == 401, path
    assert checked >= 15
    assert httpx.get(f"{server.base}/health-check").status_code == 200


def test_tokens_are_never_logged(server):
    wrong = "wrong-token-that-must-not-appear"
    httpx.get(f"{server.base}/v1/predictions", headers={"authorization": f"Bearer {wrong}"})
    httpx.get(f"{server.base}/v1/predictions", headers={"authorization": f"Token {wrong}"})
    with server.http() as http:
        create(http, wait=30)
    log = server.log_path.read_text(errors="replace")
    assert "GET /v1/predictions" in log  # the access log is on and was captured
    for secret in (TOKEN, OTHER_TOKEN, wrong):
        assert secret not in log
    with sqlite3.connect(server.data_dir / "i2v.db") as db:
        stored = "\n".join(str(row) for row in db.execute("SELECT * FROM predictions"))
        stored += "\n".join(str(row) for row in db.execute("SELECT * FROM files"))
    assert TOKEN not in stored and OTHER_TOKEN not in stored  # only a hash of the token is kept


def test_rate_limits_and_queue_limits_per_token(tmp_path, _cache_dir):
    """Small limits on a server of its own: 429 with Retry-After, per token, and the official client's view."""
    server = fault_server(
        tmp_path / "data", I2V_CREATE_RATE="4", I2V_MAX_UNFINISHED="2", I2V_REQUEST_RATE="40"
    )
    try:
        server.wait_ready(timeout=120)
        with server.http() as http, as_other(server) as other:
            slow = [create(http, "fault:slow") for _ in range(2)]
            assert [r.status_code for r in slow] == [201, 201]
            full = create(http)
            assert full.status_code == 429 and "already has 2 predictions waiting or running" in full.text
            assert create(other).status_code == 201  # another token has its own allowance
            for answer in slow:
                http.post(f"/v1/predictions/{answer.json()['id']}/cancel")
            for answer in slow:
                server.wait_for(answer.json()["id"], TERMINAL, timeout=30)
            assert create(http).status_code == 201  # the 4th create in this minute
            limited = create(http)
            assert limited.status_code == 429
            assert 1 <= int(limited.headers["retry-after"]) <= 15
            assert "4 predictions a minute" in limited.json()["detail"]
            with pytest.raises(ReplicateError) as error:  # the official client does not retry a POST
                server.client().predictions.create(
                    model=MODEL, input={"prompt": "x", "start_image": data_uri(400, 400)}
                )
            assert error.value.status == 429
            codes = [http.get("/v1/predictions").status_code for _ in range(40)]
            assert codes[-1] == 429 and 200 in codes
            assert other.get("/v1/predictions").status_code == 200
    finally:
        server.stop()
