"""The Kling v2.1 request: fields, defaults, rules, and the schema generated from it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from i2v.request import KlingRequest, field_errors

BASE = {"prompt": "a boat on the sea", "start_image": "https://example.com/a.jpg"}


def errors_of(**fields: object) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        KlingRequest(**fields)
    return dict(field_errors(info.value))


def test_defaults_match_kling() -> None:
    request = KlingRequest(**BASE)
    assert (request.mode, request.duration, request.negative_prompt, request.end_image) == (
        "standard",
        5,
        "",
        None,
    )
    assert request.seed is None and request.audio is False
    assert request.num_frames == 121 and request.short_side == 720
    assert KlingRequest(**BASE, duration=10, mode="pro").num_frames == 241
    assert KlingRequest(**BASE, mode="pro").short_side == 1080


def test_prompt_and_start_image_are_required() -> None:
    errors = errors_of()
    assert set(errors) == {"prompt", "start_image"}
    assert "required" in errors["prompt"].lower()
    assert "start_image" in errors_of(prompt="x", start_image="  ")


@pytest.mark.parametrize(
    ("field", "value"), [("mode", "master"), ("duration", 7), ("duration", 0), ("seed", -1), ("prompt", 5)]
)
def test_enums_and_types_are_enforced(field: str, value: object) -> None:
    assert field in errors_of(**{**BASE, field: value})


def test_end_image_requires_pro() -> None:
    errors = errors_of(**BASE, end_image="https://example.com/b.jpg")
    assert errors == {"end_image": "end_image requires mode 'pro' (standard mode takes a start image only)"}
    assert KlingRequest(**BASE, end_image="https://example.com/b.jpg", mode="pro").end_image


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompts_are_limited_to_2500_characters(field: str) -> None:
    KlingRequest(**{**BASE, field: "x" * 2500})
    assert "2500" in errors_of(**{**BASE, field: "x" * 2501})[field]


def test_unknown_keys_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="i2v.request"):
        request = KlingRequest(**BASE, aspect_ratio="16:9", cfg_scale=0.5)
    assert not hasattr(request, "aspect_ratio")
    assert "aspect_ratio, cfg_scale" in caplog.text


def test_paths_are_taken_as_text(tmp_path: Path) -> None:
    assert KlingRequest(prompt="p", start_image=tmp_path / "a.png").start_image == str(tmp_path / "a.png")


def test_schema_is_generated_in_cog_order_with_descriptions() -> None:
    schema = KlingRequest.model_json_schema()
    properties = schema["properties"]
    order = sorted(properties, key=lambda name: properties[name]["x-order"])
    assert order == [
        "mode",
        "duration",
        "prompt",
        "end_image",
        "start_image",
        "negative_prompt",
        "seed",
        "audio",
        "preset",
    ]
    assert list(properties) == order  # declaration order is the Cog order
    assert schema["required"] == ["prompt", "start_image"]
    assert properties["mode"]["enum"] == ["standard", "pro"] and properties["mode"]["default"] == "standard"
    assert properties["duration"]["enum"] == [5, 10] and properties["duration"]["default"] == 5
    assert properties["start_image"]["format"] == "uri"
    assert (
        properties["mode"]["description"]
        == "Standard has a resolution of 720p, pro is 1080p. Both are 24fps."
    )
    assert properties["end_image"]["description"].startswith("Last frame of the video")
    assert all(properties[name].get("description") for name in properties)
