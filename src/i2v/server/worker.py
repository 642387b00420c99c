"""The local runner: one worker process per GPU (or GPU group), each running one prediction at a time.

The worker process is the only place the engine (and so torch) is imported. It talks to the server over a
pipe, in typed messages that pickle as they are: the server sends `RunJob`, `CancelJob` and `StopWorker`;
the worker answers with the runner's events (`Started`, `Log`, `Succeeded`, ..., `StateChanged`).
If the server dies, the pipe closes and the worker exits at once, so no orphan keeps the GPU busy.

A job's mp4 is written to a local staging file, then put into the job's storage (the data folder or a
bucket) with its poster frame; the server shares no disk with the worker.

At start-up a worker pulls and loads the models of its preload modes (`I2V_PRELOAD`) before it reports
READY; while weights download it reports DOWNLOADING with the bytes (`StateChanged.download`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from ..devices import GROUP_SEPARATOR
from ..progress import DOWNLOAD_STAGE, DownloadProgress
from ..request import MODES, Mode
from .runner import (
    Canceled,
    ClipInfo,
    Event,
    EventCallback,
    Failed,
    Job,
    Log,
    RunnerState,
    Started,
    StateChanged,
    Succeeded,
)
from .storage import poster_key, staged

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

BAR_WIDTH = 20


# What the server sends a worker.


@dataclass(frozen=True)
class RunJob:
    job: Job


@dataclass(frozen=True)
class CancelJob:
    id: str


@dataclass(frozen=True)
class StopWorker:
    """Exit now; a running job is abandoned (the store marks it interrupted at the next start)."""


ToWorker = RunJob | CancelJob | StopWorker
Send = Callable[[Event], None]


def progress_line(stage: str, step: int | None, total: int | None) -> str:
    """A log line per progress report; steps look like tqdm, so clients can parse `prediction.progress`."""
    if not total:
        return stage
    done = step or 0
    filled = BAR_WIDTH * done // total
    return f"{100 * done // total:3d}%|{'█' * filled}{' ' * (BAR_WIDTH - filled)}| {done}/{total} {stage}"


class WorkerProcess:
    """One child process on one device, and the thread that reads its events."""

    def __init__(
        self,
        index: int,
        model: str | None,
        device: str | None,
        on_event: EventCallback,
        preload: tuple[Mode, ...] = MODES,
    ) -> None:
        self.index, self.model, self.device, self.preload = index, model, device, preload
        self._on_event = on_event
        self._send_lock = threading.Lock()
        self.state: RunnerState = "STARTING"
        self.error: str | None = None
        self.current: str | None = None
        self._stopping = False
        self._crashes = 0  # in a row before becoming ready: spaces out restarts of a worker that cannot start
        self._spawn()

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot survive fork
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main,
            args=(child, self.model, self.device, self.preload),
            name=f"i2v-worker-{self.index}",
            # A group's worker starts its follower ranks, which a daemonic process may not; it still exits
            # as soon as the server's end of the pipe closes, and the runner's stop() (also at exit) ends it.
            daemon=GROUP_SEPARATOR not in (self.device or ""),
        )
        self.process.start()
        child.close()
        self.state, self.current = "STARTING", None
        threading.Thread(target=self._read, name=f"i2v-worker-{self.index}-events", daemon=True).start()

    def send(self, message: ToWorker) -> None:
        with self._send_lock:
            self._conn.send(message)

    def submit(self, job: Job) -> None:
        self.current = job.id
        self.send(RunJob(job))

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            for event in self._translate(message):
                self._on_event(event)
        self._died()

    def _translate(self, event: Event) -> list[Event]:
        match event:
            case StateChanged("READY"):
                self.state, self._crashes = "READY", 0
            case StateChanged("SETUP_FAILED", detail):
                self.state, self.error = "SETUP_FAILED", detail
            case StateChanged("DOWNLOADING" | "STARTING" as state):
                self.state = state
            case Started() | Log():
                pass
            case Succeeded() | Failed() | Canceled():
                self.current = None  # free before the event goes out, so the next job is dispatched at once
                return [event, StateChanged(self.state)]
            case _:
                log.warning("unknown message from worker: %r", event)
                return []
        return [event]

    def _died(self) -> None:
        self.process.join(timeout=5)
        self._conn.close()
        if self._stopping:
            return
        lost, code = self.current, self.process.exitcode
        if lost is not None:
            self._on_event(
                Failed(
                    lost,
                    f"the worker process died (exit code {code}) while running this prediction",
                    worker_lost=True,
                )
            )
        if self.state == "STARTING":
            self._crashes += 1
        self.state, self.current = "STARTING", None
        delay = min(60.0, 2.0**self._crashes - 1)
        log.error("worker %d exited (code %s); starting a new one in %.0f s", self.index, code, delay)
        time.sleep(delay)
        if self._stopping:
            return
        self._spawn()
        self._on_event(StateChanged("STARTING"))

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.send(StopWorker())
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class LocalRunner:
    """Worker processes on this machine, one per configured device."""

    def __init__(
        self, model: str | None, devices: tuple[str | None, ...] = (None,), preload: tuple[Mode, ...] = MODES
    ) -> None:
        self.model, self.devices, self.preload = model, devices, preload
        self._workers: list[WorkerProcess] = []
        self._lock = threading.Lock()

    def start(self, on_event: EventCallback) -> None:
        self._workers = [
            WorkerProcess(i, self.model, d, on_event, self.preload) for i, d in enumerate(self.devices)
        ]
        atexit.register(self.stop)  # before multiprocessing joins the non-daemonic (group) workers at exit

    def _accepting(self) -> list[WorkerProcess]:
        # A worker whose setup failed still takes jobs: each fails with the reason instead of waiting forever.
        return [w for w in self._workers if w.state in ("READY", "SETUP_FAILED") and w.current is None]

    def state(self) -> RunnerState:
        states = {w.state for w in self._workers}
        if "READY" in states or "SETUP_FAILED" in states:
            if self._accepting():
                return "READY" if "READY" in states else "SETUP_FAILED"
            return "BUSY"
        return "DOWNLOADING" if "DOWNLOADING" in states else "STARTING"

    def setup_error(self) -> str | None:
        return next((w.error for w in self._workers if w.error), None)

    def free_slots(self) -> int:
        return len(self._accepting())

    def submit(self, job: Job) -> None:
        with self._lock:
            free = self._accepting()
            if not free:
                raise RuntimeError("no free worker")
            free[0].submit(job)

    def cancel(self, prediction_id: str) -> None:
        for worker in self._workers:
            if worker.current == prediction_id:
                worker.send(CancelJob(prediction_id))

    def stop(self) -> None:
        for worker in self._workers:
            worker.stop()


# The child process from here on.


def worker_main(
    conn: Connection, model: str | None, device: str | None, preload: tuple[Mode, ...] = MODES
) -> None:
    """Entry point of a worker process: set up the engine (pull and load the preload modes' models), then
    run jobs as they come."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    logging.basicConfig(level=logging.INFO, format=f"worker[{os.getpid()}] %(levelname)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per hub request while weights load
    jobs: queue.Queue[Job | None] = queue.Queue()
    send_lock, state_lock = threading.Lock(), threading.Lock()
    running: dict[str, threading.Event] = {}  # the job now running, and its cancel flag
    early_cancels: set[str] = set()

    def send(event: Event) -> None:
        with send_lock:
            conn.send(event)

    def read() -> None:
        while True:
            try:
                message: ToWorker = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: free the GPU now
            match message:
                case RunJob(job):
                    jobs.put(job)
                case CancelJob(prediction_id):
                    with state_lock:
                        if prediction_id in running:
                            running[prediction_id].set()
                        else:
                            early_cancels.add(prediction_id)
                case StopWorker():
                    os._exit(0)  # a running job is abandoned; the store marks it interrupted at next start

    threading.Thread(target=read, name="server-pipe", daemon=True).start()

    engine: Engine | None = None
    setup_error: str | None = None
    try:
        from ..engine import Engine
        from ..images import ImageLoader

        # Images arrive as the bytes checked at create; the engine never fetches or reads a path here.
        # A device group ("cuda:0+cuda:1") gives an engine that splits each request across its GPUs.
        engine = Engine(model, device=device, loader=ImageLoader(allow_local_paths=False))
        modes = _preload(engine, preload, send)
        speed = engine.settings.speed
        if modes and speed.on(speed.warmup, engine.device):  # compile and tune now, not in the first request
            log.info("warmed up in %s", engine.warm_up(modes))
    except Exception as exc:
        setup_error = f"model setup failed: {type(exc).__name__}: {exc}"
        log.error("%s\n%s", setup_error, traceback.format_exc())
        send(StateChanged("SETUP_FAILED", setup_error))
    else:
        send(StateChanged("READY"))

    while (job := jobs.get()) is not None:
        cancel = threading.Event()
        with state_lock:
            if job.id in early_cancels:
                early_cancels.discard(job.id)
                cancel.set()
            running[job.id] = cancel
        _run_job(job, engine, setup_error, cancel, send)
        with state_lock:
            running.pop(job.id, None)
        if engine is not None and not engine.healthy:  # a GPU group broken mid-run: start afresh
            log.error("the GPU group failed; this worker exits and the server starts a new one")
            os._exit(70)


def _preload(engine: Engine, modes: tuple[Mode, ...], send: Send) -> tuple[Mode, ...]:
    """Pull (reporting DOWNLOADING with the bytes) and load each mode's model, once per model; returns the
    modes loaded. A prediction for one of them waits in the server's queue meanwhile."""
    distinct: dict[object, Mode] = {}
    for mode in modes:
        distinct.setdefault(engine.key(mode), mode)
    last: list[DownloadProgress] = []

    def downloading(progress: DownloadProgress) -> None:
        last[:] = [progress]
        send(StateChanged("DOWNLOADING", download=progress))

    for mode in distinct.values():
        last.clear()
        engine.pull(mode, on_download=downloading)
        if last:
            send(StateChanged("STARTING"))
        engine.backend(mode)
    return tuple(distinct.values())


def _run_job(
    job: Job, engine: Engine | None, setup_error: str | None, cancel: threading.Event, send: Send
) -> None:
    from .. import errors
    from ..progress import Progress, StageClock, format_stage_times

    send(Started(job.id))
    clock = time.perf_counter()
    try:
        if cancel.is_set():
            raise errors.Canceled("canceled before it started")
        if engine is None:
            raise errors.I2VError(setup_error or "the model is not set up")

        stages = StageClock()  # the server's time estimates for similar clips come from these lines
        percent = [-1]  # a download's bytes go to the logs once per percent

        def on_progress(progress: Progress) -> None:
            stages(progress)
            if progress.stage == DOWNLOAD_STAGE and progress.total:
                if 100 * (progress.step or 0) // progress.total == percent[0]:
                    return
                percent[0] = 100 * (progress.step or 0) // progress.total
            send(Log(job.id, progress_line(progress.stage, progress.step, progress.total)))

        with engine_log_to(job.id, send), staged(job.storage, f"{job.id}.mp4") as path:
            result = engine.generate(
                job.request, path, on_progress=on_progress, cancel=cancel, images=job.images
            )
            store_output(job, path)
        send(Log(job.id, format_stage_times(stages.finish())))
    except errors.Canceled:
        send(Canceled(job.id))
    except errors.InputError as exc:
        send(Failed(job.id, f"{exc.field}: {exc.rule}"))
    except errors.I2VError as exc:
        send(Failed(job.id, str(exc)))
    except Exception as exc:  # a bug or a GPU fault: report it on the prediction, keep serving
        if _out_of_memory(exc):
            log.error("prediction %s ran out of GPU memory: %s", job.id, exc)
            _free_gpu_memory()
            send(Failed(job.id, out_of_memory_advice(job.request.mode, job.request.duration)))
        else:
            log.error("prediction %s crashed:\n%s", job.id, traceback.format_exc())
            send(Failed(job.id, f"internal error: {type(exc).__name__}: {exc}"))
    else:
        info = ClipInfo(
            seed=result.seed,
            model=result.model,
            width=result.width,
            height=result.height,
            num_frames=result.num_frames,
            fps=result.fps,
        )
        send(Succeeded(job.id, time.perf_counter() - clock, info))


def store_output(job: Job, path: Path) -> None:
    """Put the mp4 at `path` (and its poster frame, first) into the job's storage; a storage that refuses
    fails the job with its reason (StorageError is an I2VError)."""
    from ..video import poster_jpeg

    try:
        poster = poster_jpeg(path)
    except Exception as exc:  # a nicety: the clip stands without it (the page shows the start image)
        log.warning("prediction %s: no poster frame (%s)", job.id, exc)
    else:
        job.storage.put_bytes(poster_key(job.id), poster, "image/jpeg")
    job.storage.put_file(job.output, path, "video/mp4")


class _PredictionLog(logging.Handler):
    """Copies the engine's log records (which model runs, which negative prompt, what was written) into
    the prediction's logs, where a client reads them; they also go to the worker's own log as before."""

    def __init__(self, prediction_id: str, send: Send) -> None:
        super().__init__(logging.INFO)
        self._id, self._send = prediction_id, send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(Log(self._id, record.getMessage()))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def engine_log_to(prediction_id: str, send: Send) -> Iterator[None]:
    """While one prediction runs, the engine's log lines are that prediction's too (one job at a time)."""
    engine_log = logging.getLogger("i2v.engine")
    handler = _PredictionLog(prediction_id, send)
    engine_log.addHandler(handler)
    try:
        yield
    finally:
        engine_log.removeHandler(handler)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _free_gpu_memory() -> None:
    """Drop the failed run's cached blocks so the next prediction starts from the resident weights alone."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_advice(mode: str, duration: int) -> str:
    """What to ask for instead when a prediction did not fit in GPU memory."""
    smaller = []
    if mode == "pro":
        smaller.append("mode standard (720p instead of 1080p)")
    if duration == 10:
        smaller.append("duration 5")
    ask = "; ".join(smaller) if smaller else "a smaller request"
    return (
        f"out of GPU memory: use {ask}, or run the server on a GPU with more memory "
        "(the worker is still up and serving)"
    )
