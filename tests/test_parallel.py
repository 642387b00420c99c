"""One request across a device group (i2v.parallel), here two CPU ranks over gloo.

On GPUs the group speaks NCCL; everything else (the follower processes, CFG parallel and the Ulysses split
of the transformer, the collective cancel, the fallback to rank 0) is this same code. Four ranks (CFG
parallel x Ulysses) are in test_cfg_parallel.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import probe
from serverproc import ServerProcess, data_uri

from i2v import Canceled, Engine, KlingRequest, Progress
from i2v.backends import Backend
from i2v.devices import device_group
from i2v.errors import I2VError
from i2v.geometry import Grid
from i2v.settings import Settings
from i2v.speed import Speed

# Batched CFG is on, as it is on GPUs: on the group CFG parallel takes its place for the guided models,
# while the turbo model (no guidance) keeps the Ulysses split. The single engine runs CFG's two passes one
# by one, as each rank of the group does, so the frames match bit for bit (batched CFG would round
# differently: test_speed.py). Pro runs on Wan2.1 FLF2V here; the default LTX-2 (its own CFG-parallel
# hook) is in test_cfg_parallel.py and the server test.
MODELS = {"standard": "wan2.2-ti2v-5b", "pro": "wan2.1-flf2v-14b"}
SETTINGS = Settings(speed=Speed(batched_cfg=True), models=MODELS)


@pytest.fixture(scope="module")
def group(_cache_dir: Path) -> Iterator[Engine]:
    engine = Engine("tiny", device="cpu+cpu", settings=SETTINGS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def single(_cache_dir: Path) -> Engine:
    return Engine("tiny", settings=Settings(speed=Speed(batched_cfg=False), models=MODELS))


@contextmanager
def passes(backend: Backend) -> Iterator[list[int]]:
    """The batch size of each forward through this process's transformer (rank 0's), while open."""
    calls: list[int] = []
    ffn = backend.pipe.transformer.blocks[0].ffn
    handle = ffn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


def test_device_specs() -> None:
    assert device_group("cuda:0+cuda:1") == ("cuda:0", "cuda:1")
    assert device_group(" cuda:3 ") == ("cuda:3",)
    assert device_group("cpu+cpu") == ("cpu", "cpu")
    assert device_group(None) == ()
    for spec, rule in (
        ("cuda:0+cuda:0", "each GPU may appear once"),
        ("cuda:0+", "is not a device"),
        ("gpu zero", "is not a device"),
    ):
        with pytest.raises(I2VError, match=rule):
            device_group(spec)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_the_grid_gives_every_rank_an_equal_share(ranks: int) -> None:
    grid = Grid(max_area=1280 * 704, multiple=32)  # TI2V-5B at 720p
    for aspect in (16 / 9, 9 / 16, 1.0, 4 / 3, 3 / 2, 21 / 9, 0.42, 2.7):
        alone = grid.size_for(aspect)
        split = grid.size_for(aspect, tokens_multiple=ranks)
        assert grid.tokens(split) % ranks == 0
        if grid.tokens(alone) % ranks == 0:
            assert split == alone  # a size that already splits is kept
        assert split[0] * split[1] <= grid.max_area
        assert split[0] * split[1] >= 0.8 * alone[0] * alone[1]
        assert max(aspect / (split[0] / split[1]), split[0] / split[1] / aspect) < 1.07  # 21:9 on 8: 6%
    assert grid.size_for(16 / 9, tokens_multiple=4) == (1280, 704)  # 1248x704 has 858 tokens a frame


def test_two_ranks_run_the_cfg_passes_apart_and_render_the_same_frames_as_one(
    group: Engine, single: Engine, image_file, tmp_path: Path
) -> None:
    request = KlingRequest(prompt="waves roll in", start_image=str(image_file(300, 300)), seed=3)
    backend = group.backend("standard")
    assert "CFG parallel across 2 ranks" in backend.placement
    assert "sequence split" not in backend.placement and backend.parallel_degree == 1
    assert backend.model_size((720, 720)) == single.backend("standard").model_size((720, 720))
    with passes(backend) as ours, passes(single.backend("standard")) as theirs:
        frames = group.render(request).clip.frames
        np.testing.assert_array_equal(frames, single.render(request).clip.frames)
    steps = backend.spec.steps
    assert ours == [1] * steps and theirs == [1, 1] * steps  # rank 0 ran the conditional pass alone
    info = probe(group.generate(request, tmp_path / "group.mp4").path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (720, 720, 121, 24)


def test_a_model_without_guidance_splits_the_sequence_instead(
    group: Engine, single: Engine, image_file, caplog: pytest.LogCaptureFixture
) -> None:
    """The turbo model (FastWan, guidance 1) has no negative pass to split: Ulysses, said in the log."""
    request = KlingRequest(
        prompt="waves roll in", start_image=str(image_file(300, 300)), seed=3, preset="turbo"
    )
    with caplog.at_level(logging.INFO, logger="i2v.engine"):
        ours = group.render(request)
    expected = "sequence split across 2 ranks (no CFG parallel: the model samples without guidance)"
    assert ours.backend.spec.name == "tiny-fastwan2.2-ti2v-5b" and expected in ours.backend.placement
    assert expected in caplog.text  # the per-request line that the worker copies into the prediction's logs
    np.testing.assert_array_equal(ours.clip.frames, single.render(request).clip.frames)


def test_a_wide_clip_is_generated_at_a_size_the_ranks_can_split(
    group: Engine, single: Engine, image_file, tmp_path: Path
) -> None:
    # Ulysses (the turbo model here) splits the tokens, so their count must divide; CFG parallel does not.
    wide = (1280, 720)
    ulysses = group.backend("standard", "turbo")
    alone, split = single.backend("standard", "turbo").model_size(wide), ulysses.model_size(wide)
    grid = ulysses.spec.grid
    assert grid.tokens(alone) % 2 == 1 and grid.tokens(split) % 2 == 0  # the tiny 16:9 size does not split
    assert group.backend("standard").model_size(wide) == alone
    request = KlingRequest(
        prompt="waves roll in", start_image=str(image_file(640, 360)), seed=3, preset="turbo"
    )
    result = group.generate(request, tmp_path / "wide.mp4")
    info = probe(result.path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1280, 720, 121, 24)


def test_cancel_stops_every_rank_at_the_same_step(group: Engine, image_file, tmp_path: Path) -> None:
    request = KlingRequest(prompt="waves roll in", start_image=str(image_file(300, 300)), seed=4)
    cancel = threading.Event()
    seen: list[Progress] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        if progress.stage == "denoising" and progress.step == 1:
            cancel.set()  # rank 0 only: the followers learn it from the next collective check

    with pytest.raises(Canceled):
        group.generate(request, tmp_path / "canceled.mp4", on_progress=on_progress, cancel=cancel)
    assert not (tmp_path / "canceled.mp4").exists()
    assert [p.step for p in seen if p.stage == "denoising"] == [0, 1]
    assert group.healthy
    after = group.generate(request, tmp_path / "after.mp4")  # the ranks are still in step
    assert probe(after.path)["frames"] == 121


def test_the_keyframe_wan_model_runs_cfg_parallel_too(group: Engine, single: Engine, image_file) -> None:
    start, end = str(image_file(300, 300, seed=1)), str(image_file(300, 300, seed=2))
    request = KlingRequest(prompt="a door opens", start_image=start, end_image=end, mode="pro", seed=2)
    ours = group.render(request)
    assert ours.backend.spec.name == "tiny-wan2.1-flf2v-14b"
    assert "CFG parallel across 2 ranks" in ours.backend.placement
    np.testing.assert_array_equal(ours.clip.frames, single.render(request).clip.frames)


def test_one_group_per_process(group: Engine) -> None:
    with pytest.raises(I2VError, match="one device group at a time"):
        Engine("tiny", device="cpu+cpu", settings=SETTINGS)


def test_a_dead_rank_ends_the_group(tmp_path: Path, _cache_dir: Path) -> None:
    """A follower that dies would leave rank 0 in a collective forever; rank 0 exits instead (code 70),
    and the server's worker supervision starts a new group."""
    script = textwrap.dedent(
        """
        import time
        from i2v.engine import Engine
        group = Engine("tiny", device="cpu+cpu")
        group.executor.followers[0].process.kill()
        time.sleep(60)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 70, done.stderr[-2000:]
    assert "a rank of the GPU group died" in done.stderr


def test_a_server_worker_runs_each_prediction_on_its_group(tmp_path: Path, _cache_dir: Path) -> None:
    server = ServerProcess(tmp_path / "data", env={"I2V_DEVICES": "cpu+cpu", "I2V_WARMUP": "1"})
    try:
        server.wait_ready(timeout=120)
        client = server.client()
        standard = client.predictions.create(
            model="kwaivgi/kling-v2.1", input={"prompt": "waves", "start_image": data_uri(300, 300)}
        )
        standard.wait()
        assert standard.status == "succeeded", standard.error
        # LTX-2's sequence cannot be split by diffusers 0.42.1, its guided passes can (test_cfg_parallel.py).
        keyframes = {"start_image": data_uri(450, 300, seed=1), "end_image": data_uri(450, 300, seed=2)}
        pro = client.predictions.create(
            model="kwaivgi/kling-v2.1", input={"prompt": "a door opens", "mode": "pro", **keyframes}
        )
        pro.wait()
        assert pro.status == "succeeded", pro.error
        # Each prediction's own logs (in the store, not a window of the server's log) say how it ran.
        assert "running tiny-wan2.2-ti2v-5b on cpu (attention native, CFG parallel across 2 ranks)" in (
            standard.logs
        )
        assert "negative prompt: the model's default" in standard.logs
        assert "running tiny-ltx-2 on cpu (attention native, CFG parallel across 2 ranks);" in pro.logs
        # The warm-up ran before the worker took work: the whole log file, read after the fact.
        assert "warmed up in" in server.log_path.read_text(errors="replace")
    finally:
        server.stop()
