"""Hardening pieces that need no server process: token checks, limiters, settings, the store's upgrade."""

from __future__ import annotations

import hmac
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image
from serverproc import PREDICTIONS

from i2v.backends import BACKENDS, BUILTIN, registered, resolve
from i2v.errors import ModelUnavailable
from i2v.server import app as app_module
from i2v.server import deps
from i2v.server.config import ConfigError, ServerConfig
from i2v.server.limits import RateLimiter, token_owner
from i2v.server.store import Store
from i2v.server.worker import out_of_memory_advice
from i2v.settings import Settings


class IdleRunnerForTests:
    """Stands in for the worker processes, which these HTTP-only tests never start (no lifespan)."""

    def start(self, on_event): ...
    def state(self): return "READY"  # fmt: skip

    def setup_error(self): return None  # fmt: skip

    def workers(self): return ()  # fmt: skip

    def submit(self, job, worker): raise AssertionError("nothing is dispatched here")  # fmt: skip

    def cancel(self, prediction_id): ...
    def stop(self): ...


def test_tokens_are_compared_in_constant_time_against_every_token(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", recording)
    config = ServerConfig(data_dir=tmp_path, tokens=("first-token", "second-token", "third-token"))
    client = TestClient(app_module.create_app(config, runner=IdleRunnerForTests()))
    assert client.get("/v1/predictions", headers={"authorization": "Bearer first-token"}).status_code == 200
    assert len(compared) == 3  # no early exit on the first match: the time does not tell which token matched
    compared.clear()
    assert client.get("/v1/predictions", headers={"authorization": "Bearer nope"}).status_code == 401
    assert [b for _, b in compared] == [b"first-token", b"second-token", b"third-token"]


def test_token_owner_is_a_hash_and_no_auth_has_one_owner():
    owner = token_owner("secret-token")
    assert owner and "secret" not in owner and owner == token_owner("secret-token")
    assert owner != token_owner("secret-token2")
    assert token_owner(None) == token_owner("") == ""


def test_rate_limiter_allows_a_burst_then_says_when_to_retry(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    limiter = RateLimiter(per_minute=6)  # one every 10 s, six at once
    assert [limiter.acquire("a") for _ in range(6)] == [0] * 6
    assert limiter.acquire("a") == 10
    assert limiter.acquire("b") == 0  # keys have their own buckets
    clock[0] += 10
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 10
    assert RateLimiter(0).acquire("a") == 0  # 0: off


def test_limits_and_the_fetch_allowlist_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("I2V_API_TOKEN", "t")
    monkeypatch.setenv("I2V_FETCH_ALLOW", "files.lan, 10.0.0.0/8")
    monkeypatch.setenv("I2V_CREATE_RATE", "off")
    monkeypatch.setenv("I2V_MAX_UNFINISHED", "7")
    monkeypatch.setenv("I2V_WEBHOOK_RETRY_DELAYS", "0.5,1")
    config = ServerConfig.from_env(data_dir=tmp_path)
    assert config.fetch_allow == ("files.lan", "10.0.0.0/8")
    assert (config.create_rate, config.max_unfinished, config.request_rate) == (0, 7, 2400)
    assert config.webhook_retry_delays == (0.5, 1.0)
    monkeypatch.setenv("I2V_MAX_BODY_BYTES", "lots")
    with pytest.raises(ConfigError, match="I2V_MAX_BODY_BYTES"):
        ServerConfig.from_env(data_dir=tmp_path)
    monkeypatch.delenv("I2V_MAX_BODY_BYTES")
    monkeypatch.setenv("I2V_DEVICES", "cuda:0+cuda:1,cuda:2")
    devices = ServerConfig.from_env(data_dir=tmp_path).devices
    assert [(d.device, d.mode) for d in devices] == [("cuda:0+cuda:1", None), ("cuda:2", None)]
    monkeypatch.setenv("I2V_DEVICES", "cuda:0+gpu 1")
    with pytest.raises(ConfigError, match="I2V_DEVICES: device 'cuda:0\\+gpu 1': 'gpu 1' is not a device"):
        ServerConfig.from_env(data_dir=tmp_path)


def test_the_server_fetches_through_the_operator_allowlist(tmp_path, http_dir, monkeypatch):
    """Loopback is refused unless the operator trusts it; the server's loader uses the configured list."""
    from fastapi.testclient import TestClient

    folder, base = http_dir
    (folder / "ok.png").write_bytes(make_image(400, 400))
    body = {"input": {"prompt": "x", "start_image": f"{base}/ok.png"}}
    for allow, expected in (((), 422), (("127.0.0.1",), 201)):
        config = ServerConfig(data_dir=tmp_path / str(len(allow)), no_auth=True, fetch_allow=allow)
        client = TestClient(app_module.create_app(config, runner=IdleRunnerForTests()))
        answer = client.post(PREDICTIONS, json=body)
        assert answer.status_code == expected, answer.text
        if expected == 422:
            assert "a loopback address" in answer.json()["invalid_fields"][0]["description"]


def test_an_older_database_gains_the_owner_columns(tmp_path):
    path = tmp_path / "i2v.db"
    with sqlite3.connect(path) as db:  # the tables as the first server version made them
        db.execute("CREATE TABLE predictions (seq INTEGER PRIMARY KEY, id VARCHAR(40), status VARCHAR(16))")
        db.execute("CREATE TABLE files (seq INTEGER PRIMARY KEY, id VARCHAR(40))")
        db.execute("INSERT INTO predictions (id, status) VALUES ('old', 'succeeded')")
    Store(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT owner FROM predictions WHERE id = 'old'").fetchone() == ("",)
        assert "owner" in {row[1] for row in db.execute("PRAGMA table_info(files)")}


def test_out_of_memory_advice_names_what_to_reduce():
    assert "mode standard" in out_of_memory_advice("pro", 10)
    assert "duration 5" in out_of_memory_advice("pro", 10)
    advice = out_of_memory_advice("standard", 5)
    assert advice.startswith("out of GPU memory") and "more memory" in advice
    named = out_of_memory_advice(
        "pro", 5, model="ltx-2", placement="all parts on the device", budget=79 * 10**9, device="cuda:0"
    )
    assert named.startswith(
        "out of GPU memory running ltx-2 (all parts on the device) within a memory budget of 79.0 GB on cuda:0"
    )


def test_backend_plugins_come_from_the_environment(monkeypatch, tmp_path):
    assert "fault-injection" not in registered()  # the product's registry has no test backend
    monkeypatch.setenv("I2V_EXTRA_BACKENDS", "fault_backends:FaultInjection")
    cls, spec = resolve("fault-injection", tmp_path, Settings().extra_backends)
    assert cls.__name__ == "FaultInjection" and spec.name == "fault-injection"
    monkeypatch.setenv("I2V_EXTRA_BACKENDS", "fault_backends:NoSuchThing")
    with pytest.raises(ModelUnavailable, match="I2V_EXTRA_BACKENDS"):
        resolve("fault-injection", tmp_path, Settings().extra_backends)
    monkeypatch.setenv("I2V_EXTRA_BACKENDS", "pathlib:Path")
    with pytest.raises(ModelUnavailable, match="not a Backend"):
        resolve("fault-injection", tmp_path, Settings().extra_backends)


def test_a_backend_is_imported_only_when_its_model_is_used():
    """A worker for one model (here a plugin's) imports no other backend: no diffusers, transformers or
    peft, which would add seconds to each worker's start."""
    check = (
        "import sys; sys.path.insert(0, 'tests'); import i2v.engine, i2v.server.worker; "
        "from i2v.backends import resolve; from pathlib import Path; "
        "resolve('fault-injection', Path('no-tiny-twin-is-built'), ('fault_backends:FaultInjection',)); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}))"
    )
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run(
        [sys.executable, "-c", check], cwd=root, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"
    assert {name: BACKENDS[name].spec.name for name in BUILTIN} == {name: name for name in BUILTIN}


def test_files_never_map_an_id_outside_their_folder(tmp_path):
    from i2v.server.files import Files
    from i2v.server.storage import LocalStorage

    storage = LocalStorage(tmp_path)
    files = Files(Store(tmp_path / "i2v.db"), storage, None)
    for bad in ("../i2v.db", "..", "a/b", "", "A" * 41, "x\x00"):
        with pytest.raises(ValueError):
            files.key(bad)
    assert storage.path(files.key("abc123")) == tmp_path / "files" / "abc123"
    for bad in ("files/../i2v.db", "outputs/../../x.mp4", "i2v.db", "files/a/b", "outputs/.x.mp4"):
        with pytest.raises(ValueError):  # and the storage takes only keys made from such ids
            storage.path(bad)


class WorkerGoneOnceRunnerForTests(IdleRunnerForTests):
    """One worker that looks free, but is gone when the first job is sent to it (it died, or another server's
    dispatcher took it, between its view and the submit); the second submit reaches it, and it fails the job
    with a reason the test can read."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def start(self, on_event):
        self.on_event = on_event

    def workers(self):
        from i2v.server.runner import WorkerView

        return (WorkerView(index=0, name="0 (gone once)", modes=("standard", "pro"), state="READY", free=True, capacity=None),)  # fmt: skip

    def submit(self, job, worker):
        from i2v.server.runner import Failed

        self.submitted.append(job.id)
        if len(self.submitted) == 1:
            raise RuntimeError("worker 0 is not free")
        self.on_event(Failed(job.id, "reached the worker the second time"))


def test_a_job_the_worker_cannot_take_goes_back_to_the_queue_and_runs(tmp_path):
    """A claimed prediction whose submit finds the worker gone is queued again, not left `processing`."""
    import base64

    from fastapi.testclient import TestClient

    runner = WorkerGoneOnceRunnerForTests()
    config = ServerConfig(data_dir=tmp_path, no_auth=True)
    image = "data:image/png;base64," + base64.b64encode(make_image(400, 400)).decode()
    with TestClient(app_module.create_app(config, runner=runner)) as client:
        created = client.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": image}}).json()
        deadline = time.monotonic() + 30
        while (pred := client.get(f"/v1/predictions/{created['id']}").json())["status"] != "failed":
            assert time.monotonic() < deadline, pred
            time.sleep(0.05)
    assert runner.submitted == [created["id"]] * 2
    assert pred["error"] == "reached the worker the second time"
    assert "worker 0 (gone once) could not take it (worker 0 is not free); back in the queue" in pred["logs"]
