"""The speed-ups and presets on the tiny TI2V twin: what each changes, and that exact ones stay exact.

Speed itself is measured by bench/, never here; these check that each switch does what it says.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import probe
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry

from i2v import Engine, KlingRequest, Progress
from i2v.fp8 import block_linears, fp8_unsupported
from i2v.placement import choose_attention, step_cache
from i2v.settings import Settings
from i2v.speed import Speed

EXAMPLE = str(Path(__file__).resolve().parents[1] / "src" / "i2v" / "assets" / "example.jpg")
REQUEST = KlingRequest(prompt="waves roll in", start_image=EXAMPLE, seed=5)


def engine(**speed: object) -> Engine:
    return Engine("tiny", settings=Settings(speed=Speed(**speed)))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """Frames of the default path (which on CPU is the stock pipeline's, bit for bit: test_engine.py)."""
    return engine().render(REQUEST).clip.frames


@contextmanager
def block_calls(backend: object, index: int) -> Iterator[list[int]]:
    """The batch size of each forward through one transformer block, while the context is open.

    Counted inside the block (its feed-forward): a cache hook replaces the block's forward, so a hook
    on the block itself would count skipped calls too.
    """
    calls: list[int] = []
    ffn = backend.pipe.transformer.blocks[index].ffn  # type: ignore[attr-defined]
    handle = ffn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


def test_batched_cfg_runs_one_forward_per_step_and_keeps_the_frames(reference: np.ndarray) -> None:
    batched, sequential = engine(batched_cfg=True), engine()
    for eng, batch_sizes in ((sequential, [1, 1]), (batched, [2])):
        backend = eng.backend("standard")
        with block_calls(backend, 0) as calls:
            frames = eng.render(REQUEST).clip.frames
        steps = backend.spec.steps
        assert calls == batch_sizes * steps  # sequential: cond then uncond; batched: both at once
        np.testing.assert_allclose(frames, reference, atol=1e-4)  # float rounding, nothing more


def test_low_vram_stores_weights_in_fp8_and_offloads_blocks(reference: np.ndarray) -> None:
    eng = engine(preset="low-vram")
    backend = eng.backend("standard")
    assert "group offload" in backend.placement and "fp8 storage transformer" in backend.placement
    assert HookRegistry.check_if_exists_or_initialize(backend.pipe.transformer.blocks[0]).hooks
    assert backend.pipe.transformer.blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    assert backend.pipe.text_encoder.dtype == torch.float32  # only the transformer is stored in fp8
    frames = eng.render(REQUEST).clip.frames
    assert not np.array_equal(frames, reference)  # fp8 weight rounding, as documented
    assert np.abs(frames - reference).mean() < 0.05


def test_fast_server_preset_on_cpu_logs_its_fp8_fallback(
    reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    eng = engine(preset="fast")
    with caplog.at_level(logging.WARNING, logger="i2v.fp8"):
        backend = eng.backend("standard")
    fallbacks = [r for r in caplog.records if r.name == "i2v.fp8" and "falling back" in r.getMessage()]
    assert len(fallbacks) == 1, [r.getMessage() for r in caplog.records]
    message = fallbacks[0].getMessage()
    assert "the device is cpu" in message and "float32 compute" in message
    assert "fp8" not in backend.placement  # nothing was quantized or cast
    assert backend.pipe.transformer.blocks[0].ffn.net[2].weight.dtype == torch.float32
    result = eng.generate(REQUEST, tmp_path / "fast.mp4")  # the request preset's step cache still runs
    info = probe(result.path)
    assert (info["width"], info["height"], info["frames"]) == (1280, 720, 121)


def test_fp8_compute_needs_fp8_tensor_cores_and_takes_the_blocks_linear_layers() -> None:
    assert "the device is cpu" in (fp8_unsupported(torch.device("cpu")) or "")
    # The tiny twin's widths (24) cannot run torch._scaled_mm; a block with widths of multiples of 16 can.
    assert not block_linears(engine().backend("standard").pipe.transformer)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    )  # fmt: skip
    linears = block_linears(model)
    assert "blocks.0.ffn.net.2" in linears and "blocks.1.attn1.to_q" in linears
    assert all(name.startswith("blocks.") for name in linears)  # embedders and the head stay as they are


def test_fast_request_preset_caches_steps_for_that_request_only(reference: np.ndarray) -> None:
    eng = engine()
    transformer = eng.backend("standard").pipe.transformer
    hooked: list[bool] = []

    def on_progress(progress: Progress) -> None:
        if progress.stage == "denoising" and progress.step:
            hooked.append(transformer.is_cache_enabled)

    eng.render(REQUEST.model_copy(update={"preset": "fast"}), on_progress=on_progress)
    assert hooked and all(hooked)  # FirstBlockCache was on while it denoised
    assert not transformer.is_cache_enabled  # and is off after
    np.testing.assert_array_equal(eng.render(REQUEST).clip.frames, reference)


def test_step_cache_skips_the_blocks_after_the_first_when_steps_change_little() -> None:
    eng = engine()
    backend = eng.backend("standard")
    inputs = dataclasses.replace(eng.render(REQUEST).inputs, steps=6)
    with block_calls(backend, -1) as full:
        backend.generate(inputs, lambda step, total: None)
    # A threshold no change exceeds: after the first step, every step reuses the cached residual.
    with block_calls(backend, -1) as cached, step_cache(backend.pipe.transformer, threshold=1e9):
        backend.generate(inputs, lambda step, total: None)
    assert len(full) == 2 * 6 and len(cached) == 2  # the first step's cond and uncond passes only


def test_turbo_request_preset_runs_the_distilled_model_in_three_steps(tmp_path: Path) -> None:
    eng = engine()
    steps: list[tuple[int | None, int | None]] = []

    def on_progress(progress: Progress) -> None:
        if progress.stage == "denoising":
            steps.append((progress.step, progress.total))

    turbo = REQUEST.model_copy(update={"preset": "turbo"})
    result = eng.generate(turbo, tmp_path / "turbo.mp4", on_progress=on_progress)
    assert result.model == "tiny-fastwan2.2-ti2v-5b"
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    info = probe(result.path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1280, 720, 121, 24)
    again = eng.render(turbo).clip.frames
    np.testing.assert_array_equal(again, eng.render(turbo).clip.frames)  # a seed is still a clip


def test_server_preset_is_the_default_and_a_request_overrides_it() -> None:
    eng = engine(preset="turbo")
    assert eng.preset(REQUEST) == "turbo"
    assert eng.preset(REQUEST.model_copy(update={"preset": "default"})) == "default"
    assert engine(preset="low-vram").preset(REQUEST) == "default"  # a way to load, not a request preset


def test_compiled_blocks_with_batched_cfg_keep_the_frames(reference: np.ndarray) -> None:
    eng = engine(compile=True, batched_cfg=True)
    assert "compiled blocks" in eng.backend("standard").placement
    np.testing.assert_allclose(eng.render(REQUEST).clip.frames, reference, atol=1e-4)


def test_attention_falls_back_to_what_is_installed() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_attention("auto", cpu) == "native"
    # A CUDA device with none of the fused kernels installed (this machine's packages) gets PyTorch's own;
    # an unavailable request falls back the same way instead of failing at the first step.
    expected = "_native_cudnn" if torch.cuda.is_available() else "native"
    assert choose_attention("flash", cuda) in (expected, "flash", "_flash_3")
    assert choose_attention("no-such-kernel", cuda) in (expected, "flash", "_flash_3")
