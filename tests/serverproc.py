"""A real `i2v serve` in a subprocess on loopback, and a local webhook receiver, for the server tests."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import httpx
import replicate
from conftest import make_image

TOKEN = "test-token-1"
METRICS_TOKEN = "test-metrics-token"
MODEL = "kwaivgi/kling-v2.1"
PREDICTIONS = f"/v1/models/{MODEL}/predictions"


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all are held open until each is chosen, since a port just closed is
    often the next one handed out (two of a Ray head's ports once came back equal and `ray start` refused)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    return free_ports(1)[0]


def data_uri(width: int, height: int, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(make_image(width, height, seed=seed)).decode()


class ServerProcess:
    """`python -m i2v serve --model tiny` on a free loopback port, logging to a file next to its data dir.

    With `log_pipe`, the server writes its log to a pipe this process copies into the file, so a limit on
    the server's own file writes (RLIMIT_FSIZE, to fill its disk) does not silence its log."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        model: str = "tiny",
        log_pipe: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.with_name(f"{data_dir.name}-server-{self.port}.log")
        full_env = {
            **os.environ,
            "I2V_API_TOKEN": f"other-token,{TOKEN}",
            "PYTHONUNBUFFERED": "1",
            # per-token limits off unless a test sets them: the tests create predictions in bursts
            "I2V_CREATE_RATE": "0",
            "I2V_REQUEST_RATE": "0",
            "I2V_MAX_UNFINISHED": "0",
            # the worker loads the standard model at start, the pro one on first use (the suite's budget)
            "I2V_PRELOAD": "standard",
            "I2V_METRICS_TOKEN": METRICS_TOKEN,
            **(env or {}),
        }
        command = [
            sys.executable,
            "-m",
            "i2v",
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
        ]
        if log_pipe:
            self.process = subprocess.Popen(
                command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            threading.Thread(target=self._copy_log, daemon=True).start()
        else:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def _copy_log(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("ab", buffering=0) as log:
            for line in self.process.stdout:
                log.write(line)

    def log(self) -> str:
        """The whole log, for assertions (a tail can scroll past the line looked for)."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        """The end of the log, for failure messages."""
        return self.log()[-4000:]

    def wait_ready(self, timeout: float = 300, states: tuple[str, ...] = ("READY", "BUSY")) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                health = httpx.get(f"{self.base}/health-check", timeout=2).json()
                if health["status"] in states:
                    return health
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The server's Prometheus samples, read with the metrics token."""
        from prometheus_client.parser import text_string_to_metric_families

        answer = httpx.get(f"{self.base}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
        answer.raise_for_status()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }

    def client(self) -> replicate.Client:
        return replicate.Client(api_token=TOKEN, base_url=self.base)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=90)

    def wait_for(self, prediction_id: str, statuses: Collection[str], timeout: float = 300) -> dict[str, Any]:
        return self.wait_until(prediction_id, lambda body: body["status"] in statuses, timeout)

    def wait_until(
        self, prediction_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.http() as http:
            while True:
                body = http.get(f"/v1/predictions/{prediction_id}").json()
                if done(body):
                    return body
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{prediction_id} after {timeout} s: {body}\n{self.log_tail()}")
                time.sleep(0.2)

    def wait_for_log(self, prediction_id: str, needle: str, count: int = 1) -> dict[str, Any]:
        """The prediction once its logs hold `needle` `count` times (its whole logs, which only grow)."""
        return self.wait_until(prediction_id, lambda body: (body["logs"] or "").count(needle) >= count)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class WebhookReceiver:
    """Records each POST (arrival time, headers, body); answers with `statuses` in turn, then 200."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[float, dict[str, str], str]] = []
        replies = list(statuses)
        calls = self.calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                calls.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(replies.pop(0) if replies else 200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.calls]

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.calls) >= count, f"{len(self.calls)} webhook(s) arrived, expected {count}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
