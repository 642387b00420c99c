"""Pro mode on the tiny LTX-2 and Wan FLF2V twins: exact 1080p clips, end frames, audio, retiming, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import probe
from pydantic import ValidationError

from i2v.backends.ltx2 import LTX2
from i2v.engine import Engine
from i2v.progress import Progress
from i2v.request import KlingRequest
from i2v.retime import retime
from i2v.settings import DEFAULT_MODELS, Settings
from i2v.video import write_mp4

PROMPT = "a boat moves slowly over the sea under a bright sun"


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The tiny twins of the default models (pro: LTX-2), loaded once for the module."""
    return Engine("tiny", device="cpu", settings=Settings(models=dict(DEFAULT_MODELS)))


@pytest.fixture
def images(image_file) -> Iterator[dict[str, Path]]:
    yield {
        "16:9": image_file(640, 360, seed=1),
        "9:16": image_file(360, 640, seed=2),
        "1:1": image_file(400, 400, seed=3),
        "end": image_file(640, 360, "JPEG", seed=4),
    }


@pytest.mark.parametrize(
    ("aspect", "duration", "size"),
    [
        ("16:9", 5, (1920, 1080)),
        ("9:16", 5, (1080, 1920)),
        ("1:1", 5, (1080, 1080)),
        ("16:9", 10, (1920, 1080)),  # 10 s once: the frame count does not depend on the aspect
    ],
)
def test_pro_clip_is_exact_1080p_24fps(engine, images, tmp_path, aspect, duration, size) -> None:
    request = KlingRequest(mode="pro", prompt=PROMPT, start_image=images[aspect], duration=duration, seed=5)
    result = engine.generate(request, tmp_path / "pro.mp4")
    info = probe(result.path)
    assert (info["width"], info["height"]) == size
    assert info["frames"] == 24 * duration + 1
    assert info["fps"] == 24
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["audio"] == []  # Kling clips are silent unless the request asks for the soundtrack
    assert result.model == "tiny-ltx-2"


def test_ltx2_generates_at_half_size_then_doubles() -> None:
    """1080p is 960x544 at stage 1 and 1920x1088 after the latent upsample; the writer crops to 1080."""
    backend = LTX2(LTX2.spec, torch.device("cpu"))
    assert backend.model_size((1920, 1080)) == (1920, 1088)
    assert backend.model_size((1080, 1920)) == (1088, 1920)
    assert backend.model_size((1080, 1080)) == (1088, 1088)
    assert backend.model_size((1440, 1080)) == (1472, 1088)


def test_end_image_conditions_the_clip(engine, images) -> None:
    def render(end_image: Path | None) -> np.ndarray:
        request = KlingRequest(
            mode="pro", prompt=PROMPT, start_image=images["16:9"], end_image=end_image, seed=11
        )
        return engine.render(request).clip.frames

    without, with_end, again = render(None), render(images["end"]), render(None)
    np.testing.assert_array_equal(without, again)  # fixed seed: the same request gives the same clip
    assert np.abs(with_end - without).mean() > 1e-3  # so the difference is the end image's doing


@pytest.mark.parametrize("duration", [5, 10])
def test_end_image_sits_on_the_last_frame(engine, images, monkeypatch, duration) -> None:
    """The end keyframe's temporal position is the clip's last frame (120/24 s), not diffusers' 113/24."""
    from diffusers import LTX2ConditionPipeline

    starts: list[float] = []
    place = LTX2ConditionPipeline._prepare_keyframe_coords

    def spy(self, *args, **kwargs):  # records what the pipeline hands the transformer, changes nothing
        coords = place(self, *args, **kwargs)
        starts.append(float(coords[0, 0, :, 0].min()))
        return coords

    monkeypatch.setattr(LTX2ConditionPipeline, "_prepare_keyframe_coords", spy)
    request = KlingRequest(
        mode="pro", prompt=PROMPT, start_image=images["16:9"], end_image=images["end"], duration=duration
    )
    engine.render(request)
    assert starts and all(start == pytest.approx(duration) for start in starts)  # both stages


def test_audio_true_muxes_aac_of_the_clip_length(engine, images, tmp_path) -> None:
    request = KlingRequest(mode="pro", prompt=PROMPT, start_image=images["16:9"], seed=3, audio=True)
    seen: list[Progress] = []
    result = engine.generate(request, tmp_path / "sound.mp4", on_progress=seen.append)
    # Both stages count on one scale: stage 1 then the 3 refine steps, ending on the announced total.
    steps = [(p.step, p.total) for p in seen if p.stage == "denoising"]
    assert len({total for _, total in steps}) == 1 and steps[-1][0] == steps[-1][1] == len(steps) - 1
    info = probe(result.path)
    assert info["audio"] == ["aac"] and info["frames"] == 121
    with av.open(str(result.path)) as container:
        audio = container.streams.audio[0]
        seconds = float(audio.duration * audio.time_base)
        samples = np.concatenate([frame.to_ndarray().ravel() for frame in container.decode(audio=0)])
    # One AAC frame (1024 samples) of slack for the encoder's padding.
    assert abs(seconds - 121 / 24) <= 1024 / audio.sample_rate
    assert np.abs(samples).max() > 0  # the model's soundtrack, not padding silence


def test_end_image_with_standard_mode_is_refused(images) -> None:
    with pytest.raises(ValidationError) as error:
        KlingRequest(prompt=PROMPT, start_image=images["16:9"], end_image=images["end"])
    assert error.value.errors()[0]["loc"] == ("end_image",)
    assert "pro" in str(error.value)


def test_wan_keyframe_backend_is_retimed_from_16_to_24_fps(images, tmp_path) -> None:
    engine = Engine("tiny-wan2.1-flf2v-14b", device="cpu")
    request = KlingRequest(
        mode="pro", prompt=PROMPT, start_image=images["16:9"], end_image=images["end"], seed=2, audio=True
    )
    spec = engine.backend("pro").spec
    assert spec.fps == 16 and spec.frames_for(5) == 81  # what the model renders before retiming
    result = engine.generate(request, tmp_path / "wan.mp4")
    info = probe(result.path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1920, 1080, 121, 24)
    assert info["audio"] == []  # Wan makes no soundtrack, so `audio: true` adds none


def test_retime_keeps_the_frames_that_fall_on_24_fps_times() -> None:
    """16 -> 24 fps: every second input frame lands on every third output frame, the last on the last."""
    x = np.mgrid[0:48, 0:80][1]
    frames = np.stack([np.repeat(((x + 3 * i) % 32 < 16)[..., None] * 255, 3, axis=-1) for i in range(81)])
    out = retime(frames.astype(np.uint8), 16, 24, 121)
    assert out.shape == (121, 48, 80, 3)
    for k in range(41):
        np.testing.assert_array_equal(out[3 * k], frames[2 * k])
    # The frames between are synthesised. The first interval is the exception here: scene-change
    # detection compares each frame difference with the one before, taken as 0 at the start, and these
    # black/white stripes differ by 19% a frame (over the threshold, 10%), so frame 1 repeats a neighbour.
    for k in range(2, 120):
        if k % 3:
            before, after = frames[2 * k // 3], frames[2 * k // 3 + 1]
            assert not np.array_equal(out[k], before) and not np.array_equal(out[k], after)


def test_distilled_ltx2_renders_a_clip(images) -> None:
    engine = Engine("tiny-ltx-2-distilled", device="cpu")
    request = KlingRequest(
        mode="pro", prompt=PROMPT, start_image=images["9:16"], end_image=images["end"], seed=1
    )
    rendered = engine.render(request)
    assert rendered.backend.spec.steps == 8
    assert rendered.clip.frames.shape[:1] == (121,)


def test_cli_generate_pro_with_end_image(images, tmp_path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[models]\npro = "ltx-2"\n')
    output = tmp_path / "cli.mp4"
    env = {**os.environ, "I2V_CONFIG": str(config)}
    command = [
        sys.executable, "-m", "i2v", "generate", "--mode", "pro", "--model", "tiny", "--prompt", PROMPT,
        "--start-image", str(images["1:1"]), "--end-image", str(images["end"]), "--seed", "9",
        "-o", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "tiny-ltx-2" in done.stdout and "1080x1080" in done.stdout
    info = probe(output)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1080, 1080, 121, Fraction(24))


def test_cli_refuses_end_image_in_standard_mode(images, tmp_path) -> None:
    command = [
        sys.executable, "-m", "i2v", "generate", "--model", "tiny", "--prompt", PROMPT,
        "--start-image", str(images["16:9"]), "--end-image", str(images["end"]),
        "-o", str(tmp_path / "x.mp4"),
    ]  # fmt: skip
    done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "end_image" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_write_mp4_fits_the_soundtrack_to_the_video(tmp_path) -> None:
    """A mono track shorter than the clip is padded with silence; a longer one is cut."""
    frames = [np.full((64, 96, 3), 8 * i, np.uint8) for i in range(25)]
    tracks = {"short": np.full(4000, 0.2, np.float32), "long": np.zeros((2, 96000), np.float32)}
    for name, samples in tracks.items():
        path = write_mp4(frames, tmp_path / f"{name}.mp4", size=(96, 64), fps=24, audio=(samples, 24000))
        with av.open(str(path)) as container:
            audio = container.streams.audio[0]
            assert abs(float(audio.duration * audio.time_base) - 25 / 24) <= 1024 / 24000
            assert audio.codec_context.layout.nb_channels == samples.ndim
