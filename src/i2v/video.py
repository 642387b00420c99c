"""Video out: frames to an H.264 mp4 (yuv420p, +faststart) with PyAV, written under a temporary name;
and back: a clip's first frame as a JPEG poster."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Mapping
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
    audio: tuple[np.ndarray, int] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to `path` at exactly `size` (width, height).

    Each frame is centre-cropped to the target aspect and scaled by libswscale (Lanczos), so any model
    grid maps onto the exact output size. The file appears under its name only once it is complete.
    Metadata values that are not strings are stored as JSON. `audio` (samples (C, N) float in [-1, 1],
    rate) is muxed as AAC, trimmed or padded with silence to the video's length. `checkpoint` runs before
    each frame; whatever it raises (a cancel) abandons the file, and nothing partial is left behind.
    """
    path = Path(path)
    width, height = size
    partial = path.with_name(f".{path.name}.partial")
    try:
        with av.open(
            str(partial), "w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"}
        ) as out:
            for key, value in (metadata or {}).items():
                out.metadata[key] = value if isinstance(value, str) else json.dumps(value)
            stream = out.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": preset, "crf": str(crf)}
            # Every stream must exist before the first packet is written.
            sound = _add_aac(out, audio) if audio is not None else None
            box, count = None, 0
            for rgb in frames:
                if checkpoint is not None:
                    checkpoint()
                if box is None:
                    box = cover_crop_box(rgb.shape[1], rgb.shape[0], width / height)
                left, top, right, bottom = box
                frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(rgb[top:bottom, left:right]), format="rgb24"
                )
                frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="LANCZOS")
                out.mux(stream.encode(frame))
                count += 1
            out.mux(stream.encode(None))
            if sound is not None and audio is not None:
                _mux_aac(out, sound, audio, seconds=count / fps)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _add_aac(out: av.container.OutputContainer, audio: tuple[np.ndarray, int]) -> av.audio.stream.AudioStream:
    samples, rate = audio
    stream = out.add_stream("aac", rate=rate)
    # Mono or stereo: players handle AAC with more channels in mp4 unevenly.
    stream.layout = "stereo" if np.atleast_2d(samples).shape[0] >= 2 else "mono"
    return stream


def _mux_aac(
    out: av.container.OutputContainer,
    stream: av.audio.stream.AudioStream,
    audio: tuple[np.ndarray, int],
    *,
    seconds: float,
) -> None:
    """Encode the soundtrack, trimmed or padded with silence to `seconds`, the video's length."""
    samples, rate = np.atleast_2d(np.asarray(audio[0], dtype=np.float32)), audio[1]
    channels = stream.layout.nb_channels
    length = round(seconds * rate)
    fitted = np.zeros((channels, length), dtype=np.float32)
    kept = min(length, samples.shape[1])
    fitted[:, :kept] = np.clip(samples[:channels, :kept], -1.0, 1.0)
    frame = av.AudioFrame.from_ndarray(fitted, format="fltp", layout=stream.layout.name)
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    # The encoder re-chunks the buffer into AAC's 1024-sample frames.
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (what diffusers returns with output_type="np") to uint8."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def poster_jpeg(path: str | os.PathLike[str], max_side: int = 640, quality: int = 85) -> bytes:
    """The clip's first frame as a JPEG, scaled down to at most `max_side` on its long side."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        image = frame.to_image()
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
