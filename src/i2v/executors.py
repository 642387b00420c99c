"""Where models are loaded and run: the executor behind an `Engine`.

The engine plans a request (images, sizes, seed) and hands the executor a `Plan`; the executor owns which
backends are loaded on its device(s) and runs the model. Two executors exist:

- `LocalExecutor`: this process, one device;
- `GroupExecutor` (`i2v.parallel`): a device group, one clip split across its GPUs by follower processes.

`i2v.engine.executor_for` picks one from a device spec. What an executor promises is `Executor`; remote workers slot
in behind the same few methods. Each executor plans its device's memory (`i2v.memory`: which placement each
model needs) and keeps what is on the device within its budget (`i2v.residency`: moves idle models off,
least recently used first).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from .backends import Backend, BackendSpec, Clip, ModelInputs, resolve
from .errors import ModelUnavailable
from .fp8 import fp8_unsupported
from .memory import Need, activations_for, cfg_batch, choose, device_budget, one_run, plan_mode
from .parsing import format_bytes
from .progress import Reporter
from .request import KlingRequest, RequestPreset
from .residency import FileHashes, Residency
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendKey:
    """Which backend: a model reference as `i2v.backends.resolve` takes it (`tiny-ltx-2`, `ltx-2=/m`)."""

    ref: str


@dataclass(frozen=True)
class Plan:
    """A request resolved to one model run: all an executor (and each rank of a group) needs to run it,
    and all the engine needs to write its output."""

    request: KlingRequest
    key: BackendKey
    preset: RequestPreset
    inputs: ModelInputs  # the images fitted to the model's grid, the seed fixed
    size: tuple[int, int]  # the exact output (width, height)


class Executor(Protocol):
    """Loads backends and runs plans. Thread-safe where the engine needs it: `backend` may race a run."""

    device: torch.device  # where rank 0 runs (where the engine's plans are made for)
    ranks: int  # devices one clip is split across (1 but for a group)

    @property
    def healthy(self) -> bool:
        """False once a fault left the executor unable to run again (a group out of step)."""

    @property
    def budget(self) -> int | None:
        """The bytes of device memory models and activations may use (None: no limit)."""

    def spec(self, key: BackendKey) -> tuple[type[Backend], BackendSpec]:
        """The backend class and spec of a key (no weights are read)."""

    def need(self, key: BackendKey) -> Need:
        """The placement a backend gets on this device, and what it needs there (no weights are read)."""

    def holds(self) -> tuple[str, ...]:
        """The models (their references) on the device now, most recently used first."""

    def would_drop(self, key: BackendKey) -> bool:
        """Whether loading `key` now would drop a loaded model from memory (not only move it to CPU
        memory) to make room; False once it is loaded."""

    def backend(self, key: BackendKey, report: Reporter | None = None) -> Backend:
        """The loaded backend; the first call loads its weights (making room first), later calls reuse
        them. Memory moves are reported to `report`."""

    def run(self, plan: Plan, report: Reporter) -> Clip:
        """Run the model on a plan (its backend is loaded); frames at the model's grid and fps."""

    def warm_up(self, key: BackendKey) -> None:
        """Run a short clip through a loaded backend, so compilation happens now."""

    def close(self) -> None:
        """Free what the executor holds (processes, process groups)."""


class LocalExecutor:
    """Backends loaded in this process on one device, kept within the device's memory budget."""

    def __init__(self, device: torch.device, settings: Settings, *, ranks: int = 1) -> None:
        self.device, self.settings, self.ranks = device, settings, ranks
        self._specs: dict[BackendKey, tuple[type[Backend], BackendSpec]] = {}
        self._needs: dict[BackendKey, Need] = {}
        self._backends: dict[BackendKey, Backend] = {}
        self._lock = threading.RLock()  # a load may drop another backend (residency), under the same lock
        self._budget = self._device_budget()
        self.residency = Residency(
            device,
            self._budget,
            offload_memory=settings.offload_memory,
            hashes=FileHashes(settings.cache_dir / "weight-sha256.json"),
            drop=self._forget,
            can_drop=ranks == 1,
        )

    def _device_budget(self) -> int | None:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = device_budget(free, self.settings.gpu_memory)
            log.info(
                "memory budget on %s: %s (free at start: %s)",
                self.device,
                format_bytes(budget),
                format_bytes(free),
            )
            return budget
        return self.settings.gpu_memory  # on a CPU: only what I2V_GPU_MEMORY says (tests, sharing a host)

    @property
    def budget(self) -> int | None:
        return self._budget

    @property
    def healthy(self) -> bool:
        return True

    def spec(self, key: BackendKey) -> tuple[type[Backend], BackendSpec]:
        if key not in self._specs:
            settings = self.settings
            self._specs[key] = resolve(key.ref, settings.tiny_dir, settings.extra_backends)
        return self._specs[key]

    def need(self, key: BackendKey) -> Need:
        if key not in self._needs:
            cls, spec = self.spec(key)
            speed = self.settings.speed
            parts = cls.parts(spec, self.device.type)
            batched = speed.on(speed.batched_cfg, self.device)
            per_placement = activations_for(
                cls, spec, parts, plan_mode(spec), batched_cfg=batched, device_type=self.device.type
            )
            fp8 = fp8_unsupported(self.device) is None  # else `fast` computes in bf16 (i2v.fp8)
            self._needs[key] = choose(
                key.ref, parts, per_placement, self._budget, speed, self.device.type, fp8_compute=fp8
            )
        return self._needs[key]

    def loaded(self) -> tuple[BackendKey, ...]:
        return tuple(self._backends)

    def holds(self) -> tuple[str, ...]:
        return self.residency.resident_models()

    def would_drop(self, key: BackendKey) -> bool:
        with self._lock:
            if key in self._backends:
                return False
            return self.residency.would_drop(self.need(key).loading, keep=key.ref)

    def backend(self, key: BackendKey, report: Reporter | None = None) -> Backend:
        with self._lock:
            if key not in self._backends:
                self._backends[key] = self._load(key, report)
            return self._backends[key]

    def _forget(self, ref: str) -> None:
        with self._lock:
            self._backends.pop(BackendKey(ref), None)

    def _load(self, key: BackendKey, report: Reporter | None) -> Backend:
        cls, spec = self.spec(key)
        planned = self.need(key)
        placement = planned.placement
        speed = self.settings.speed
        if placement.kind == "offload" and not speed.low_vram:
            speed = speed.model_copy(update={"preset": "low-vram"})
            fp8 = (
                f", fp8 weight storage for its {', '.join(cls.fp8_modules)}: lossy" if cls.fp8_modules else ""
            )
            log.info(
                "%s does not fit %s otherwise: placed with group offload (low-vram%s)",
                spec.name,
                self.device,
                fp8,
            )
        tag = "streamed" if placement.kind == "offload" else "resident"
        keys = self.residency.part_keys(key.ref, cls, spec.source, tag)
        shared = self.residency.shared_parts(keys)
        here = sum(
            self.residency.held[keys[name]].bytes
            for name in shared
            if self.residency.held[keys[name]].where == "device"
        )
        self.residency.make_room(max(0, planned.loading - here), keep=key.ref, report=report)
        backend = cls(spec, self.device, speed, ranks=self.ranks)
        backend.shared = shared
        try:
            backend.load()
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"could not load {spec.name} from {spec.source}: {exc}") from exc
        if shared:
            log.info("%s shares %s with a model already loaded", spec.name, ", ".join(sorted(shared)))
        keys = self.residency.part_keys(key.ref, cls, spec.source, tag)  # downloaded now, if it was not
        self.residency.register(
            key.ref,
            backend,
            keys,
            streamed=placement.kind == "offload",
            shuttle=placement.kind == "shuttle",
            extra=max(0, planned.peak - planned.idle),
        )
        log.info("loaded %s on %s (%s); memory: %s", spec.name, self.device, backend.placement, placement)
        return backend

    def _extra(self, key: BackendKey, inputs: ModelInputs) -> int:
        """What this run adds to the model's weights on the device (planned: activations, streamed blocks)."""
        if self.device.type == "cpu":
            return 0  # activations use host memory, outside the budget (i2v.memory.activations_for)
        cls, spec = self.spec(key)
        speed = self.settings.speed
        batch = cfg_batch(spec, speed.on(speed.batched_cfg, self.device))
        size = (inputs.width, inputs.height, inputs.model_frames)
        run = one_run(cls, cls.parts(spec, self.device.type), self.need(key).placement, size, batch)
        return max(0, run.peak - run.idle)

    def run(self, plan: Plan, report: Reporter) -> Clip:
        backend, inputs = self.backend(plan.key, report), plan.inputs

        def on_step(step: int, total: int) -> None:
            report("denoising", step, total)
            if step == total:
                report("decoding")

        self.residency.acquire(plan.key.ref, self._extra(plan.key, inputs), report)
        try:
            report("denoising", 0, backend.total_steps(inputs))
            with torch.inference_mode():
                clip = backend.generate(inputs, on_step)
        finally:
            self.residency.release()
        report.check_cancel()
        return clip

    def warm_up(self, key: BackendKey) -> None:
        backend = self.backend(key)
        self.residency.acquire(key.ref, self.residency.models[key.ref].extra, None)
        try:
            backend.warm_up()
        finally:
            self.residency.release()

    def close(self) -> None:
        with self._lock:
            for key in list(self._backends):
                self.residency.forget(key.ref)
            self._backends.clear()
