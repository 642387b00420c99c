"""The engine on the tiny TI2V-5B twin: exact mp4s, determinism, parity with diffusers, loading, cancel."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode_frames, probe
from diffusers import WanImageToVideoPipeline
from PIL import Image

from i2v import Canceled, Engine, KlingRequest, Progress
from i2v.backends import ensure_tiny, resolve
from i2v.backends.wan_ti2v import WanTI2V
from i2v.errors import InputError, ModelUnavailable
from i2v.geometry import fit_image
from i2v.settings import Settings


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("tiny")


ASPECTS = {
    "16:9": (1280, 720),
    "9:16": (720, 1280),
    "4:3": (800, 600),
    "1:1": (600, 600),
    "2.5:1": (1000, 400),
}
EXPECTED = {
    "16:9": (1280, 720),
    "9:16": (720, 1280),
    "4:3": (960, 720),
    "1:1": (720, 720),
    "2.5:1": (1800, 720),
}


# Every aspect at 5 s; 10 s (the frame count does not depend on the aspect) at a tall and a wide one.
@pytest.mark.parametrize(
    ("aspect", "duration"), [(aspect, 5) for aspect in ASPECTS] + [("9:16", 10), ("2.5:1", 10)]
)
def test_exact_output_geometry(
    engine: Engine, image_file, tmp_path: Path, aspect: str, duration: int
) -> None:
    start = image_file(*ASPECTS[aspect], "JPEG")
    request = KlingRequest(prompt="the sea", start_image=str(start), duration=duration, seed=1)
    result = engine.generate(request, tmp_path / "clip.mp4")
    info = probe(result.path)
    width, height = EXPECTED[aspect]
    assert (info["width"], info["height"]) == (width, height) == (result.width, result.height)
    assert info["fps"] == 24
    assert info["frames"] == result.num_frames == {5: 121, 10: 241}[duration]
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["audio"] == []
    assert not list(tmp_path.glob(".*partial"))  # the temporary name is gone


def test_metadata_records_prompt_seed_and_model(engine: Engine, image_file, tmp_path: Path) -> None:
    request = KlingRequest(prompt="a red boat", negative_prompt="blur", start_image=str(image_file(640, 360)))
    result = engine.generate(request, tmp_path / "clip.mp4")
    comment = json.loads(probe(result.path)["metadata"]["comment"])
    assert comment == {
        "prompt": "a red boat",
        "negative_prompt": "blur",
        "negative_prompt_source": "as given",  # an empty one would be the model's default
        "seed": result.seed,  # a random seed was drawn and is reported
        "model": "tiny-wan2.2-ti2v-5b",
        "mode": "standard",
        "duration": 5,
    }
    assert probe(result.path)["metadata"]["title"] == "a red boat"


def test_same_seed_same_frames_other_seed_other_frames(engine: Engine, image_file, tmp_path: Path) -> None:
    start = str(image_file(640, 360))
    first = engine.generate(KlingRequest(prompt="waves", start_image=start, seed=42), tmp_path / "a.mp4")
    again = engine.generate(KlingRequest(prompt="waves", start_image=start, seed=42), tmp_path / "b.mp4")
    other = engine.generate(KlingRequest(prompt="waves", start_image=start, seed=43), tmp_path / "c.mp4")
    frames = decode_frames(first.path)
    assert np.array_equal(frames, decode_frames(again.path))
    assert not np.array_equal(frames, decode_frames(other.path))


def test_frames_equal_the_stock_diffusers_pipeline(engine: Engine, image_file) -> None:
    """Our engine adds nothing to the model's output: same components, inputs and seed, same frames."""
    request = KlingRequest(
        prompt="a cat runs", negative_prompt="dark", start_image=str(image_file(800, 600)), seed=5
    )
    rendered = engine.render(request)
    inputs, spec = rendered.inputs, rendered.backend.spec
    # Wan's own UniPC schedule is the one thing we swap in (test_parity.py checks it against Wan's code).
    ours = rendered.backend.pipe.scheduler
    stock = WanImageToVideoPipeline.from_pretrained(
        spec.source, scheduler=type(ours).from_config(ours.config)
    )
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        image=inputs.image,
        prompt="a cat runs",
        negative_prompt="dark",
        height=inputs.height,
        width=inputs.width,
        num_frames=121,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).frames[0]
    assert (inputs.width, inputs.height) == spec.grid.size_for(4 / 3)
    assert np.array_equal(rendered.clip.frames, expected)


def test_the_start_image_conditions_the_clip(engine: Engine, image_file) -> None:
    """The model gets the start image fitted to its grid, and a different start image changes the clip.

    (With random weights the VAE does not reconstruct the image, so pixel closeness to it says nothing.)
    """
    start = image_file(1000, 600, seed=3)
    rendered = engine.render(KlingRequest(prompt="sky", start_image=str(start), seed=0))
    with Image.open(start) as original:
        fitted = fit_image(original.convert("RGB"), (rendered.inputs.width, rendered.inputs.height))
    assert np.array_equal(np.asarray(rendered.inputs.image), np.asarray(fitted))
    other = engine.render(KlingRequest(prompt="sky", start_image=str(image_file(1000, 600, seed=9)), seed=0))
    assert not np.array_equal(rendered.clip.frames[0], other.clip.frames[0])


def test_tiny_twin_round_trips_through_save_and_from_pretrained(tmp_path: Path) -> None:
    """The tiny twin is saved with save_pretrained and loaded by the same `load()` real weights use."""
    folder = ensure_tiny(WanTI2V, tmp_path)
    assert (folder / "model_index.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae",
    ]  # fmt: skip
    assert ensure_tiny(WanTI2V, tmp_path) == folder  # built once
    # The real backend spec pointed at a local folder of weights, as a user with a download would do.
    cls, spec = resolve(f"wan2.2-ti2v-5b={folder}", tmp_path)
    assert cls is WanTI2V and spec.name == "wan2.2-ti2v-5b" and spec.source == str(folder)
    backend = cls(spec, torch.device("cpu"))
    backend.load()
    reference = WanTI2V.tiny_spec(folder)
    loaded = WanTI2V(reference, torch.device("cpu"))
    loaded.load()
    for name, tensor in backend.pipe.transformer.state_dict().items():
        assert torch.equal(tensor, loaded.pipe.transformer.state_dict()[name])
    assert backend.pipe.vae.dtype == torch.float32
    assert backend.pipe.scheduler.config.flow_shift == 5.0
    assert backend.pipe.config.expand_timesteps is True


def test_hub_ids_load_from_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves through the Hugging Face cache; the download itself cannot happen here, so the
    test lays the tiny weights out as a cached snapshot and turns the hub off."""
    folder = ensure_tiny(WanTI2V, tmp_path / "tiny")
    snapshot = tmp_path / "hub" / "models--acme--tiny-ti2v" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    engine = Engine("wan2.2-ti2v-5b=acme/tiny-ti2v", settings=Settings(cache_dir=tmp_path))
    backend = engine.backend("standard")
    assert backend.spec.source == "acme/tiny-ti2v"
    assert engine.backend("standard") is backend  # loaded once, resident afterwards
    with pytest.raises(ModelUnavailable, match=r"could not load wan2\.2-ti2v-5b from acme/not-cached"):
        Engine("wan2.2-ti2v-5b=acme/not-cached", settings=Settings(cache_dir=tmp_path)).backend("standard")


def test_progress_reports_stages_and_steps(engine: Engine, image_file, tmp_path: Path) -> None:
    seen: list[Progress] = []
    engine.generate(
        KlingRequest(prompt="sky", start_image=str(image_file(640, 360)), seed=1),
        tmp_path / "a.mp4",
        on_progress=seen.append,
    )
    stages = [p.stage for p in seen]
    assert stages[:2] == ["loading inputs", "loading model"]
    assert [(p.step, p.total) for p in seen if p.stage == "denoising"] == [(0, 2), (1, 2), (2, 2)]
    assert stages[-2:] == ["decoding", "encoding video"]


def test_cancel_stops_between_steps_and_leaves_no_file(engine: Engine, image_file, tmp_path: Path) -> None:
    cancel = threading.Event()
    steps: list[int] = []

    def on_progress(progress: Progress) -> None:
        if progress.stage == "denoising" and progress.step:
            steps.append(progress.step)
            cancel.set()

    request = KlingRequest(prompt="sky", start_image=str(image_file(640, 360)), seed=1)
    with pytest.raises(Canceled):
        engine.generate(request, tmp_path / "a.mp4", on_progress=on_progress, cancel=cancel)
    assert steps == [1]
    assert list(tmp_path.glob("*.mp4")) == []


def test_cancel_during_the_encode_leaves_no_file(engine: Engine, image_file, tmp_path: Path) -> None:
    cancel = threading.Event()
    stages: list[str] = []

    def on_progress(progress: Progress) -> None:
        stages.append(progress.stage)
        if progress.stage == "encoding video":
            cancel.set()  # the encoder has opened its partial file when it next checks

    request = KlingRequest(prompt="sky", start_image=str(image_file(640, 360)), seed=1)
    with pytest.raises(Canceled):
        engine.generate(request, tmp_path / "a.mp4", on_progress=on_progress, cancel=cancel)
    assert stages[-1] == "encoding video"
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".png"] == []  # no mp4, no hidden partial


def test_bad_requests_fail_before_the_model_runs(engine: Engine, image_file) -> None:
    with pytest.raises(InputError) as info:
        engine.render(KlingRequest(prompt="x", start_image=str(image_file(200, 200))))
    assert info.value.field == "start_image"
    with pytest.raises(ModelUnavailable, match="unknown model 'nope'"):
        Engine("nope").render(KlingRequest(prompt="x", start_image=str(image_file(400, 400))))


def test_a_backend_without_end_frames_refuses_one(image_file) -> None:
    """TI2V-5B ignores `last_image` silently in diffusers; configured for pro, it must refuse one instead."""
    engine = Engine(
        settings=Settings(models={"standard": "tiny-wan2.2-ti2v-5b", "pro": "tiny-wan2.2-ti2v-5b"})
    )
    assert engine.backend("pro").spec.takes_end_frame is False
    start, end = str(image_file(640, 360, seed=1)), str(image_file(640, 360, seed=2))
    with pytest.raises(InputError) as info:
        engine.render(KlingRequest(prompt="x", start_image=start, end_image=end, mode="pro"))
    assert info.value.field == "end_image" and "cannot take an end frame" in info.value.rule
