"""The boundary between the HTTP service and whatever runs the model.

The service hands a `Runner` one `Job` at a time per free worker and learns what happens through `Event`s;
`workers()` tells it what each worker serves (its modes, and the `Capacity` its memory budget allows) and
holds, which is all the routing and the admission check need.
Today's runner is a local worker process per GPU (`worker.LocalRunner`); a distributed engine can take its
place by implementing the same few methods, without touching the HTTP layer. Jobs and events are plain
dataclasses that pickle as they are, and a job carries everything the model needs (the request and the
bytes of its images) and where its output goes (a `Storage`, which pickles as its settings), so no file
system is shared with whoever runs it: the worker puts the mp4 into the storage itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from ..progress import DownloadProgress
from ..request import ImageField, KlingRequest, Mode
from ..speed import RequestPreset
from .storage import Storage

# DOWNLOADING: setting up, and fetching a model's weights into the HF cache (StateChanged.download says how far).
RunnerState = Literal["STARTING", "DOWNLOADING", "READY", "BUSY", "SETUP_FAILED"]


@dataclass(frozen=True)
class Job:
    """One prediction to run: the validated request, and the bytes of its image inputs as checked at
    create (the runner fetches nothing). The mp4 is put into `storage` under the key `output`, its poster
    frame beside it (`storage.poster_key`), before the job reports `Succeeded`."""

    id: str
    request: KlingRequest
    images: dict[ImageField, bytes]
    output: str
    storage: Storage


@dataclass(frozen=True)
class ClipInfo:
    """What the model made, for the prediction's logs."""

    seed: int
    model: str
    width: int
    height: int
    num_frames: int
    fps: int


@dataclass(frozen=True)
class Started:
    id: str


@dataclass(frozen=True)
class Log:
    id: str
    line: str


@dataclass(frozen=True)
class Succeeded:
    id: str
    predict_time: float
    info: ClipInfo | None = None


@dataclass(frozen=True)
class Failed:
    """`worker_lost`: the worker died under the job (not the job's own error), so running it again may work."""

    id: str
    error: str
    worker_lost: bool = False


@dataclass(frozen=True)
class Canceled:
    id: str


@dataclass(frozen=True)
class StateChanged:
    """A worker became ready, busy, idle or failed its setup; `detail` says why when it failed. While it
    pulls weights at set-up the state is DOWNLOADING, sent again as the bytes come in (`download`)."""

    state: RunnerState
    detail: str | None = None
    download: DownloadProgress | None = None


@dataclass(frozen=True)
class Offer:
    """One mode and preset a worker can run on its memory budget: the model, its placement, the durations
    that fit (none: `reason` says why), and its bytes on the device idle and at its peak."""

    mode: Mode
    preset: RequestPreset
    model: str
    placement: str
    durations: tuple[int, ...]
    idle_bytes: int
    peak_bytes: int
    reason: str | None = None


@dataclass(frozen=True)
class Capacity:
    """What a worker decided at start-up it can serve (sent before it is READY)."""

    budget_bytes: int | None  # None: no limit
    default_preset: RequestPreset  # the preset a request without one runs with
    offers: tuple[Offer, ...]


@dataclass(frozen=True)
class Holding:
    """The models on a worker's device now, most recently used first (sent after each job)."""

    models: tuple[str, ...]


Event = Started | Log | Succeeded | Failed | Canceled | StateChanged | Capacity | Holding
EventCallback = Callable[[Event], None]


@dataclass(frozen=True)
class WorkerView:
    """One worker as the dispatcher and the admission check see it."""

    index: int
    name: str  # its I2V_DEVICES entry, e.g. "pro@cuda:1"
    modes: tuple[Mode, ...]  # the modes it was given
    state: RunnerState
    free: bool  # it would take a job now
    capacity: Capacity | None  # None until it reports (or when its setup failed)
    holds: tuple[str, ...] = ()

    def offer(self, request: KlingRequest) -> Offer | None:
        if self.capacity is None:
            return None
        preset = request.preset or self.capacity.default_preset
        return next((o for o in self.capacity.offers if (o.mode, o.preset) == (request.mode, preset)), None)

    def can_run(self, request: KlingRequest) -> bool:
        """Its mode, and (once it has reported) an offer whose durations include the request's."""
        if request.mode not in self.modes:
            return False
        if self.capacity is None:
            return True  # setup failed: it takes the job and fails it with the reason
        offer = self.offer(request)
        return offer is not None and request.duration in offer.durations

    def holds_model_for(self, request: KlingRequest) -> bool:
        offer = self.offer(request)
        return offer is not None and offer.model in self.holds


class Runner(Protocol):
    def start(self, on_event: EventCallback) -> None:
        """Start the workers; events (from any thread) go to `on_event` from now on."""

    def state(self) -> RunnerState:
        """STARTING until a worker is set up (DOWNLOADING while it fetches weights); READY with a free slot;
        BUSY when all are running."""

    def setup_error(self) -> str | None:
        """Why setup failed, when it did."""

    def workers(self) -> tuple[WorkerView, ...]:
        """Each worker: its modes, whether it is free (the dispatcher sends jobs only to free ones), what
        it can serve (`capacity` None until it has said: nothing is refused on its account meanwhile)
        and what it holds. With no workers at all, creates are admitted and wait."""

    def submit(self, job: Job, worker: int) -> None:
        """Run a job on a free worker (one `workers` showed free and able to run it)."""

    def cancel(self, prediction_id: str) -> None:
        """Stop a running job at its next step; ends with a `Canceled` event (or its outcome if too late)."""

    def stop(self) -> None:
        """Stop the workers; running jobs are abandoned (the store recovers them at the next start)."""
