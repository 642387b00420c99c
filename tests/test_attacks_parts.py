"""The defects of issue 16 at their root, in-process: each piece attacked the way the server is in
tests/test_attacks.py, but without a server process (the store, the sender's secrets, the lock, the app on
an idle runner)."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import make_image
from fastapi.testclient import TestClient
from serverproc import PREDICTIONS, data_uri
from sqlalchemy import event
from test_hardening_parts import IdleRunnerForTests

from i2v.server import app as app_module
from i2v.server.app import _prefer_wait
from i2v.server.cog_schema import version_id
from i2v.server.config import ServerConfig
from i2v.server.limits import token_owner
from i2v.server.states import CANCELED, QUEUED, RUNNING
from i2v.server.storage import LocalStorage, input_key
from i2v.server.store import DataDirInUse, DataDirLock, PredictionRow, StorageError, Store, utcnow
from i2v.server.webhooks import WebhookSecrets


def queued_row(prediction_id: str) -> PredictionRow:
    return PredictionRow(
        id=prediction_id, model="m", version="v", input={}, status=QUEUED, logs="", created_at=utcnow(),
        webhook=None, webhook_events_filter=[], base_url="http://x", attempts=0, data_removed=False,
        cancel_requested=False, owner="",
    )  # fmt: skip


# 1. a terminal state is final


def test_a_status_change_is_compare_and_set_even_when_another_writer_commits_in_between(tmp_path):
    """The start (queued -> processing) is about to write when a cancel commits (queued -> canceled): the
    start's UPDATE checks the status it expects, so it changes nothing and the cancel stands. (A
    read-then-write would have overwritten the cancel: the defect.)"""
    store = Store(tmp_path / "i2v.db")
    store.add(queued_row("p1"))
    raced = []

    def cancel_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE") and not raced:
            raced.append(True)  # the competing writer commits now, from another thread, and finishes
            other = threading.Thread(
                target=lambda: raced.append(store.transition("p1", {QUEUED}, status=CANCELED))
            )
            other.start()
            other.join()

    event.listen(store.engine, "before_cursor_execute", cancel_first)
    started = store.transition("p1", {QUEUED}, status=RUNNING, started_at=utcnow())
    event.remove(store.engine, "before_cursor_execute", cancel_first)
    assert raced[1] is not None and raced[1].status == CANCELED  # the cancel won ...
    assert started is None  # ... so the start did not happen
    assert store.prediction("p1").status == CANCELED
    assert store.transition("p1", {QUEUED, RUNNING}, status="succeeded") is None  # and it stays canceled
    store.close()


# 5. a refused write is retried until it lands


def test_a_write_the_database_refuses_is_retried_until_it_lands_and_said_once(tmp_path, caplog):
    """SQLite itself refuses the writes (`PRAGMA query_only`, set on the store's connections as a full or
    read-only disk would refuse them); `until_written` retries, logs once, counts, and lands once allowed."""
    store = Store(tmp_path / "i2v.db")
    store.add(queued_row("p1"))
    refuse = threading.Event()
    refuse.set()

    def read_only(dbapi_connection, _record):
        if refuse.is_set():
            dbapi_connection.execute("PRAGMA query_only = ON")

    event.listen(store.engine, "connect", read_only)
    store.engine.dispose()  # new connections from now on: each refuses writes
    with pytest.raises(StorageError, match="readonly"):
        store.transition("p1", {QUEUED}, status=RUNNING)  # the HTTP side: at once, as a 507
    landed: list[PredictionRow | None] = []
    with caplog.at_level(logging.INFO, logger="i2v.server.store"):
        writer = threading.Thread(
            target=lambda: landed.append(
                store.until_written(
                    "the start of p1", lambda: store.transition("p1", {QUEUED}, status=RUNNING)
                )
            )
        )
        writer.start()
        deadline = time.monotonic() + 30
        while store.write_retries < 4:  # state, not time: it has been refused four times
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.01)
        assert not landed and store.prediction("p1").status == QUEUED  # still waiting, nothing half-done
        refuse.clear()
        store.engine.dispose()  # the space came back
        writer.join(timeout=30)
    assert landed and landed[0] is not None and landed[0].status == RUNNING
    refused = [r for r in caplog.records if "could not record the start of p1" in r.getMessage()]
    assert len(refused) == 1  # said once, however many retries
    assert any("takes writes again" in r.getMessage() for r in caplog.records)
    store.close()


# 7. one webhook secret per token


def test_each_token_has_its_own_webhook_secret_unless_the_operator_set_one(tmp_path):
    secrets = WebhookSecrets(tmp_path / "a")
    mine, theirs = secrets.for_owner(token_owner("one")), secrets.for_owner(token_owner("two"))
    assert mine != theirs and mine.startswith("whsec_") and mine.count("_") == 1
    assert base64.b64decode(mine.split("_")[1])  # the shape replicate.webhooks.validate reads
    assert WebhookSecrets(tmp_path / "a").for_owner(token_owner("one")) == mine  # stable across restarts
    assert WebhookSecrets(tmp_path / "b").for_owner(token_owner("one")) != mine  # per data dir
    shared = WebhookSecrets(tmp_path / "c", configured="whsec_c2hhcmVk")  # I2V_WEBHOOK_SECRET: for all
    assert shared.for_owner("x") == shared.for_owner("y") == "whsec_c2hhcmVk"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "webhook_secret").write_text("whsec_b2xk\n")  # a data dir from before: kept, shared
    legacy = WebhookSecrets(tmp_path / "d")
    assert legacy.for_owner("x") == legacy.for_owner("y") == "whsec_b2xk"


# 8. one server per data dir


def test_the_data_dir_lock_is_exclusive_and_names_the_holder(tmp_path):
    first = DataDirLock(tmp_path)
    with pytest.raises(
        DataDirInUse, match=rf"another i2v server \(pid \d+\) is using the data dir {tmp_path}"
    ):
        DataDirLock(tmp_path)
    first.release()
    DataDirLock(tmp_path).release()  # free again once the holder is gone


# the app on an idle runner (nothing is dispatched)


@pytest.fixture
def app(tmp_path) -> Iterator[tuple[TestClient, ServerConfig]]:
    config = ServerConfig(data_dir=tmp_path / "data", tokens=("tok-a", "tok-b"), fetch_allow=("127.0.0.1",))
    with TestClient(app_module.create_app(config, runner=IdleRunnerForTests())) as client:
        client.headers["authorization"] = "Bearer tok-a"
        yield client, config


def test_orphan_files_are_removed_at_start_and_waiting_inputs_kept(tmp_path, caplog):
    config = ServerConfig(data_dir=tmp_path / "data", no_auth=True)
    with TestClient(app_module.create_app(config, runner=IdleRunnerForTests())) as client:
        waiting = client.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": data_uri(400, 400)}})
        assert waiting.status_code == 201
    storage = LocalStorage(config.data_dir)
    kept = storage.path(input_key(waiting.json()["id"], "start_image"))
    assert kept.is_file()
    # what a SIGKILL leaves: inputs of a prediction that ended or never got stored, half-written files
    orphans = [
        storage.path(input_key("gone0000000000000000000000", "start_image")),
        config.data_dir / "files" / ".abc.part",
        config.data_dir / "outputs" / ".xyz.mp4.partial",
    ]
    for path in orphans:
        path.write_bytes(b"left behind")
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING),
        TestClient(app_module.create_app(config, runner=IdleRunnerForTests())),
    ):
        pass
    assert kept.is_file() and not any(path.exists() for path in orphans)
    assert "removed 3 file(s) left behind" in caplog.text
    assert caplog.text.count("I2V_PUBLIC_URL is not set") == 1  # said at each start, once


def test_lists_refuse_cursors_they_did_not_make(app):
    client, _ = app
    for value in (b'{"a":true}', b'{"b":false}', b'{"a":1.5}', b'{"a":"1"}', b"[1]", b"null", b"{}" * 3,
                  b'{"a":' + b"9" * 5000 + b"}", b"[" * 5000, b"\xff\xfe"):  # fmt: skip
        cursor = base64.urlsafe_b64encode(value).decode().rstrip("=")
        for route in ("/v1/predictions", "/v1/files"):
            answer = client.get(route, params={"cursor": cursor})
            assert answer.status_code == 400, (value[:20], answer.text)
    assert client.get("/v1/predictions", params={"cursor": "%%%"}).status_code == 400


def test_prefer_wait_never_raises():
    assert _prefer_wait("wait") == 60 and _prefer_wait("wait=5") == 5 and _prefer_wait("wait=0") == 1
    assert _prefer_wait("wait=" + "9" * 5000) == 60 and _prefer_wait("wait=" + "0" * 5000 + "7") == 7
    assert _prefer_wait("respond-async, wait=3") == 3
    for ignored in ("wait=-1", "wait=1.5", "wait=abc", "", None, "wait=\udfff"):
        assert _prefer_wait(ignored) is None


def test_stored_files_answer_head_etags_and_ranges_per_rfc_9110(app):
    client, _ = app
    data = make_image(400, 400)
    upload = client.post("/v1/files", files={"content": ("a.png", data, "image/png")}).json()
    url = f"/v1/files/{upload['id']}/download"
    full = client.get(url)
    assert full.status_code == 200 and full.content == data
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == full.headers["etag"]
    same = client.get(url, headers={"if-none-match": full.headers["etag"]})
    assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == full.headers["etag"]
    assert client.get(url, headers={"if-none-match": "*"}).status_code == 304
    assert client.get(url, headers={"if-none-match": f'"other", W/{full.headers["etag"]}'}).status_code == 304
    assert client.get(url, headers={"if-none-match": '"other"'}).status_code == 200
    part = client.get(url, headers={"range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == data[:10]
    for invalid in ("bytes=500-100", "bytes=abc", f"bytes={len(data) + 10}-"):  # reversed, junk, past the end
        answer = client.get(url, headers={"range": invalid})
        assert answer.status_code == 416, invalid
        assert answer.headers["content-range"] == f"bytes */{len(data)}"
    ignored = client.get(url, headers={"range": "items=0-1"})  # a unit it does not know: the whole file
    assert ignored.status_code == 200 and ignored.content == data


def test_a_create_by_bare_version_id_is_filed_under_kling(app):
    client, config = app
    body = {"version": version_id(config.model), "input": {"prompt": "x", "start_image": data_uri(400, 400)}}
    created = client.post("/v1/predictions", json=body)
    assert created.status_code == 201 and created.json()["model"] == "kwaivgi/kling-v2.1"
    body["version"] = f"i2v/default:{version_id(config.model)}"
    assert client.post("/v1/predictions", json=body).json()["model"] == "i2v/default"


def test_the_account_is_the_tokens_own(app):
    client, _ = app
    mine = client.get("/v1/account").json()
    theirs = client.get("/v1/account", headers={"authorization": "Bearer tok-b"}).json()
    assert mine["type"] == "user" and mine["username"] != theirs["username"] and mine["github_url"] is None
    assert "tok-a" not in json.dumps(mine)
    secret = client.get("/v1/webhooks/default/secret").json()["key"]
    other = client.get("/v1/webhooks/default/secret", headers={"authorization": "Bearer tok-b"}).json()["key"]
    assert secret != other


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(1000):
            try:
                self.wfile.write(b"\0")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)

    def log_message(self, *args: object) -> None:
        pass


def test_a_create_gives_up_on_a_slow_image_at_the_fetch_deadline(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = ServerConfig(
        data_dir=tmp_path / "data", no_auth=True, fetch_allow=("127.0.0.1",), fetch_timeout=1.0
    )
    try:
        with TestClient(app_module.create_app(config, runner=IdleRunnerForTests())) as client:
            url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
            answer = client.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": url}})
            assert answer.status_code == 422, answer.text
            (problem,) = answer.json()["invalid_fields"]
            assert problem["field"] == "input.start_image"
            assert "within 1 s" in problem["description"] or "longer than 1 s" in problem["description"]
            assert client.get("/v1/predictions").json()["results"] == []  # nothing stored
    finally:
        server.shutdown()
        server.server_close()
