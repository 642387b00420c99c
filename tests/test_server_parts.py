"""The service's parts that need no running server: layering, settings, schema, store recovery, signing."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
import replicate
from conftest import make_image
from serverproc import PREDICTIONS

from i2v.request import KlingRequest
from i2v.server import cog_schema
from i2v.server.config import ConfigError, ServerConfig, parse_duration
from i2v.server.states import FAILED, QUEUED, RUNNING
from i2v.server.store import PredictionRow, Store, utcnow
from i2v.server.webhooks import new_secret, sign


def test_http_layer_never_imports_torch(tmp_path):
    """Building the whole app (routes, service, runner) leaves torch and diffusers to the worker process;
    Ray is imported only for a server set to run on it (`I2V_RUNNER=ray`), and brings no torch either."""
    code = (
        "import importlib.util, sys\n"
        "from pathlib import Path\n"
        "from i2v.server.app import create_app\n"
        "from i2v.server.config import ServerConfig\n"
        f"app = create_app(ServerConfig(data_dir=Path({str(tmp_path)!r}), tokens=('t',)))\n"
        "import i2v.cli, i2v.server.main, i2v.settings, i2v.speed\n"
        "print('RAY', 'ray' in sys.modules)\n"
        "if importlib.util.find_spec('ray'):\n"
        f"    app = create_app(ServerConfig(data_dir=Path({str(tmp_path)!r}), tokens=('t',), runner='ray'))\n"
        "    assert 'ray' in sys.modules\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'i2v.engine') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True
    )
    assert "HEAVY []" in out.stdout and "RAY False" in out.stdout, out.stdout + out.stderr


def test_serve_refuses_to_start_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "I2V_API_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "i2v", "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert "I2V_API_TOKEN" in out.stderr and "--no-auth" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_setting_stops_serve_with_one_line_naming_it(tmp_path):
    """Both parsers of flags agree now: junk is an error, never silently false (retries were turned off)."""
    for name, value, expected in (
        ("I2V_RETRY_ON_RESTART", "ture", "I2V_RETRY_ON_RESTART: expected true or false, not 'ture'"),
        ("I2V_BATCHED_CFG", "maybe", "I2V_BATCHED_CFG: expected true or false, not 'maybe'"),
        ("I2V_CREATE_RATE", "lots", "I2V_CREATE_RATE: expected a whole number"),
    ):
        env = {**os.environ, "I2V_API_TOKEN": "t", name: value}
        out = subprocess.run(
            [sys.executable, "-m", "i2v", "serve", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith(f"error: {expected}"), out.stderr
        assert "Traceback" not in out.stderr


def test_config_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("I2V_API_TOKEN", "a, b,,c")
    monkeypatch.setenv("I2V_RETENTION", "2h")
    monkeypatch.setenv("I2V_PUBLIC_URL", "https://video.example.com/")
    config = ServerConfig.from_env(data_dir=tmp_path)
    assert config.tokens == ("a", "b", "c")
    assert config.retention == 7200
    assert config.public_url == "https://video.example.com"
    assert config.host == "0.0.0.0" and not config.retry_on_restart
    monkeypatch.delenv("I2V_API_TOKEN")
    with pytest.raises(ConfigError, match="I2V_API_TOKEN"):
        ServerConfig.from_env(data_dir=tmp_path)
    assert ServerConfig.from_env(data_dir=tmp_path, no_auth=True).host == "127.0.0.1"  # loopback unless told
    assert ServerConfig.from_env(data_dir=tmp_path, no_auth=True, host="0.0.0.0").host == "0.0.0.0"
    monkeypatch.setenv("I2V_RETRY_ON_RESTART", "yes")
    assert ServerConfig.from_env(data_dir=tmp_path, no_auth=True).retry_on_restart
    monkeypatch.setenv("I2V_RETRY_ON_RESTART", "ture")
    with pytest.raises(ConfigError, match="I2V_RETRY_ON_RESTART: expected true or false, not 'ture'"):
        ServerConfig.from_env(data_dir=tmp_path, no_auth=True)
    assert parse_duration("off", "x") is None and parse_duration("90s", "x") == 90
    with pytest.raises(ConfigError, match="I2V_RETENTION"):
        parse_duration("soon", "I2V_RETENTION")


def test_cog_schema_is_generated_from_the_request_model():
    schema = cog_schema.openapi_schema()
    components = schema["components"]["schemas"]
    inputs = components["Input"]
    fields = KlingRequest.model_fields
    assert list(inputs["properties"]) == list(fields)
    assert inputs["required"] == ["prompt", "start_image"]
    for order, (name, prop) in enumerate(inputs["properties"].items()):
        assert prop["x-order"] == order
        assert prop["description"] == fields[name].description
        assert "anyOf" not in prop and "exclusiveMaximum" not in prop  # Cog has neither
    assert inputs["properties"]["mode"]["allOf"] == [{"$ref": "#/components/schemas/mode"}]
    assert components["mode"]["enum"] == ["standard", "pro"] and components["duration"]["enum"] == [5, 10]
    assert inputs["properties"]["start_image"]["format"] == "uri"
    assert inputs["properties"]["end_image"] == {
        "type": "string",
        "format": "uri",
        "title": "End Image",
        "x-order": 3,
        "description": fields["end_image"].description,
        "x-i2v-image": {
            "formats": ["image/jpeg", "image/png", "image/webp"],
            "max_bytes": 10 * 2**20,
            "min_side": 300,
            "max_aspect": 2.5,
        },
    }
    assert inputs["properties"]["mode"]["x-i2v-output"] == {
        "short_side": {"standard": 720, "pro": 1080},
        "fps": 24,
    }
    assert (
        inputs["properties"]["seed"]["maximum"] == 2**63 - 1 and inputs["properties"]["seed"]["minimum"] == 0
    )
    assert components["Output"] == {"type": "string", "title": "Output", "format": "uri"}
    assert len(cog_schema.version_id("tiny")) == 64 and cog_schema.version_id(
        "tiny"
    ) != cog_schema.version_id(None)


def _prediction(prediction_id: str, status: str, attempts: int) -> PredictionRow:
    return PredictionRow(
        id=prediction_id,
        model="i2v/default",
        version="v",
        input={},
        status=status,
        logs="",
        created_at=utcnow(),
        base_url="http://x",
        attempts=attempts,
        webhook_events_filter=[],
        data_removed=False,
        cancel_requested=False,
    )


@pytest.mark.parametrize("retry", [False, True])
def test_store_recovers_interrupted_predictions(tmp_path, retry):
    store = Store(tmp_path / "i2v.db")
    store.add(_prediction("first-try", RUNNING, attempts=1))
    store.add(_prediction("second-try", RUNNING, attempts=2))
    store.add(_prediction("waiting", QUEUED, attempts=0))
    requeued, failed = store.recover_interrupted(retry)
    if retry:
        assert requeued == ["first-try"] and failed == ["second-try"]  # retried once, not forever
        assert store.next_queued().id == "first-try"  # keeps its place: FIFO by creation
    else:
        assert requeued == [] and sorted(failed) == ["first-try", "second-try"]
        assert "server stopped" in store.prediction("first-try").error
        assert store.prediction("first-try").status == FAILED
    assert store.prediction("waiting").status == QUEUED
    mode = store.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode == "wal"
    store.close()


def test_store_pages_newest_first(tmp_path):
    store = Store(tmp_path / "i2v.db")
    for i in range(5):
        store.add(_prediction(f"p{i}", QUEUED, 0))
    rows, more = store.page(PredictionRow, after=None, before=None, limit=2)
    assert [r.id for r in rows] == ["p4", "p3"] and more
    rows, more = store.page(PredictionRow, after=rows[-1].seq, before=None, limit=2)
    assert [r.id for r in rows] == ["p2", "p1"] and more
    rows, more = store.page(PredictionRow, after=None, before=rows[0].seq, limit=2)
    assert [r.id for r in rows] == ["p4", "p3"] and not more
    store.close()


def test_webhook_signature_passes_the_official_validator():
    secret = new_secret()
    assert secret.count("_") == 1 and len(base64.b64decode(secret.split("_")[1])) == 32
    body = '{"id":"abc","status":"succeeded"}'
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign(secret, "msg_1", 1700000000, body),
    }
    key = replicate.webhook.WebhookSigningSecret(key=secret)
    assert replicate.webhooks.validate(headers=headers, body=body, secret=key) is None
    with pytest.raises(replicate.webhook.InvalidSignatureError):
        replicate.webhooks.validate(headers=headers, body=body.replace("succeeded", "failed"), secret=key)


def test_public_url_shapes_every_url_and_own_files_resolve_behind_it(tmp_path):
    """Behind a reverse proxy (https, a path prefix) URLs use the public origin; our file URLs still resolve.

    The app runs in-process without its lifespan: requests are answered, nothing is dispatched to a worker.
    """
    from fastapi.testclient import TestClient

    from i2v.server.app import create_app

    public = "https://video.example.com/i2v"
    config = ServerConfig(data_dir=tmp_path, tokens=("t",), public_url=public)
    app = create_app(config)
    client = TestClient(
        app, base_url="http://10.0.0.5:8000", headers={"authorization": "Bearer t"}
    )  # no lifespan
    upload = client.post("/v1/files", files={"content": ("a.png", make_image(400, 300), "image/png")}).json()
    assert upload["urls"]["get"] == f"{public}/v1/files/{upload['id']}"
    created = client.post(
        PREDICTIONS,
        json={"input": {"prompt": "x", "start_image": upload["urls"]["get"]}},
    )
    assert created.status_code == 201, created.text
    assert created.json()["urls"]["get"].startswith(f"{public}/v1/predictions/")
    intake = app.state.service.intake
    assert intake.own_file_id(upload["urls"]["get"], ()) == upload["id"]
    assert intake.own_file_id("https://elsewhere.example.com/v1/files/" + upload["id"], ()) is None
    page = client.get("/v1/predictions").json()
    assert page["results"][0]["id"] == created.json()["id"]
    assert (
        replicate.helpers.transform_output(created.json()["urls"]["get"], None).__class__.__name__
        == "FileOutput"
    )
