"""Attacks on a real `i2v serve` (fault-injection backend): hostile clients, races and faults (issue 16).

What must hold, whatever the attack: no create, read, list or cancel answers 5xx (a storage failure is a
507 where the issue asks for one); no prediction leaves a terminal state and each sends one terminal
webhook; whatever is accepted reads back; a slow image host delays nobody else; a write the disk refuses
is retried until the prediction ends; a second server on the data dir refuses to start.

Bounded for CI; `I2V_ATTACK_SCALE=10` multiplies the counts (docs/reliability.md has both runs). The
figures of a run are printed (`-s`) and, with `I2V_HARDENING_REPORT=file.json`, added to that file.

Every wait is on a state (a status, a metric, a connection count, a file), bounded by a generous timeout;
the only times compared are one request's against the same request's before the attack.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import os
import random
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from conftest import make_image
from hardening import NO_LIMITS, fault_server
from PIL import Image
from replicate.webhook import InvalidSignatureError
from serverproc import MODEL, PREDICTIONS, TOKEN, ServerProcess, WebhookReceiver

from i2v.server.states import TERMINAL

SCALE = float(os.environ.get("I2V_ATTACK_SCALE", "1"))
REPORT = os.environ.get("I2V_HARDENING_REPORT")
OTHER_TOKEN = "other-token"  # the second token ServerProcess configures
BODY_MEMORY = 16 * 2**20
BODY_TIMEOUT = 10
ROOT = Path(__file__).resolve().parents[1]
FIGURES: dict[str, Any] = {}


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


def report(name: str, figures: dict[str, Any]) -> None:
    FIGURES[name] = figures
    print(f"\n{name}: {json.dumps(figures)}")
    if REPORT:
        path = Path(REPORT)
        known = json.loads(path.read_text()) if path.is_file() else {}
        known[f"attack.{name}"] = figures
        path.write_text(json.dumps(known, indent=2))


def small_jpeg_uri(seed: int = 0) -> str:
    """A few KB: the creates of a race cost the service, not base64."""
    image = Image.linear_gradient("L").resize((480, 320)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=70 + seed % 20)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


IMAGE = small_jpeg_uri()


class Host(http.server.ThreadingHTTPServer):
    """A loopback image host the test controls by events: `/slow.png` sends its headers and a byte, then a
    byte every 2 s until `release` is set, then hangs up; `/fine.png` serves an image; `/to/<scheme>`
    redirects to a URL of that scheme; POST `/hook-redirect` answers a webhook with a redirect to data:."""

    daemon_threads = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.changed = threading.Condition()
        self.active = self.max_active = self.served = 0
        super().__init__(("127.0.0.1", 0), HostHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server_address[1]}"

    def wait_active(self, count: int, timeout: float = 60) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.active >= count, timeout), (self.active, count)

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


REDIRECTS = {
    "data": "data:image/png;base64,iVBORw0KGgo=",
    "mailto": "mailto:someone@example.com",
    "javascript": "javascript:alert(1)",
    "ftp": "ftp://127.0.0.1/a.png",
    "file": "file:///etc/passwd",
}
FINE = make_image(480, 320, "JPEG")


class HostHandler(http.server.BaseHTTPRequestHandler):
    server: Host

    def do_GET(self) -> None:
        host = self.server
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path[4:]])
            self.end_headers()
        elif self.path == "/fine.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(FINE)))
            self.end_headers()
            self.wfile.write(FINE)
        elif self.path == "/slow.png":
            with host.changed:
                host.active += 1
                host.max_active = max(host.max_active, host.active)
                host.served += 1
                host.changed.notify_all()
            try:
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                while True:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    if host.release.wait(2.0):
                        break  # hang up: the body is cut short, the fetch fails
            except OSError:
                pass
            finally:
                with host.changed:
                    host.active -= 1
                    host.changed.notify_all()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(302)
        self.send_header("Location", REDIRECTS["data"])
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Iterator[ServerProcess]:
    proc = fault_server(
        tmp_path_factory.mktemp("attacks") / "data",
        **NO_LIMITS,
        I2V_FETCHES_PER_TOKEN="2",
        I2V_FETCHES_TOTAL="8",
        I2V_FETCH_TIMEOUT="120",  # the slow-host attack measures while its fetches are in flight
        I2V_BODY_MEMORY=str(BODY_MEMORY),
        I2V_BODY_TIMEOUT=str(BODY_TIMEOUT),
        I2V_TRUSTED_HOSTS="127.0.0.1",
        I2V_WEBHOOK_RETRY_DELAYS="0.2,0.2",
        log_pipe=True,  # the full-disk attack limits the server's file writes, its log's included
    )
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()
        if FIGURES:
            print("\nattack figures:", json.dumps(FIGURES))


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    served = Host()
    yield served
    served.close()


def client_for(server: ServerProcess, token: str = TOKEN, timeout: float = 90) -> httpx.Client:
    return httpx.Client(base_url=server.base, headers={"authorization": f"Bearer {token}"}, timeout=timeout)


def all_predictions(http: httpx.Client) -> list[dict[str, Any]]:
    results, url = [], "/v1/predictions"
    while url:
        page = http.get(url)
        assert page.status_code == 200, page.text
        results += page.json()["results"]
        url = page.json()["next"]
    return results


def wait_terminal(server: ServerProcess, ids: list[str], timeout: float = 300) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with client_for(server) as http:
        while len(done) < len(ids):
            for prediction_id in ids:
                if prediction_id not in done:
                    body = http.get(f"/v1/predictions/{prediction_id}").json()
                    if body["status"] in TERMINAL:
                        done[prediction_id] = body
            assert time.monotonic() < deadline, f"{len(ids) - len(done)} not ended:\n{server.log_tail()}"
            time.sleep(0.2)
    return done


def wait_idle(server: ServerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout

    def idle() -> bool:
        health = httpx.get(f"{server.base}/health-check", timeout=10).json()
        return health["status"] == "READY" and health["queue_depth"] == 0

    while not idle():
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)


def deliveries(server: ServerProcess) -> list[tuple[str, str, str, int, str | None]]:
    with contextlib.closing(sqlite3.connect(server.data_dir / "i2v.db")) as db:
        return db.execute(
            "SELECT prediction_id, event, state, attempts, last_error FROM webhook_deliveries WHERE terminal"
        ).fetchall()


# 1. a terminal state is final


@pytest.mark.parametrize(
    "prompt",
    [
        "fault:slow",  # one that starts is canceled at its next step: the worker is free every ~0.2 s
        "fault:oom",  # one that starts fails at once: nearly every create is started while its cancel runs
    ],
)
def test_create_then_cancel_at_once_never_leaves_a_terminal_state(server, prompt):
    """Waves of creates, each canceled the moment it is created, 16 in flight, while a poller reads the
    list: whatever a cancel, a read or a list says is terminal stays so; each prediction has exactly one
    terminal webhook, saying its final status."""
    in_flight, waves = 16, scaled(3)
    receiver = WebhookReceiver()
    # each observation: (when its request was sent, when its answer came, the status it said)
    seen: dict[str, list[tuple[float, float, str]]] = {}
    cancel_said: dict[str, str] = {}
    statuses: list[int] = []

    def observe(prediction_id: str, sent: float, status: str) -> None:
        seen.setdefault(prediction_id, []).append((sent, time.monotonic(), status))

    async def attack() -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=server.base, headers=auth, timeout=120, limits=limits) as http:
            stop = asyncio.Event()

            async def poll() -> None:
                while not stop.is_set():
                    sent = time.monotonic()
                    page = await http.get("/v1/predictions")
                    statuses.append(page.status_code)
                    for prediction in page.json()["results"]:
                        observe(prediction["id"], sent, prediction["status"])
                    await asyncio.sleep(0.05)

            async def one(n: int) -> None:
                body = {
                    "input": {"prompt": prompt, "start_image": IMAGE, "seed": n},
                    "webhook": receiver.url,
                    "webhook_events_filter": ["completed"],
                }
                sent = time.monotonic()
                created = await http.post(PREDICTIONS, json=body)
                statuses.append(created.status_code)
                assert created.status_code == 201, created.text
                prediction_id = created.json()["id"]
                observe(prediction_id, sent, created.json()["status"])
                sent = time.monotonic()
                canceled = await http.post(f"/v1/predictions/{prediction_id}/cancel")
                statuses.append(canceled.status_code)
                assert canceled.status_code == 200, canceled.text
                cancel_said[prediction_id] = canceled.json()["status"]
                observe(prediction_id, sent, canceled.json()["status"])

            poller = asyncio.create_task(poll())
            for wave in range(waves):
                await asyncio.to_thread(wait_idle, server)  # a free worker: the first create races its start
                await asyncio.gather(*(one(wave * in_flight + n) for n in range(in_flight)))
            stop.set()
            await poller

    try:
        asyncio.run(attack())
        ids = list(cancel_said)
        final = wait_terminal(server, ids)
        for prediction_id in ids:
            observe(prediction_id, time.monotonic(), final[prediction_id]["status"])
        for prediction_id, history in seen.items():
            # once an answer said terminal, every request sent after that answer came says the same
            ended = [(received, status) for _, received, status in history if status in TERMINAL]
            if ended:
                first_end, status = min(ended)
                later = {said for sent, _, said in history if sent > first_end}
                assert later <= {status}, (prediction_id, status, sorted(history))
                assert {said for _, said in ended} == {status}, (prediction_id, sorted(history))
        for prediction_id, said in cancel_said.items():
            if said in TERMINAL:
                assert final[prediction_id]["status"] == said, (prediction_id, said, final[prediction_id])
        deadline = time.monotonic() + 60
        while any(d[2] == "pending" for d in deliveries(server)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        mine = [d for d in deliveries(server) if d[0] in final]
        per_prediction = {prediction_id: 0 for prediction_id in ids}
        for prediction_id, _, state, _, _ in mine:
            per_prediction[prediction_id] += 1
            assert state == "delivered"
        assert set(per_prediction.values()) == {1}, per_prediction  # exactly one terminal webhook each
        bodies = [b for b in receiver.bodies() if b["id"] in final]
        assert sorted(b["id"] for b in bodies) == sorted(ids)
        for body in bodies:
            assert body["status"] == final[body["id"]]["status"], body["id"]
        assert not [s for s in statuses if s >= 500]
        outcome = {s: sum(f["status"] == s for f in final.values()) for s in sorted(TERMINAL)}
        started = sum(f["started_at"] is not None for f in final.values())
        report(
            f"create_then_cancel ({prompt})",
            {
                "predictions": len(ids),
                "in_flight": in_flight,
                "requests": len(statuses),
                "observations": sum(map(len, seen.values())),
                "reached_a_worker": started,
                "canceled_while_queued": len(ids) - started,
                "final": outcome,
                "terminal_webhooks": len(bodies),
                "left_a_terminal_state": 0,
                "status_5xx": 0,
            },
        )
    finally:
        receiver.close()


# 2./3. whatever is accepted reads back; what cannot be served is refused; no create answers 5xx


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hostile_cases() -> list[tuple[str, str, dict[str, str]]]:
    """(name, raw body, headers): what JSON parsers take and JSON answers cannot give back, and more."""
    good = {"prompt": "fault:slow", "start_image": IMAGE}  # the one that starts is canceled at a step

    def body(**extra: str) -> str:  # raw JSON pieces spliced into a good input
        fields = {**{k: json.dumps(v) for k, v in good.items()}, **extra}
        return '{"input": {' + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}}"

    ends_at_once = body(prompt='"fault:oom"')  # fails at its first step: a Prefer: wait is answered at once
    cases = [
        ("Prefer wait= 5000 digits", ends_at_once, {"prefer": "wait=" + "9" * 5000}),
        ("Prefer wait=-1", ends_at_once, {"prefer": "wait=-1"}),
        ("Prefer wait=abc", ends_at_once, {"prefer": "wait=abc"}),
        ("Prefer wait=0", ends_at_once, {"prefer": "wait=0"}),
        ("Prefer with junk", ends_at_once, {"prefer": 'wait=1; x="y", respond-async, wait'}),
        ("surrogate in an unknown key", body(zz='"\\udfff"'), {}),
        ("surrogate pair split", body(zz='"\\ud800x"'), {}),
        ("surrogate in the prompt", body(prompt='"a\\udfffb"'), {}),
        ("surrogate in negative_prompt", body(negative_prompt='"\\udc00"'), {}),
        ("surrogate in start_image", body(start_image='"\\udfff"'), {}),
        ("surrogate in a key name", body(**{"z\udfff": "1"}).replace("\udfff", "\\udfff"), {}),
        ("valid astral character", body(prompt='"\\ud83c\\udf0a waves"'), {}),
        ("NUL in the prompt", body(prompt='"a\\u0000b"'), {}),
        ("NaN in an unknown key", body(zz="NaN"), {}),
        ("Infinity in an unknown key", body(zz="Infinity"), {}),
        ("-Infinity in an unknown key", body(zz="-Infinity"), {}),
        ("1e400 in an unknown key", body(zz="1e400"), {}),
        ("-1e400 as the seed", body(seed="-1e400"), {}),
        ("NaN as the seed", body(seed="NaN"), {}),
        ("5000-digit seed", body(seed="1" * 5000), {}),
        ("5000-digit unknown number", body(zz="9" * 5000), {}),
        ("seed 2**63", body(seed=str(2**63)), {}),
        ("float duration", body(duration="5.0"), {}),
        ("10k unknown keys", body(**{f"k{n}": "1" for n in range(10_000)}), {}),
        ("1 MB unknown value", body(zz=json.dumps("x" * 2**20)), {}),
        ("100 KB key name", body(**{"k" * 100_000: "1"}), {}),
        ("duplicate keys", body(prompt='"a"').replace('"input": {', '"input": {"prompt": "b", '), {}),
        ("surrogate in the webhook", body().replace("}}", '}, "webhook": "http://x/\\udfff"}'), {}),
        ("surrogate in the events", body().replace("}}", '}, "webhook_events_filter": ["\\udfff"]}'), {}),
        ("an unknown top-level key", body().replace("}}", '}, "zz": "\\udfff"}'), {}),
        ("input not an object", '{"input": "\\udfff"}', {}),
        ("input a list", '{"input": [1, 2]}', {}),
        ("body a list", "[]", {}),
        ("body null", "null", {}),
        ("body empty", "", {}),
        ("body a string", '"\\udfff"', {}),
        ("body not UTF-8", '{"input": {"prompt": "\xff\xfe"}}', {}),
        ("body with a BOM", "\ufeff" + body(), {}),
        ("trailing garbage", body() + "}", {}),
        ("nesting 5000 at the top", _deep(5000), {}),
    ]
    for depth in (33, 100, 255, 500, 990, 1000, 5000):
        cases.append((f"nesting {depth} in an unknown key", body(zz=_deep(depth)), {}))
        cases.append((f"object nesting {depth}", body(zz='{"a":' * depth + "1" + "}" * depth), {}))
    return cases


def _random_value(rng: random.Random, depth: int = 0) -> str:
    """Raw JSON text, some of which Python reads and JSON answers cannot carry."""
    pick = rng.randrange(12)
    if depth > 6 or pick < 3:
        return rng.choice(
            ['"plain"', '"\\udfff"', '"\\ud800"', "NaN", "Infinity", "-Infinity", "1e400", "1e-400",
             "9" * rng.randrange(1, 6000), "true", "null", '"\\u0000"', '"' + "y" * rng.randrange(5000) + '"',
             '"\\ud83c\\udf0a"', "-0", "0.1", '"\\\\u0041"']
        )  # fmt: skip
    if pick < 5:
        return _deep(rng.choice([1, 31, 32, 33, 200, 999, 1001, 3000]))
    if pick < 9:
        return "[" + ", ".join(_random_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    keys = [
        rng.choice(['"k"', '"\\udfff"', '"prompt"', '"seed"', '"a\\u0000"']) for _ in range(rng.randrange(4))
    ]
    return "{" + ", ".join(f"{k}: {_random_value(rng, depth + 1)}" for k in keys) + "}"


def test_hostile_bodies_are_stored_and_readable_or_refused_with_a_4xx(server):
    rng = random.Random(16)
    cases = _hostile_cases()
    fields = ["zz", "prompt", "negative_prompt", "seed", "mode", "duration", "end_image", "preset", "audio"]
    for n in range(scaled(120)):
        where = rng.choice(fields)
        value = _random_value(rng)
        raw = (
            '{"input": {"prompt": "fault:slow", "start_image": '
            + json.dumps(IMAGE)
            + f', "{where}": {value}}}}}'
        )
        cases.append((f"random {n} in {where}", raw, {}))
    answers: dict[int, int] = {}
    created: list[str] = []
    requests = 0
    wait_idle(server)  # the Prefer: wait cases come first, each ended by an idle worker at once
    with client_for(server) as http, client_for(server, OTHER_TOKEN) as other:
        for name, raw, headers in cases:
            content = raw.encode("utf-8", "surrogatepass") if "\xff" not in raw else raw.encode("latin-1")
            for route in (PREDICTIONS, "/v1/predictions"):
                sent = content
                if route == "/v1/predictions" and raw.startswith('{"input"'):
                    sent = b'{"version": "kwaivgi/kling-v2.1", ' + content[1:]
                answer = http.post(
                    route, content=sent, headers={"content-type": "application/json", **headers}
                )
                requests += 1
                answers[answer.status_code] = answers.get(answer.status_code, 0) + 1
                assert answer.status_code < 500, (name, route, answer.status_code, answer.text[:300])
                assert answer.status_code in (201, 400, 413, 422), (
                    name,
                    answer.status_code,
                    answer.text[:300],
                )
                if answer.status_code == 201:
                    created.append(answer.json()["id"])
                else:
                    assert answer.json()["detail"], name  # a problem that says what is wrong
        for prediction_id in created:  # every accepted one reads back, cancels and lists
            got = http.get(f"/v1/predictions/{prediction_id}")
            assert got.status_code == 200 and got.json()["id"] == prediction_id, got.text[:300]
            assert http.post(f"/v1/predictions/{prediction_id}/cancel").status_code == 200
            requests += 2
        listed = {p["id"] for p in all_predictions(http)}
        assert set(created) <= listed
        assert other.get("/v1/predictions").status_code == 200
        requests += 2
    wait_terminal(server, created)
    report(
        "hostile_bodies",
        {
            "cases": len(cases),
            "requests": requests,
            "created_and_read_back": len(created),
            "by_status": {str(k): v for k, v in sorted(answers.items())},
            "status_5xx": 0,
        },
    )


# 4. slow image hosts


def test_a_slow_image_host_delays_no_other_request(server, host):
    """Token A's creates point at a host that trickles a byte every 2 s and never finishes (until the test
    releases it). Meanwhile every other request (another token's creates, uploads, cancels, reads; and A's
    own uploads and cancels) takes what it took before, within a second; A's fetches stay within its
    slots."""
    creates = scaled(6)

    def measure(token: str, with_creates: bool = True) -> dict[str, float]:
        """Median seconds of each kind of request, three of each (A's own creates are left out while its
        slots are held: they wait for them, which is the per-token bound doing its job)."""
        times: dict[str, list[float]] = {}

        def timed(name: str, send: Callable[[], httpx.Response]) -> httpx.Response:
            clock = time.perf_counter()
            answer = send()
            times.setdefault(name, []).append(time.perf_counter() - clock)
            assert answer.status_code in (200, 201), (token, name, answer.status_code, answer.text[:300])
            return answer

        with client_for(server, token) as http:
            for _ in range(3):
                if with_creates:
                    for name, image in (
                        ("create (data URI)", IMAGE),
                        ("create (fast URL)", f"{host.base}/fine.png"),
                    ):
                        body = {"input": {"prompt": "fault:slow", "start_image": image}}
                        made = timed(name, lambda b=body: http.post(PREDICTIONS, json=b)).json()["id"]
                        timed("cancel", lambda i=made: http.post(f"/v1/predictions/{i}/cancel"))
                latest = http.get("/v1/predictions").json()["results"][0]["id"]
                timed("cancel (ended)", lambda i=latest: http.post(f"/v1/predictions/{i}/cancel"))
                timed("get", lambda i=latest: http.get(f"/v1/predictions/{i}"))
                timed("list", lambda: http.get("/v1/predictions"))
                timed(
                    "upload", lambda: http.post("/v1/files", files={"content": ("a.png", FINE, "image/png")})
                )
        return {name: statistics.median(values) for name, values in times.items()}

    before = {OTHER_TOKEN: measure(OTHER_TOKEN), TOKEN: measure(TOKEN, with_creates=False)}
    host.release.clear()
    answers: list[httpx.Response] = []

    def slow_create() -> None:
        with client_for(server, timeout=180) as http:
            url = f"{host.base}/slow.png"
            answers.append(http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": url}}))

    threads = [threading.Thread(target=slow_create) for _ in range(creates)]
    for thread in threads:
        thread.start()
    host.wait_active(min(2, creates))  # A's two slots are fetching; the rest of A's creates wait for one
    during = {OTHER_TOKEN: measure(OTHER_TOKEN), TOKEN: measure(TOKEN, with_creates=False)}
    still_held = host.active
    host.release.set()
    for thread in threads:
        thread.join(timeout=180)
    assert len(answers) == creates
    assert all(400 <= a.status_code < 500 for a in answers), [(a.status_code, a.text[:200]) for a in answers]
    assert host.max_active <= 2  # I2V_FETCHES_PER_TOKEN
    assert still_held == min(2, creates)  # the slow fetches were still in flight when the others ran
    slower = {
        f"{'A' if token == TOKEN else 'B'} {name}": round(during[token][name] - before[token][name], 3)
        for token in during
        for name in during[token]
    }
    assert all(delta <= 1.0 for delta in slower.values()), slower
    report(
        "slow_image_host",
        {
            "slow_creates": creates,
            "fetches_at_once_at_most": host.max_active,
            "slow_requests_served": host.served,
            "other_requests_timed": 2 * 3 * (len(before[OTHER_TOKEN]) + 1 + len(before[TOKEN])),
            "median_s_before": {t: {k: round(v, 3) for k, v in m.items()} for t, m in before.items()},
            "slower_by_s_during": slower,
            "slow_creates_answered": sorted({a.status_code for a in answers}),
        },
    )
    with client_for(server) as http:  # the canceled slow-backend predictions end
        wait_terminal(server, [p["id"] for p in all_predictions(http) if p["status"] not in TERMINAL])


# 9. stalled bodies: bounded in time and memory


def _raw_request(
    server: ServerProcess, path: str, length: int, body: bytes, kind: str = "application/json"
) -> socket.socket:
    """A request whose body stops after `body`: the client stalls with the rest unsent."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {length}\r\n\r\n".encode()
        + body
    )
    return sock


def _status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    sock.close()
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else -1


def _body_bytes(server: ServerProcess) -> float:
    return server.metrics()[("i2v_request_body_bytes", ())]


def test_stalled_bodies_are_bounded_in_memory_and_time(server):
    stalled = _raw_request(server, PREDICTIONS, 12 * 2**20, b'{"input": {"prompt": "' + b"x" * 1000)
    deadline = time.monotonic() + 60
    while _body_bytes(server) < 12 * 2**20:  # the server holds the declared 12 MB for it
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    over = _raw_request(server, PREDICTIONS, 6 * 2**20, b"")  # 12 + 6 MB > the 16 MB for all bodies
    assert _status(over) == 429
    upload = _raw_request(
        server, "/v1/files", 2**20, b"--b\r\n", "multipart/form-data; boundary=b"
    )  # uploads spool to disk: not counted ...
    with client_for(server) as http:  # ... and a small body goes through meanwhile
        small = http.post(PREDICTIONS, json={"input": {"prompt": "fault:slow", "start_image": IMAGE}})
        assert small.status_code == 201
        assert http.post(f"/v1/predictions/{small.json()['id']}/cancel").status_code == 200
    assert _status(stalled) == 408  # I2V_BODY_TIMEOUT after its first byte: no longer held
    assert _status(upload) == 408
    deadline = time.monotonic() + 60
    while _body_bytes(server) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with client_for(server) as http:  # the memory is free again: a big body fits
        big = http.post(
            PREDICTIONS, json={"input": {"prompt": "fault:slow", "start_image": IMAGE, "zz": "y" * 6 * 2**20}}
        )
        assert big.status_code == 201, big.text[:300]
        assert "ignored unknown input field(s): zz" in big.json()["logs"] and "zz" not in big.json()["input"]
        http.post(f"/v1/predictions/{big.json()['id']}/cancel")
    report("stalled_bodies", {"stalled": 2, "refused_over_memory": 1, "answered_408": 2, "status_5xx": 0})


# 5. a full disk: what cannot be written is retried until it lands


def _file_size_limit(pid: int, soft: int) -> None:
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="sets the server's file-size limit (Linux)")
def test_a_full_disk_delays_an_outcome_and_never_loses_it(server, tmp_path):
    """The server's own file writes are made to fail for real: the WAL is checkpointed to zero bytes and the
    server process's RLIMIT_FSIZE set to 0, so any write that grows a file (SQLite's WAL, an input, an
    upload) fails with EFBIG, as on a full disk (SQLite answers "disk I/O error"). The worker, a process of
    its own, still writes its mp4. Its outcome is retried until the limit is lifted; then the prediction
    ends, its webhook goes out once, and the request waiting on it (Prefer: wait) wakes."""
    receiver = WebhookReceiver()
    release = tmp_path / "release"
    db = server.data_dir / "i2v.db"
    waited: list[httpx.Response] = []
    try:
        with client_for(server) as http, client_for(server, OTHER_TOKEN) as other:
            body = {
                "input": {"prompt": f"fault:hold={release}", "start_image": IMAGE},
                "webhook": receiver.url,
                "webhook_events_filter": ["completed"],
            }

            def wait_on_it() -> None:
                with client_for(server) as waiting:
                    waited.append(waiting.post(PREDICTIONS, json=body, headers={"prefer": "wait=60"}))

            waiter = threading.Thread(target=wait_on_it)
            waiter.start()
            deadline = time.monotonic() + 60
            while True:  # running, its first step's log line stored: nothing more is written until released
                listed = http.get("/v1/predictions").json()["results"]
                held = [p for p in listed if p["status"] == "processing" and "1/2" in p["logs"]]
                if held:
                    break
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.1)
            (held_id,) = [p["id"] for p in held]
            with contextlib.closing(sqlite3.connect(db)) as conn:
                assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            assert Path(f"{db}-wal").stat().st_size == 0
            retries = server.metrics()[("i2v_store_write_retries_total", ())]
            _file_size_limit(server.process.pid, 0)
            try:
                release.touch()  # the worker finishes; its outcome cannot be written
                deadline = time.monotonic() + 60
                while server.metrics()[("i2v_store_write_retries_total", ())] < retries + 3:
                    assert time.monotonic() < deadline, server.log_tail()
                    time.sleep(0.1)
                assert http.get(f"/v1/predictions/{held_id}").json()["status"] == "processing"
                assert http.get("/v1/predictions").status_code == 200
                full_create = other.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": IMAGE}})
                assert full_create.status_code == 507, full_create.text
                full_upload = other.post("/v1/files", files={"content": ("a.png", FINE, "image/png")})
                assert full_upload.status_code == 507, full_upload.text
                assert waiter.is_alive()  # still waiting: nothing has ended
                during = server.metrics()[("i2v_store_write_retries_total", ())] - retries
            finally:
                _file_size_limit(server.process.pid, resource.RLIM_INFINITY)
            waiter.join(timeout=90)
            (answer,) = waited
            assert answer.status_code == 201 and answer.json()["status"] == "succeeded", answer.text[:300]
            assert http.get(f"/v1/predictions/{held_id}").json()["status"] == "succeeded"
            assert http.get(f"/v1/predictions/{held_id}/output.mp4").status_code == 200
            receiver.wait_for(1)
            deadline = time.monotonic() + 30
            while [d for d in deliveries(server) if d[0] == held_id and d[2] == "pending"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert [(d[1], d[2]) for d in deliveries(server) if d[0] == held_id] == [
                ("completed", "delivered")
            ]
            assert [b["status"] for b in receiver.bodies() if b["id"] == held_id] == ["succeeded"]
        log = server.log_path.read_text(errors="replace")
        assert log.count("retrying until it can") == 1, log[-3000:]  # said once, then counted
        assert "the database takes writes again" in log
        report(
            "full_disk",
            {"retries_during_outage": int(during), "refused_507": 2, "outcome": "succeeded", "webhooks": 1},
        )
    finally:
        release.touch()
        receiver.close()


@contextlib.contextmanager
def unwritable(*folders: Path) -> Iterator[None]:
    """Folders the server cannot write for real: a read-only bind mount as root (root ignores modes), a
    mode without w for anyone else. Open files stay writable, as on a remount."""
    done: list[Callable[[], None]] = []
    try:
        for folder in folders:
            if os.geteuid() == 0:
                subprocess.run(["mount", "--bind", folder, folder], check=True, capture_output=True)
                done.append(lambda f=folder: subprocess.run(["umount", f], check=True))
                subprocess.run(["mount", "-o", "remount,ro,bind", folder], check=True, capture_output=True)
            else:
                mode = folder.stat().st_mode
                folder.chmod(0o555)
                done.append(lambda f=folder, m=mode: f.chmod(m))
        yield
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a folder read-only here: {exc.stderr.decode(errors='replace').strip()}")
    finally:
        for undo in reversed(done):
            undo()


def test_a_read_only_data_dir_answers_200_for_a_cancel_that_took_effect_and_507_for_writes(server, tmp_path):
    release = tmp_path / "release"
    with client_for(server) as http:
        running = http.post(
            PREDICTIONS, json={"input": {"prompt": f"fault:hold={release}", "start_image": IMAGE}}
        )
        queued = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": IMAGE}}).json()["id"]
        server.wait_for(running.json()["id"], {"processing"}, timeout=60)
        try:
            with unwritable(server.data_dir / "inputs", server.data_dir / "files"):
                canceled = http.post(f"/v1/predictions/{queued}/cancel")  # its input cannot be removed now
                assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
                upload = http.post("/v1/files", files={"content": ("a.png", FINE, "image/png")})
                assert upload.status_code == 507 and "could not store" in upload.json()["detail"], upload.text
                create = http.post(PREDICTIONS, json={"input": {"prompt": "x", "start_image": IMAGE}})
                assert create.status_code == 507, create.text
                assert http.get(f"/v1/predictions/{queued}").json()["status"] == "canceled"
                assert http.get("/v1/predictions").status_code == 200
        finally:
            release.touch()
        assert server.wait_for(running.json()["id"], TERMINAL, timeout=60)["status"] == "succeeded"
        assert http.get(f"/v1/predictions/{queued}").json()["status"] == "canceled"
    report("read_only_data_dir", {"cancel": 200, "upload": 507, "create": 507})


# 6. redirects to what is not http


def test_redirects_to_non_http_targets_are_refused_for_images_and_fail_webhooks(server, host):
    with client_for(server) as http:
        for scheme in sorted(REDIRECTS):
            answer = http.post(
                PREDICTIONS, json={"input": {"prompt": "x", "start_image": f"{host.base}/to/{scheme}"}}
            )
            assert answer.status_code == 422, (scheme, answer.text)
            (problem,) = answer.json()["invalid_fields"]
            assert problem["field"] == "input.start_image"
            assert f"redirected to a {scheme}: URL" in problem["description"], problem
        body = {
            "input": {"prompt": "x", "start_image": IMAGE},
            "webhook": f"{host.base}/hook-redirect",
            "webhook_events_filter": ["completed"],
        }
        done = http.post(PREDICTIONS, json=body, headers={"prefer": "wait=60"}).json()
    assert done["status"] == "succeeded", done["error"]
    deadline = time.monotonic() + 30
    while True:
        rows = [d for d in deliveries(server) if d[0] == done["id"]]
        if rows and rows[0][2] != "pending":
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    ((_, event, state, attempts, error),) = rows
    assert (event, state, attempts) == ("completed", "failed", 3)  # counted, retried, then given up
    assert "redirected to a data: URL" in error, error
    report("redirects", {"image_schemes_refused": len(REDIRECTS), "webhook_attempts": attempts})


# 7. tenants do not share secrets


def test_each_token_signs_with_its_own_secret(server):
    receiver = WebhookReceiver()
    try:
        secrets, whose = {}, {}
        for token in (TOKEN, OTHER_TOKEN):
            client = replicate.Client(api_token=token, base_url=server.base)
            secrets[token] = client.webhooks.default.secret()
            with client_for(server, token) as http:
                body = {
                    "input": {"prompt": "x", "start_image": IMAGE},
                    "webhook": receiver.url,
                    "webhook_events_filter": ["completed"],
                }
                created = http.post(PREDICTIONS, json=body, headers={"prefer": "wait=60"})
                assert created.status_code == 201
                whose[created.json()["id"]] = token
        assert secrets[TOKEN].key != secrets[OTHER_TOKEN].key
        receiver.wait_for(2)
        for _, headers, body in receiver.calls:
            token = whose[json.loads(body)["id"]]
            replicate.webhooks.validate(headers=headers, body=body, secret=secrets[token])  # raises if forged
            other = secrets[OTHER_TOKEN if token == TOKEN else TOKEN]
            with pytest.raises(InvalidSignatureError):  # another token's secret does not sign it
                replicate.webhooks.validate(headers=headers, body=body, secret=other)
    finally:
        receiver.close()
    as_tenant = httpx.get(f"{server.base}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert as_tenant.status_code == 403 and "I2V_METRICS_TOKEN" in as_tenant.text
    assert server.metrics()  # the metrics token reads them


# 8. two servers, one data dir


def test_a_second_server_on_the_same_data_dir_refuses_to_start(server):
    with client_for(server) as http:
        before = http.get("/v1/predictions").json()["results"][0]
    second = subprocess.run(
        [sys.executable, "-m", "i2v", "serve", "--model", "fault-injection", "--port", "0",
         "--data-dir", str(server.data_dir)],
        env={**os.environ, **server_env()}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: another i2v server (pid "), second.stderr
    assert f"is using the data dir {server.data_dir}" in lines[0]
    with client_for(server) as http:  # the first is untouched
        assert http.get(f"/v1/predictions/{before['id']}").json() == before


def server_env() -> dict[str, str]:
    from hardening import FAULT_ENV

    return {**FAULT_ENV, "I2V_API_TOKEN": f"{OTHER_TOKEN},{TOKEN}"}


# 9. the smaller ones, through the server


def test_outputs_answer_head_etags_ranges_and_hosts_are_checked(server):
    with client_for(server) as http:
        done = http.post(
            PREDICTIONS, json={"input": {"prompt": "x", "start_image": IMAGE}}, headers={"prefer": "wait=60"}
        ).json()
        assert done["status"] == "succeeded", done["error"]
        url = f"/v1/predictions/{done['id']}/output.mp4"
        full = http.get(url)
        head = http.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(full.content)) and head.headers["etag"]
        assert head.headers["content-type"] == "video/mp4"
        assert http.get(url, headers={"if-none-match": full.headers["etag"]}).status_code == 304
        reversed_range = http.get(url, headers={"range": "bytes=500-100"})
        assert reversed_range.status_code == 416
        assert reversed_range.headers["content-range"] == f"bytes */{len(full.content)}"
        assert http.get(url, headers={"range": "bytes=0-99"}).content == full.content[:100]
        # I2V_TRUSTED_HOSTS: a Host the server does not answer for is refused before anything else
        assert http.get("/v1/predictions", headers={"host": "evil.example"}).status_code == 400
        assert http.get("/v1/predictions", headers={"host": f"127.0.0.1:{server.port}"}).status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert "I2V_PUBLIC_URL is not set" not in log and "one of I2V_TRUSTED_HOSTS" in log


def test_the_official_clients_see_the_account_and_versions_filed_under_kling(server):
    client = server.client()
    account = client.accounts.current()
    assert account.type == "user" and account.username.startswith("token-")
    other = replicate.Client(api_token=OTHER_TOKEN, base_url=server.base).accounts.current()
    assert other.username != account.username
    version = client.models.get(MODEL).latest_version.id
    output = client.run(f"{MODEL}:{version}", input={"prompt": "x", "start_image": IMAGE})
    prediction_id = str(output).split("/outputs/")[1].split(".mp4")[0]
    with client_for(server) as http:
        assert http.get(f"/v1/predictions/{prediction_id}").json()["model"] == MODEL
        by_id = http.post(
            "/v1/predictions",
            json={"version": version, "input": {"prompt": "fault:slow", "start_image": IMAGE}},
        )
        assert by_id.status_code == 201 and by_id.json()["model"] == MODEL
        http.post(f"/v1/predictions/{by_id.json()['id']}/cancel")
    js_client = ROOT / "tests" / "web-tools" / "node_modules" / "replicate"
    if not js_client.is_dir():
        pytest.skip(
            "the JS client is not installed (tests/web-tools, ./setup.sh --dev): Python client checked"
        )
    script = (
        f"const Replicate = require({json.dumps(str(js_client))});"
        f"const r = new Replicate({{auth: {json.dumps(TOKEN)}, baseUrl: {json.dumps(server.base + '/v1')}}});"
        "r.accounts.current().then(a => console.log(JSON.stringify(a)), e => { console.error(e); process.exit(1); });"
    )
    ran = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["username"] == account.username
