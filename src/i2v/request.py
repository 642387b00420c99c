"""The Kling v2.1 input, exactly as Replicate's `kwaivgi/kling-v2.1` takes it.

This one model is the validation, the JSON schema (Cog's `x-order` included) and the documentation.
Three optional extensions follow the Kling fields: `seed`, `audio` and `preset`.
"""

from __future__ import annotations

import logging
from os import PathLike
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .speed import RequestPreset

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2500
FPS = 24
Mode = Literal["standard", "pro"]
MODES: tuple[Mode, ...] = get_args(Mode)
SHORT_SIDE: dict[Mode, int] = {"standard": 720, "pro": 1080}
ImageField = Literal["start_image", "end_image"]
IMAGE_FIELDS: tuple[ImageField, ...] = get_args(ImageField)


def _order(n: int, **extra: Any) -> dict[str, Any]:
    return {"x-order": n, **extra}


class KlingRequest(BaseModel):
    """Input of `kwaivgi/kling-v2.1`: one image-to-video clip."""

    model_config = ConfigDict(extra="ignore", title="Input", frozen=True)

    mode: Mode = Field(
        "standard",
        description="Standard has a resolution of 720p, pro is 1080p. Both are 24fps.",
        json_schema_extra=_order(0),
    )
    duration: Literal[5, 10] = Field(
        5, description="Duration of the video in seconds", json_schema_extra=_order(1)
    )
    prompt: str = Field(
        description="Text prompt for video generation",
        max_length=MAX_PROMPT_CHARS,
        json_schema_extra=_order(2),
    )
    end_image: str | None = Field(
        None,
        description="Last frame of the video (pro mode is required when this parameter is set)",
        json_schema_extra=_order(3, format="uri"),
    )
    start_image: str = Field(
        description="First frame of the video. You must use a start image with kling-v2.1.",
        json_schema_extra=_order(4, format="uri"),
    )
    negative_prompt: str = Field(
        "",
        description="Things you do not want to see in the video",
        max_length=MAX_PROMPT_CHARS,
        json_schema_extra=_order(5),
    )
    # Extensions; Replicate's kling-v2.1 has none of them.
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="Random seed. Leave blank to randomize; the seed used is reported.",
        json_schema_extra=_order(6),
    )
    audio: bool = Field(
        False,
        description="Add the model's generated soundtrack (AAC) when the model makes one. "
        "Kling v2.1 clips are silent, so the default is no audio track.",
        json_schema_extra=_order(7),
    )
    preset: RequestPreset | None = Field(
        None,
        description="Speed preset. default: the full model at full quality. fast: step caching, "
        "faster with a small loss of detail. turbo: a distilled few-step model, several times faster "
        "with some loss of quality. Leave blank for the server's preset.",
        json_schema_extra=_order(8),
    )

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(map(str, set(data) - set(cls.model_fields)))
            if unknown:
                shown = ", ".join(name[:40] for name in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                log.warning("ignoring unknown input field(s): %s", ascii(shown)[1:-1])
        return data

    @field_validator("start_image", "end_image", mode="before")
    @classmethod
    def _paths_as_strings(cls, value: Any) -> Any:
        # Images are URLs, data URIs or (library and CLI) local paths; a Path object is taken as its text.
        return str(value) if isinstance(value, PathLike) else value

    @field_validator("start_image")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("start_image is required: a URL, a data URI or an uploaded file's URL")
        return value

    @field_validator("end_image")
    @classmethod
    def _end_image_needs_pro(cls, value: str | None, info: ValidationInfo) -> str | None:
        # `mode` is declared first, so it is validated by now (absent from data if it was invalid).
        if value is not None and info.data.get("mode", "standard") != "pro":
            raise ValueError("end_image requires mode 'pro' (standard mode takes a start image only)")
        return value

    @property
    def num_frames(self) -> int:
        """Frames in the output clip: 24 fps for the duration, plus the opening frame (121 or 241).

        (What a model renders at its own frame rate is `ModelInputs.model_frames`.)"""
        return FPS * self.duration + 1

    @property
    def short_side(self) -> int:
        return SHORT_SIDE[self.mode]


def field_errors(error: ValidationError) -> list[tuple[str, str]]:
    """(field, rule) pairs for a failed validation, e.g. ("mode", "Input should be 'standard' or 'pro'")."""
    pairs = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "input"
        message = item["msg"].removeprefix("Value error, ")
        pairs.append((field, message))
    return pairs
