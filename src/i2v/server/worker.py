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
from typing import TYPE_CHECKING, Protocol

from ..devices import GROUP_SEPARATOR, WorkerSpec
from ..parsing import format_bytes
from ..progress import DOWNLOAD_STAGE, DownloadProgress
from ..request import MODES, KlingRequest, Mode
from ..speed import REQUEST_PRESETS
from .runner import (
    Canceled,
    Capacity,
    ClipInfo,
    Event,
    EventCallback,
    Failed,
    Holding,
    Job,
    Log,
    Offer,
    RunnerState,
    Started,
    StateChanged,
    Succeeded,
    WorkerView,
)
from .storage import poster_key, staged

if TYPE_CHECKING:
    from ..engine import Engine
    from ..executors import BackendKey

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
        spec: WorkerSpec,
        on_event: EventCallback,
        preload: tuple[Mode, ...] = MODES,
    ) -> None:
        self.index, self.model, self.spec, self.preload = index, model, spec, preload
        self.device = spec.device
        self._on_event = on_event
        self._send_lock = threading.Lock()
        self.state: RunnerState = "STARTING"
        self.error: str | None = None
        self.current: str | None = None
        self.capacity: Capacity | None = None  # what it can serve, once it has said
        self.holds: tuple[str, ...] = ()
        self._stopping = False
        self._crashes = 0  # in a row before becoming ready: spaces out restarts of a worker that cannot start
        self._spawn()

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot survive fork
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main,
            args=(child, self.model, self.device, self.spec.mode, self.preload),
            name=f"i2v-worker-{self.index}",
            # A group's worker starts its follower ranks, which a daemonic process may not; it still exits
            # as soon as the server's end of the pipe closes, and the runner's stop() (also at exit) ends it.
            daemon=GROUP_SEPARATOR not in (self.device or ""),
        )
        self.process.start()
        child.close()
        self.state, self.current = "STARTING", None
        self.capacity, self.holds = None, ()
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
            case Capacity() as capacity:
                self.capacity = capacity
                log.info("worker %d (%s) can serve: %s", self.index, self.spec, describe_capacity(capacity))
                return []
            case Holding(models):
                self.holds = models
                return []
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

    def view(self) -> WorkerView:
        free = self.state in ("READY", "SETUP_FAILED") and self.current is None
        return WorkerView(
            index=self.index,
            name=f"{self.index} ({self.spec})",
            modes=self.spec.modes,
            state=self.state if self.current is None or self.state != "READY" else "BUSY",
            free=free,
            capacity=self.capacity,
            holds=self.holds,
        )

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.send(StopWorker())
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class LocalRunner:
    """Worker processes on this machine, one per configured device (or group), each with its mode."""

    def __init__(
        self,
        model: str | None,
        devices: tuple[WorkerSpec, ...] = (WorkerSpec(),),
        preload: tuple[Mode, ...] = MODES,
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

    def workers(self) -> tuple[WorkerView, ...]:
        return tuple(worker.view() for worker in self._workers)

    def submit(self, job: Job, worker: int) -> None:
        with self._lock:
            chosen = self._workers[worker]
            if chosen not in self._accepting():
                raise RuntimeError(f"worker {worker} is not free")
            chosen.submit(job)

    def cancel(self, prediction_id: str) -> None:
        for worker in self._workers:
            if worker.current == prediction_id:
                worker.send(CancelJob(prediction_id))

    def stop(self) -> None:
        for worker in self._workers:
            worker.stop()


# The child process from here on.


class Channel(Protocol):
    """The worker's end of its link to the server: a pipe for a local process (`Connection`), method calls
    for a Ray actor (`ray_runner.ActorChannel`). `recv` raises EOFError or OSError once the server is gone."""

    def send(self, event: Event) -> None: ...

    def recv(self) -> ToWorker: ...


def worker_main(
    conn: Connection,
    model: str | None,
    device: str | None,
    mode: Mode | None = None,
    preload: tuple[Mode, ...] = MODES,
) -> None:
    """Entry point of a worker process: set up the engine, say what it can serve (its `mode`, or every
    mode) on its memory budget, pull and load the preload modes' models it serves, then run jobs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    worker_logging()
    serve(conn, model, device, mode, preload)


def worker_logging() -> None:
    """The engine's INFO lines reach the worker's log, and so (`engine_log_to`) the predictions' logs."""
    logging.basicConfig(level=logging.INFO, format=f"worker[{os.getpid()}] %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # also where a host (Ray) configured the root logger first
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per hub request while weights load


def serve(
    conn: Channel,
    model: str | None,
    device: str | None,
    mode: Mode | None = None,
    preload: tuple[Mode, ...] = MODES,
) -> None:
    """A worker's life on any channel: set up the engine, say what it can serve (its `mode`, or every mode),
    then run the jobs it is sent, one at a time, until
    the server goes or says stop (the process exits: nothing keeps the GPU once the server is gone)."""
    jobs: queue.Queue[Job | None] = queue.Queue()
    send_lock, state_lock = threading.Lock(), threading.Lock()
    running: dict[str, threading.Event] = {}  # the job now running, and its cancel flag
    early_cancels: set[str] = set()

    engine: Engine | None = None

    def send(event: Event) -> None:
        with send_lock:
            if isinstance(event, Succeeded | Failed | Canceled) and engine is not None:
                conn.send(Holding(engine.executor.holds()))  # before the slot frees: routing reads it
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

    setup_error: str | None = None
    try:
        from ..engine import Engine
        from ..images import ImageLoader

        # Images arrive as the bytes checked at create; the engine never fetches or reads a path here.
        # A device group ("cuda:0+cuda:1") gives an engine that splits each request across its GPUs.
        # A setup that fails after this (a preload's download) leaves the engine to the jobs, which try
        # again and fail with their own reason if they must.
        engine = Engine(model, device=device, loader=ImageLoader(allow_local_paths=False))
        capacity = serving_capacity(engine, (mode,) if mode else MODES)
        log.info(
            "on a budget of %s this worker can serve: %s", _budget(capacity), describe_capacity(capacity)
        )
        send(capacity)  # before any download: a create no worker can hold is refused from now on
        modes = preload_models(engine, capacity, preload, send)
        speed = engine.settings.speed
        if modes and speed.on(speed.warmup, engine.device):  # compile and tune now, not in the first request
            log.info("warmed up in %s", engine.warm_up(modes))
    except Exception as exc:
        setup_error = f"model setup failed: {type(exc).__name__}: {exc}"
        log.error("%s\n%s", setup_error, traceback.format_exc())
        send(StateChanged("SETUP_FAILED", setup_error))
    else:
        send(Holding(engine.executor.holds()))
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


def preload_models(
    engine: Engine, capacity: Capacity, modes: tuple[Mode, ...], send: Send
) -> tuple[Mode, ...]:
    """Pull (reporting DOWNLOADING with the bytes) and load the model of each preload mode this worker
    serves and can hold (`capacity`), once per model; returns the modes loaded. A model that would drop
    another one from memory to fit (no room for it in CPU memory, i2v.residency) is pulled but loads on
    first use. A prediction for one of them waits in the server's queue meanwhile."""
    fits = {o.mode for o in capacity.offers if o.preset == "default" and o.durations}
    distinct: dict[BackendKey, Mode] = {}
    for mode in modes:
        if mode not in fits:
            if any(o.mode == mode for o in capacity.offers):  # its own: it does not fit this worker's budget
                log.info("not preloading mode %s: it does not fit this worker's memory budget", mode)
            continue
        distinct.setdefault(engine.key(mode), mode)
    last: list[DownloadProgress] = []

    def downloading(progress: DownloadProgress) -> None:
        last[:] = [progress]
        send(StateChanged("DOWNLOADING", download=progress))

    loaded = []
    for key, mode in distinct.items():
        last.clear()
        engine.pull(mode, on_download=downloading)
        if last:
            send(StateChanged("STARTING"))
        if loaded and engine.executor.would_drop(key):
            log.info("pulled %s; it loads on first use (loading it now would drop another model)", key.ref)
            continue
        engine.backend(mode)
        loaded.append(mode)
    return tuple(loaded)


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
            send(
                Failed(
                    job.id,
                    out_of_memory_advice(
                        job.request.mode, job.request.duration, **_memory_facts(engine, job.request)
                    ),
                )
            )
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


def out_of_memory_advice(
    mode: str,
    duration: int,
    *,
    model: str | None = None,
    placement: str | None = None,
    budget: int | None = None,
    device: str | None = None,
) -> str:
    """What failed and what to change when a prediction did not fit in GPU memory."""
    smaller = []
    if mode == "pro":
        smaller.append("mode standard (720p instead of 1080p)")
    if duration == 10:
        smaller.append("duration 5")
    ask = "; ".join(smaller) if smaller else "a smaller request"
    what = f" running {model} ({placement})" if model else ""
    within = f" within a memory budget of {format_bytes(budget)} on {device}" if budget is not None else ""
    return (
        f"out of GPU memory{what}{within}: use {ask}; or set I2V_PRESET=low-vram (group offload); if "
        "another process shares the GPU, set I2V_GPU_MEMORY to what is left for i2v; or run the server "
        "on a GPU with more memory (docs/memory.md says what fits where). The worker is still up and serving"
    )


def _memory_facts(engine: Engine | None, request: KlingRequest) -> dict[str, object]:
    if engine is None:
        return {}
    try:
        key = engine.key(request.mode, engine.preset(request))
        need = engine.executor.need(key)
    except Exception:  # the advice must not fail over the facts
        return {}
    return {
        "model": key.ref,
        "placement": str(need.placement),
        "budget": engine.executor.budget,
        "device": str(engine.device),
    }


def serving_capacity(engine: Engine, modes: tuple[Mode, ...]) -> Capacity:
    """What this worker can run on its budget, per mode and preset (from footprints; no weights read)."""
    from ..errors import I2VError

    budget = engine.executor.budget
    offers = []
    for mode in modes:
        for preset in REQUEST_PRESETS:
            try:
                key = engine.key(mode, preset)
                need = engine.executor.need(key)
            except I2VError as exc:
                if preset == "default":
                    raise  # the mode's own model: the setup fails with the reason
                offers.append(Offer(mode, preset, "?", "", (), 0, 0, reason=str(exc)))
                continue
            missing = [d for d in need.peaks if d not in need.fits]
            reason = None
            if missing:
                limit = format_bytes(budget) if budget is not None else "unlimited"
                reason = (
                    f"{key.ref} needs {format_bytes(need.peaks[missing[0]])} for a {missing[0]} s clip at its "
                    f"best placement ({need.placement}), more than this worker's budget of {limit}"
                )
            offers.append(
                Offer(mode, preset, key.ref, str(need.placement), need.fits, need.idle, need.peak, reason)
            )
    return Capacity(budget, engine.settings.speed.request_preset(None), tuple(offers))


def describe_capacity(capacity: Capacity) -> str:
    parts = []
    for offer in capacity.offers:
        if offer.durations:
            seconds = " and ".join(f"{d} s" for d in offer.durations)
            parts.append(f"{offer.mode}/{offer.preset} ({offer.model}, {offer.placement}, {seconds})")
        else:
            parts.append(f"not {offer.mode}/{offer.preset} ({offer.reason})")
    return "; ".join(parts) or "nothing"


def _budget(capacity: Capacity) -> str:
    return format_bytes(capacity.budget_bytes) if capacity.budget_bytes is not None else "no limit"
