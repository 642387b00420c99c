"""Helpers for the tests of several `i2v serve` processes on one PostgreSQL database (test_several_servers.py,
with local workers, and test_scaleout.py, on a Ray cluster): creates spread over the servers, each ended as
asked, run once (counted at the workers: `fault:tally`), answered once and its webhook sent once.

Every wait is on a state (a status, a row), bounded by a generous timeout.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from PIL import Image
from serverproc import PREDICTIONS, ServerProcess, WebhookReceiver

from i2v.server.states import TERMINAL

DEADLINE_S = 300


def small_jpeg() -> str:
    """A few KB: the creates cost the service, not base64."""
    out = io.BytesIO()
    Image.linear_gradient("L").resize((480, 320)).convert("RGB").save(out, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


IMAGE = small_jpeg()


def http(server: ServerProcess, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.base, headers={"authorization": f"Bearer {token}"}, timeout=90)


def rows(database: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.replace("postgresql+psycopg", "postgresql")) as conn:
        return conn.execute(query).fetchall()


def wait_terminal(servers: list[ServerProcess], owned: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each prediction (id -> its token) once it has ended, read through either server in turn."""
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + DEADLINE_S
    clients: dict[tuple[int, str], httpx.Client] = {}
    try:
        while len(done) < len(owned):
            for n, (prediction_id, token) in enumerate(owned.items()):
                if prediction_id in done:
                    continue
                client = clients.get((n % 2, token)) or clients.setdefault(
                    (n % 2, token), http(servers[n % 2], token)
                )
                answer = client.get(f"/v1/predictions/{prediction_id}")
                assert answer.status_code == 200, answer.text
                if answer.json()["status"] in TERMINAL:
                    done[prediction_id] = answer.json()
            assert time.monotonic() < deadline, (
                f"{len(owned) - len(done)} not ended:\n{servers[0].log_tail()}"
            )
            time.sleep(0.1)
    finally:
        for client in clients.values():
            client.close()
    return done


@dataclass
class Spread:
    """What `spread_creates` made: each create's kind (`cancel`, `wait`, `plain`), id and final body."""

    plan: dict[int, str]
    ids: list[str]
    final: dict[str, dict[str, Any]]
    tally: Path

    def runs(self) -> collections.Counter[str]:
        """How many times each prompt ran, counted at the workers."""
        return collections.Counter(line.split(" ", 1)[1] for line in self.tally.read_text().splitlines())

    def per_worker(self) -> collections.Counter[str]:
        return collections.Counter(line.split(" ", 1)[0] for line in self.tally.read_text().splitlines())

    def check_each_ran_once(self) -> None:
        """A succeeded prediction ran exactly once, a canceled one at most once."""
        runs = self.runs()
        for n, prediction_id in enumerate(self.ids):
            count = runs[self.final[prediction_id]["input"]["prompt"]]
            assert count == 1 if self.plan[n] != "cancel" else count <= 1, (n, count)


def spread_creates(
    servers: list[ServerProcess],
    count: int,
    tally: Path,
    receiver: WebhookReceiver,
    token_of: Callable[[int], str],
) -> Spread:
    """`count` creates through the servers in turn, 8 at once: a fifth wait for their answer (`Prefer:
    wait`), a fifth are long runs canceled through another server than the one that created them. Each ends
    as asked, and each wait's answer came in its create's own response, whichever server ran it."""
    plan = {n: ("cancel" if n % 5 == 0 else "wait" if n % 5 == 1 else "plain") for n in range(count)}
    answers: dict[int, dict[str, Any]] = {}

    def create(n: int) -> None:
        kind, here, there = plan[n], servers[n % 2], servers[(n + 1) % 2]
        prompt = f"fault:tally={tally} n={n}" + (" fault:slow:2000" if kind == "cancel" else "")
        body = {
            "input": {"prompt": prompt, "start_image": IMAGE},
            "webhook": receiver.url,
            "webhook_events_filter": ["start", "completed"],
        }
        headers = {"prefer": "wait=50"} if kind == "wait" else {}
        with http(here, token_of(n)) as client:
            created = client.post(PREDICTIONS, json=body, headers=headers)
            assert created.status_code == 201, created.text
            answer = created.json()
        if kind == "cancel":
            with http(there, token_of(n)) as other:  # the cancel reaches the other server
                canceled = other.post(f"/v1/predictions/{answer['id']}/cancel")
                assert canceled.status_code == 200, canceled.text
        answers[n] = answer

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))
    for n, answer in answers.items():
        if plan[n] == "wait":
            assert answer["status"] == "succeeded", answer
    ids = [answers[n]["id"] for n in range(count)]
    final = wait_terminal(servers, {ids[n]: token_of(n) for n in range(count)})
    for n, prediction_id in enumerate(ids):
        expected = "canceled" if plan[n] == "cancel" else "succeeded"
        assert final[prediction_id]["status"] == expected, final[prediction_id]
    return Spread(plan, ids, final, tally)


def check_each_webhook_once(database: str, receiver: WebhookReceiver, ids: list[str]) -> None:
    """Every terminal delivery recorded as delivered (nothing pending, so no copy can follow); exactly one
    terminal webhook per prediction, at most one start, and every webhook id unique."""
    deadline = time.monotonic() + DEADLINE_S
    while rows(database, "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'") != [(0,)]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    terminal: collections.Counter[str] = collections.Counter()
    started: collections.Counter[str] = collections.Counter()
    for _, _, body in receiver.calls:
        sent = json.loads(body)
        (terminal if sent["status"] in TERMINAL else started)[sent["id"]] += 1
    assert all(terminal[p] == 1 for p in ids), [p for p in ids if terminal[p] != 1]
    assert all(started[p] <= 1 for p in ids)
    assert len({h["webhook-id"] for _, h, _ in receiver.calls}) == len(receiver.calls)
    failed = rows(database, "SELECT count(*) FROM webhook_deliveries WHERE state = 'failed' AND terminal")
    assert failed == [(0,)]
