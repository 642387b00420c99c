"""Video out: frames to an H.264 mp4 (yuv420p, +faststart) with PyAV, written under a temporary name."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .geometry import cover_crop_box


def write_mp4(
    frames: Iterable[np.ndarray],
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int],
    fps: int,
    metadata: Mapping[str, object] | None = None,
    preset: str = "medium",
    crf: int = 18,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to `path` at exactly `size` (width, height).

    Each frame is centre-cropped to the target aspect and scaled by libswscale (Lanczos), so any model
    grid maps onto the exact output size. The file appears under its name only once it is complete.
    Metadata values that are not strings are stored as JSON.
    """
    path = Path(path)
    width, height = size
    partial = path.with_name(f".{path.name}.partial")
    try:
        with av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"}) as out:
            for key, value in (metadata or {}).items():
                out.metadata[key] = value if isinstance(value, str) else json.dumps(value)
            stream = out.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": preset, "crf": str(crf)}
            box = None
            for rgb in frames:
                if box is None:
                    box = cover_crop_box(rgb.shape[1], rgb.shape[0], width / height)
                left, top, right, bottom = box
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[top:bottom, left:right]), format="rgb24")
                frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="LANCZOS")
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (what diffusers returns with output_type="np") to uint8."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
