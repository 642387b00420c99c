"""Sampling as the models' own code does, checked on the tiny twins through the real pipelines.

The schedules are recorded at the transformer (a forward pre-hook on `pipe.transformer`: the timesteps
it is called with) and compared with the reference algorithms, re-implemented below from their sources:

- Wan2.2 TI2V-5B, Wan2.1 FLF2V-14B: `FlowUniPCMultistepScheduler.__init__` and `set_timesteps(steps,
  shift=...)` in `wan/utils/fm_solvers_unipc.py` (Wan-Video/Wan2.2 @ 42bf4cfaa384bc21833865abc2f9e6c0e67233dc,
  the same file in Wan-Video/Wan2.1 @ 9737cba9c1c3c4d04b33fcad41c111989865d315), as `wan/textimage2video.py`
  `i2v` (shift 5, per-token timesteps 0 on the start frame) and `wan/first_last_frame2video.py` (shift 16,
  `generate.py`) call it.
- FastWan2.2-TI2V-5B: `DmdDenoisingStage.forward` in `fastvideo/pipelines/stages/denoising.py`
  (hao-ai-lab/FastVideo @ 2f3d4074064e4d86f99dc784ebbaa296e6f5925f), with `add_noise` /
  `pred_noise_to_pred_video` looking sigmas up in its `FlowMatchEulerDiscreteScheduler(shift=8.0)` table
  (`fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py`, `fastvideo/models/utils.py`).
- LTX-2: `LTX2Scheduler.execute` in `packages/ltx-core/src/ltx_core/components/schedulers.py`, called
  without a latent by `packages/ltx-pipelines/src/ltx_pipelines/ti2vid_two_stages.py` and
  `keyframe_interpolation.py`; the distilled sigmas in `ltx_pipelines/utils/constants.py`
  (Lightricks/LTX-2 @ 400fd31054597515f47125691032c04b1c3ee24e).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import probe
from diffusers import WanImageToVideoPipeline
from packaging.version import Version
from PIL import Image
from safetensors import safe_open
from transformers import UMT5Config, UMT5EncoderModel

from i2v import Engine, KlingRequest
from i2v.backends import Backend, resolve
from i2v.backends.base import ModelInputs
from i2v.backends.ltx2 import LTX2_NEGATIVE_PROMPT
from i2v.backends.wan_flf2v import FLF2V_NEGATIVE_PROMPT
from i2v.backends.wan_ti2v import TIED_UMT5_SINCE, WAN_NEGATIVE_PROMPT
from i2v.engine import Plan, Rendered
from i2v.errors import InputError, ModelUnavailable
from i2v.progress import Reporter
from i2v.retime import retime
from i2v.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PROMPT = "a cat moves slowly through the city at night"


# The references, re-implemented from their sources (see the module docstring).


def wan_reference(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    then .set_timesteps(steps, shift=shift): (int64 timesteps, float32 sigmas ending in 0)."""
    train = 1000
    alphas = np.linspace(1, 1 / train, train)[::-1].copy()
    table = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)  # shift 1 leaves the table as is
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * train).to(dtype=torch.int64)
    return timesteps, torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))


FASTVIDEO_DMD_STEPS = [1000, 757, 522]  # FastWan2_2_TI2V_5B_Config.dmd_denoising_steps


def fastvideo_sigma(timestep: int, shift: float = 8.0) -> float:
    """The sigma FastVideo's DMD stage converts and re-noises with for a timestep: the nearest entry of its
    FlowMatchEulerDiscreteScheduler(shift=8.0) table (DmdDenoisingStage builds it, never sets timesteps)."""
    train = 1000
    timesteps = torch.from_numpy(np.linspace(1, train, train, dtype=np.float32)[::-1].copy())
    sigmas = timesteps / train
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    table = sigmas * train
    return float(sigmas[torch.argmin((table.double() - timestep).abs())])


def ltx2_reference(steps: int, terminal: float = 0.1) -> torch.Tensor:
    """LTX2Scheduler().execute(steps) with no latent: the 4096-token anchor, stretched to `terminal`."""
    base_anchor, max_anchor, max_shift, base_shift = 1024, 4096, 2.05, 0.95
    tokens = max_anchor  # `latent is None` -> default_number_of_tokens
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    mm = (max_shift - base_shift) / (max_anchor - base_anchor)
    b = base_shift - mm * base_anchor
    sigma_shift = tokens * mm + b
    sigmas = torch.where(sigmas != 0, math.exp(sigma_shift) / (math.exp(sigma_shift) + (1 / sigmas - 1)), 0)
    non_zero = sigmas != 0
    one_minus_z = 1.0 - sigmas[non_zero]
    scale_factor = one_minus_z[-1] / (1.0 - terminal)
    sigmas[non_zero] = 1.0 - (one_minus_z / scale_factor)
    return sigmas.to(torch.float32)


LTX2_DISTILLED = [
    1.0,
    0.99375,
    0.9875,
    0.98125,
    0.975,
    0.909375,
    0.725,
    0.421875,
    0.0,
]  # DISTILLED_SIGMA_VALUES
LTX2_STAGE_2 = [0.909375, 0.725, 0.421875, 0.0]  # STAGE_2_DISTILLED_SIGMA_VALUES


# Our backends on their tiny twins, and what their transformers are called with.

_loaded: dict[str, Backend] = {}


def backend(name: str) -> Backend:
    """The tiny twin of a registered backend, loaded once by its ordinary `load()`."""
    if name not in _loaded:
        cls, spec = resolve(f"tiny-{name}", Settings().tiny_dir)
        _loaded[name] = cls(spec, CPU)
        _loaded[name].load()
    return _loaded[name]


@dataclasses.dataclass
class Call:
    batch: int
    timestep: torch.Tensor  # as the pipeline passed it: per sample, or per sample and token


@contextmanager
def transformer_calls(model: Backend) -> Iterator[list[Call]]:
    calls: list[Call] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(Call(kwargs["hidden_states"].shape[0], kwargs["timestep"].detach().float().clone()))

    handle = model.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def run(
    model: Backend,
    *,
    steps: int | None,
    end: bool = False,
    size: tuple[int, int] = (1280, 720),
    seconds: int = 1,
    negative: str = "",
    seed: int = 1,
) -> tuple[list[Call], np.ndarray]:
    """One generation through our backend and the real pipeline; the transformer's calls and the frames."""
    width, height = model.model_size(size)
    start = Image.new("RGB", (width, height), (90, 140, 200))
    inputs = ModelInputs(
        prompt=PROMPT, negative_prompt=negative, image=start,
        end_image=Image.new("RGB", (width, height), (200, 120, 40)) if end else None,
        width=width, height=height,
        model_frames=model.spec.frames_for(seconds) if seconds else model.spec.frame_multiple + 1,
        seed=seed, steps=steps,
    )  # fmt: skip
    with transformer_calls(model) as calls, torch.inference_mode():
        clip = model.generate(inputs, lambda step, total: None)
    return calls, clip.frames


def peaks(calls: list[Call]) -> list[float]:
    """The noise level of each call: the largest timestep (conditioned tokens sit at 0)."""
    return [float(call.timestep.max()) for call in calls]


@pytest.mark.parametrize("steps", [2, 7, 50])
def test_wan22_ti2v_transformer_sees_wan_reference_timesteps(steps: int) -> None:
    model = backend("wan2.2-ti2v-5b")
    calls, _ = run(model, steps=steps, seconds=0)
    timesteps, sigmas = wan_reference(steps, shift=5.0)
    expected = [float(t) for t in timesteps for _ in range(2)]  # CFG: prompt, then negative prompt
    assert peaks(calls) == expected
    assert [call.batch for call in calls] == [1] * 2 * steps
    assert all(float(call.timestep.min()) == 0.0 for call in calls)  # the start frame's tokens: t = 0
    torch.testing.assert_close(model.pipe.scheduler.sigmas, sigmas, rtol=0, atol=0)
    if steps == 50:  # where diffusers' own spacing would differ: its last timestep is 96
        assert timesteps[-1] == 92


@pytest.mark.parametrize("steps", [None, 2, 8])
def test_fastwan_transformer_sees_the_unwarped_dmd_timesteps(steps: int | None) -> None:
    """Three DMD steps whatever is asked, one forward each (no CFG); sigma t/1000, last step to 0."""
    model = backend("fastwan2.2-ti2v-5b")
    calls, _ = run(model, steps=steps, seconds=0)
    assert peaks(calls) == [float(t) for t in FASTVIDEO_DMD_STEPS]
    assert [call.batch for call in calls] == [1, 1, 1]
    sigmas = model.pipe.scheduler.sigmas.tolist()
    assert sigmas == pytest.approx([t / 1000 for t in FASTVIDEO_DMD_STEPS] + [0.0], abs=1e-7)
    for ours, step in zip(sigmas, FASTVIDEO_DMD_STEPS, strict=False):
        assert abs(ours - fastvideo_sigma(step)) < 5e-4  # FastVideo's table lookup lands within 0.0005
    assert model.pipe.scheduler.config.stochastic_sampling  # x0, then fresh noise to the next sigma


@pytest.mark.parametrize("steps", [2, 7, 50])
def test_wan21_flf2v_transformer_sees_wan_reference_timesteps(steps: int) -> None:
    model = backend("wan2.1-flf2v-14b")
    calls, _ = run(model, steps=steps, end=True, seconds=0)
    timesteps, sigmas = wan_reference(steps, shift=16.0)
    assert peaks(calls) == [float(t) for t in timesteps for _ in range(2)]
    assert [tuple(call.timestep.shape) for call in calls] == [(1,)] * 2 * steps
    torch.testing.assert_close(model.pipe.scheduler.sigmas, sigmas, rtol=0, atol=0)
    assert model.spec.guidance == 5.0  # generate.py's --sample_guide_scale


@pytest.mark.parametrize(
    ("steps", "size", "seconds", "end"),
    [(8, (1280, 720), 1, False), (20, (720, 1280), 0, True), (40, (1080, 1080), 0, True)],
)
def test_ltx2_transformer_sees_lightricks_schedule(
    steps: int, size: tuple[int, int], seconds: int, end: bool
) -> None:
    """Stage 1: LTX2Scheduler's sigmas, each step one CFG forward over a batch of two, one STG and one
    modality forward (4 forward-equivalents); stage 2: the 3 distilled sigmas, one forward each."""
    model = backend("ltx-2")
    calls, _ = run(model, steps=steps, size=size, seconds=seconds, end=end)
    stage1, stage2 = calls[: 3 * steps], calls[3 * steps :]
    reference = ltx2_reference(steps)
    expected = [float(sigma) for sigma in reference[:-1] for _ in range(3)]
    np.testing.assert_allclose(np.array(peaks(stage1)) / 1000, expected, rtol=0, atol=2e-6)
    assert [call.batch for call in stage1] == [2, 1, 1] * steps
    np.testing.assert_allclose(np.array(peaks(stage2)) / 1000, LTX2_STAGE_2[:-1], rtol=0, atol=1e-7)
    assert [call.batch for call in stage2] == [1, 1, 1]


def test_ltx2_schedule_does_not_depend_on_size_length_or_keyframes() -> None:
    """diffusers would shift by the token count (an end keyframe adds tokens); Lightricks' does not."""
    model = backend("ltx-2")
    runs = [
        run(model, steps=8, size=(1280, 720), seconds=0)[0],
        run(model, steps=8, size=(1280, 720), seconds=0, end=True)[0],
        run(model, steps=8, size=(720, 1280), seconds=1)[0],
    ]
    first = peaks(runs[0])
    assert all(peaks(calls) == first for calls in runs[1:])


def test_ltx2_distilled_transformer_sees_the_distilled_sigmas() -> None:
    model = backend("ltx-2-distilled")
    calls, _ = run(model, steps=None, end=True)
    expected = LTX2_DISTILLED[:-1] + LTX2_STAGE_2[:-1]
    np.testing.assert_allclose(np.array(peaks(calls)) / 1000, expected, rtol=0, atol=1e-7)
    assert [call.batch for call in calls] == [1] * len(expected)  # no guidance: one forward a step


def test_ltx2_guidance_is_the_ltx_2_0_reference() -> None:
    """LTX_2_PARAMS in ltx-pipelines utils/constants.py: what the pipeline is called with."""
    from diffusers import LTX2ConditionPipeline

    model = backend("ltx-2")
    seen: dict[str, object] = {}
    original = LTX2ConditionPipeline.__call__

    def spy(self: object, *args: object, **kwargs: object) -> object:
        seen.setdefault("stage1", kwargs)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LTX2ConditionPipeline, "__call__", spy)
        run(model, steps=2)
    stage1 = seen["stage1"]
    assert isinstance(stage1, dict)
    assert {key: stage1[key] for key in ("guidance_scale", "stg_scale", "modality_scale", "guidance_rescale")} == {
        "guidance_scale": 3.0, "stg_scale": 1.0, "modality_scale": 3.0, "guidance_rescale": 0.7,
    }  # fmt: skip
    assert (stage1["audio_guidance_scale"], stage1["audio_stg_scale"], stage1["audio_guidance_rescale"]) == (
        7.0, 1.0, 0.7,
    )  # fmt: skip
    # block 29 on the real 48-block model; the tiny twin has two blocks, so its last
    assert stage1["spatio_temporal_guidance_blocks"] == [model.pipe.transformer.config.num_layers - 1]


# Default negative prompts.

DEFAULTS = {
    "wan2.2-ti2v-5b": WAN_NEGATIVE_PROMPT,
    "wan2.1-flf2v-14b": FLF2V_NEGATIVE_PROMPT,
    "ltx-2": LTX2_NEGATIVE_PROMPT,
}


def test_each_backend_declares_its_reference_default() -> None:
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，") and WAN_NEGATIVE_PROMPT.endswith("倒着走")
    assert FLF2V_NEGATIVE_PROMPT == "镜头切换，镜头晃动，" + WAN_NEGATIVE_PROMPT
    assert LTX2_NEGATIVE_PROMPT.startswith("has_subtitles, has_blurbox,")
    for name, default in DEFAULTS.items():
        assert backend(name).spec.default_negative_prompt == default
    for name in ("fastwan2.2-ti2v-5b", "ltx-2-distilled"):  # no guidance: no negative prompt at all
        spec = backend(name).spec
        assert spec.negative_prompt_for("") == ("", "unused (the model samples without guidance)")


def short(plan: Plan, frames: int) -> Plan:
    """The same plan with fewer frames: what the negative prompt does shows in any clip length."""
    return dataclasses.replace(plan, inputs=dataclasses.replace(plan.inputs, model_frames=frames))


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_an_empty_negative_prompt_samples_with_the_models_default(name: str, image_file) -> None:
    """`negative_prompt: ""` gives the frames of the default written out; sampling with a literally empty
    negative prompt gives other frames, so the equality is the default's doing."""
    model = backend(name)
    default = DEFAULTS[name]
    tokens = model.pipe.tokenizer(default).input_ids
    assert model.pipe.tokenizer.unk_token_id not in tokens  # the twin encodes the default, word by word
    mode = "standard" if name == "wan2.2-ti2v-5b" else "pro"
    engine = Engine(settings=Settings(models={"standard": f"tiny-{name}", "pro": f"tiny-{name}"}))
    images = {"start_image": str(image_file(640, 360, seed=1))}
    if model.spec.needs_end_frame:
        images["end_image"] = str(image_file(640, 360, seed=2))
    report = Reporter(None, None)
    frames = model.spec.frame_multiple + 1

    def render(negative: str) -> Rendered:
        request = KlingRequest(prompt=PROMPT, mode=mode, negative_prompt=negative, seed=7, **images)
        return engine.run(short(engine.plan(request, report), frames), report)

    empty, written = render(""), render(default)
    assert empty.inputs.negative_prompt == default and empty.inputs.negative_source == "the model's default"
    assert written.inputs.negative_source == "as given"
    np.testing.assert_array_equal(empty.clip.frames, written.clip.frames)
    literal = dataclasses.replace(empty.inputs, negative_prompt="")
    with torch.inference_mode():
        other = empty.backend.generate(literal, lambda step, total: None).frames
    assert np.abs(other - empty.clip.frames).max() > 1e-3


def test_the_mp4_says_which_negative_prompt_was_used(image_file, tmp_path: Path) -> None:
    engine = Engine(settings=Settings(models={"standard": "tiny-wan2.2-ti2v-5b", "pro": "tiny-ltx-2"}))
    start = str(image_file(640, 360))
    result = engine.generate(KlingRequest(prompt="sky", start_image=start, seed=1), tmp_path / "a.mp4")
    comment = json.loads(probe(result.path)["metadata"]["comment"])
    assert comment["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert comment["negative_prompt_source"] == "the model's default"
    # (a given one is recorded "as given": tests/test_engine.py::test_metadata_records_prompt_seed_and_model)


# The UMT5 text encoder, saved and loaded the way Wan's is.


def test_umt5_tie_check_fails_loudly_on_an_untied_load_and_passes_on_the_pinned_transformers() -> None:
    cls, spec = resolve("tiny-wan2.2-ti2v-5b", Settings().tiny_dir)
    folder = Path(spec.source) / "text_encoder"
    # Saved like Wan's checkpoint: the untied flag, and the one embedding tensor `shared.weight`.
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(folder / "model.safetensors"), "pt") as tensors:
        keys = set(tensors.keys())
    assert "shared.weight" in keys and not any("embed_tokens" in key for key in keys)

    loaded = cls(spec, CPU)
    loaded.load()  # the pinned transformers ties it, so the check passes
    text_encoder = loaded.pipe.text_encoder
    assert text_encoder.encoder.embed_tokens.weight is text_encoder.shared.weight

    # What transformers 5.0.0-5.2.0 do: the config keeps tie_word_embeddings false and nothing ties the
    # encoder's embedding, so it stays at its initialisation while `shared` holds the trained weights.
    config = UMT5Config.from_pretrained(folder)
    config.tie_word_embeddings = False
    untied = UMT5EncoderModel.from_pretrained(folder, config=config)
    assert not torch.equal(untied.encoder.embed_tokens.weight, untied.shared.weight)
    pipe = WanImageToVideoPipeline.from_pretrained(spec.source, text_encoder=untied)
    with pytest.raises(ModelUnavailable) as error:
        cls(spec, CPU).prepare(pipe)
    message = str(error.value)
    assert "untied" in message and "PR #43880" in message and f"transformers>={TIED_UMT5_SINCE}" in message


def test_transformers_floor_is_the_first_release_with_the_fix() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"transformers>={TIED_UMT5_SINCE}" in project["dependencies"]
    assert Version(version("transformers")) >= Version(TIED_UMT5_SINCE)


# FLF2V's end frame, and the retime at a cut.


def test_flf2v_refuses_a_start_image_alone(image_file) -> None:
    engine = Engine("tiny-wan2.1-flf2v-14b")
    request = KlingRequest(prompt=PROMPT, mode="pro", start_image=str(image_file(640, 360)))
    with pytest.raises(InputError) as info:
        engine.render(request)
    assert info.value.field == "end_image" and "needs an end frame" in info.value.rule


def test_retime_repeats_the_nearer_frame_at_a_scene_cut() -> None:
    """A 2 s clip at 16 fps with a cut after 1 s: the 24 fps frame between the two sides is the nearer
    input frame (up to the YUV round trip), not a warp of one scene into the other."""
    y, x = np.mgrid[0:64, 0:96]
    frames = []
    for i in range(33):
        if i <= 16:  # scene A: a horizontal ramp moving right
            frame = np.stack([(x + 2 * i) % 96 * 2, y * 3, np.full_like(x, 60)], -1)
        else:  # scene B: other colours, moving down
            frame = np.stack([np.full_like(x, 200), (5 * y + 3 * i) % 255, 2 * x % 255], -1)
        frames.append(frame.astype(np.uint8))
    clip = np.stack(frames)
    out = retime(clip, 16, 24, 49).astype(int)

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b.astype(int)).mean())

    # Input 16 is at 1.0 s (output 24), input 17 at 1.0625 s; output 25 (1.0417 s) lies across the cut.
    assert distance(out[24], clip[16]) < 1.0
    assert min(distance(out[25], clip[16]), distance(out[25], clip[17])) < 1.0
    # (within a scene the frames between are synthesised: test_pro.py::test_retime_keeps_the_frames...)
