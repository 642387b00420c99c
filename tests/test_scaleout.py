"""The scale-out as deployed: two real `i2v serve` processes sharing nothing but one PostgreSQL, one Ray
cluster and one S3 bucket (each its own data dir), as behind a load balancer.

The cluster (tests/raycluster.py) is a head and two worker nodes, each with one unit of the resource standing
for a GPU; the workers run the fault-injection backend (tests/fault_backends.py: black frames at once, or
the fault the prompt names). One server leads the placement (one actor per node) and the other follows
(`ray_runner`'s docstring): creates, waits and cancels spread over both; each runs exactly once, counted
at the workers (`fault:tally`); a Ray node killed mid-clip has the clip run again on the other; the leading
server killed mid-clip hands the placement to the other, which runs the clip again. S3 is moto's standalone
server (tests/s3_and_tls.py).

`I2V_SCALEOUT_CREATES` sets how many creates the main test makes (CI: 40; the issue's full run: 200).
Every wait is on a state (a status, a line in a prediction's or a server's whole log), bounded by a
generous timeout.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hardening import FAULT_ENV
from raycluster import RayCluster, worker_pids
from serverproc import MODEL, PREDICTIONS, TOKEN, ServerProcess, WebhookReceiver
from several import IMAGE, check_each_webhook_once, http, spread_creates

from i2v.server.states import TERMINAL

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs i2v[ray]")
CREATES = int(os.environ.get("I2V_SCALEOUT_CREATES", "40"))
LEADS = "this server leads the Ray namespace"
FOLLOWS = "this one follows"


@pytest.fixture(scope="module")
def moto() -> Iterator[object]:
    from s3_and_tls import MotoS3

    s3 = MotoS3()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Iterator[RayCluster]:
    cluster = RayCluster(tmp_path_factory.mktemp("ray"), FAULT_ENV)
    try:
        for _ in range(2):
            cluster.add_node(wait=False)  # the servers start meanwhile
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def database(postgres) -> str:
    return postgres.new_database()


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, cluster: RayCluster, database: str, moto
) -> Iterator[list[ServerProcess]]:
    """The leader first. Each server has a data dir of its own: only PostgreSQL, Ray and S3 are shared."""
    from s3_and_tls import AWS_ENV

    env = {
        **FAULT_ENV,
        **AWS_ENV,
        **cluster.server_env(),
        "I2V_DATABASE_URL": database,
        "I2V_STORAGE_URL": f"s3://{moto.new_bucket()}/scaleout",
        "I2V_S3_ENDPOINT_URL": moto.endpoint,
        "I2V_RETRY_ON_RESTART": "1",
        "I2V_WEBHOOK_RETRY_DELAYS": "0.2,0.2,0.5,1,2",
        "I2V_PRELOAD": "none",
    }
    folder = tmp_path_factory.mktemp("scaleout")
    procs = [ServerProcess(folder / f"data-{n}", env=env, model="fault-injection") for n in range(2)]
    try:
        for node in cluster.nodes:
            node.wait_started()
        for proc in procs:
            proc.wait_ready(timeout=300)  # a follower is ready once the leader has published ready workers
        procs.sort(key=lambda proc: LEADS not in proc.log())
        assert LEADS in procs[0].log() and FOLLOWS in procs[1].log(), procs[1].log_tail()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def create(server: ServerProcess, prompt: str) -> str:
    with http(server, TOKEN) as client:
        answer = client.post(PREDICTIONS, json={"input": {"prompt": prompt, "start_image": IMAGE}})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def test_creates_spread_over_both_servers_run_once_on_the_leaders_workers(servers, database, tmp_path):
    """CREATES creates, waits and cancels spread over both servers (tests/several.py): each ends as asked and
    ran once, each wait got its answer, each webhook arrived once. Only the leader placed actors (one per
    node, none pending), and both servers see them; an output reads back through either server."""
    leader, follower = servers
    receiver = WebhookReceiver()
    try:
        spread = spread_creates(servers, CREATES, tmp_path / "tally", receiver, lambda n: TOKEN)
        spread.check_each_ran_once()
        check_each_webhook_once(database, receiver, spread.ids)
    finally:
        receiver.close()
    assert "placing Ray worker" in leader.log() and "placing Ray worker" not in follower.log()
    for server in servers:
        health = httpx.get(f"{server.base}/health-check").json()
        assert len(health["workers"]) == 2, health
    with http(follower, TOKEN) as client:
        output = spread.final[spread.ids[2]]["output"].replace(leader.base, follower.base)
        video = client.get(output, follow_redirects=True)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    print(f"\nscale-out: {CREATES} creates, runs per worker {spread.per_worker()}")


def test_the_official_client_works_against_either_server_and_a_cancel_reaches_the_leaders_actor(servers):
    """`replicate` runs and reads the output through each server; a clip running on the leader's actor is
    canceled through the follower (the database's NOTIFY carries it) and stops mid-run."""
    leader, follower = servers
    for server in servers:
        output = server.client().run(MODEL, input={"prompt": "x", "start_image": IMAGE})
        video = httpx.get(str(output), follow_redirects=True)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    running = create(leader, "fault:slow:100000")  # ~6 hours of 0.2 s steps: only a cancel ends it
    follower.wait_for_log(running, "/100000 denoising")
    follower.client().predictions.cancel(running)
    assert follower.wait_for(running, TERMINAL, timeout=60)["status"] == "canceled"


def test_a_ray_node_killed_mid_clip_runs_the_clip_again_on_the_other_and_loses_nothing(
    servers, cluster, tmp_path
):
    """The node under a held clip is killed (as a machine losing power): with I2V_RETRY_ON_RESTART the clip
    runs again on the other node, and everything queued behind it through either server completes."""
    tally, release = tmp_path / "tally", tmp_path / "release"
    follower = servers[1]
    prompt = f"fault:tally={tally} fault:hold={release} held"
    held = create(follower, prompt)
    first = follower.wait_for_log(held, "1/2 denoising")
    node = cluster.node_of(worker_pids(first)[0])
    others = [create(servers[n % 2], f"fault:tally={tally} n={n}") for n in range(6)]
    node.kill()
    second = follower.wait_for_log(held, "1/2 denoising", count=2)
    assert "running it again" in second["logs"]
    assert cluster.node_of(worker_pids(second)[-1]) is not node
    release.touch()
    for n, prediction_id in enumerate([held, *others]):
        done = servers[n % 2].wait_for(prediction_id, TERMINAL, timeout=120)
        assert done["status"] == "succeeded", done
    runs = [line.split(" ", 1)[1] for line in tally.read_text().splitlines()]
    assert sorted(runs) == sorted([prompt, prompt, *[f"fault:tally={tally} n={n}" for n in range(6)]])


def test_the_leading_server_killed_mid_clip_hands_the_placement_over(servers, tmp_path):
    """SIGKILL the leading server under a clip: Ray ends its placement and its actors with its driver, the
    other server takes the placement over, its sweep puts the clip back (I2V_RETRY_ON_RESTART), and the clip
    runs again on the new leader's actor and ends. Last in the module: it ends a server."""
    tally, release = tmp_path / "tally", tmp_path / "release"
    leader, follower = servers
    held = create(follower, f"fault:tally={tally} fault:hold={release} leader-killed")
    follower.wait_for_log(held, "1/2 denoising")
    leader.kill()
    again = follower.wait_for_log(held, "1/2 denoising", count=2)
    assert "the server restarted while this prediction ran; running it again" in again["logs"]
    assert LEADS in follower.log()
    release.touch()
    assert follower.wait_for(held, TERMINAL, timeout=120)["status"] == "succeeded"
    assert len(tally.read_text().splitlines()) == 2
