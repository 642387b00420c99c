"""`I2V_LONG_CLIPS=extend`: a 10 s clip as two 5 s clips, the second from the first one's last frame."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import probe
from PIL import Image

from i2v import Engine, KlingRequest, Progress
from i2v.backends import Clip
from i2v.long_clips import join, parts_for
from i2v.progress import Reporter
from i2v.settings import Settings
from i2v.video import to_uint8


@pytest.fixture(scope="module")
def extending() -> Engine:
    return Engine("tiny", settings=Settings(long_clips="extend"))


def _request(image: Path, duration: int, **fields: object) -> KlingRequest:
    return KlingRequest(prompt="a boat", start_image=str(image), duration=duration, seed=7, **fields)


def test_a_10s_clip_is_the_5s_clip_then_one_from_its_last_frame(extending: Engine, image_file) -> None:
    image = image_file(640, 360)
    report = Reporter(None, None)
    long = extending.render(_request(image, 10)).clip
    plan = extending.plan(_request(image, 5), report)
    first = extending.executor.run(plan, report)
    last = Image.fromarray(to_uint8(first.frames[-1]))
    second = extending.executor.run(replace(plan, inputs=replace(plan.inputs, image=last, seed=8)), report)

    assert len(first.frames) == 121 and len(long.frames) == 241
    np.testing.assert_array_equal(long.frames[:121], first.frames)
    np.testing.assert_array_equal(long.frames[121:], second.frames[1:])


def test_the_extended_mp4_is_exact_and_steps_count_across_the_parts(
    extending: Engine, image_file, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    result = extending.generate(
        _request(image_file(640, 360), 10), tmp_path / "long.mp4", on_progress=seen.append
    )
    info = probe(result.path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1280, 720, 241, 24)
    assert json.loads(info["metadata"]["comment"])["parts"] == 2
    steps = [(p.step, p.total) for p in seen if p.stage == "denoising"]
    assert steps == [(0, 4), (1, 4), (2, 4), (2, 4), (3, 4), (4, 4)]


def test_clips_with_an_end_image_or_of_one_part_run_in_one_sequence(extending: Engine, image_file) -> None:
    report = Reporter(None, None)
    pro = extending.plan(
        _request(image_file(640, 360), 10, mode="pro", end_image=str(image_file(640, 360))), report
    )
    spec = extending.executor.backend(pro.key).spec
    assert parts_for(spec, pro.inputs, "extend") == 1
    assert parts_for(spec, replace(pro.inputs, end_image=None), "extend") == 2
    assert parts_for(spec, replace(pro.inputs, end_image=None), "one-sequence") == 1
    five = extending.plan(_request(image_file(640, 360), 5), report)
    assert parts_for(extending.executor.backend(five.key).spec, five.inputs, "extend") == 1


def test_join_drops_the_seam_frame_and_its_share_of_the_soundtrack() -> None:
    rate, fps = 48_000, 24

    def clip(start: int) -> Clip:
        frames = np.arange(start, start + 121, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)
        audio = np.full((2, rate * 121 // fps), start, dtype=np.float32)
        return Clip(frames=frames, fps=fps, audio=(audio, rate))

    joined = join([clip(0), clip(120)])
    assert joined.frames[:, 0, 0, 0].tolist() == list(range(241))
    samples, joined_rate = joined.audio  # type: ignore[misc]
    assert joined_rate == rate and samples.shape == (2, rate * 241 // fps)
    assert (samples[:, : rate * 121 // fps] == 0).all() and (samples[:, rate * 121 // fps :] == 120).all()
