"""Server overhead: what `i2v serve` adds around the model, measured with the tiny model on loopback.

    .venv/bin/python -m bench.server [--predictions 5] [--out bench/results]

Starts `i2v serve --model tiny --no-auth` in a subprocess, creates predictions one after another through
the HTTP API (`Prefer: wait`), and reads the server's own timestamps: create-to-start (queueing and
dispatch to the worker), and total minus `metrics.predict_time` (everything that is not the model run).
The ratio total / predict_time says how much of a clip's wall time the service costs.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.report import machine, write_report

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "i2v" / "assets" / "example.jpg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def run(predictions: int, out: Path) -> dict[str, object]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    image = "data:image/jpeg;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(
            [sys.executable, "-m", "i2v", "serve", "--model", "tiny", "--no-auth", "--port", str(port),
             "--data-dir", data_dir],
            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with httpx.Client(base_url=base, timeout=120) as client:
                deadline = time.monotonic() + 300
                while True:  # wait for the worker to load the model
                    try:
                        if client.get("/health-check").json()["status"] == "READY":
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("the server did not become ready in 300 s")
                    time.sleep(0.5)
                rows = []
                for i in range(predictions + 1):  # the first one warms the worker up and is not counted
                    clock = time.perf_counter()
                    body = client.post(
                        "/v1/models/kwaivgi/kling-v2.1/predictions",
                        headers={"Prefer": "wait=60"},
                        json={"input": {"prompt": "waves roll in", "start_image": image, "seed": i}},
                    ).json()
                    while body["status"] not in ("succeeded", "failed", "canceled"):
                        time.sleep(0.2)
                        body = client.get(f"/v1/predictions/{body['id']}").json()
                    wall = time.perf_counter() - clock
                    if body["status"] != "succeeded":
                        raise SystemExit(f"prediction {body['id']} {body['status']}: {body.get('error')}")
                    if i:
                        total = _seconds(body["created_at"], body["completed_at"])
                        rows.append(
                            {
                                "create_to_start_s": _seconds(body["created_at"], body["started_at"]),
                                "total_s": total,
                                "predict_s": body["metrics"]["predict_time"],
                                "client_wall_s": wall,
                            }
                        )
        finally:
            server.terminate()
            server.wait(timeout=60)
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "predictions": predictions,
        **{f"median_{key}": value for key, value in median.items()},
        "median_overhead_s": statistics.median(row["total_s"] - row["predict_s"] for row in rows),
        "ratio_total_over_predict": median["total_s"] / median["predict_s"],
    }
    write_report(report, out, "server")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--predictions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    run(args.predictions, args.out)


if __name__ == "__main__":
    main()
