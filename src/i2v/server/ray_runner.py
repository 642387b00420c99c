"""GPU workers on a Ray cluster (`I2V_RUNNER=ray`): one actor per GPU, or per group of GPUs, on every node.

Imported only when the server is set to run on Ray; the HTTP layer sees a `Runner` like any other.

An actor is a worker exactly as a local worker process is one: `worker.serve` sets up the engine once (its
models stay resident) and runs one job at a time with the same job-running code. Only its pipe differs
(`ActorChannel`): the server's messages (`RunJob`, `CancelJob`) arrive as calls of `WorkerActor.send`, and
its events leave through a long poll, `WorkerActor.events`, which one thread of the runner calls again as
soon as it returns, so each actor's events arrive in order. The actor is threaded (`max_concurrency`): a
plain actor runs one method at a time, and a cancel must land while a job runs and the poll waits. A long
poll rather than a streaming generator because Ray Client (`ray://`) has no streaming methods, and rather
than a `ray.util.queue.Queue` because that queue is one more actor on some node that can die on its own;
the poll is also how the runner learns at once that an actor is gone.

No file system is shared: a job carries its images as bytes; the actor writes its mp4 and poster frame to
a scratch folder of its own and sends them back as bytes (`VideoBytes`, just before its `Succeeded`), which
the runner puts into the job's storage (the data folder, or S3) on the server's side.

Placement: a watcher looks at the cluster's live nodes every `WATCH_S` and keeps one actor per
`gpus_per_worker` units of the GPU resource on each, pinned to its node. A node that joins later (the
autoscaler adding one) gets its actors at the next look, and the queue flows to them without a restart.

One placement per cluster: of all the API servers of a deployment (`I2V_RAY_NAMESPACE`) on one cluster,
exactly one at a time places and drives the actors; were each to place its own, the second server's actors
would wait for GPUs forever, and their pending demand would make an autoscaler add nodes up to its maximum.
At every look, a server that does not lead tries to create a tiny named actor, `Placement` (`PLACEMENT` in
the namespace, no CPU, not detached, pinned to the driver's own node). Ray registers a named actor
synchronously, so exactly one creation succeeds and the others raise `ActorAlreadyExistsError` at once (two
creations racing included). The server that created it leads: it places the actors as above and publishes
its workers' views to it at each look. The others follow: they read what the leader published and report
those workers as never free, so their dispatchers never dispatch while their admission checks and health
see the real cluster. The queue is the shared database's, so the leader's dispatcher claims what any server
queued, and a cancel sent to any server reaches the leader's actor through the database's NOTIFY
(`peers.py`). The placement actor is owned by the leader's driver, as its workers are, so Ray's fate sharing
ends all of them with that driver however it ends (SIGKILL included: Ray frees the name and the GPUs within
a second or two); the next look of another server then creates the placement and takes over, and the
store's sweep puts back what the dead server ran.

Why an actor and not PostgreSQL's advisory lock: leadership must end exactly when the leader's actors end,
or a new leader would place actors beside the old ones, pending on GPUs still held. A lock in the database
can be lost (a dropped connection) while the actors live on; the named actor shares their fate by
construction, in the system that holds the GPUs, and also carries the views the followers report. Should
the placement actor die alone (its process killed), the leader creates it again; if another server got
there first, the leader kills its own actors (their predictions are lost workers, run again under
`I2V_RETRY_ON_RESTART`) and follows. Through Ray Client (`ray://`) the driver is the head's session for this
server, which Ray keeps for the client's reconnect grace period (`RAY_CLIENT_RECONNECT_GRACE_PERIOD`, 30 s)
after the server is gone: the takeover waits that long.

Failure: a call to an actor that died (its process or its whole node) raises `RayActorError`. Its job fails
with `worker_lost=True`, as a killed local worker's does, so the dispatcher runs it again when
`I2V_RETRY_ON_RESTART` asks. The actor is killed for good first: one only unreachable must not finish a job
already reported lost. The watcher places a new actor where there is room again, after a growing pause if
actors on that node keep dying before they are ready.

Why Ray core actors and not Ray Serve: i2v keeps its own durable queue (FIFO, cancel, retry after a lost
worker, the outcome stored once), and a job is minutes on one GPU with progress and a cooperative cancel
between steps. Serve's router would add a second, in-memory queue in front of ours that a restart loses, and
its autoscaling reads the requests it routes, which our dispatcher only hands out when a slot is free.
Actors give what the `Runner` needs and nothing on top: one long-lived process per GPU, placed on a node
we choose, and a clear error when it dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..request import MODES, Mode
from .config import ServerConfig
from .runner import (
    Canceled,
    Capacity,
    Event,
    EventCallback,
    Failed,
    Holding,
    Job,
    Log,
    RunnerState,
    Started,
    StateChanged,
    Succeeded,
    WorkerView,
)
from .storage import LocalStorage, poster_key
from .worker import CancelJob, RunJob, ToWorker, serve, worker_logging

log = logging.getLogger(__name__)

GPU = "GPU"  # Ray's own GPU resource: Ray hands each actor its GPUs (CUDA_VISIBLE_DEVICES)
POLL_S = 10.0  # how long one `events` call waits for the next event before it returns empty
WATCH_S = 2.0  # how often the cluster's nodes are looked at for room for more actors
ACTOR_THREADS = 4  # the long poll, and the server's messages (a job, a cancel) arriving while it waits
CONNECT_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between tries to reach the cluster (it may start after us)
MAX_PAUSE_S = 60.0
PLACEMENT = "i2v-placement"  # the leading server's named actor, one per namespace
READ_S = 10.0  # how long a follower waits for the placement actor's answer (it may still be starting)


@dataclass(frozen=True)
class WorkerSpec:
    """What one actor runs: the model, its device (None: the engine's choice) and the modes it loads at
    start. A per-actor set of modes to serve would join these (the local runner's device spec has them)."""

    model: str | None
    device: str | None
    preload: tuple[Mode, ...] = MODES


@dataclass(frozen=True)
class VideoBytes:
    """The mp4 (and poster frame) of a job that succeeded, sent just before its `Succeeded`: the actor's
    disk is its own."""

    id: str
    mp4: bytes
    poster: bytes | None = None


Outgoing = Event | VideoBytes


@dataclass(frozen=True)
class Published:
    """What the leading server last told the others: who it is (for their logs), and its runner's state and
    workers as its own dispatcher sees them."""

    leader: str
    state: RunnerState
    error: str | None
    workers: tuple[WorkerView, ...]


class Placement:
    """The named actor whose creator leads (see the module's docstring); it keeps the leader's last word."""

    def __init__(self) -> None:
        self._published: Published | None = None

    def publish(self, published: Published) -> None:
        self._published = published

    def read(self) -> Published | None:
        return self._published


# Inside the actor.


class ActorChannel:
    """`worker.serve`'s channel inside an actor. `put` takes the server's messages (`WorkerActor.send`),
    `take` hands the worker's events to the runner's poll. A job's mp4 goes to a scratch file of the actor
    and back to the server as bytes."""

    def __init__(self, scratch: Path) -> None:
        self._scratch = LocalStorage(scratch)
        self._scratch.check()  # its folders
        self._inbox: queue.Queue[ToWorker] = queue.Queue()
        self._outbox: queue.Queue[Outgoing] = queue.Queue()
        self._outputs: dict[str, str] = {}  # job id -> its mp4's key in the scratch storage

    def put(self, message: ToWorker) -> None:
        if isinstance(message, RunJob):
            self._outputs[message.job.id] = message.job.output
            message = RunJob(dataclasses.replace(message.job, storage=self._scratch))
        self._inbox.put(message)

    def recv(self) -> ToWorker:
        return self._inbox.get()

    def send(self, event: Event) -> None:
        if isinstance(event, Succeeded | Failed | Canceled) and (key := self._outputs.pop(event.id, None)):
            poster = poster_key(event.id)
            if isinstance(event, Succeeded):
                try:
                    mp4 = self._scratch.read(key)
                    self._outbox.put(VideoBytes(event.id, mp4, self._optional(poster)))
                except OSError as exc:
                    event = Failed(event.id, f"the worker could not read back the video it wrote: {exc}")
            for written in (key, poster):
                with contextlib.suppress(OSError):
                    self._scratch.delete(written)
        self._outbox.put(event)

    def _optional(self, key: str) -> bytes | None:
        """A scratch file the worker may not have written (no poster when it could not read its own clip)."""
        try:
            return self._scratch.read(key)
        except FileNotFoundError:
            return None

    def take(self, wait: float) -> list[Outgoing]:
        """What the worker has sent since the last call, waiting up to `wait` seconds for the first."""
        try:
            batch = [self._outbox.get(timeout=wait)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._outbox.get_nowait())
        return batch


class WorkerActor:
    """One worker on one GPU (or group) of a Ray node: `worker.serve` in a thread, its pipe as methods."""

    def __init__(self, spec: WorkerSpec) -> None:
        worker_logging()
        self._scratch = tempfile.TemporaryDirectory(prefix="i2v-worker-")
        self._channel = ActorChannel(Path(self._scratch.name))
        threading.Thread(
            target=serve,
            args=(self._channel, spec.model, spec.device, None, spec.preload),
            name="i2v-worker",
            daemon=True,
        ).start()

    def where(self) -> str:
        """The node's address and this process, for the logs of the predictions it runs."""
        return f"{ray.util.get_node_ip_address()} (pid {os.getpid()})"

    def send(self, message: ToWorker) -> None:
        self._channel.put(message)

    def events(self, wait: float) -> list[Outgoing]:
        return self._channel.take(wait)


# The server's side.


class RayWorker:
    """The runner's handle on one actor: its node, its state, the job it runs, and the thread that polls its
    events (the only caller of `events`, so they arrive in order)."""

    def __init__(self, index: int, node: str, actor: Any, runner: RayRunner) -> None:
        self.index, self.node, self.actor, self._runner = index, node, actor, runner
        self.state: RunnerState = "STARTING"
        self.error: str | None = None
        self.current: str | None = None
        self.capacity: Capacity | None = None  # what it can serve on its budget, once it has said
        self.holds: tuple[str, ...] = ()
        self.where = f"on node {node[:12]}"
        self._jobs: dict[str, Job] = {}  # job id -> the job, whose storage its mp4 goes to
        self._unwritten: dict[str, str] = {}  # job id -> why its mp4 could not be stored
        threading.Thread(target=self._poll, name=f"i2v-ray-worker-{index}", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.current = job.id
        self._jobs[job.id] = job
        self.actor.send.remote(RunJob(job))

    def cancel(self, prediction_id: str) -> None:
        self.actor.send.remote(CancelJob(prediction_id))

    def _poll(self) -> None:
        try:
            self.where = f"at {ray.get(self.actor.where.remote())}"  # returns once the actor is up
            while True:
                for item in ray.get(self.actor.events.remote(POLL_S)):
                    for event in self._translate(item):
                        self._runner.emit(event)
        except Exception as exc:  # RayActorError: the actor or its node died, or cannot be reached
            if self._runner.stopping:
                return
            if not isinstance(exc, RayError):  # ours: say where, and give the job up all the same
                log.exception("Ray worker %d: handling its events failed", self.index)
            self._lost(exc)

    def _translate(self, item: Outgoing) -> list[Event]:
        match item:
            case VideoBytes(prediction_id, mp4, poster):
                self._store(prediction_id, mp4, poster)
                return []
            case StateChanged("READY"):
                self.state = "READY"
                log.info("Ray worker %d is ready %s", self.index, self.where)
            case StateChanged("SETUP_FAILED", detail):
                self.state, self.error = "SETUP_FAILED", detail
            case StateChanged("DOWNLOADING" | "STARTING" as state):
                self.state = state
            case Capacity() as capacity:
                self.capacity = capacity
                return []
            case Holding(models):
                self.holds = models
                return []
            case Started(prediction_id):
                return [item, Log(prediction_id, f"running on the Ray worker {self.where}")]
            case Succeeded() | Failed() | Canceled():
                event: Event = item
                if isinstance(item, Succeeded) and (why := self._unwritten.pop(item.id, None)):
                    event = Failed(item.id, why)
                self._jobs.pop(item.id, None)
                self.current = None  # free before the event goes out, so the next job is dispatched at once
                return [event, StateChanged(self.state)]
        return [item]

    def view(self) -> WorkerView:
        return WorkerView(
            index=self.index,
            name=f"{self.index} (Ray {self.where})",
            modes=MODES,  # an actor serves every mode (WorkerSpec would carry a mode set)
            state=self.state if self.current is None or self.state != "READY" else "BUSY",
            free=self.state in ("READY", "SETUP_FAILED") and self.current is None,
            capacity=self.capacity,
            holds=self.holds,
        )

    def _store(self, prediction_id: str, mp4: bytes, poster: bytes | None) -> None:
        """Put a job's mp4 (its poster frame first) into the job's storage, as a local worker does."""
        job = self._jobs.get(prediction_id)
        if job is None:
            return
        try:
            if poster is not None:
                job.storage.put_bytes(poster_key(prediction_id), poster, "image/jpeg")
            job.storage.put_bytes(job.output, mp4, "video/mp4")
        except OSError as exc:  # StorageError too: the job fails with the storage's reason
            self._unwritten[prediction_id] = f"the server could not store the output video: {exc}"

    def _lost(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)  # one only unreachable must not finish a job reported lost
        cause = _first_line(exc)
        # Out of the runner's list first: the job's Failed below frees its slot, and the dispatcher, woken by
        # it, must not hand the next job to this dead actor (nobody would ever report that job's end).
        self._runner.lost(self)
        lost, self.current = self.current, None  # read after: a job submitted before the removal is caught
        log.error("Ray worker %d %s was lost: %s", self.index, self.where, cause)
        if lost is not None:
            message = f"the Ray worker {self.where} was lost while running this prediction: {cause}"
            self._runner.emit(Failed(lost, message, worker_lost=True))
        self._runner.emit(StateChanged(self._runner.state()))


class RayRunner:
    """Actors on the GPU nodes of a Ray cluster, one per `gpus_per_worker` units of `resource` on each."""

    def __init__(
        self,
        model: str | None,
        *,
        address: str = "auto",
        resource: str = GPU,
        gpus_per_worker: int = 1,
        preload: tuple[Mode, ...] = MODES,
        namespace: str = "i2v",
    ) -> None:
        self.address, self.resource, self.gpus_per_worker = address, resource, gpus_per_worker
        self.namespace = namespace
        self.name = f"{socket.gethostname()} (pid {os.getpid()})"  # this server, in the others' logs
        self.leading = False
        self._placement: Any = None  # the placement actor, while this server leads
        self._publishing: Any = None  # the last publish call, until it is through
        self._leader: Published | None = None  # what the leader published, while this server follows
        self.spec = WorkerSpec(model, self._device(), preload)
        self.stopping = False
        self._workers: list[RayWorker] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_event: EventCallback = lambda event: None
        self._index = itertools.count()
        self._crashes: dict[str, int] = {}  # node -> actors in a row that died there before they were ready
        self._not_before: dict[str, float] = {}  # node -> when the next actor may be placed there
        self._actor_class: Any = None
        self._placement_class: Any = None
        self._told_no_room = False  # that no node has the resource, once until one has

    @classmethod
    def from_config(cls, config: ServerConfig) -> RayRunner:
        return cls(
            config.model,
            address=config.ray_address,
            resource=config.ray_gpu_resource,
            gpus_per_worker=config.ray_gpus_per_worker,
            preload=config.preload_modes,
            namespace=config.ray_namespace,
        )

    def _device(self) -> str | None:
        """Ray gives an actor holding `num_gpus` its own GPUs, numbered from 0; any other resource name says
        nothing about devices, and the engine picks its own (cuda when it has one, else cpu)."""
        if self.resource != GPU:
            return None
        return "+".join(f"cuda:{i}" for i in range(self.gpus_per_worker))

    # the Runner protocol

    def start(self, on_event: EventCallback) -> None:
        self._on_event = on_event
        threading.Thread(target=self._watch, name="i2v-ray-watch", daemon=True).start()

    def state(self) -> RunnerState:
        if not self.leading:
            return self._leader.state if self._leader is not None else "STARTING"
        workers = self._snapshot()
        states = {w.state for w in workers}
        if "READY" in states or "SETUP_FAILED" in states:
            if _accepting(workers):
                return "READY" if "READY" in states else "SETUP_FAILED"
            return "BUSY"
        return "DOWNLOADING" if "DOWNLOADING" in states else "STARTING"

    def setup_error(self) -> str | None:
        if not self.leading:
            return self._leader.error if self._leader is not None else None
        return next((w.error for w in self._snapshot() if w.error), None)

    def workers(self) -> tuple[WorkerView, ...]:
        """Ours while this server leads; else the leader's, never free: its dispatcher runs them."""
        if not self.leading:
            leader = self._leader
            return tuple(dataclasses.replace(w, free=False) for w in leader.workers) if leader else ()
        return tuple(worker.view() for worker in self._snapshot())

    def submit(self, job: Job, worker: int) -> None:
        with self._lock:
            chosen = next((w for w in _accepting(self._workers) if w.index == worker), None)
            if chosen is not None:
                chosen.submit(job)
                return
        # Lost (or taken) since the dispatcher looked: the job never reached it, so it may run again. The
        # event goes out from a thread of its own, as a worker's events do, never from the dispatcher's.
        lost = Failed(job.id, f"the Ray worker {worker} was gone before the job reached it", worker_lost=True)
        threading.Thread(target=self.emit, args=(lost,), name="i2v-ray-lost", daemon=True).start()

    def cancel(self, prediction_id: str) -> None:
        for worker in self._snapshot():
            if worker.current == prediction_id:
                worker.cancel(prediction_id)

    def stop(self) -> None:
        self.stopping = True
        self._stop.set()
        for worker in self._snapshot():
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)
        if self._placement is not None:  # the name frees now, not when Ray notices the driver has gone
            with contextlib.suppress(Exception):
                ray.kill(self._placement, no_restart=True)
        with contextlib.suppress(Exception):
            ray.shutdown()

    # for the workers' threads

    def emit(self, event: Event) -> None:
        self._on_event(event)

    def lost(self, worker: RayWorker) -> None:
        """A worker's actor is gone: its slot goes (under the lock `submit` chooses in, so no job reaches it
        after this); its node gets a new one, after a pause if it keeps dying."""
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            crashes = self._crashes[worker.node] = (
                0 if worker.state != "STARTING" else self._crashes.get(worker.node, 0) + 1
            )
            self._not_before[worker.node] = time.monotonic() + min(MAX_PAUSE_S, 2.0**crashes - 1)

    # placement

    def _snapshot(self) -> list[RayWorker]:
        with self._lock:
            return list(self._workers)

    def _watch(self) -> None:
        if not self._connect():
            return
        while not self._stop.is_set():
            try:
                if self.leading or self._elect():
                    self._place()
                    self._publish()
                else:
                    self._follow()
            except Exception as exc:  # the cluster is unreachable for now: look again at the next round
                log.warning("could not look at the Ray cluster's nodes: %s", exc)
            self._stop.wait(WATCH_S)

    # one placement per cluster (the module's docstring)

    def _elect(self) -> bool:
        """Create the placement actor: True if this server did, and so leads now."""
        options: dict[str, Any] = {"name": PLACEMENT, "num_cpus": 0, "max_restarts": 0}
        # On the driver's node (the head's, through Ray Client), which lives as long as the driver: not on a
        # GPU node that can die alone. Hard: Ray's soft affinity places it elsewhere as readily.
        with contextlib.suppress(Exception):
            here = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=False)
        try:
            placement = self._placement_class.options(**options).remote()
        except ActorAlreadyExistsError:  # raised at once: Ray registers a named actor synchronously
            self._stand_down()
            return False
        with self._lock:
            if self.stopping:
                ray.kill(placement, no_restart=True)
                return False
            self._placement, self._publishing, self._leader = placement, None, None
            self.leading = True
        log.info(
            "this server leads the Ray namespace %r (I2V_RAY_NAMESPACE): it places and drives the workers",
            self.namespace,
        )
        return True

    def _publish(self) -> None:
        """Tell the followers about our workers, once the last word has gone through (the placement actor
        may still be starting): a publish that fails means the placement actor is gone."""
        if self._publishing is not None:
            done, _ = ray.wait([self._publishing], timeout=0)
            if not done:
                return
            try:
                ray.get(done[0])
            except RayError as exc:
                self._placement_lost(exc)
                return
        published = Published(self.name, self.state(), self.setup_error(), self.workers())
        self._publishing = self._placement.publish.remote(published)

    def _placement_lost(self, exc: BaseException) -> None:
        with self._lock:
            self.leading, self._placement, self._publishing = False, None, None
        log.error("this server's Ray placement actor was lost (%s); electing again", _first_line(exc))
        self._elect()

    def _stand_down(self) -> None:
        """Another server leads: actors this one still has (it led until its placement actor was lost)
        must not run beside the leader's."""
        workers = self._snapshot()
        if not workers:
            return
        log.error(
            "another server took the Ray placement: this server's %d worker(s) stop, their predictions go "
            "back to the queue (I2V_RETRY_ON_RESTART) or fail, and it follows",
            len(workers),
        )
        for worker in workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)  # its poll thread reports it lost

    def _follow(self) -> None:
        """Read what the leader published; gone, the next round elects."""
        previous = self._leader
        try:
            published = ray.get(ray.get_actor(PLACEMENT).read.remote(), timeout=READ_S)
        except GetTimeoutError:
            return  # the leader's placement actor is still starting
        except (ValueError, RayError):  # gone since the election: the leader ended
            published = None
        self._leader = published
        if published is not None and (previous is None or previous.leader != published.leader):
            log.info(
                "the Ray workers of namespace %r are placed by the server at %s: this one follows, and its "
                "predictions run on that server's workers",
                self.namespace,
                published.leader,
            )
        if previous is not None and published is None:
            log.warning("the server at %s no longer leads the Ray placement: electing again", previous.leader)
        if (previous.state if previous else None) != (published.state if published else None):
            self.emit(StateChanged(self.state(), self.setup_error()))  # for health and the metrics

    def _connect(self) -> bool:
        for attempt in itertools.count():
            try:
                # the workers' log lines join ours; the namespace scopes the placement's name
                ray.init(address=self.address, namespace=self.namespace, log_to_driver=True)
            except Exception as exc:
                delay = CONNECT_RETRY_S[min(attempt, len(CONNECT_RETRY_S) - 1)]
                log.error(
                    "cannot reach the Ray cluster at %s (I2V_RAY_ADDRESS): %s; trying again in %.0f s",
                    self.address,
                    _first_line(exc),
                    delay,
                )
                if self._stop.wait(delay):
                    return False
            else:
                log.info(
                    "connected to the Ray cluster at %s; one worker per %d %s on each node",
                    self.address,
                    self.gpus_per_worker,
                    self.resource,
                )
                self._actor_class = ray.remote(WorkerActor)
                self._placement_class = ray.remote(Placement)
                return True
        return False  # pragma: no cover (the loop only ends by returning)

    def _place(self) -> None:
        """One actor per `gpus_per_worker` units of the resource on each live node, where there is none yet."""
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        rooms = {
            n["NodeID"]: int(n.get("Resources", {}).get(self.resource, 0) // self.gpus_per_worker)
            for n in nodes
        }
        if not any(rooms.values()) and not self._told_no_room:
            log.warning(
                "no node of the Ray cluster has %d %s (I2V_RAY_GPU_RESOURCE) yet: predictions wait in the "
                "queue until one joins",
                self.gpus_per_worker,
                self.resource,
            )
        self._told_no_room = not any(rooms.values())
        now = time.monotonic()
        with self._lock:
            if self.stopping or not self.leading:
                return
            for node_id, room in rooms.items():
                have = sum(1 for w in self._workers if w.node == node_id)
                if have >= room or now < self._not_before.get(node_id, 0.0):
                    continue
                for _ in range(room - have):
                    index = next(self._index)
                    log.info("placing Ray worker %d on node %s", index, node_id[:12])
                    self._workers.append(RayWorker(index, node_id, self._new_actor(node_id), self))

    def _new_actor(self, node_id: str) -> Any:
        options: dict[str, Any] = {
            "num_cpus": 0,  # a worker is counted by its GPUs
            "max_concurrency": ACTOR_THREADS,
            "max_restarts": 0,  # the runner places a new one itself, after failing the job the dead one held
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        }
        if self.resource == GPU:
            options["num_gpus"] = self.gpus_per_worker
        else:
            options["resources"] = {self.resource: self.gpus_per_worker}
        return self._actor_class.options(**options).remote(self.spec)


def _accepting(workers: list[RayWorker]) -> list[RayWorker]:
    """Free workers, ready ones first: one whose setup failed still takes jobs (each fails with the reason,
    rather than waiting forever), but only when no ready one is free."""
    free = [w for w in workers if w.state in ("READY", "SETUP_FAILED") and w.current is None]
    return sorted(free, key=lambda w: w.state != "READY")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
