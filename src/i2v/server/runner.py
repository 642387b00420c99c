"""The boundary between the HTTP service and whatever runs the model.

The service hands a `Runner` one `Job` at a time per free slot and learns what happens through `Event`s.
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
from ..request import ImageField, KlingRequest
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


Event = Started | Log | Succeeded | Failed | Canceled | StateChanged
EventCallback = Callable[[Event], None]


class Runner(Protocol):
    def start(self, on_event: EventCallback) -> None:
        """Start the workers; events (from any thread) go to `on_event` from now on."""

    def state(self) -> RunnerState:
        """STARTING until a worker is set up (DOWNLOADING while it fetches weights); READY with a free slot;
        BUSY when all are running."""

    def setup_error(self) -> str | None:
        """Why setup failed, when it did."""

    def free_slots(self) -> int:
        """How many jobs `submit` would accept right now."""

    def submit(self, job: Job) -> None:
        """Run a job on a free slot (the caller checked `free_slots`)."""

    def cancel(self, prediction_id: str) -> None:
        """Stop a running job at its next step; ends with a `Canceled` event (or its outcome if too late)."""

    def stop(self) -> None:
        """Stop the workers; running jobs are abandoned (the store recovers them at the next start)."""
