"""Load and schema fuzzing against a real `i2v serve` (fault-injection backend, per-token limits off).

Bounded for CI; the long versions (docs/reliability.md has the figures):

    I2V_LOAD_PREDICTIONS=1000 I2V_LOAD_KEEP=50 I2V_FUZZ_API_EXAMPLES=300 pytest tests/test_hardening_load.py -s
    I2V_LOAD_PREDICTIONS=1000 I2V_LOAD_CONCURRENCY=8 pytest tests/test_hardening_load.py -s -k load_every

- load: I2V_LOAD_PREDICTIONS creates, I2V_LOAD_CONCURRENCY of them in flight at once (default: all at
  once), then one poller per prediction (every 0.5 s, as the official client) until it ends; all but the first I2V_LOAD_KEEP are canceled (each kept one encodes a 720p clip, ~1 s here,
  which is the model's time, not the service's). Every prediction must be recorded and end; no 5xx.
- fuzz: schemathesis generates I2V_FUZZ_API_EXAMPLES cases per operation of the server's own
  /openapi.json (valid and invalid bodies, path and query values); no answer may be a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hardening import NO_LIMITS, fault_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from serverproc import PREDICTIONS, TOKEN, ServerProcess

from i2v.server.states import TERMINAL

AUTH = {"authorization": f"Bearer {TOKEN}"}
LOAD_PREDICTIONS = int(os.environ.get("I2V_LOAD_PREDICTIONS", "200"))
LOAD_CONCURRENCY = int(os.environ.get("I2V_LOAD_CONCURRENCY", str(LOAD_PREDICTIONS)))  # creates in flight
LOAD_KEEP = int(os.environ.get("I2V_LOAD_KEEP", "8"))
FUZZ_EXAMPLES = int(os.environ.get("I2V_FUZZ_API_EXAMPLES", "25"))
REPORT = os.environ.get("I2V_HARDENING_REPORT")  # a JSON file the figures are added to


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Iterator[ServerProcess]:
    proc = fault_server(tmp_path_factory.mktemp("load") / "data", **NO_LIMITS)
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.stop()


def report(name: str, figures: dict[str, object]) -> None:
    print(f"\n{name}: {json.dumps(figures)}")
    if REPORT:
        path = Path(REPORT)
        known = json.loads(path.read_text()) if path.is_file() else {}
        known[name] = figures
        path.write_text(json.dumps(known, indent=2))


def smooth_image_uri() -> str:
    image = Image.linear_gradient("L").resize((640, 400)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_load_every_prediction_is_recorded_and_ends(server):
    statuses: list[int] = []
    latencies: list[float] = []
    # A smooth image (a few KB, like a small photo's JPEG) keeps the measure on the service: a noise PNG
    # would make every create mostly base64 and zlib work.
    body = {"input": {"prompt": "load", "start_image": smooth_image_uri()}}

    async def run() -> tuple[list[str], list[dict], float]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=120, limits=limits) as http:

            async def request(method: str, url: str, **kwargs: object) -> httpx.Response:
                answer = await http.request(method, url, **kwargs)
                statuses.append(answer.status_code)
                return answer

            clients = asyncio.Semaphore(LOAD_CONCURRENCY)

            async def create() -> str:
                async with clients:  # the latency is the server's: from sending to the answer
                    clock = time.perf_counter()
                    answer = await request("POST", PREDICTIONS, json=body)
                    latencies.append(time.perf_counter() - clock)
                assert answer.status_code == 201, answer.text
                return answer.json()["id"]

            async def follow(prediction_id: str, cancel: bool) -> dict:
                if cancel:
                    await request("POST", f"/v1/predictions/{prediction_id}/cancel")
                while True:
                    answer = await request("GET", f"/v1/predictions/{prediction_id}")
                    if answer.json()["status"] in TERMINAL:
                        return answer.json()
                    await asyncio.sleep(0.5)  # the official client's poll interval

            clock = time.perf_counter()
            ids = await asyncio.gather(*(create() for _ in range(LOAD_PREDICTIONS)))
            created_in = time.perf_counter() - clock
            ends = await asyncio.gather(*(follow(i, n >= LOAD_KEEP) for n, i in enumerate(ids)))
            return list(ids), list(ends), created_in

    clock = time.perf_counter()
    ids, ends, created_in = asyncio.run(run())
    total = time.perf_counter() - clock

    assert not [s for s in statuses if s >= 500]
    assert len(set(ids)) == LOAD_PREDICTIONS
    kept = ends[:LOAD_KEEP]
    assert [e["status"] for e in kept] == ["succeeded"] * len(kept), [e["error"] for e in kept]
    assert all(e["status"] in ("canceled", "succeeded") for e in ends)
    listed, url = set(), "/v1/predictions"  # every prediction is recorded, none twice
    with server.http() as http:
        while url:
            page = http.get(url).json()
            listed |= {p["id"] for p in page["results"]}
            url = page["next"]
        for prediction in kept:
            assert http.get(prediction["output"]).status_code == 200
    assert set(ids) <= listed
    report(
        "load",
        {
            "predictions": LOAD_PREDICTIONS,
            "concurrency": LOAD_CONCURRENCY,
            "rendered": len(kept),
            "canceled": sum(e["status"] == "canceled" for e in ends),
            "requests": len(statuses),
            "status_5xx": 0,
            "create_p50_ms": round(1000 * statistics.median(latencies), 1),
            "create_p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "create_max_ms": round(1000 * max(latencies), 1),
            "all_created_s": round(created_in, 2),
            "creates_per_s": round(LOAD_PREDICTIONS / created_in, 1),
            "total_s": round(total, 1),
        },
    )


def test_fuzz_the_openapi_schema_finds_no_server_error(server):
    """Every operation of /openapi.json, with schemathesis' valid and invalid (negative) cases."""
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json", headers=AUTH)
    cases: list[tuple[str, int]] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @given(case=strategy)
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            derandomize=os.environ.get("I2V_FUZZ_RANDOM") is None,  # the same cases each CI run unless asked
            database=None,
        )
        def call(case: schemathesis.Case) -> None:
            response = case.call(headers=AUTH, timeout=60)
            cases.append((case.operation.label, response.status_code))
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"

        call()

    by_status: dict[int, int] = {}
    for _, status in cases:
        by_status[status] = by_status.get(status, 0) + 1
    assert httpx.get(f"{server.base}/health-check").json()["status"] in ("READY", "BUSY")
    report(
        "fuzz",
        {
            "cases": len(cases),
            "operations": len(operations),
            "examples_per_operation": FUZZ_EXAMPLES,
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
        },
    )
