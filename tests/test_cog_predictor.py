"""The Cog predictor (predict.py): inputs equal to KlingRequest's as Cog itself reads them, and a render."""

from __future__ import annotations

import sys
from pathlib import Path

import cog
import pytest
from cog._inspector import check_input, create_predictor
from conftest import probe

from i2v.server.cog_schema import input_schema

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
