"""CFG parallel (i2v.cfg_parallel): how a group's plan is chosen, and four CPU ranks as 2 CFG x 2 Ulysses.

The two-rank case (CFG parallel alone, and the fallback to Ulysses without guidance) is in
test_parallel.py, on that module's group; a process holds one group at a time, so this module has its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from i2v import Engine, KlingRequest
from i2v.backends import BACKENDS, Backend
from i2v.errors import I2VError
from i2v.settings import Settings
from i2v.speed import GroupPlan, Speed, group_plan

WAN, FASTWAN, LTX2, LTX2_DISTILLED = (
    BACKENDS[name] for name in ("wan2.2-ti2v-5b", "fastwan2.2-ti2v-5b", "ltx-2", "ltx-2-distilled")
)


def plan(cls: type, ranks: int, cfg_parallel: bool | None = None) -> GroupPlan:
    return cls.group_plan(cls.spec, ranks, Speed(cfg_parallel=cfg_parallel))


def test_a_guided_model_on_an_even_group_runs_cfg_parallel_then_ulysses() -> None:
    assert plan(WAN, 1) == GroupPlan()
    assert plan(WAN, 2) == GroupPlan(cfg=2, ulysses=1)
    assert plan(WAN, 4) == GroupPlan(cfg=2, ulysses=2)
    assert plan(WAN, 8) == GroupPlan(cfg=2, ulysses=4)
    assert plan(WAN, 2, cfg_parallel=True) == GroupPlan(cfg=2, ulysses=1)
    assert plan(WAN, 4).describe() == "CFG parallel across 2 groups x sequence split across 2 ranks"
    assert plan(WAN, 2).describe() == "CFG parallel across 2 ranks"


def test_where_cfg_parallel_cannot_run_the_plan_says_why() -> None:
    assert plan(WAN, 2, cfg_parallel=False) == GroupPlan(ulysses=2, note="CFG parallel off")
    assert plan(WAN, 3) == GroupPlan(ulysses=3, note="no CFG parallel: a group of 3 does not halve")
    # The distilled turbo model samples without guidance: nothing to split but the sequence.
    assert plan(FASTWAN, 2, cfg_parallel=True).describe() == (
        "sequence split across 2 ranks (no CFG parallel: the model samples without guidance)"
    )
    # diffusers 0.42.1 cannot split LTX-2's sequence: its guided passes split across two ranks, no more.
    assert plan(LTX2, 2) == GroupPlan(cfg=2, ulysses=1)
    assert plan(LTX2, 4).describe() == (
        "rank 0 alone (CFG parallel would use 2 of 4 ranks, and its sequence does not split)"
    )
    assert plan(LTX2_DISTILLED, 2).describe() == (
        "rank 0 alone (no CFG parallel: the model samples without guidance, and its sequence does not split)"
    )
    unsplit = group_plan(2, guided=True, splits_cfg=False, splits_sequence=True, cfg_parallel=None)
    assert unsplit.note == "no CFG parallel: this pipeline's guidance passes are not split"


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2V_CFG_PARALLEL", "off")
    assert Settings().speed.cfg_parallel is False
    monkeypatch.setenv("I2V_CFG_PARALLEL", "1")
    assert Settings().speed.cfg_parallel is True
    monkeypatch.setenv("I2V_CFG_PARALLEL", "sometimes")
    with pytest.raises(I2VError, match="I2V_CFG_PARALLEL: expected true or false, not 'sometimes'"):
        Settings()
    monkeypatch.delenv("I2V_CFG_PARALLEL")
    assert Settings().speed.cfg_parallel is None  # auto: where the group and the model allow


def test_four_ranks_split_cfg_then_the_sequence_and_render_the_same_frames_as_one(
    _cache_dir: Path, tmp_path: Path
) -> None:
    """Ranks 0-1 run the conditional pass, each on half its tokens, ranks 2-3 the unconditional one."""
    start = tmp_path / "square.png"
    start.write_bytes(make_image(300, 300))
    request = KlingRequest(prompt="waves roll in", start_image=str(start), seed=3)
    single = Engine("tiny")  # CFG's passes one by one, as each half of the group runs its own
    group = Engine("tiny", device="cpu+cpu+cpu+cpu")
    try:
        backend = group.backend("standard")
        assert "CFG parallel across 2 groups x sequence split across 2 ranks" in backend.placement
        assert backend.parallel_degree == 2
        with passes(backend) as ours, passes(single.backend("standard")) as theirs:
            frames = group.render(request).clip.frames
            np.testing.assert_array_equal(frames, single.render(request).clip.frames)
    finally:
        group.close()
    steps, (batch, tokens) = backend.spec.steps, theirs[0]
    assert theirs == [(batch, tokens)] * 2 * steps  # one engine: both passes over every token
    assert ours == [(batch, tokens // 2)] * steps  # rank 0: the conditional pass over half the tokens


@contextmanager
def passes(backend: Backend) -> Iterator[list[tuple[int, int]]]:
    """(batch, tokens) of each forward through this process's transformer block 0, while open."""
    calls: list[tuple[int, int]] = []
    ffn = backend.pipe.transformer.blocks[0].ffn
    handle = ffn.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[:2])))
    try:
        yield calls
    finally:
        handle.remove()


def test_two_ranks_split_ltx2s_four_guided_passes_and_render_the_frames_of_one(
    _cache_dir: Path, tmp_path: Path
) -> None:
    """LTX-2's stage 1: rank 0 runs the conditional row and the STG pass, rank 1 the unconditional row
    and the modality pass; the unguided refine stage runs on both. One engine batches CFG's rows, so the
    frames match to float rounding (batch of two against two of one), not bit for bit."""
    start, end = tmp_path / "start.png", tmp_path / "end.png"
    start.write_bytes(make_image(300, 300, seed=1))
    end.write_bytes(make_image(300, 300, seed=2))
    request = KlingRequest(
        prompt="a door opens", start_image=str(start), end_image=str(end), mode="pro", seed=2
    )
    single = Engine("tiny")
    group = Engine("tiny", device="cpu+cpu")
    try:
        backend = group.backend("pro")
        assert backend.spec.name == "tiny-ltx-2" and "CFG parallel across 2 ranks" in backend.placement
        with ltx2_passes(backend) as ours, ltx2_passes(single.backend("pro")) as theirs:
            frames = group.render(request).clip.frames
            np.testing.assert_allclose(frames, single.render(request).clip.frames, atol=1e-5)
    finally:
        group.close()
    guided, refine = backend.spec.steps, 3  # tiny stage 1 steps; STAGE_2_DISTILLED_SIGMA_VALUES
    assert theirs == [2, 1, 1] * guided + [1] * refine  # CFG's pair batched, STG, modality; then refine
    assert ours == [1, 1] * guided + [1] * refine  # rank 0: the conditional row and STG


@contextmanager
def ltx2_passes(backend: Backend) -> Iterator[list[int]]:
    """The batch size of each forward through this process's LTX-2 transformer, while open."""
    calls: list[int] = []
    block = backend.pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()
