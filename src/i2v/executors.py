"""Where models are loaded and run: the executor behind an `Engine`.

The engine plans a request (images, sizes, seed) and hands the executor a `Plan`; the executor owns which
backends are loaded on its device(s) and runs the model. Two executors exist:

- `LocalExecutor`: this process, one device;
- `GroupExecutor` (`i2v.parallel`): a device group, one clip split across its GPUs by follower processes.

`i2v.engine.executor_for` picks one from a device spec. What an executor promises is `Executor`; a residency manager
(which backends stay on the device) or remote workers slot in behind the same few methods.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from .backends import Backend, BackendSpec, Clip, ModelInputs, resolve
from .errors import ModelUnavailable
from .progress import Reporter
from .request import KlingRequest, RequestPreset
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

    def spec(self, key: BackendKey) -> tuple[type[Backend], BackendSpec]:
        """The backend class and spec of a key (no weights are read)."""

    def backend(self, key: BackendKey) -> Backend:
        """The loaded backend; the first call loads its weights, later calls reuse them."""

    def run(self, plan: Plan, report: Reporter) -> Clip:
        """Run the model on a plan (its backend is loaded); frames at the model's grid and fps."""

    def warm_up(self, key: BackendKey) -> None:
        """Run a short clip through a loaded backend, so compilation happens now."""

    def close(self) -> None:
        """Free what the executor holds (processes, process groups)."""


class LocalExecutor:
    """Backends loaded in this process on one device; each loads once and stays resident."""

    def __init__(self, device: torch.device, settings: Settings, *, ranks: int = 1) -> None:
        self.device, self.settings, self.ranks = device, settings, ranks
        self._specs: dict[BackendKey, tuple[type[Backend], BackendSpec]] = {}
        self._backends: dict[BackendKey, Backend] = {}
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return True

    def spec(self, key: BackendKey) -> tuple[type[Backend], BackendSpec]:
        if key not in self._specs:
            settings = self.settings
            self._specs[key] = resolve(key.ref, settings.tiny_dir, settings.extra_backends)
        return self._specs[key]

    def loaded(self) -> tuple[BackendKey, ...]:
        return tuple(self._backends)

    def backend(self, key: BackendKey) -> Backend:
        with self._lock:
            if key not in self._backends:
                self._backends[key] = self._load(key)
            return self._backends[key]

    def _load(self, key: BackendKey) -> Backend:
        cls, spec = self.spec(key)
        backend = cls(spec, self.device, self.settings.speed, ranks=self.ranks)
        try:
            backend.load()
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"could not load {spec.name} from {spec.source}: {exc}") from exc
        log.info("loaded %s on %s (%s)", spec.name, self.device, backend.placement)
        return backend

    def run(self, plan: Plan, report: Reporter) -> Clip:
        backend, inputs = self.backend(plan.key), plan.inputs

        def on_step(step: int, total: int) -> None:
            report("denoising", step, total)
            if step == total:
                report("decoding")

        report("denoising", 0, backend.total_steps(inputs))
        with torch.inference_mode():
            clip = backend.generate(inputs, on_step)
        report.check_cancel()
        return clip

    def warm_up(self, key: BackendKey) -> None:
        self.backend(key).warm_up()

    def close(self) -> None:
        with self._lock:
            self._backends.clear()
