"""Progress reports from the engine, and the cancel check between steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import Canceled


@dataclass(frozen=True)
class Progress:
    """One report: a stage ("loading model", "denoising", ...) and, while denoising, step of total."""

    stage: str
    step: int | None = None
    total: int | None = None

    def __str__(self) -> str:
        return f"{self.stage} {self.step}/{self.total}" if self.total else self.stage


ProgressCallback = Callable[[Progress], None]


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

    def __call__(self, stage: str, step: int | None = None, total: int | None = None) -> None:
        self.check_cancel()
        if self._callback is not None:
            self._callback(Progress(stage, step, total))

    def check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Canceled("the prediction was canceled")
