"""Per-token limits: token buckets for request rates, the slots of the image intake, and the identity a
token is known by in the store.

The rates are kept in this process's memory with one server (SQLite), and in the database when several
servers share one (`SharedRateLimiter`), so a token's rate is the same whichever server it reaches. The
intake's slots bound this server's own threads, so they stay per server."""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .store import Store

T = TypeVar("T")


def token_owner(token: str | None) -> str:
    """The id stored on a token's predictions and files: a hash, so the database never holds a token."""
    if not token:
        return ""  # no authentication: everything belongs to the one anonymous owner
    return hashlib.sha256(token.encode()).hexdigest()[:24]


class Limiter(Protocol):
    capacity: float

    def acquire(self, key: str) -> int:
        """0 when the request may go ahead, else the whole seconds until it could (Retry-After)."""


class RateLimiter:
    """`per_minute` requests per key, refilled continuously; a full minute's worth may come at once.

    `acquire` returns 0 when the request may go ahead, else the whole seconds until it could (Retry-After).
    A limit of 0 lets everything through.
    """

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> int:
        if self.capacity <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))


class SharedRateLimiter:
    """The same buckets as `RateLimiter`, kept in the database (`Store.take_token`, by its clock), for
    several servers on one database."""

    def __init__(self, store: Store, name: str, per_minute: int) -> None:
        self.store, self.name = store, name
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0

    def acquire(self, key: str) -> int:
        if self.capacity <= 0:
            return 0
        wait = self.store.take_token(f"{self.name}:{key}", self.capacity, self.rate)
        return max(1, math.ceil(wait)) if wait > 0 else 0


def rate_limiter(store: Store, name: str, per_minute: int) -> Limiter:
    """In memory with one server; in the database when other servers share it."""
    return SharedRateLimiter(store, name, per_minute) if store.shared else RateLimiter(per_minute)


class SlotsBusy(Exception):
    """No intake slot came free before the create's deadline; `whose` is "token" or "server"."""

    def __init__(self, whose: str) -> None:
        super().__init__(whose)
        self.whose = whose


class IntakeSlots:
    """Threads of their own for the slow part of a create (image fetches, DNS, decodes), at most
    `per_owner` creates of one token and `total` of all tokens at once.

    A host that trickles bytes then holds only its own token's slots: other tokens' creates, and every
    cancel, upload and read (which never run here), go on. A slot is given back when its thread is done,
    not when the create gave up waiting on it, so the bounds hold even for work that overstays.
    """

    def __init__(self, per_owner: int, total: int) -> None:
        self.per_owner, self.total = per_owner, total
        self._pool = ThreadPoolExecutor(max_workers=total, thread_name_prefix="intake")
        self._owners: dict[str, asyncio.Semaphore] = {}
        self._all: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def slot(self, owner: str, deadline: float) -> AsyncIterator[Lease]:
        """A slot for one create until `deadline` (the event loop's clock); `SlotsBusy` if none came free."""
        loop = asyncio.get_running_loop()
        mine = self._owners.setdefault(owner, asyncio.Semaphore(self.per_owner))
        every = self._all = self._all or asyncio.Semaphore(self.total)
        whose = "token"
        try:
            async with asyncio.timeout_at(deadline):
                await mine.acquire()
                whose = "server"
                try:
                    await every.acquire()
                except BaseException:
                    mine.release()
                    raise
        except TimeoutError:
            raise SlotsBusy(whose) from None
        lease = Lease(self._pool, loop, deadline, (mine, every))
        try:
            yield lease
        finally:
            lease.close()

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Lease:
    """One create's slot: `run` does blocking work on the intake threads until the create's deadline."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        semaphores: tuple[asyncio.Semaphore, ...],
    ) -> None:
        self._pool, self._loop, self.deadline, self._semaphores = pool, loop, deadline, semaphores
        self._working: Future[Any] | None = None

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on an intake thread; TimeoutError at the deadline (the thread keeps the slot until
        it is done: its own timeouts end it soon after)."""
        self._working = future = self._pool.submit(work, *args)
        return await asyncio.wait_for(asyncio.wrap_future(future), self.deadline - self._loop.time())

    def close(self) -> None:
        working = self._working
        if working is None or working.done():
            self._release()
        else:
            working.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self._release))

    def _release(self) -> None:
        for semaphore in self._semaphores:
            semaphore.release()
