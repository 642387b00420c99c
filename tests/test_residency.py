"""Residency within a budget, on the tiny twins: moves to CPU memory (logged), drops when CPU memory has
no room, parts shared between models held once, and the text encoder off the device while denoising.

On the CPU the budget (`I2V_GPU_MEMORY`) is set against the tiny models' footprints, and a move "to CPU
memory" is the real code path with nothing to copy (device and host are one memory here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from i2v import Engine
from i2v.backends import resolve
from i2v.backends.base import ModelInputs
from i2v.errors import I2VError
from i2v.footprint import tensor_bytes
from i2v.progress import Reporter
from i2v.residency import FileHashes, Residency
from i2v.settings import Settings


@pytest.fixture(scope="module")
def tiny(_cache_dir: Path) -> Engine:
    return Engine("tiny")


def test_shared_parts_are_held_once(tiny: Engine) -> None:
    def storage(module: torch.nn.Module) -> list[int]:
        return [p.untyped_storage().data_ptr() for p in module.parameters()]

    expected = {
        "standard": ({"text_encoder", "vae"}, {"transformer"}),
        "pro": (
            {"text_encoder", "vae", "audio_vae", "vocoder", "latent_upsampler"},
            {"transformer", "connectors"},
        ),
    }
    for mode, (shared, separate) in expected.items():
        base, turbo = tiny.backend(mode).modules(), tiny.backend(mode, "turbo").modules()
        for name in shared:
            assert storage(base[name]) == storage(turbo[name]), (mode, name)
        for name in separate:
            assert set(storage(base[name])).isdisjoint(storage(turbo[name])), (mode, name)
    residency = tiny.executor.residency
    unique = {id(h.module): tensor_bytes(h.module) for h in residency.held.values()}
    assert residency.on_device() == sum(unique.values())  # a shared part counts once


def tiny_bytes(engine: Engine, mode: str) -> int:
    cls, spec = engine.executor.spec(engine.key(mode))  # type: ignore[arg-type]
    return sum(p.size.bytes for p in cls.parts(spec, "cpu").values())


def test_alternating_modes_on_a_budget_that_holds_one_model(tiny: Engine) -> None:
    """Each turn makes room for its model the way a run does (load, then `acquire`), without rendering:
    the clips themselves are test_memory_server's, end to end."""
    standard, pro = tiny_bytes(tiny, "standard"), tiny_bytes(tiny, "pro")
    budget = max(standard, pro) + min(standard, pro) // 2  # either one, never both
    engine = Engine("tiny", settings=Settings(gpu_memory=budget))
    residency = engine.executor.residency
    models = {"standard": engine.key("standard").ref, "pro": engine.key("pro").ref}
    for turn, mode in enumerate(("standard", "pro", "standard", "pro")):
        lines: list[str] = []
        report = Reporter(lambda p, lines=lines: lines.append(p.stage), None)
        engine.backend(mode, report=report)  # type: ignore[arg-type]
        residency.acquire(models[mode], 0, report)
        residency.release()
        other = models["pro" if mode == "standard" else "standard"]
        if turn:
            assert any(f"moved {other} to CPU memory" in line for line in lines), lines
        if turn >= 2:
            assert any(f"moved {models[mode]} from CPU memory back" in line for line in lines), lines
        assert engine.executor.holds() == (models[mode],)
        assert residency.on_device() <= budget
        assert set(engine.executor.loaded()) == {engine.key(m) for m in models if turn or m == mode}


def test_models_are_dropped_when_cpu_memory_has_no_room(tiny: Engine) -> None:
    budget = tiny_bytes(tiny, "pro") + tiny_bytes(tiny, "standard") // 2
    engine = Engine("tiny", settings=Settings(gpu_memory=budget, offload_memory=0))
    lines: list[str] = []
    report = Reporter(lambda p: lines.append(p.stage), None)
    engine.backend("standard", report=report)
    engine.backend("pro", report=report)
    standard = engine.key("standard")
    assert any(line.startswith(f"memory: dropped {standard.ref}") for line in lines), lines
    assert standard not in engine.executor.loaded()  # it loads again on its next use
    engine.backend("standard", report=report)
    assert any(line.startswith(f"memory: dropped {engine.key('pro').ref}") for line in lines), lines


def test_the_text_encoder_leaves_the_device_while_denoising(_cache_dir: Path) -> None:
    settings = Settings()
    cls, spec = resolve("tiny-wan2.2-ti2v-5b", settings.tiny_dir)
    backend = cls(spec, torch.device("cpu"))
    backend.load()
    residency = Residency(
        torch.device("cpu"), None, offload_memory=None, hashes=FileHashes(settings.cache_dir / "h.json"),
        drop=lambda ref: None,
    )  # fmt: skip
    keys = residency.part_keys("m", cls, spec.source, "resident")
    residency.register("m", backend, keys, streamed=False, shuttle=True, extra=0)
    width, height = backend.model_size((1280, 720))
    inputs = ModelInputs(
        prompt="the sea", negative_prompt="", image=Image.new("RGB", (width, height)), end_image=None,
        width=width, height=height, model_frames=5, seed=0,
    )  # fmt: skip
    for turn in range(2):
        lines: list[str] = []
        residency.acquire("m", 0, Reporter(lambda p, lines=lines: lines.append(p.stage), None))
        with torch.inference_mode():
            backend.generate(inputs, lambda step, total: None)
        residency.release()
        assert residency.held[keys["text_encoder"]].where == "host"
        assert any("text_encoder to CPU memory while denoising" in line for line in lines), lines
        assert turn == 0 or any("text_encoder from CPU memory back" in line for line in lines), lines


def test_memory_settings(monkeypatch) -> None:
    monkeypatch.setenv("I2V_GPU_MEMORY", "40GB")
    monkeypatch.setenv("I2V_OFFLOAD_MEMORY", "off")
    settings = Settings()
    assert (settings.gpu_memory, settings.offload_memory) == (40 * 10**9, 0)
    monkeypatch.setenv("I2V_GPU_MEMORY", "24 GiB")
    assert Settings().gpu_memory == 24 * 2**30
    monkeypatch.setenv("I2V_GPU_MEMORY", "auto")
    assert Settings().gpu_memory is None  # the device's free memory at start
    monkeypatch.setenv("I2V_GPU_MEMORY", "lots")
    with pytest.raises(I2VError, match="I2V_GPU_MEMORY: expected a size like 500MB, 20GB"):
        Settings()
    monkeypatch.setenv("I2V_GPU_MEMORY", "0")
    with pytest.raises(I2VError, match="I2V_GPU_MEMORY: expected a size above zero"):
        Settings()
