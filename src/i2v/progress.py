"""Progress reports from the engine (stages, steps, bytes of a download), and the cancel check between steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import Canceled
from .parsing import format_bytes


@dataclass(frozen=True)
class Progress:
    """One report: a stage ("loading model", "denoising", ...) and, while denoising, step of total."""

    stage: str
    step: int | None = None
    total: int | None = None

    def __str__(self) -> str:
        return f"{self.stage} {self.step}/{self.total}" if self.total else self.stage


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class DownloadProgress:
    """Bytes of a model's weights fetched so far, of those missing from the cache when the pull began.

    Plain and picklable: a worker sends it to the server inside its `StateChanged` events.
    """

    model: str  # the backend's name
    repo: str  # the hub repository
    done: int
    total: int

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def __str__(self) -> str:
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        return (
            f"{self.model} from {self.repo}: {format_bytes(self.done)} of {format_bytes(self.total)}{share}"
        )


DownloadCallback = Callable[[DownloadProgress], None]


class CancelFlag(Protocol):
    """A `threading.Event`, or anything read the same way (a group's collective flag)."""

    def is_set(self) -> bool: ...


class Reporter:
    """Sends progress to a callback and raises `Canceled` once the cancel flag is set."""

    def __init__(self, callback: ProgressCallback | None, cancel: CancelFlag | None) -> None:
        self._callback = callback
        self._cancel = cancel

    @property
    def cancel(self) -> CancelFlag | None:
        return self._cancel

    def with_cancel(self, cancel: CancelFlag | None) -> Reporter:
        """The same reports, another cancel flag."""
        return Reporter(self._callback, cancel)

    def part(self, index: int, count: int) -> Reporter:
        """The reports of run `index` of `count` alike runs making one clip: denoising steps count across all."""
        callback = self._callback
        if callback is None:
            return self

        def across(progress: Progress) -> None:
            if progress.stage == "denoising" and progress.step is not None and progress.total is not None:
                progress = Progress(
                    "denoising", index * progress.total + progress.step, count * progress.total
                )
            callback(progress)

        return Reporter(across, self._cancel)

    def __call__(self, stage: str, step: int | None = None, total: int | None = None) -> None:
        self.check_cancel()
        if self._callback is not None:
            self._callback(Progress(stage, step, total))

    def check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Canceled("the prediction was canceled")


# The stages the engine reports, in the order it reports them ("downloading weights" only when the model's
# weights are missing from the cache, its step and total in bytes; "retiming" only for models not at 24 fps).
DOWNLOAD_STAGE = "downloading weights"
STAGES = (
    "loading inputs",
    DOWNLOAD_STAGE,
    "loading model",
    "denoising",
    "decoding",
    "retiming",
    "encoding video",
)
_STAGE_TIMES = "stage times: "


class StageClock:
    """Seconds spent in each stage, from the progress reports: a stage lasts until the next one begins."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._stage: str | None = None
        self._since = 0.0
        self.seconds: dict[str, float] = {}

    def __call__(self, progress: Progress) -> None:
        if progress.stage != self._stage:
            now = self._clock()
            self._close(now)
            self._stage, self._since = progress.stage, now

    def _close(self, now: float) -> None:
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._since

    def finish(self) -> dict[str, float]:
        """The times so far, the current stage closed now."""
        self._close(self._clock())
        self._stage = None
        return dict(self.seconds)


def format_stage_times(seconds: dict[str, float]) -> str:
    """One log line, e.g. `stage times: loading inputs 0.02 s, denoising 12.40 s, encoding video 1.10 s`."""
    return _STAGE_TIMES + ", ".join(f"{stage} {value:.2f} s" for stage, value in seconds.items())


def parse_stage_times(logs: str) -> dict[str, float] | None:
    """The stage times a finished prediction's logs end with (format_stage_times), or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(_STAGE_TIMES):
            times = {}
            for part in line[len(_STAGE_TIMES) :].split(", "):
                stage, _, value = part.removesuffix(" s").rpartition(" ")
                try:
                    times[stage] = float(value)
                except ValueError:
                    return None
            return times
    return None
