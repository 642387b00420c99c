"""One request on several GPUs: CFG parallel and Ulysses context parallelism.

A device group such as `cuda:0+cuda:1` (`I2V_DEVICES`, `I2V_DEVICE`, `i2v generate --device`) gives the
engine a `GroupExecutor`. It is rank 0 and runs in this process; it starts one follower process per other
device, and all of them join one torch.distributed group (NCCL on CUDA, gloo on CPU). Every rank loads
the same models, and each backend's group plan (`i2v.speed.group_plan`) says how a clip is split:

- CFG parallel (`i2v.cfg_parallel`), for a model sampled with guidance on an even group: half the ranks
  run the conditional pass and half the unconditional one, and one all_gather per step shares them;
- Ulysses (diffusers' `ContextParallelConfig`), on the whole group or within each CFG half: each
  transformer keeps 1/N of the video tokens, and its attention exchanges heads for tokens with an
  all-to-all, so each GPU attends over the whole clip while doing 1/N of the work.

Per request:

    rank 0:    request -> Plan (images fetched, seed fixed, inputs fitted) -> `Run(plan)` to every follower
    all ranks: the pipeline, in lock-step (text encoder and VAE run on every rank; the transformer is split)
    rank 0:    frames -> exact mp4

Followers wait for work on a pipe, not in a collective, so an idle group never hits a collective timeout.
A cancel is collective: every check all-reduces rank 0's flag, so all ranks stop at the same step.
A model whose plan is rank 0 alone (LTX-2: see docs/speed.md) runs there while the others wait.
A fault on any rank during a run ends the group: a half-finished collective cannot be recovered, so the
executor reports itself unhealthy and the server's worker restarts it (rank 0 exits if a follower dies).
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
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from .backends import Backend, BackendSpec, Clip
from .errors import Canceled, I2VError
from .executors import BackendKey, LocalExecutor, Plan
from .memory import Need
from .progress import CancelFlag, Reporter
from .settings import Settings

log = logging.getLogger(__name__)
# diffusers 0.42.1's context-parallel gather calls a torch API that warns on every step.
warnings.filterwarnings("ignore", message=".*all_gather_tensor.* is deprecated", category=FutureWarning)

T = TypeVar("T")


# What rank 0 sends its followers (each pickles as it is).


@dataclass(frozen=True)
class Load:
    """Load this backend now: enabling parallelism on its transformer is a collective."""

    key: BackendKey


@dataclass(frozen=True)
class WarmUp:
    key: BackendKey


@dataclass(frozen=True)
class Run:
    plan: Plan


FollowerMessage = Load | WarmUp | Run


class CollectiveCancel:
    """A cancel flag every rank reads together: `is_set` all-reduces rank 0's flag (a few bytes per step).

    Every rank must call `is_set` at the same points, which holds because all of them run the same plan
    through `LocalExecutor.run`; followers pass no local flag.
    """

    def __init__(self, local: CancelFlag | None, device: torch.device) -> None:
        self._local = local
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)

    def is_set(self) -> bool:
        self._flag.fill_(1 if self._local is not None and self._local.is_set() else 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag.item())


@dataclass
class Follower:
    process: BaseProcess
    conn: Connection


class GroupExecutor:
    """Rank 0 of a device group: a `LocalExecutor` here, and one follower process per other device."""

    def __init__(self, devices: tuple[str, ...], settings: Settings) -> None:
        if dist.is_initialized():  # diffusers' device meshes are built on the default process group
            raise I2VError("a process can hold one device group at a time; close() the other first")
        self.devices, self.ranks = devices, len(devices)
        self._healthy = True
        self._closing = False
        self._rendezvous = Path(tempfile.mkdtemp(prefix="i2v-group-"))
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot survive fork
        self.followers: list[Follower] = []
        for rank in range(1, len(devices)):
            conn, child = context.Pipe()
            process = context.Process(
                target=follower_main,
                args=(child, rank, devices, self._rendezvous, settings),
                name=f"i2v-rank-{rank}",
                daemon=True,
            )
            process.start()
            child.close()
            self.followers.append(Follower(process, conn))
        threading.Thread(target=self._watch_followers, name="i2v-group-watch", daemon=True).start()
        atexit.register(self.close)  # before multiprocessing ends the followers, so the watcher stays calm
        join_group(0, devices, self._rendezvous)
        self.local = LocalExecutor(torch.device(devices[0]), settings, ranks=self.ranks)
        self.device = self.local.device
        log.info("device group of %d on %s", len(devices), "+".join(devices))

    @property
    def healthy(self) -> bool:
        return self._healthy

    def _watch_followers(self) -> None:
        """A dead follower leaves rank 0 waiting in a collective forever: end this process instead."""
        wait([follower.process.sentinel for follower in self.followers])
        if self._closing:
            return
        dead = [(f.process.name, f.process.exitcode) for f in self.followers if not f.process.is_alive()]
        log.critical("a rank of the GPU group died %s; the group cannot go on, exiting", dead)
        os._exit(70)

    def _send(self, message: FollowerMessage) -> None:
        for follower in self.followers:
            follower.conn.send(message)

    def spec(self, key: BackendKey) -> tuple[type[Backend], BackendSpec]:
        return self.local.spec(key)

    @property
    def budget(self) -> int | None:
        return self.local.budget  # rank 0's; each follower keeps its own device within its own

    def need(self, key: BackendKey) -> Need:
        return self.local.need(key)

    def holds(self) -> tuple[str, ...]:
        return self.local.holds()

    def would_drop(self, key: BackendKey) -> bool:
        return self.local.would_drop(key)

    def _splits(self, key: BackendKey) -> bool:
        """Whether this backend runs on the whole group (else rank 0 runs it alone): its group plan."""
        cls, spec = self.spec(key)
        return cls.group_plan(spec, self.ranks, self.local.settings.speed).ranks > 1

    def backend(self, key: BackendKey, report: Reporter | None = None) -> Backend:
        if self._splits(key) and key not in self.local.loaded():
            self._send(Load(key))  # every rank loads it: enabling parallelism is collective
            return self._collective(self.local.backend, key, report)
        return self.local.backend(key, report)

    def warm_up(self, key: BackendKey) -> None:
        self.backend(key)
        if self._splits(key):
            self._send(WarmUp(key))
        self._collective(self.local.warm_up, key)

    def run(self, plan: Plan, report: Reporter) -> Clip:
        """Every rank runs the plan (or rank 0 alone, for a model that does not split); rank 0 keeps the
        frames."""
        if not self._healthy:
            raise I2VError("the GPU group failed in an earlier run and is restarting")
        if not self._splits(plan.key):
            return self.local.run(plan, report)
        self._send(Run(plan))
        collective = report.with_cancel(CollectiveCancel(report.cancel, self.device))
        return self._collective(self.local.run, plan, collective)

    def _collective(self, function: Callable[..., T], *args: object) -> T:
        try:
            return function(*args)
        except Canceled:
            raise  # every rank stopped at the same check: the group is still in step
        except BaseException:
            self._healthy = False  # the followers may be stuck mid-collective
            raise

    def close(self) -> None:
        """End the followers (they exit when their pipe closes) and leave the process group."""
        if self._closing:
            return
        self._closing = True
        for follower in self.followers:
            with contextlib.suppress(OSError):
                follower.conn.close()
            follower.process.join(timeout=10)
            if follower.process.is_alive():
                follower.process.kill()
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
    conn: Connection, rank: int, devices: tuple[str, ...], rendezvous: Path, settings: Settings
) -> None:
    """A follower rank: load what rank 0 loads, run what it runs, and leave the output to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group ends
    logging.basicConfig(level=logging.INFO, format=f"rank{rank}[{os.getpid()}] %(levelname)s %(message)s")
    join_group(rank, devices, rendezvous)
    executor = LocalExecutor(torch.device(devices[rank]), settings, ranks=len(devices))
    report = Reporter(None, CollectiveCancel(None, executor.device))
    for message in _messages(conn):
        try:
            match message:
                case Load(key):
                    executor.backend(key)
                case WarmUp(key):
                    executor.warm_up(key)
                case Run(plan):
                    with contextlib.suppress(Canceled):  # rank 0 canceled: all ranks stopped at one step
                        executor.run(plan, report)
        except BaseException:
            log.critical("rank %d failed; the group ends:\n%s", rank, traceback.format_exc())
            os._exit(70)


def _messages(conn: Connection) -> Iterator[FollowerMessage]:
    while True:
        try:
            yield conn.recv()
        except (EOFError, OSError):  # rank 0 is gone: free the GPU now
            os._exit(0)
