"""The engine: one Kling request in, one exact mp4 out.

    plan:  request -> images fetched and checked -> output size from the start image -> backend for the
           mode -> inputs fitted to the model's grid
    run:   diffusers pipeline -> frames on the model's grid
    write: frames at 24 fps -> mp4 at exact size

Pipelines load once per backend and stay resident across requests.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends import Backend, Clip, ModelInputs, resolve
from .errors import InputError, ModelUnavailable, OutputError
from .geometry import fit_image, output_size
from .images import ImageLoader
from .progress import ProgressCallback, Reporter
from .request import FPS, KlingRequest
from .retime import retime
from .settings import Settings
from .speed import REQUEST_PRESETS
from .video import to_uint8, write_mp4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What a generation produced and how."""

    path: Path
    seed: int
    model: str
    width: int
    height: int
    num_frames: int
    fps: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A request resolved to one model run: all a GPU of a context-parallel group needs to run it too."""

    mode: str
    preset: str
    inputs: ModelInputs
    size: tuple[int, int]  # the exact output (width, height)


@dataclass
class Rendered:
    """A clip at the model's grid and native fps, before it is mapped to the exact output."""

    clip: Clip
    inputs: ModelInputs
    backend: Backend
    size: tuple[int, int]  # the exact output (width, height)


class Engine:
    """Runs requests on the backends configured for each mode.

    `model` is None or "default" (the configured model per mode), "tiny" (the tiny twins of those), or a
    model reference used for every mode it serves (see `i2v.backends.resolve`).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        settings: Settings | None = None,
        loader: ImageLoader | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.model = model
        self.device = torch.device(
            device or self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.loader = loader or ImageLoader()
        self._backends: dict[tuple[str, str], Backend] = {}
        self._lock = threading.Lock()

    def preset(self, request: KlingRequest) -> str:
        """The request's preset, else the server's (`low-vram` is how models load, not a per-request one)."""
        if request.preset is not None:
            return request.preset
        return self.settings.speed.preset if self.settings.speed.preset in REQUEST_PRESETS else "default"

    def model_ref(self, mode: str, preset: str = "default") -> str:
        """The model for a mode; `turbo` picks the mode's distilled model (Settings.turbo_models)."""
        turbo = preset == "turbo"
        configured = (self.settings.turbo_models if turbo else self.settings.models)[mode]
        if self.model in (None, "default"):
            return configured
        if self.model == "tiny":
            return "tiny-" + configured.partition("=")[0]
        return self.model  # one explicit model serves every mode and preset

    def backend(self, mode: str, preset: str = "default") -> Backend:
        """The loaded backend for a mode; the first call loads its weights, later calls reuse them."""
        cls, spec = resolve(self.model_ref(mode, preset), self.settings.tiny_dir)
        if mode not in spec.modes:  # allowed (the output is still mapped to the exact size), but worth a note
            log.warning(
                "%s is made for %s mode, configured here for %s", spec.name, "/".join(spec.modes), mode
            )
        with self._lock:
            key = (spec.name, spec.source)
            if key not in self._backends:
                backend = cls(spec, self.device, self.settings.speed)
                try:
                    backend.load()
                except (OSError, ValueError) as exc:
                    raise ModelUnavailable(f"could not load {spec.name} from {spec.source}: {exc}") from exc
                log.info("loaded %s on %s (%s)", spec.name, self.device, backend.placement)
                self._backends[key] = backend
            return self._backends[key]

    def warm_up(self, modes: tuple[str, ...] = ("standard", "pro")) -> dict[str, float]:
        """Load each mode's model and run a short clip through it (compiles, tunes kernels); seconds per mode.

        Speed.warmup (on with CUDA) makes the server do this before it reports READY.
        """
        seconds = {}
        for mode in modes:
            clock = time.perf_counter()
            self.backend(mode).warm_up()
            seconds[mode] = time.perf_counter() - clock
        return seconds

    def plan(self, request: KlingRequest, report: Reporter, timings: dict[str, float] | None = None) -> Plan:
        """Resolve a request to one model run: fetch and check its images, load the backend, fix the seed
        and fit the inputs to the model's grid."""
        timings = timings if timings is not None else {}
        clock = time.perf_counter()
        report("loading inputs")
        start = self.loader.load(request.start_image, "start_image")
        end = self.loader.load(request.end_image, "end_image") if request.end_image is not None else None
        size = output_size(start.width, start.height, request.short_side)
        timings["inputs"] = time.perf_counter() - clock

        report("loading model")
        clock = time.perf_counter()
        preset = self.preset(request)
        backend = self.backend(request.mode, preset)
        spec = backend.spec
        if end is not None and not spec.takes_end_frame:
            raise InputError(
                "end_image", f"model {spec.name} cannot take an end frame; configure a keyframe model"
            )
        if end is None and spec.needs_end_frame:
            raise InputError(
                "end_image",
                f"model {spec.name} needs an end frame (it was trained on a first and a last frame); "
                f"send end_image, or configure a start-image model for mode {request.mode}",
            )
        timings["load"] = time.perf_counter() - clock

        negative, negative_source = spec.negative_prompt_for(request.negative_prompt)
        # One line of what runs, per request: the worker copies the engine's log into the prediction's.
        log.info(
            "running %s on %s (%s); negative prompt: %s",
            spec.name, self.device, backend.placement, negative_source,
        )  # fmt: skip
        width, height = backend.model_size(size)
        inputs = ModelInputs(
            prompt=request.prompt,
            negative_prompt=negative,
            negative_source=negative_source,
            image=fit_image(start, (width, height)),
            end_image=fit_image(end, (width, height)) if end is not None else None,
            width=width,
            height=height,
            num_frames=spec.frames_for(request.duration),
            seed=request.seed if request.seed is not None else secrets.randbelow(2**32),
            audio=request.audio,
            # Ranks of a context-parallel group would each decide on their own share of the tokens.
            step_cache=preset == "fast" and backend.parallel_degree == 1,
        )
        return Plan(mode=request.mode, preset=preset, inputs=inputs, size=size)

    def run(self, plan: Plan, report: Reporter, timings: dict[str, float] | None = None) -> Rendered:
        """Run the model on a plan; the frames come back on the model's grid and at its fps."""
        timings = timings if timings is not None else {}
        backend, inputs = self.backend(plan.mode, plan.preset), plan.inputs

        def on_step(step: int, total: int) -> None:
            report("denoising", step, total)
            if step == total:
                report("decoding")

        clock = time.perf_counter()
        report("denoising", 0, backend.total_steps(inputs))
        with torch.inference_mode():
            clip = backend.generate(inputs, on_step)
        timings["generate"] = time.perf_counter() - clock
        report.check_cancel()
        return Rendered(clip=clip, inputs=inputs, backend=backend, size=plan.size)

    def render(
        self,
        request: KlingRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        timings: dict[str, float] | None = None,
    ) -> Rendered:
        """Plan and run a request; the frames come back on the model's grid and at its fps."""
        report = Reporter(on_progress, cancel)
        return self.run(self.plan(request, report, timings), report, timings)

    def generate(
        self,
        request: KlingRequest,
        output: str | Path,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        """Render a request to an mp4 at `output` (H.264, 24 fps, exact size); returns what was made."""
        timings: dict[str, float] = {}
        rendered = self.render(request, on_progress=on_progress, cancel=cancel, timings=timings)
        return self.write(rendered, request, output, Reporter(on_progress, cancel), timings)

    def write(
        self,
        rendered: Rendered,
        request: KlingRequest,
        output: str | Path,
        report: Reporter,
        timings: dict[str, float] | None = None,
    ) -> Result:
        """Map rendered frames to 24 fps and the exact size, and encode the mp4."""
        timings = timings if timings is not None else {}
        clip, inputs, spec = rendered.clip, rendered.inputs, rendered.backend.spec
        frames = to_uint8(clip.frames) if clip.frames.dtype != "uint8" else clip.frames
        if clip.fps != FPS:
            report("retiming")
            clock = time.perf_counter()
            frames = retime(frames, clip.fps, FPS, request.num_frames, checkpoint=report.check_cancel)
            timings["retime"] = time.perf_counter() - clock
        if len(frames) != request.num_frames:
            raise RuntimeError(f"{spec.name} returned {len(frames)} frames, expected {request.num_frames}")

        report("encoding video")
        clock = time.perf_counter()
        metadata = {
            "title": request.prompt,
            "comment": {
                "prompt": request.prompt,
                "negative_prompt": inputs.negative_prompt,  # what the model was sampled with
                "negative_prompt_source": inputs.negative_source,
                "seed": inputs.seed,
                "model": spec.name,
                "mode": request.mode,
                "duration": request.duration,
            },
        }
        try:
            path = write_mp4(
                frames,
                output,
                size=rendered.size,
                fps=FPS,
                metadata=metadata,
                preset=self.settings.x264_preset,
                crf=self.settings.x264_crf,
                audio=clip.audio if request.audio else None,
                checkpoint=report.check_cancel,  # a cancel during the encode leaves no file
            )
        except OSError as exc:  # write_mp4 leaves no partial file behind
            reason = exc.strerror or str(exc)
            raise OutputError(
                f"could not write the video ({reason}): the disk may be full or the output folder not writable"
            ) from exc
        timings["encode"] = time.perf_counter() - clock
        log.info("wrote %s (%s, seed %d) in %s", path.name, spec.name, inputs.seed, timings)
        return Result(
            path=path,
            seed=inputs.seed,
            model=spec.name,
            width=rendered.size[0],
            height=rendered.size[1],
            num_frames=len(frames),
            fps=FPS,
            timings=timings,
        )
