"""What runs beside the predictions: the Prometheus metrics and the retention sweep."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .bodies import BodyBudget
from .config import ServerConfig
from .files import Files
from .runner import Runner, RunnerState
from .states import QUEUED, TERMINAL
from .storage import Storage, output_key, poster_key
from .store import PredictionRow, Store, utcnow

log = logging.getLogger(__name__)

PREDICT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, 1200, 1800, 3600)
RUNNER_STATES: tuple[RunnerState, ...] = get_args(RunnerState)


class Metrics:
    """Counters kept as predictions end, and gauges read from the store at scrape time (right across
    restarts)."""

    def __init__(self, store: Store, runner: Runner, bodies: BodyBudget | None = None) -> None:
        self.store, self.runner, self.bodies = store, runner, bodies
        self.registry = CollectorRegistry()
        self._predict_time = Histogram(
            "i2v_predict_time_seconds",
            "Time the model spent on a prediction",
            buckets=PREDICT_BUCKETS,
            registry=self.registry,
        )
        self._completed = Counter(
            "i2v_predictions_completed",
            "Predictions that ended, by final status",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(self)

    def ended(self, row: PredictionRow) -> None:
        self._completed.labels(row.status).inc()
        if row.predict_time is not None:
            self._predict_time.observe(row.predict_time)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Any]:
        counts = self.store.counts_by_status()
        queue = GaugeMetricFamily("i2v_queue_depth", "Predictions waiting for a worker")
        queue.add_metric([], counts[QUEUED])
        by_status = GaugeMetricFamily(
            "i2v_predictions", "Predictions in the store, by status", labels=["status"]
        )
        for status, n in counts.items():
            by_status.add_metric([status], n)
        ready = GaugeMetricFamily(
            "i2v_worker_state", "Runner state (1 for the current one)", labels=["state"]
        )
        state = self.runner.state()
        for name in RUNNER_STATES:
            ready.add_metric([name], 1 if name == state else 0)
        retries = CounterMetricFamily(
            "i2v_store_write_retries", "Background writes tried again because the database refused them"
        )
        retries.add_metric([], self.store.write_retries)
        yield from (queue, by_status, ready, retries)
        if self.bodies is not None:
            held = GaugeMetricFamily("i2v_request_body_bytes", "Bytes of request bodies held in memory now")
            held.add_metric([], self.bodies.held)
            yield held

    def describe(self) -> list[Any]:
        return []


class Retention:
    """Deletes outputs (mp4 and poster), inputs and uploads older than `I2V_RETENTION`, in the storage
    (files or bucket objects) and then in the rows: the prediction's record stays (`data_removed`). What
    the storage refuses now stays as it was and is tried again at the next sweep."""

    def __init__(self, config: ServerConfig, store: Store, files: Files, storage: Storage) -> None:
        self.config, self.store, self.files, self.storage = config, store, files, storage

    def run(self, stopping: threading.Event) -> None:
        period = max(1.0, min(60.0, (self.config.retention or 60) / 4))
        while not stopping.is_set():
            try:
                self.expire(utcnow())
            except Exception:
                log.exception("retention sweep failed")
            stopping.wait(timeout=period)

    def expire(self, now: datetime) -> None:
        """Delete outputs and inputs older than the retention time (`data_removed: true`, output null)."""
        if not self.config.retention:
            return
        cutoff = now - timedelta(seconds=self.config.retention)
        for row in self.store.expired_predictions(cutoff):
            try:
                for key in (output_key(row.id), poster_key(row.id)):
                    self.storage.delete(key)
            except OSError as exc:
                log.warning("retention: the output of %s could not be deleted yet (%s)", row.id, exc)
                continue
            kept = {
                k: (None if isinstance(v, str) and v.startswith("data:") else v) for k, v in row.input.items()
            }
            self.store.transition(row.id, TERMINAL, output=None, data_removed=True, input=kept)
        for file in self.store.expired_files(now):
            try:
                self.files.delete(file.id)
            except OSError as exc:
                log.warning("retention: file %s could not be deleted yet (%s)", file.id, exc)
