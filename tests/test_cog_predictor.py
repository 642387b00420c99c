"""The Cog predictor (predict.py): inputs equal to KlingRequest's as Cog itself reads them, a render, and
the schema shipped for Cog's runtime (coglet), which checks inputs with it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import cog
import httpx
import pytest
from cog._inspector import check_input, create_predictor
from conftest import probe
from serverproc import free_port

from i2v.server.cog_schema import SHIPPED_SCHEMA, input_schema, schema_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor_info():
    sys.path.insert(0, str(ROOT))
    try:
        with pytest.warns(
            DeprecationWarning
        ):  # Cog 0.23 prefers BaseRunner.run; BasePredictor.predict still works
            yield create_predictor("predict", "Predictor")
    finally:
        sys.path.remove(str(ROOT))


def test_predictor_inputs_match_the_served_schema(predictor_info):
    """Cog's inspector reads predict.py; each input must equal the served schema (from KlingRequest)."""
    schema, enums = input_schema()
    properties = schema["properties"]
    inputs = predictor_info.inputs
    assert list(inputs) == list(properties)
    for name, field in inputs.items():
        prop = properties[name]
        assert field.order == prop["x-order"]
        assert field.description == prop["description"], name
        assert (name in schema["required"]) == (
            field.default is None and field.type.repetition.name == "REQUIRED"
        )
        if "default" in prop:
            assert field.default == prop["default"], name
        assert field.choices == (enums[name]["enum"] if name in enums else None), name
        assert field.max_length == prop.get("maxLength"), name
        bounds = [float(prop[key]) if key in prop else None for key in ("minimum", "maximum")]
        assert [field.ge, field.le] == bounds, name  # Cog keeps bounds as floats
        assert (field.type.primitive.name == "PATH") == (prop.get("format") == "uri"), name
    assert predictor_info.output.type.name == "PATH"


def test_predictor_renders_a_clip(predictor_info, image_file, monkeypatch):
    monkeypatch.setenv("I2V_MODEL", "tiny")
    module = sys.modules["predict"]
    predictor = module.Predictor()
    predictor.setup()
    kwargs = check_input(
        predictor_info.inputs, {"prompt": "a boat", "start_image": str(image_file(640, 360)), "seed": 5}
    )
    with pytest.raises(ValueError, match="mode"):
        check_input(predictor_info.inputs, {"prompt": "a boat", "start_image": "x.png", "mode": "ultra"})
    kwargs["start_image"] = cog.Path(kwargs["start_image"])
    output = predictor.predict(**kwargs)
    assert isinstance(output, cog.Path)
    info = probe(output)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1280, 720, 121, 24)


def test_the_shipped_cog_schema_is_the_generated_one():
    """coglet reads `.cog/openapi_schema.json`; regenerate it with `python -m i2v.server.cog_schema`."""
    shipped = ROOT / SHIPPED_SCHEMA
    assert shipped.is_file(), f"{shipped} is missing: python -m i2v.server.cog_schema"
    assert shipped.read_text() == schema_text(), "the shipped schema drifted: python -m i2v.server.cog_schema"


def test_coglet_serves_the_shipped_schema_and_checks_inputs(tmp_path):
    """Cog's own runtime on predict.py: /openapi.json is the schema (not 503) and a bad input is refused by
    coglet before predict() runs."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # its worker's python
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        "I2V_MODEL": "tiny",
    }
    log = (tmp_path / "coglet.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "coglet.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health-check", timeout=5).json()["status"] == "READY":
                    break
            assert time.monotonic() < deadline, (tmp_path / "coglet.log").read_text()[-3000:]
            time.sleep(0.5)
        served = httpx.get(f"{base}/openapi.json", timeout=10)
        assert served.status_code == 200
        assert served.json()["components"]["schemas"]["Input"] == input_schema()[0]
        for bad, field, words in [
            ({"prompt": "x", "start_image": "https://example.com/a.png", "mode": "ultra"}, "mode", "ultra"),
            ({"start_image": "https://example.com/a.png"}, "prompt", "required"),
            ({"prompt": "x", "start_image": "https://example.com/a.png", "duration": 7}, "duration", "7"),
        ]:
            answer = httpx.post(f"{base}/predictions", json={"input": bad}, timeout=30)
            assert answer.status_code == 422, answer.text
            (problem,) = answer.json()["detail"]
            assert problem["loc"] == ["body", "input", field] and words in problem["msg"], problem
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
