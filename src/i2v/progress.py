"""Progress reports from the engine, and the cancel check between steps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """One report: a stage ("loading model", "denoising", ...) and, while denoising, step of total."""

    stage: str
    step: int | None = None
    total: int | None = None

    def __str__(self) -> str:
        return f"{self.stage} {self.step}/{self.total}" if self.total else self.stage


ProgressCallback = Callable[[Progress], None]


class Reporter:
    """Sends progress to a callback and raises `Cancelled` once the cancel flag is set."""

    def __init__(self, callback: ProgressCallback | None, cancel: threading.Event | None) -> None:
        self._callback = callback
        self._cancel = cancel

    def __call__(self, stage: str, step: int | None = None, total: int | None = None) -> None:
        self.check_cancel()
        if self._callback is not None:
            self._callback(Progress(stage, step, total))

    def check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the prediction was canceled")
