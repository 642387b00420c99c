"""The contract every model backend fulfils. A backend is one small file: a spec and two methods.

`load()` builds the diffusers pipeline with `from_pretrained` (a hub id, a local folder, the HF cache);
`generate()` runs it on inputs already fitted to the model's own grid and returns the frames at the
model's native frame rate. Everything else (image checks, exact output size, 24 fps, the mp4) is the
engine's, and the same for every backend.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.distributed.device_mesh import DeviceMesh

from ..footprint import Activations, Component, Part, parts
from ..geometry import Grid
from ..placement import group_mesh, place
from ..speed import GroupPlan, Speed, group_plan

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total); raises `Canceled` to stop the run."""


@dataclass(frozen=True)
class BackendSpec:
    """What a backend declares about its model. A tiny twin is the same spec with small numbers."""

    name: str
    source: str  # hub id or local folder passed to from_pretrained
    fps: int  # native frame rate of the model
    grid: Grid  # the sizes the model generates at
    frame_multiple: int  # frame counts are k * frame_multiple + 1
    takes_end_frame: bool
    steps: int
    guidance: float
    shift: float | None
    modes: tuple[str, ...]  # the Kling modes it is made for (others work, with a logged warning)
    # The repository files `load()` reads, as glob patterns (`i2v pull`, and the pull before a load):
    # one weight format, no root-level single-file checkpoint the diffusers layout does not use.
    # "*" (every file) for a backend that declares nothing.
    files: tuple[str, ...] = ("*",)
    # What the model's own code samples with when the negative prompt is empty (its CLI's or config's).
    default_negative_prompt: str = ""
    needs_end_frame: bool = False  # trained on a first and a last frame: a start image alone is refused

    def negative_prompt_for(self, given: str) -> tuple[str, str]:
        """The negative prompt to sample with for a request's `negative_prompt`, and where it came from.

        Empty means the model's default, as in the references; a non-empty one is used as given.
        """
        if self.guidance <= 1.0:
            return given, "unused (the model samples without guidance)"
        if given:
            return given, "as given"
        if self.default_negative_prompt:
            return self.default_negative_prompt, "the model's default"
        return "", "none"

    def frames_for(self, duration: int) -> int:
        """Frames to generate at the native fps for `duration` seconds, on the model's frame rule."""
        k = round(self.fps * duration / self.frame_multiple)
        return k * self.frame_multiple + 1


@dataclass(frozen=True)
class ModelInputs:
    """One generation, in the model's own terms: images already fitted to width x height."""

    prompt: str
    negative_prompt: str  # what the model is sampled with: the request's, or the model's default
    image: Image.Image
    end_image: Image.Image | None
    width: int
    height: int
    model_frames: int  # at the model's own fps (the output's 24 fps count is KlingRequest.num_frames)
    seed: int
    audio: bool = False
    step_cache: bool = False  # the `fast` preset: cache steps where the model's blocks allow it
    steps: int | None = None  # denoising steps (the first stage's, for two-stage models); None: the model's
    negative_source: str = "as given"  # where `negative_prompt` came from (BackendSpec.negative_prompt_for)

    def generator(self) -> torch.Generator:
        # A CPU generator gives the same noise on every device, so a seed means the same clip anywhere.
        return torch.Generator("cpu").manual_seed(self.seed)


@dataclass
class Clip:
    """Frames (T, H, W, 3) uint8 at `fps`, with an optional soundtrack (samples (C, N) float32, rate)."""

    frames: np.ndarray
    fps: int
    audio: tuple[np.ndarray, int] | None = None


def model_files(folder: str, weights: str = "diffusion_pytorch_model") -> tuple[str, ...]:
    """What `from_pretrained(source, subfolder=folder)` reads: the folder's JSON (config, shard index) and
    its safetensors, in one file or in shards (`-00001-of-00003`); not `.bin` copies, not variants
    (`.fp16.safetensors`). `weights` is "model" for a transformers model (text or image encoder)."""
    return (f"{folder}/*.json", f"{folder}/{weights}.safetensors", f"{folder}/{weights}-*-of-*.safetensors")


def device_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what the weights are published in), float32 on CPU (bf16 is slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Backend(ABC):
    """A model behind the engine: `spec` says what it is, `load` and `generate` run it."""

    spec: ClassVar[BackendSpec]
    tiny_grid: ClassVar[Grid]  # the small grid the tiny twin declares, so CPU tests stay fast
    tiny_steps: ClassVar[int] = 2
    # The `fast` preset's FirstBlockCache threshold; None where diffusers cannot cache the model's blocks.
    cache_threshold: ClassVar[float | None] = None
    # Whether diffusers can split the model's sequence across GPUs (its transformer has a `_cp_plan` that
    # works for this pipeline), and whether this backend can run CFG's two passes on two halves of a
    # device group (`i2v.cfg_parallel`); a model that can do neither runs on one GPU of a group.
    splits_sequence: ClassVar[bool] = False
    # The parts with weights (i2v.footprint), and the folder of i2v/backends/configs holding their
    # architecture configs for when the weights are not on this machine. A plugin may leave both empty:
    # its memory is then unknown, and it is placed as it asks.
    components: ClassVar[tuple[Component, ...]] = ()
    configs: ClassVar[str] = ""
    # The transformers `place` takes to fp8 (fp8 compute in `fast`, fp8 weight storage in `low-vram`);
    # the memory plan counts them the same way.
    fp8_modules: ClassVar[tuple[str, ...]] = ("transformer",)
    splits_cfg: ClassVar[bool] = False

    def __init__(
        self, spec: BackendSpec, device: torch.device, speed: Speed | None = None, *, ranks: int = 1
    ) -> None:
        self.spec = spec  # the instance's spec: the class's, a tiny twin's, or one with a local source
        self.device = device
        self.speed = speed or Speed()
        self.ranks = ranks  # the size of the device group this backend's process belongs to
        self.pipe: Any = None
        self.placement = ""  # what `load` did for speed, for the log: "attention flash, compiled blocks"
        # Parts already loaded for another backend with the same weights (i2v.residency): `load` passes
        # them to `from_pretrained` instead of reading a second copy.
        self.shared: dict[str, torch.nn.Module] = {}
        self.group = self.group_plan(spec, ranks, self.speed)
        self.mesh: DeviceMesh | None = None  # the group's mesh, where the plan has CFG parallel

    @classmethod
    def parts(cls, spec: BackendSpec, device_type: str) -> dict[str, Part]:
        """Each part's size at the dtype it loads in on this kind of device, from its config (no weights)."""
        dtype = device_dtype(torch.device(device_type))
        return parts(cls.components, spec.source, cls.configs, dtype, fp8=cls.fp8_modules)

    @classmethod
    def activations(
        cls, parts: Mapping[str, Part], width: int, height: int, frames: int, *, batch: int, tiled: bool
    ) -> Activations:
        """What one generation at width x height x frames (the model's own) adds to the weights on the
        device, per phase; `batch` is the denoising batch (2 with CFG's passes batched), `tiled` whether
        the VAE decodes in tiles. Each backend states its formula; the default knows nothing."""
        return Activations(encode=0, decode=0, denoise=0, formula="not estimated for this backend")

    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded parts with weights, by component name (what residency moves and shares)."""
        pipe = self.pipe
        found = {}
        for component in self.components:
            module = getattr(pipe, component.name, None) if pipe is not None else None
            if isinstance(module, torch.nn.Module):
                found[component.name] = module
        return found

    @classmethod
    def group_plan(cls, spec: BackendSpec, ranks: int, speed: Speed) -> GroupPlan:
        """How this backend runs on a group of `ranks` (`i2v.speed.group_plan`); known before loading."""
        return group_plan(
            ranks, guided=spec.guidance > 1.0, splits_cfg=cls.splits_cfg,
            splits_sequence=cls.splits_sequence, cfg_parallel=speed.cfg_parallel,
        )  # fmt: skip

    @abstractmethod
    def load(self) -> None:
        """Read the weights with `from_pretrained(self.spec.source)`, then `prepare` them; called once."""

    def prepare(self, pipe: Any) -> None:
        """Everything after the weights are read: scheduler, device, speed-ups; sets `self.pipe`.

        The GPU benchmark hands it full-size pipelines built in memory with random weights, so what is
        timed runs the same code as a loaded model. This default places the pipeline with the speed-ups.
        """
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        if self.group.cfg > 1:
            self.mesh = group_mesh(self.group, self.device)  # collective: every rank prepares in step
        self.placement = place(
            pipe, self.device, self.speed, fp8_modules=self.fp8_modules, group=self.group, mesh=self.mesh
        )

    @property
    def parallel_degree(self) -> int:
        """The ranks one pass's sequence is split across (Ulysses): 1 alone or with CFG parallel on two."""
        return self.group.ulysses

    def model_size(self, output_size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) to generate at for an exact output size; the engine fits the images to it."""
        return self.spec.grid.size_for(output_size[0] / output_size[1], tokens_multiple=self.parallel_degree)

    def total_steps(self, inputs: ModelInputs | None = None) -> int:
        """Denoising steps one generation reports, all stages together."""
        return inputs.steps if inputs is not None and inputs.steps else self.spec.steps

    def warm_up(self) -> None:
        """Run a short generation at the model's 16:9 size, so compilation and kernel tuning happen now
        rather than in the first user's request. A 10 s clip's shape compiles on its first request."""
        width, height = self.model_size((1280, 720))
        image = Image.new("RGB", (width, height), (128, 128, 128))
        negative, source = self.spec.negative_prompt_for("")
        end = image if self.spec.needs_end_frame else None
        inputs = ModelInputs(
            prompt="warm-up", negative_prompt=negative, image=image, end_image=end, width=width,
            height=height, model_frames=self.spec.frames_for(5), seed=0, steps=2, negative_source=source,
        )  # fmt: skip
        with torch.inference_mode():
            self.generate(inputs, lambda step, total: None)

    @abstractmethod
    def generate(self, inputs: ModelInputs, on_step: StepCallback) -> Clip:
        """Run the pipeline; frames come back at the model's native fps and grid size."""

    @classmethod
    @abstractmethod
    def build_tiny(cls, folder: Path) -> None:
        """Build a tiny random-weight twin from configs (no download) and `save_pretrained` it to `folder`."""

    @classmethod
    def tiny_spec(cls, folder: Path) -> BackendSpec:
        return dataclasses.replace(
            cls.spec,
            name=f"tiny-{cls.spec.name}",
            source=str(folder),
            grid=cls.tiny_grid,
            steps=cls.tiny_steps,
        )

    def step_callback(self, on_step: StepCallback, total: int) -> Callable[..., dict[str, Any]]:
        """Adapt `on_step` to diffusers' `callback_on_step_end`."""

        def callback(pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(index + 1, total)
            return {}

        return callback
