"""One request on several GPUs: Ulysses context parallelism (diffusers' `ContextParallelConfig`).

A device group such as `cuda:0+cuda:1` (`I2V_DEVICES`, `I2V_DEVICE`, `i2v generate --device`) gives one
`ParallelEngine`. It is rank 0 and runs in this process; it starts one follower process per other
device, and all of them join one torch.distributed group (NCCL on CUDA, gloo on CPU). Every rank loads
the same models; each transformer then keeps 1/N of the video tokens, and its attention exchanges heads
for tokens with an all-to-all, so each GPU attends over the whole clip while doing 1/N of the work.

Per request:

    rank 0:    request -> Plan (images fetched, seed fixed, inputs fitted) -> sent to every follower
    all ranks: the pipeline, in lock-step (text encoder and VAE run on every rank; the transformer is split)
    rank 0:    frames -> exact mp4

Followers wait for work on a pipe, not in a collective, so an idle group never hits a collective timeout.
A cancel is collective: every check all-reduces rank 0's flag, so all ranks stop at the same step.
A model diffusers cannot split (LTX-2 in diffusers 0.42.1) runs on rank 0 alone while the others wait.
A fault on any rank during a run ends the group: a half-finished collective cannot be recovered, so the
engine reports itself unhealthy and the server's worker restarts it (rank 0 exits if a follower dies).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from .backends import resolve
from .devices import device_group
from .engine import Engine, Plan, Rendered, Result
from .errors import Cancelled, I2VError
from .images import ImageLoader
from .progress import ProgressCallback, Reporter
from .request import KlingRequest
from .settings import Settings

log = logging.getLogger(__name__)
# diffusers 0.42.1's context-parallel gather calls a torch API that warns on every step.
warnings.filterwarnings("ignore", message=".*all_gather_tensor.* is deprecated", category=FutureWarning)


def open_engine(
    model: str | None = None,
    *,
    device: str | None = None,
    settings: Settings | None = None,
    loader: ImageLoader | None = None,
) -> Engine | ParallelEngine:
    """An Engine for one device, or a ParallelEngine for a device group ("cuda:0+cuda:1")."""
    settings = settings or Settings()
    devices = device_group(device or settings.device)
    if len(devices) > 1:
        return ParallelEngine(model, devices=devices, settings=settings, loader=loader)
    return Engine(model, device=devices[0] if devices else None, settings=settings, loader=loader)


def split_sequence(model: Any, degree: int, device: torch.device) -> None:
    """Ulysses on one transformer: each rank keeps 1/degree of the tokens (the model's `_cp_plan`).

    Plain Ulysses needs the heads and the sequence to split evenly: the heads are checked here, and the
    backends pick grid sizes whose token count divides (`Grid.size_for(tokens_multiple=)`). diffusers'
    "ulysses_anything" mode would lift that, but its uneven all-to-all cannot be traced by torch.compile.
    """
    from diffusers import ContextParallelConfig

    heads = model.config.num_attention_heads
    if heads % degree:
        raise I2VError(
            f"{type(model).__name__} has {heads} attention heads, which {degree} GPUs cannot split"
        )
    # diffusers 0.42.1 records rank % torch.accelerator.device_count() as the rank's device, which divides
    # by zero on a host with no accelerator; there the CPU counts as one (the value is not used for CP).
    no_accelerator = torch.accelerator.device_count() == 0 and device.type == "cpu"
    count_cpu = mock.patch.object(torch.accelerator, "device_count", return_value=1)
    with count_cpu if no_accelerator else contextlib.nullcontext():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


class CollectiveCancel:
    """A cancel flag every rank reads together: `is_set` all-reduces rank 0's flag (a few bytes per step).

    Every rank must call `is_set` at the same points, which holds because all of them run `Engine.run`
    on the same plan; followers pass no local flag.
    """

    def __init__(self, local: threading.Event | None, device: torch.device) -> None:
        self._local = local
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)

    def is_set(self) -> bool:
        self._flag.fill_(1 if self._local is not None and self._local.is_set() else 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag.item())


class ParallelEngine:
    """An Engine spread over a device group; the same interface as `Engine` where the worker uses it."""

    def __init__(
        self,
        model: str | None = None,
        *,
        devices: tuple[str, ...],
        settings: Settings | None = None,
        loader: ImageLoader | None = None,
    ) -> None:
        if dist.is_initialized():  # diffusers' device meshes are built on the default process group
            raise I2VError("a process can hold one device group at a time; close() the other first")
        settings = settings or Settings()
        self.devices = devices
        self.settings = replace(settings, speed=replace(settings.speed, context_parallel=len(devices)))
        self.healthy = True
        self._closing = False
        self._rendezvous = Path(tempfile.mkdtemp(prefix="i2v-group-"))
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot survive fork
        self._followers: list[tuple[Any, Connection]] = []
        for rank in range(1, len(devices)):
            conn, child = context.Pipe()
            process = context.Process(
                target=follower_main,
                args=(child, rank, devices, self._rendezvous, model, self.settings),
                name=f"i2v-rank-{rank}",
                daemon=True,
            )
            process.start()
            child.close()
            self._followers.append((process, conn))
        threading.Thread(target=self._watch_followers, name="i2v-group-watch", daemon=True).start()
        atexit.register(self.close)  # before multiprocessing ends the followers, so the watcher stays calm
        join_group(0, devices, self._rendezvous)
        self.engine = Engine(model, device=devices[0], settings=self.settings, loader=loader)
        self.device = self.engine.device
        log.info("context-parallel group of %d on %s", len(devices), "+".join(devices))

    def _watch_followers(self) -> None:
        """A dead follower leaves rank 0 waiting in a collective forever: end this process instead."""
        sentinels = [process.sentinel for process, _ in self._followers]
        wait(sentinels)
        if self._closing:
            return
        dead = [(p.name, p.exitcode) for p, _ in self._followers if not p.is_alive()]
        log.critical("a rank of the GPU group died %s; the group cannot go on, exiting", dead)
        os._exit(70)

    def _send(self, *message: Any) -> None:
        for _, conn in self._followers:
            conn.send(message)

    def _splits(self, mode: str, preset: str) -> bool:
        """Whether this mode's model runs on the whole group (else rank 0 runs it alone)."""
        cls, _ = resolve(self.engine.model_ref(mode, preset), self.settings.tiny_dir)
        return cls.context_parallel

    def backend(self, mode: str, preset: str = "default") -> Any:
        if self._splits(mode, preset):  # every rank loads it: enabling parallelism is collective
            self._send("load", mode, preset)
        return self.engine.backend(mode, preset)

    def warm_up(self, modes: tuple[str, ...] = ("standard", "pro")) -> dict[str, float]:
        seconds = {}
        for mode in modes:
            backend = self.backend(mode)
            clock = time.perf_counter()
            if self._splits(mode, "default"):
                self._send("warm_up", mode)
            self._collective(backend.warm_up)
            seconds[mode] = time.perf_counter() - clock
        return seconds

    def render(
        self,
        request: KlingRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        timings: dict[str, float] | None = None,
    ) -> Rendered:
        """Engine.render across the group: rank 0 plans, every rank runs the model, rank 0 keeps the frames."""
        if not self.healthy:
            raise I2VError("the GPU group failed in an earlier run and is restarting")
        report = Reporter(on_progress, cancel)
        timings = timings if timings is not None else {}
        self.backend(request.mode, self.engine.preset(request))  # on every rank that runs it, first
        plan = self.engine.plan(request, report, timings)
        if not self._splits(plan.mode, plan.preset):
            return self.engine.run(plan, report, timings)
        self._send("run", plan)
        run_report = Reporter(on_progress, CollectiveCancel(cancel, self.device))
        return self._collective(self.engine.run, plan, run_report, timings)

    def generate(
        self,
        request: KlingRequest,
        output: str | Path,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        """Engine.generate across the group: the frames from `render`, the mp4 written by rank 0."""
        timings: dict[str, float] = {}
        rendered = self.render(request, on_progress=on_progress, cancel=cancel, timings=timings)
        return self.engine.write(rendered, request, output, Reporter(on_progress, cancel), timings)

    def _collective(self, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except Cancelled:
            raise  # every rank stopped at the same check: the group is still in step
        except BaseException:
            self.healthy = False  # the followers may be stuck mid-collective
            raise

    def close(self) -> None:
        """End the followers (they exit when their pipe closes) and leave the process group."""
        if self._closing:
            return
        self._closing = True
        for process, conn in self._followers:
            with contextlib.suppress(OSError):
                conn.close()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        shutil.rmtree(self._rendezvous, ignore_errors=True)


def join_group(rank: int, devices: tuple[str, ...], rendezvous: Path) -> None:
    """Join the group's process group: NCCL on CUDA, gloo on CPU; rendezvous through a file."""
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any collective, so NCCL binds this rank to its own GPU
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=(rendezvous / "store").as_uri(),
        rank=rank,
        world_size=len(devices),
        device_id=device if device.type == "cuda" else None,
    )


def follower_main(
    conn: Connection,
    rank: int,
    devices: tuple[str, ...],
    rendezvous: Path,
    model: str | None,
    settings: Settings,
) -> None:
    """A follower rank: load what rank 0 loads, run what it runs, and leave the output to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group ends
    logging.basicConfig(level=logging.INFO, format=f"rank{rank}[{os.getpid()}] %(levelname)s %(message)s")
    join_group(rank, devices, rendezvous)
    engine = Engine(model, device=devices[rank], settings=settings)
    cancel = CollectiveCancel(None, engine.device)
    for message in _messages(conn):
        try:
            if message[0] == "load":
                engine.backend(message[1], message[2])
            elif message[0] == "warm_up":
                engine.backend(message[1]).warm_up()
            elif message[0] == "run":
                with contextlib.suppress(Cancelled):  # rank 0 canceled: all ranks stopped at the same step
                    engine.run(message[1], Reporter(None, cancel), {})
        except BaseException:
            log.critical("rank %d failed; the group ends:\n%s", rank, traceback.format_exc())
            os._exit(70)


def _messages(conn: Connection) -> Iterator[tuple[Any, ...]]:
    while True:
        try:
            yield conn.recv()
        except (EOFError, OSError):  # rank 0 is gone: free the GPU now
            os._exit(0)


__all__ = ["ParallelEngine", "Plan", "open_engine", "split_sequence"]
