"""The store on both databases: the migrations (fresh, and today's SQLite data dir upgraded in place under a
real server), and what several servers on one PostgreSQL rely on: claims, the queue limit, the rate
buckets, liveness, the messages between servers, the values they share.

Two `Store`s on one database stand for two servers (each its own engine, pool and claimant key), as two
`i2v serve` processes have; tests/test_several_servers.py runs the real processes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import make_image
from hardening import NO_LIMITS, fault_server
from serverproc import PREDICTIONS, TOKEN

from i2v.server import migrations
from i2v.server.config import ConfigError, ServerConfig
from i2v.server.limits import SharedRateLimiter, token_owner
from i2v.server.peers import Peers
from i2v.server.states import CANCELED, QUEUED, RUNNING, SUCCEEDED
from i2v.server.store import (
    Base,
    DataDirNotShared,
    DeliveryRow,
    PredictionRow,
    Store,
    check_shared_data_dir,
    utcnow,
)
from i2v.server.webhooks import WebhookSecrets

WAIT_S = 30  # bound on waiting for a state another connection brings about


def queued(prediction_id: str, owner: str = "") -> PredictionRow:
    return PredictionRow(
        id=prediction_id, model="m", version="v", input={}, status=QUEUED, logs="", created_at=utcnow(),
        webhook=None, webhook_events_filter=[], base_url="http://x", attempts=0, data_removed=False,
        cancel_requested=False, owner=owner,
    )  # fmt: skip


def delivery(delivery_id: str, prediction_id: str, claimant: int | None) -> DeliveryRow:
    now = utcnow()
    return DeliveryRow(
        id=delivery_id, prediction_id=prediction_id, url="http://127.0.0.1:9/hook", event="completed",
        terminal=True, body="{}", state="pending", attempts=0, owner="", next_attempt_at=now,
        created_at=now, claimed_by=claimant,
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'i2v.db'}"
    return request.getfixturevalue("pg_url")


@contextlib.contextmanager
def stores(url: str, count: int = 2):
    opened = [Store(url) for _ in range(count)]
    try:
        yield opened
    finally:
        for store in opened:
            store.close()


# migrations


def claim_oldest(store: Store) -> PredictionRow | None:
    """What a dispatch round does: claim the oldest queued prediction, the next one when another took it."""
    while (row := store.next_queued()) is not None:
        if (claimed := store.claim(row.id)) is not None:
            return claimed
    return None


def test_the_migrations_make_exactly_the_models_schema(database_url):
    """A fresh database upgraded to head has the tables, columns, types and indexes of the models, no more
    and no less (what `alembic check` compares); opening it again changes nothing."""
    with stores(database_url, 1) as (store,):
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert migrations.current(store.engine) == migrations.head() == "0002"
        assert migrations.upgrade(store.engine) == ("0002", "0002")


def test_servers_starting_together_migrate_one_after_the_other(pg_url):
    """Six stores open an empty PostgreSQL database at once: the advisory lock lets one migrate; the others
    find it done. Nobody fails on a table another just created."""
    with ThreadPoolExecutor(6) as pool:
        opened = list(pool.map(lambda _: Store(pg_url), range(6)))
    try:
        with opened[0].engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [("0002",)]
    finally:
        for store in opened:
            store.close()


def test_the_sql_of_the_migrations_can_be_printed_for_a_dba(pg_url):
    sql = migrations.upgrade_sql(pg_url)
    assert "CREATE TABLE predictions" in sql and "ALTER TABLE predictions ADD COLUMN claimed_by BIGINT" in sql
    assert "UPDATE alembic_version SET version_num='0002'" in sql


# The schema as `create_all` made it before the migrations (the last release), exactly as SQLite keeps it.
TODAYS_SCHEMA = """
CREATE TABLE predictions (
    seq INTEGER NOT NULL, id VARCHAR(40) NOT NULL, model VARCHAR(200) NOT NULL, version VARCHAR(200) NOT NULL,
    input JSON NOT NULL, status VARCHAR(16) NOT NULL, output VARCHAR(300), logs TEXT NOT NULL, error TEXT,
    created_at DATETIME NOT NULL, started_at DATETIME, completed_at DATETIME, predict_time FLOAT,
    data_removed BOOLEAN NOT NULL, webhook TEXT, webhook_events_filter JSON NOT NULL,
    base_url VARCHAR(300) NOT NULL, attempts INTEGER NOT NULL, cancel_requested BOOLEAN NOT NULL,
    owner VARCHAR(64) NOT NULL, PRIMARY KEY (seq)
);
CREATE UNIQUE INDEX ix_predictions_id ON predictions (id);
CREATE INDEX ix_predictions_owner ON predictions (owner);
CREATE INDEX ix_predictions_status ON predictions (status);
CREATE TABLE files (
    seq INTEGER NOT NULL, id VARCHAR(40) NOT NULL, name VARCHAR(300) NOT NULL,
    content_type VARCHAR(200) NOT NULL, size INTEGER NOT NULL, sha256 VARCHAR(64) NOT NULL,
    md5 VARCHAR(32) NOT NULL, metadata JSON NOT NULL, created_at DATETIME NOT NULL, expires_at DATETIME,
    owner VARCHAR(64) NOT NULL, PRIMARY KEY (seq)
);
CREATE UNIQUE INDEX ix_files_id ON files (id);
CREATE INDEX ix_files_owner ON files (owner);
CREATE TABLE webhook_deliveries (
    seq INTEGER NOT NULL, id VARCHAR(40) NOT NULL, prediction_id VARCHAR(40) NOT NULL, url TEXT NOT NULL,
    event VARCHAR(16) NOT NULL, terminal BOOLEAN NOT NULL, body TEXT NOT NULL, state VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL, owner VARCHAR(64) NOT NULL, next_attempt_at DATETIME NOT NULL,
    last_error TEXT, created_at DATETIME NOT NULL, PRIMARY KEY (seq)
);
CREATE UNIQUE INDEX ix_webhook_deliveries_id ON webhook_deliveries (id);
CREATE INDEX ix_webhook_deliveries_prediction_id ON webhook_deliveries (prediction_id);
CREATE INDEX ix_webhook_deliveries_state ON webhook_deliveries (state);
"""
INSERT = (
    "INSERT INTO predictions (id, model, version, input, status, output, logs, error, created_at, started_at,"
    " completed_at, predict_time, data_removed, webhook, webhook_events_filter, base_url, attempts,"
    " cancel_requested, owner) VALUES (?, 'kwaivgi/kling-v2.1', 'v0', ?, ?, ?, ?, NULL, ?, ?, ?, ?, 0, NULL,"
    " '[]', 'http://127.0.0.1:1', ?, 0, ?)"
)


def test_todays_sqlite_data_dir_upgrades_in_place_under_the_new_server(tmp_path):
    """A data dir as the last release left it (no Alembic; a finished, a queued and an interrupted
    prediction, an upload, a delivered webhook): the new `i2v serve` upgrades it at start, keeps every row,
    serves the old output, runs the queued prediction and fails the interrupted one as a restart does."""
    data = tmp_path / "data"
    for folder in ("outputs", "inputs", "files"):
        (data / folder).mkdir(parents=True)
    owner = token_owner(TOKEN)
    image = make_image(480, 320)
    old_video = b"an mp4 from before the upgrade"
    (data / "outputs" / "old-done.mp4").write_bytes(old_video)
    (data / "inputs" / "old-queued.start_image").write_bytes(image)
    (data / "files" / "oldfile").write_bytes(image)
    when = "2026-11-01 10:00:00.000000"
    with contextlib.closing(sqlite3.connect(data / "i2v.db")) as db, db:
        db.executescript(TODAYS_SCHEMA)
        prompt = '{"prompt": "waves", "start_image": "data:image/png;base64,AAAA"}'
        db.execute(INSERT, ("old-done", prompt, "succeeded", "old-done.mp4", "seed: 1\n", when, when, when, 9.5, 1, owner))  # fmt: skip
        db.execute(INSERT, ("old-queued", prompt, "starting", None, "", when, None, None, None, 0, owner))
        db.execute(INSERT, ("old-running", prompt, "processing", None, "", when, when, None, None, 1, owner))
        db.execute(
            "INSERT INTO files (id, name, content_type, size, sha256, md5, metadata, created_at, expires_at,"
            " owner) VALUES ('oldfile', 'photo.png', 'image/png', ?, 'x', 'y', '{}', ?, NULL, ?)",
            (len(image), when, owner),
        )
        db.execute(
            "INSERT INTO webhook_deliveries (id, prediction_id, url, event, terminal, body, state, attempts,"
            " owner, next_attempt_at, last_error, created_at) VALUES ('msg_old', 'old-done',"
            " 'http://127.0.0.1:9/hook', 'completed', 1, '{}', 'delivered', 1, ?, ?, NULL, ?)",
            (owner, when, when),
        )
    server = fault_server(data, **NO_LIMITS)
    try:
        server.wait_ready(timeout=180)
        with server.http() as http:
            done = http.get("/v1/predictions/old-done").json()
            assert done["status"] == "succeeded" and done["metrics"]["predict_time"] == 9.5
            assert http.get(done["output"]).content == old_video
            assert server.wait_for("old-queued", {"succeeded", "failed"})["status"] == "succeeded"
            interrupted = http.get("/v1/predictions/old-running").json()
            assert interrupted["status"] == "failed" and "server stopped" in interrupted["error"]
            listed = {p["id"] for p in http.get("/v1/predictions").json()["results"]}
            assert listed == {"old-done", "old-queued", "old-running"}
            assert http.get("/v1/files/oldfile").json()["name"] == "photo.png"
    finally:
        server.stop()
    with contextlib.closing(sqlite3.connect(data / "i2v.db")) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
        assert db.execute("SELECT count(*) FROM predictions").fetchone() == (3,)
        assert db.execute("SELECT state FROM webhook_deliveries WHERE id = 'msg_old'").fetchone() == (
            "delivered",
        )
    assert "schema upgraded from its first to 0002" in server.log()


def test_an_upgraded_sqlite_database_has_the_models_columns_and_indexes(tmp_path):
    path = tmp_path / "i2v.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(TODAYS_SCHEMA)
    with stores(f"sqlite:///{path}", 1) as (store,), store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False})
        # only the VARCHAR lengths SQLite never enforced differ from a fresh database
        assert compare_metadata(context, Base.metadata) == []


# several servers on one database: claims


def test_claims_take_each_prediction_once_whichever_server_claims(database_url):
    """Two stores claim from one queue with four threads each until it is empty: every prediction is taken
    exactly once, and each claim carries its server's key."""
    count = 80
    with stores(database_url) as (first, second):
        for n in range(count):
            first.add(queued(f"p{n:03}"))
        claimed: list[tuple[str, int | None, int]] = []
        lock = threading.Lock()

        def drain(store: Store) -> None:
            while (row := claim_oldest(store)) is not None:
                with lock:
                    claimed.append((row.id, row.claimed_by, store.claimant))

        threads = [threading.Thread(target=drain, args=(s,)) for s in (first, second) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        ids = [c[0] for c in claimed]
        assert sorted(ids) == [f"p{n:03}" for n in range(count)]  # all, none twice
        assert all(by == mine for _, by, mine in claimed)
        assert first.prediction("p000").status == RUNNING and first.prediction("p000").attempts == 1


def test_a_claim_never_takes_a_canceled_prediction_and_keeps_fifo(database_url):
    with stores(database_url, 1) as (store,):
        for n in range(3):
            store.add(queued(f"q{n}"))
        store.transition("q0", {QUEUED}, status=CANCELED)
        assert [claim_oldest(store).id, claim_oldest(store).id, claim_oldest(store)] == ["q1", "q2", None]


def test_an_outcome_lands_only_while_its_server_holds_the_claim(database_url):
    with stores(database_url) as (first, second):
        first.add(queued("p1"))
        assert claim_oldest(first).claimed_by == first.claimant
        assert second.transition("p1", {RUNNING}, held_by=second.claimant, status=SUCCEEDED) is None
        assert first.transition("p1", {RUNNING}, held_by=first.claimant, status=SUCCEEDED).status == SUCCEEDED


# several servers: limits


def test_the_queue_limit_holds_across_servers(database_url):
    """Twenty creates of one token at once through two stores, with at most 5 unfinished: exactly 5 go in."""
    with stores(database_url) as pair, ThreadPoolExecutor(20) as pool:
        added = list(pool.map(lambda n: pair[n % 2].add_prediction(queued(f"c{n}", "tok"), 5), range(20)))
        assert added.count(True) == 5
        assert pair[0].count_unfinished("tok") == 5 and pair[0].count_unfinished("other") == 0


def test_a_rate_holds_across_servers(database_url):
    """A bucket of 10 taken 30 times at once through two stores (refilled too slowly to matter): exactly 10
    takes succeed, and each refusal says how long until the next token."""
    capacity, per_second = 10.0, 1e-4
    with stores(database_url) as pair, ThreadPoolExecutor(12) as pool:
        waits = list(
            pool.map(lambda n: pair[n % 2].take_token("creates:tok", capacity, per_second), range(30))
        )
        assert waits.count(0.0) == 10
        assert all(9_000 < w <= 10_000 for w in waits if w)  # about 1 / per_second: the bucket is empty
        limiter = SharedRateLimiter(pair[1], "creates", 60)
        assert limiter.acquire("fresh") == 0 and limiter.acquire("fresh") == 0  # its own bucket, full


# several servers: liveness and messages (PostgreSQL)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_server_whose_connection_ends_is_gone_and_its_claims_are_recovered(pg_url):
    """A claims a prediction and holds a pending webhook; while A's connection lives, B sees A alive. Once A's
    connection ends (as it does when the process dies), B finds A gone, fails its prediction and adopts its
    webhook; A's late outcome then changes nothing."""
    with stores(pg_url) as (a, b):
        peers = Peers(a)
        peers.start(lambda *_: None, lambda: None)
        a.add(queued("p1"))
        claim_oldest(a)
        a.add(delivery("msg_a", "p1", a.claimant))
        a.add(delivery("msg_old", "p0", None))  # from before claims were recorded: anyone's to send
        assert b.claimants() == {a.claimant, None}
        assert b.gone(b.claimants()) == {None}
        peers.stop()
        wait_until(lambda: b.gone(b.claimants()) == {a.claimant, None}, "A's lock was not freed")
        lost = b.gone(b.claimants())
        assert b.recover_interrupted(False, lost) == ([], ["p1"])
        assert sorted(row.id for row in b.adopt_deliveries(lost)) == ["msg_a", "msg_old"]
        assert b.holds_delivery("msg_a") and not a.holds_delivery("msg_a")
        assert a.transition("p1", {RUNNING}, held_by=a.claimant, status=SUCCEEDED) is None
        assert b.prediction("p1").status == "failed"


def test_the_other_servers_hear_a_change_when_it_commits(pg_url):
    """B's changes reach A's listener as (kind, id): new work, a cancel request, an end; A's own are not
    echoed back to it."""
    heard: queue.Queue[tuple[str, str]] = queue.Queue()
    with stores(pg_url) as (a, b):
        peers = Peers(a)
        peers.start(lambda kind, prediction_id: heard.put((kind, prediction_id)), lambda: None)
        try:
            a.add_prediction(queued("mine"))  # A's own: not heard
            b.add_prediction(queued("p1"))
            assert heard.get(timeout=WAIT_S) == ("queued", "p1")
            claim_oldest(b)  # mine
            claim_oldest(b)  # p1
            b.transition("p1", {RUNNING}, cancel_requested=True)
            assert heard.get(timeout=WAIT_S) == ("cancel", "p1")
            b.transition("p1", {RUNNING}, status=CANCELED, completed_at=utcnow())
            assert heard.get(timeout=WAIT_S) == ("ended", "p1")
            assert heard.empty()
        finally:
            peers.stop()


def test_every_server_signs_a_tokens_webhooks_alike_and_must_share_the_data_dir(pg_url, tmp_path):
    with stores(pg_url) as (a, b):
        (tmp_path / "one").mkdir()
        (tmp_path / "one" / "webhook_key").write_text("ab" * 32)  # a single server's key, moved to PostgreSQL
        first = WebhookSecrets(tmp_path / "one", store=a)
        second = WebhookSecrets(tmp_path / "two", store=b)
        owner = token_owner("t")
        assert (
            first.for_owner(owner)
            == second.for_owner(owner)
            == WebhookSecrets(tmp_path / "one").for_owner(owner)
        )
        assert not (tmp_path / "two" / "webhook_key").exists()  # the key lives in the database
        check_shared_data_dir(a, tmp_path / "shared")
        check_shared_data_dir(b, tmp_path / "shared")  # the same folder: fine
        with pytest.raises(DataDirNotShared, match="must share one data dir"):
            check_shared_data_dir(b, tmp_path / "elsewhere")


def test_database_urls_are_checked_and_postgresql_means_psycopg(tmp_path):
    def url(value: str) -> str | None:
        return ServerConfig(data_dir=tmp_path, no_auth=True, database_url=value).database_url

    assert url("postgres://u:p@db/i2v") == "postgresql+psycopg://u:p@db/i2v"
    assert url("postgresql://db/i2v") == url("postgresql+psycopg://db/i2v") == "postgresql+psycopg://db/i2v"
    assert ServerConfig(data_dir=tmp_path, no_auth=True).store_url == f"sqlite:///{tmp_path / 'i2v.db'}"
    with pytest.raises(ConfigError, match="mysql:// is not supported"):
        url("mysql://db/i2v")
    with pytest.raises(ConfigError, match="expected a URL"):
        url("db.example.com")


def test_a_server_that_cannot_reach_its_database_stops_with_one_line(tmp_path, postgres):
    """Exit 2 with the database named (password hidden), not a traceback from inside the app."""
    unreachable = f"postgresql+psycopg://i2v:secret@127.0.0.1:{postgres.port}/no_such_database"
    server = fault_server(tmp_path / "data", I2V_DATABASE_URL=unreachable)
    assert server.process.wait(timeout=120) == 2
    log = server.log()
    assert "error: could not open the database postgresql+psycopg://i2v:***@127.0.0.1" in log
    assert "secret" not in log and "Traceback" not in log


def test_i2v_migrate_upgrades_ahead_of_a_start_and_says_where_it_is(pg_url, tmp_path):
    env = {**os.environ, "I2V_DATABASE_URL": pg_url}
    command = [sys.executable, "-m", "i2v", "migrate", "--data-dir", str(tmp_path)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and first.stdout.endswith(": upgraded from empty to 0002\n"), first
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.endswith(": at 0002, the newest\n"), again


def test_client_text_with_nul_is_stored_and_read_back_on_postgresql(pg_url, tmp_path):
    """PostgreSQL's text cannot hold NUL (SQLite's can): a NUL in an unknown input key (the logs name it), a
    webhook URL or a file's name and type is stored as U+FFFD there, never a 500; JSON inputs keep it."""
    from fastapi.testclient import TestClient
    from test_hardening_parts import IdleRunnerForTests

    from i2v.server.app import create_app

    config = ServerConfig(data_dir=tmp_path, tokens=("t",), database_url=pg_url, fetch_allow=("127.0.0.1",))
    client = TestClient(
        create_app(config, runner=IdleRunnerForTests()), headers={"authorization": "Bearer t"}
    )
    image = make_image(400, 300)
    start = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "input": {"prompt": "a\x00b", "start_image": start, "odd\x00key": 1},
        "webhook": "http://127.0.0.1:9/a\x00b",
    }
    created = client.post(PREDICTIONS, json=body)
    assert created.status_code == 201, created.text
    read = client.get(f"/v1/predictions/{created.json()['id']}").json()
    assert read["input"]["prompt"] == "a\x00b" and "odd\ufffdkey" in read["logs"]
    upload = client.post(
        "/v1/files",
        files={"content": ("x.png", image, "image/png")},
        data={"filename": "na\x00me.png", "type": "image/p\x00ng"},
    )
    assert upload.status_code == 201, upload.text
    assert client.get(f"/v1/files/{upload.json()['id']}").json()["name"] == "na\ufffdme.png"
