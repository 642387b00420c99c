"""GPU workers on a real Ray cluster (`I2V_RUNNER=ray`), behind a real `i2v serve`, through the official client.

One cluster for the module (tests/raycluster.py): a head, and worker nodes with the resource `i2v_gpu`
standing for a GPU (CPU only here). The workers run `mode: standard` on the tiny Wan twin (a real diffusers
pipeline, loaded once in the actor) and `mode: pro` on the fault-injection backend (tests/fault_backends.py),
whose prompt holds a clip mid-run (`fault:hold=PATH`) or makes it last until canceled (`fault:slow:N`).
Every wait is for a state (a status, a line in a prediction's logs, a node's start), never a timer.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
from pathlib import Path

import pytest
from conftest import make_image, probe
from hardening import FAULT_ENV
from raycluster import GPU_RESOURCE, WHERE, RayCluster, worker_pids
from serverproc import MODEL, PREDICTIONS, ServerProcess, data_uri

from i2v.geometry import output_size
from i2v.server.states import TERMINAL

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs i2v[ray]")
# Read by the workers (from their node's environment) and by the server's start-up check alike.
MODELS = {"I2V_MODEL_STANDARD": "tiny-wan2.2-ti2v-5b", "I2V_MODEL_PRO": "fault-injection"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path):
    cluster = RayCluster(tmp_path_factory.mktemp("ray"), {**FAULT_ENV, **MODELS})
    try:
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


def ray_server(cluster: RayCluster, data_dir: Path, address: str, resource: str, **env: str) -> ServerProcess:
    """`i2v serve` with its workers on the cluster; each loads a mode's model on first use (`I2V_PRELOAD`),
    so the nodes that join in these tests are ready at once."""
    env = {**FAULT_ENV, **MODELS, **cluster.server_env(address, resource), "I2V_PRELOAD": "none", **env}
    return ServerProcess(data_dir, env=env, model="default")


@pytest.fixture(scope="module")
def server(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("ray-server") / "data"
    server = ray_server(cluster, data_dir, cluster.address, GPU_RESOURCE, I2V_RETRY_ON_RESTART="1")
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


def create(server: ServerProcess, prompt: str, mode: str = "pro") -> str:
    with server.http() as http:
        answer = http.post(
            PREDICTIONS, json={"input": {"prompt": prompt, "mode": mode, "start_image": data_uri(400, 400)}}
        )
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def test_predictions_run_on_the_cluster_through_the_official_client(server, tmp_path):
    """A real pipeline in a resident actor; the image goes to it as bytes, the mp4 comes back as bytes."""
    client = server.client()
    queued = [create(server, f"a black clip {i}") for i in range(2)]  # one slot: these wait their turn
    path = tmp_path / "start.png"
    path.write_bytes(make_image(640, 360, seed=1))
    with path.open("rb") as image:
        output = client.run(MODEL, input={"prompt": "a calm sea at dawn", "start_image": image, "seed": 3})
    with server.http() as http:
        video = http.get(output)
    assert video.status_code == 200
    (tmp_path / "out.mp4").write_bytes(video.content)
    info = probe(tmp_path / "out.mp4")
    assert (info["width"], info["height"]) == output_size(640, 360, 720)
    assert info["frames"] == 121 and info["fps"] == 24 and info["codec"] == "h264"
    ran = client.predictions.list().results[0]
    assert ran.status == "succeeded" and "seed: 3" in ran.logs and "denoising" in ran.logs
    assert WHERE.search(ran.logs), ran.logs  # where it ran, for whoever reads the logs
    for prediction_id in queued:
        done = server.wait_for(prediction_id, TERMINAL, timeout=120)
        assert done["status"] == "succeeded", done["error"]
    assert f"/outputs/{queued[0]}.mp4?expires=" in client.predictions.get(queued[0]).output  # a signed link


def test_cancel_stops_a_clip_on_its_worker_mid_run(server):
    running = create(server, "fault:slow:100000")  # ~6 hours of 0.2 s steps: only a cancel ends it
    server.wait_for_log(running, "/100000 denoising")  # mid-clip on the worker
    client = server.client()
    client.predictions.cancel(running)
    canceled = server.wait_for(running, TERMINAL, timeout=60)
    assert canceled["status"] == "canceled"
    after = server.wait_for(create(server, "next"), TERMINAL, timeout=60)  # the worker is free again
    assert after["status"] == "succeeded", after["error"]


def test_workers_lost_mid_clip_run_it_again_then_fail_it_and_a_new_node_takes_the_queue(
    server, cluster, tmp_path
):
    """Kill the actor under a clip (as the OOM killer would): with I2V_RETRY_ON_RESTART the clip runs again,
    on the actor the runner places on that node anew. Kill the whole node under the second run: the clip
    fails with a clear error (a second loss is not retried). A node that joins later (as the autoscaler
    would add one) takes the queue behind it, all without restarting the server."""
    hold = tmp_path / "never"  # never created: the clip holds mid-run until its worker dies
    held = create(server, f"fault:hold={hold}")
    first = server.wait_for_log(held, "1/2 denoising")
    queued = create(server, "behind it")
    actor = worker_pids(first)[0]
    node_a = cluster.node_of(actor)

    os.kill(actor, signal.SIGKILL)
    second = server.wait_for_log(held, "1/2 denoising", count=2)
    assert "running it again" in second["logs"]  # the dispatcher's line: back to the queue's front
    again = worker_pids(second)[-1]
    assert again != actor and cluster.node_of(again) is node_a

    node_a.kill()
    lost = server.wait_for(held, TERMINAL, timeout=120)
    assert lost["status"] == "failed"
    assert "the Ray worker at" in lost["error"] and "was lost while running this prediction" in lost["error"]

    node_b = cluster.add_node()
    done = server.wait_for(queued, TERMINAL, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert cluster.node_of(worker_pids(done)[-1]) is node_b


def test_a_server_off_the_cluster_reaches_it_through_ray_client(cluster, tmp_path):
    """`I2V_RAY_ADDRESS=ray://...`: the server is a Ray Client, as from a machine outside the cluster. It is
    a deployment of its own (its own namespace, so it leads its own placement) whose workers count their GPUs
    in a resource of their own, so the module's server leaves this node alone."""
    node = cluster.add_node(resource="i2v_gpu_remote")
    server = ray_server(
        cluster, tmp_path / "data", cluster.client_address, "i2v_gpu_remote", I2V_RAY_NAMESPACE="remote"
    )
    try:
        server.wait_ready(timeout=300)
        running = create(server, "fault:slow:100000")
        server.wait_for_log(running, "/100000 denoising")
        server.client().predictions.cancel(running)
        assert server.wait_for(running, TERMINAL, timeout=60)["status"] == "canceled"
        done = server.wait_for(create(server, "a black clip"), TERMINAL, timeout=60)
        assert done["status"] == "succeeded", done["error"]
        assert cluster.node_of(worker_pids(done)[-1]) is node
        with server.http() as http:
            video = http.get(f"/v1/predictions/{done['id']}/output.mp4")
        (tmp_path / "out.mp4").write_bytes(video.content)
        assert probe(tmp_path / "out.mp4")["frames"] == 121
    finally:
        server.stop()
        node.kill()


# No cluster needed below.


def test_the_ray_settings_come_from_the_environment_and_are_checked(monkeypatch, tmp_path):
    from i2v.server.app import configured_runner
    from i2v.server.config import ConfigError, ServerConfig
    from i2v.server.ray_runner import RayRunner

    config = ServerConfig.from_env(data_dir=tmp_path, no_auth=True)
    assert (
        config.runner,
        config.ray_address,
        config.ray_gpu_resource,
        config.ray_gpus_per_worker,
        config.ray_namespace,
    ) == ("local", "auto", "GPU", 1, "i2v")
    monkeypatch.setenv("I2V_RUNNER", "ray")
    monkeypatch.setenv("I2V_RAY_ADDRESS", "ray://head.example:10001")
    monkeypatch.setenv("I2V_RAY_GPUS_PER_WORKER", "2")
    monkeypatch.setenv("I2V_RAY_NAMESPACE", " staging ")
    runner = configured_runner(ServerConfig.from_env(data_dir=tmp_path, no_auth=True))
    assert isinstance(runner, RayRunner) and runner.address == "ray://head.example:10001"
    assert runner.namespace == "staging"
    assert runner.spec.device == "cuda:0+cuda:1"  # Ray numbers an actor's own GPUs from 0: a group of two
    monkeypatch.setenv("I2V_RAY_GPU_RESOURCE", GPU_RESOURCE)
    runner = configured_runner(ServerConfig.from_env(data_dir=tmp_path, no_auth=True))
    assert runner.resource == GPU_RESOURCE and runner.spec.device is None  # the engine picks its device
    for name, value, message in [
        (
            "I2V_RAY_GPUS_PER_WORKER",
            "0",
            "I2V_RAY_GPUS_PER_WORKER: Input should be greater than or equal to 1",
        ),
        ("I2V_RUNNER", "kubernetes", "I2V_RUNNER: Input should be 'local' or 'ray'"),
        ("I2V_DEVICES", "cuda:0", "with I2V_RUNNER=ray the GPUs are the cluster's"),
    ]:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ConfigError, match=re.escape(message)):
                ServerConfig.from_env(data_dir=tmp_path, no_auth=True)


def test_the_actor_channel_sends_the_video_back_as_bytes(tmp_path):
    """Inside an actor: a job's mp4 and poster go to the actor's scratch storage, then to the server as
    bytes just before its Succeeded, and the scratch files go; a job that fails leaves nothing behind."""
    from i2v.request import KlingRequest
    from i2v.server.ray_runner import ActorChannel, VideoBytes
    from i2v.server.runner import Failed, Job, Log, Succeeded
    from i2v.server.storage import LocalStorage, output_key, poster_key
    from i2v.server.worker import CancelJob, RunJob

    server_side = LocalStorage(tmp_path / "server")
    channel = ActorChannel(tmp_path / "actor")
    request = KlingRequest(prompt="x", start_image="data:,")
    for prediction_id in ("one", "two"):
        job = Job(prediction_id, request, {"start_image": b"png"}, output_key(prediction_id), server_side)
        channel.put(RunJob(job))
    channel.put(CancelJob("two"))
    runs = [channel.recv() for _ in range(2)]
    assert isinstance(channel.recv(), CancelJob)
    scratch = {run.job.storage for run in runs if isinstance(run, RunJob)}
    assert scratch == {LocalStorage(tmp_path / "actor")}  # never the server's storage
    assert [run.job.output for run in runs] == [output_key("one"), output_key("two")]
    assert runs[0].job.images == {"start_image": b"png"}  # the rest of the job as it was sent
    actor_side = scratch.pop()
    actor_side.put_bytes(output_key("one"), b"an mp4", "video/mp4")
    actor_side.put_bytes(poster_key("one"), b"a jpeg", "image/jpeg")
    actor_side.put_bytes(output_key("two"), b"half an mp4", "video/mp4")
    channel.send(Log("one", "50%"))
    channel.send(Succeeded("one", 1.0))
    channel.send(Failed("two", "out of memory"))
    assert channel.take(0.0) == [
        Log("one", "50%"),
        VideoBytes("one", b"an mp4", b"a jpeg"),
        Succeeded("one", 1.0),
        Failed("two", "out of memory"),
    ]
    assert channel.take(0.0) == [] and not list((tmp_path / "actor" / "outputs").iterdir())
