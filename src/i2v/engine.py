"""The engine: one Kling request in, one exact mp4 out.

    plan:  request -> images decoded (or fetched) and checked -> output size from the start image ->
           backend for the mode and preset (resolved once; its weights pulled into the HF cache when
           missing, a progress stage of its own; loaded by the executor) -> inputs fitted to the model's
           grid, seed fixed
    run:   the executor runs the plan: diffusers pipeline -> frames on the model's grid
    write: frames at 24 fps -> mp4 at exact size

The executor (`i2v.executors`) owns the loaded backends: in this process on one device, or across a
device group (`i2v.parallel`); `Engine(device=...)` picks it from the device spec. Pipelines load once
per backend and stay loaded across requests, on the device while its memory budget allows (the executor
moves idle ones to CPU memory when another needs the room; `i2v.residency`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from .backends import Backend, Clip, ModelInputs
from .devices import device_group
from .errors import InputError, OutputError
from .executors import BackendKey, Executor, LocalExecutor, Plan
from .geometry import fit_image, output_size
from .images import ImageLoader, decode_image
from .long_clips import join, next_part, part_inputs, parts_for
from .parallel import GroupExecutor
from .progress import DOWNLOAD_STAGE, DownloadCallback, ProgressCallback, Reporter
from .request import FPS, ImageField, KlingRequest, Mode, RequestPreset
from .retime import retime
from .settings import Settings
from .video import to_uint8, write_mp4
from .weights import ensure

log = logging.getLogger(__name__)

ImageBytes = Mapping[ImageField, bytes]
"""Image inputs already fetched and checked (the server's intake): decoded here, never fetched again."""


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


@dataclass
class Rendered:
    """A clip at the model's grid and native fps, before it is mapped to the exact output."""

    clip: Clip
    plan: Plan
    backend: Backend
    parts: int = 1  # runs joined into the clip (`i2v.long_clips`)

    @property
    def inputs(self) -> ModelInputs:
        return self.plan.inputs


def executor_for(device: str | None, settings: Settings) -> Executor:
    """A `LocalExecutor` for one device ("cuda:1", "cpu"; None: the first GPU, else the CPU), a
    `GroupExecutor` for a device group ("cuda:0+cuda:1")."""
    devices = device_group(device)
    if len(devices) > 1:
        return GroupExecutor(devices, settings)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return LocalExecutor(torch.device(devices[0] if devices else default), settings)


class Engine:
    """Runs requests on the backends configured for each mode.

    `model` is None or "default" (the configured model per mode), "tiny" (the tiny twins of those), or a
    model reference used for every mode it serves (see `i2v.backends.resolve`). `device` is a torch
    device or a device group (default: `I2V_DEVICE`, else the first GPU, else the CPU).
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
        self.executor = executor_for(device or self.settings.device, self.settings)
        self.loader = loader or ImageLoader(allow=self.settings.fetch_allow)
        self._pulled: set[BackendKey] = set()
        self._pull_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def healthy(self) -> bool:
        """False once the executor cannot run again (a device group left out of step by a fault)."""
        return self.executor.healthy

    def close(self) -> None:
        self.executor.close()

    def preset(self, request: KlingRequest) -> RequestPreset:
        """The request's preset, else the server's (`low-vram` is how models load, not a per-request one)."""
        return self.settings.speed.request_preset(request.preset)

    def key(self, mode: Mode, preset: RequestPreset = "default") -> BackendKey:
        """The backend for a mode; `turbo` picks the mode's distilled model (Settings.turbo_models)."""
        return BackendKey(self.settings.model_ref(mode, preset, self.model))

    def pull(
        self, mode: Mode, preset: RequestPreset = "default", on_download: DownloadCallback | None = None
    ) -> None:
        """Download the mode's weights into the HF cache unless they are there (`i2v.weights.ensure`): the
        files its backend loads, after the disk check; once per backend, and before the executor loads it."""
        key = self.key(mode, preset)
        with self._pull_lock:
            if key in self._pulled:
                return
            _, spec = self.executor.spec(key)
            pulled = ensure(spec.name, spec.source, spec.files, self.settings.min_free_disk, on_download)
            if pulled is not None:
                log.info("pulled %s from %s: %s", spec.name, pulled.repo, pulled.summary())
            self._pulled.add(key)

    def backend(
        self, mode: Mode, preset: RequestPreset = "default", report: Reporter | None = None
    ) -> Backend:
        """The loaded backend for a mode; the first call pulls and loads its weights, later calls reuse them.

        With `report`, a download is reported as the "downloading weights" stage (bytes done of total)."""
        key = self.key(mode, preset)
        _, spec = self.executor.spec(key)
        if mode not in spec.modes:  # allowed (the output is still mapped to the exact size), but worth a note
            log.warning(
                "%s is made for %s mode, configured here for %s", spec.name, "/".join(spec.modes), mode
            )
        on_download = None if report is None else lambda p: report(DOWNLOAD_STAGE, p.done, p.total)
        self.pull(mode, preset, on_download)
        return self.executor.backend(key, report)

    def warm_up(self, modes: tuple[Mode, ...] = ("standard", "pro")) -> dict[str, float]:
        """Load each mode's model and run a short clip through it (compiles, tunes kernels); seconds per mode.

        Speed.warmup (on with CUDA) makes the server do this before it reports READY.
        """
        seconds = {}
        for mode in modes:
            self.backend(mode)
            clock = time.perf_counter()
            self.executor.warm_up(self.key(mode))
            seconds[mode] = time.perf_counter() - clock
        return seconds

    def _image(self, request: KlingRequest, field: ImageField, images: ImageBytes | None) -> Image.Image:
        if images is not None and field in images:
            return decode_image(images[field], field)
        return self.loader.load(getattr(request, field), field)

    def plan(
        self,
        request: KlingRequest,
        report: Reporter,
        timings: dict[str, float] | None = None,
        images: ImageBytes | None = None,
    ) -> Plan:
        """Resolve a request to one model run: decode (or fetch) and check its images, load the backend,
        fix the seed and fit the inputs to the model's grid."""
        timings = timings if timings is not None else {}
        clock = time.perf_counter()
        report("loading inputs")
        start = self._image(request, "start_image", images)
        end = self._image(request, "end_image", images) if request.end_image is not None else None
        size = output_size(start.width, start.height, request.short_side)
        timings["inputs"] = time.perf_counter() - clock

        preset = self.preset(request)
        key = self.key(request.mode, preset)
        self.pull(request.mode, preset, lambda p: report(DOWNLOAD_STAGE, p.done, p.total))
        report("loading model")
        clock = time.perf_counter()
        backend = self.backend(request.mode, preset, report)
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
            model_frames=spec.frames_for(request.duration),
            seed=request.seed if request.seed is not None else secrets.randbelow(2**32),
            audio=request.audio,
            # Ranks of a device group would each decide on their own share of the tokens (or pass).
            step_cache=preset == "fast" and backend.group.ranks == 1,
        )
        return Plan(request=request, key=key, preset=preset, inputs=inputs, size=size)

    def run(self, plan: Plan, report: Reporter, timings: dict[str, float] | None = None) -> Rendered:
        """Run the model on a plan; the frames come back on the model's grid and at its fps.

        With `I2V_LONG_CLIPS=extend`, a 10 s clip without an end image is two 5 s runs joined at a frame
        (`i2v.long_clips`); the denoising steps count across both."""
        timings = timings if timings is not None else {}
        clock = time.perf_counter()
        backend = self.executor.backend(plan.key)
        count = parts_for(backend.spec, plan.inputs, self.settings.long_clips)
        if count == 1:
            clip = self.executor.run(plan, report)
        else:
            log.info(
                "%d s as %d clips of 5 s, each from the last frame of the one before",
                plan.request.duration,
                count,
            )
            inputs, parts = part_inputs(backend.spec, plan.inputs), []
            for index in range(count):
                if parts:
                    inputs = next_part(inputs, parts[-1])
                parts.append(self.executor.run(replace(plan, inputs=inputs), report.part(index, count)))
            clip = join(parts)
        timings["generate"] = time.perf_counter() - clock
        return Rendered(clip=clip, plan=plan, backend=backend, parts=count)

    def render(
        self,
        request: KlingRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        timings: dict[str, float] | None = None,
        images: ImageBytes | None = None,
    ) -> Rendered:
        """Plan and run a request; the frames come back on the model's grid and at its fps."""
        report = Reporter(on_progress, cancel)
        return self.run(self.plan(request, report, timings, images), report, timings)

    def generate(
        self,
        request: KlingRequest,
        output: str | Path,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        images: ImageBytes | None = None,
    ) -> Result:
        """Render a request to an mp4 at `output` (H.264, 24 fps, exact size); returns what was made.

        `images` are the checked bytes of the image inputs where the caller has them (the server's
        worker); the engine fetches (or reads) only the images it is not given."""
        timings: dict[str, float] = {}
        report = Reporter(on_progress, cancel)
        rendered = self.run(self.plan(request, report, timings, images), report, timings)
        return self.write(rendered, output, report, timings)

    def write(
        self,
        rendered: Rendered,
        output: str | Path,
        report: Reporter,
        timings: dict[str, float] | None = None,
    ) -> Result:
        """Map rendered frames to 24 fps and the exact size, and encode the mp4."""
        timings = timings if timings is not None else {}
        clip, plan, spec = rendered.clip, rendered.plan, rendered.backend.spec
        request, inputs = plan.request, plan.inputs
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
        comment: dict[str, object] = {
            "prompt": request.prompt,
            "negative_prompt": inputs.negative_prompt,  # what the model was sampled with
            "negative_prompt_source": inputs.negative_source,
            "seed": inputs.seed,
            "model": spec.name,
            "mode": request.mode,
            "duration": request.duration,
        }
        if rendered.parts > 1:  # I2V_LONG_CLIPS=extend: that many 5 s clips, joined at their seam frames
            comment["parts"] = rendered.parts
        metadata = {"title": request.prompt, "comment": comment}
        try:
            path = write_mp4(
                frames,
                output,
                size=plan.size,
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
            width=plan.size[0],
            height=plan.size[1],
            num_frames=len(frames),
            fps=FPS,
            timings=timings,
        )
