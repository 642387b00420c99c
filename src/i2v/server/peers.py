"""The other API servers on the same database: this server's liveness, and what they tell each other.

With SQLite there is one server (`Alone`). On PostgreSQL each server keeps one connection of its own
(`Peers`) that
- holds the advisory lock of the store's `claimant` key for as long as the server lives. The database
  frees it when that connection ends, however the server ended (a crash, SIGKILL, a lost machine), so
  another server finds the claims of a dead one without any clock (`Store.gone`), as the kernel frees
  the SQLite data dir's `flock`;
- LISTENs on the store's NOTIFY channel. The store announces an end, a cancel request and a newly queued
  prediction in the transaction that makes the change, so a message arrives exactly when the change has
  committed. `on_message(kind, prediction_id)` gets those of other servers.

Why LISTEN/NOTIFY and not only a poll: a cancel reaches the worker at its next step and a `Prefer: wait`
answers the moment the prediction ends, whichever server the client reached, with no query per waiting
request; and notifications are transactional, so one never runs ahead of the change it announces. The
messages are hints and the rows are the truth: a notification is lost while the connection is down, so
after each (re)connect `on_reconnect()` looks at the rows again, and the service's sweep (every
`SWEEP_S`) catches anything else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import psycopg

from .store import CHANNEL, Store

log = logging.getLogger(__name__)

RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 10.0
POLL_S = 1.0  # how often the listening thread looks up from the connection to see whether to stop

OnMessage = Callable[[str, str], None]


class PeerLink(Protocol):
    def start(self, on_message: OnMessage, on_reconnect: Callable[[], None]) -> None:
        """Hold this server's liveness and listen; returns once both are in place."""

    def stop(self) -> None: ...


class Alone:
    """SQLite: this is the only server (the data dir's lock says so); nothing to hold or hear."""

    def start(self, on_message: OnMessage, on_reconnect: Callable[[], None]) -> None:
        pass

    def stop(self) -> None:
        pass


class Peers:
    """PostgreSQL: this server's own connection, holding its liveness lock and listening for the others."""

    def __init__(self, store: Store) -> None:
        self.store = store
        args, params = store.engine.dialect.create_connect_args(store.engine.url)
        self._connect_args, self._connect_params = args, {**params, "autocommit": True}
        self._url = store.engine.url.render_as_string(hide_password=True)
        self._stopping = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_message: OnMessage, on_reconnect: Callable[[], None]) -> None:
        self._conn = self._connect()  # the first time in the caller: a server that cannot reach it stops
        self._thread = threading.Thread(
            target=self._listen, args=(on_message, on_reconnect), name="peers", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S + 5)
        if self._conn is not None:
            self._conn.close()  # frees the liveness lock

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(*self._connect_args, **self._connect_params)
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (self.store.claimant,))
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _listen(self, on_message: OnMessage, on_reconnect: Callable[[], None]) -> None:
        me = str(self.store.claimant)
        delay = RECONNECT_FIRST_S
        while not self._stopping.is_set():
            conn = self._conn
            try:
                if conn is None or conn.closed:
                    conn = self._conn = self._connect()
                    log.warning(
                        "the connection to %s is back; looking again at what may have changed", self._url
                    )
                    delay = RECONNECT_FIRST_S
                    on_reconnect()
                for note in conn.notifies(timeout=POLL_S):
                    sender, kind, prediction_id = [*note.payload.split(" ", 2), "", ""][:3]
                    if sender != me:
                        on_message(kind, prediction_id)
                    if self._stopping.is_set():
                        break
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                log.error(
                    "lost the connection to %s (%s); reconnecting in %.1f s (other servers may take this "
                    "server's running predictions for interrupted meanwhile)",
                    self._url,
                    exc,
                    delay,
                )
                if conn is not None:
                    conn.close()
                self._conn = None
                self._stopping.wait(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
            except Exception:
                log.exception("handling a message from another server failed")


def link(store: Store) -> PeerLink:
    return Peers(store) if store.shared else Alone()
