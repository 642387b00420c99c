"""A real Ray cluster on this machine for the Ray runner's tests: a head and worker nodes, each its own
`ray start --block` process (CPU only, small memory), with a custom resource standing for a GPU.

Every node has its own temporary directory for Ray's session files, and its processes are found through
the process tree (psutil), so stopping one node (or the cluster) ends exactly the processes it started:
never `ray stop`, which would end every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from serverproc import free_ports

GPU_RESOURCE = "i2v_gpu"  # stands for a GPU: I2V_RAY_GPU_RESOURCE in the servers of these tests
OBJECT_STORE_BYTES = 80 * 2**20  # Ray's smallest is 75 MiB
STARTED = "Ray runtime started."
WHERE = re.compile(r"running on the Ray worker at \S+ \(pid (\d+)\)")  # a prediction's log line
# Ray's own knobs, for the head. A node that stops answering is declared dead in about two seconds rather
# than half a minute, so a node killed mid-clip is out of the cluster before the next test starts. Ray
# Client's proxy gives up on a session server that did not start after 10 s rather than 30: one sometimes
# dies as it starts (ray-project/ray#63202), and the i2v server then connects again.
HEAD_ENV = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "10",
}


def worker_pids(body: dict) -> list[int]:
    """The worker processes a prediction ran on, in order (each start logs where it runs)."""
    return [int(pid) for pid in WHERE.findall(body["logs"] or "")]


def ray_command() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("no `ray` command next to this Python: pip install 'i2v[ray]'")
    return found


class RayNode:
    """One `ray start --block` and everything it starts (raylet, agents, workers). Its log is in `folder`;
    Ray's session files are in a short folder of their own (`ray_dir`), since Ray's sockets live there and
    a socket's path may not exceed 107 bytes."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ray_dir = Path(
            tempfile.mkdtemp(prefix="i2v-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)
        )
        self.log_path = folder / "ray-start.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [ray_command(), "start", "--block", "--temp-dir", str(self.ray_dir), *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the test run is for pytest, not for Ray
            )
        self._tree: dict[int, psutil.Process] = {}

    def wait_started(self, timeout: float = 120) -> None:
        """Until `ray start` says the node runs (it has registered with the head by then)."""
        deadline = time.monotonic() + timeout
        while STARTED not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray start did not finish in {timeout} s:\n{self.log()[-4000:]}")
            self._remember()
            time.sleep(0.2)
        self._remember()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _remember(self) -> None:
        """Note the node's processes now: a worker whose raylet is killed is adopted by init, out of reach."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                self._tree.setdefault(proc.pid, proc)

    def pids(self) -> set[int]:
        self._remember()
        return {pid for pid, proc in self._tree.items() if proc.is_running()}

    def kill(self) -> None:
        """SIGKILL the node's every process at once, as if its machine lost power."""
        self._remember()
        for proc in self._tree.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for proc in self._tree.values():
            with contextlib.suppress(psutil.Error):
                proc.wait(timeout=10)
        self.process.wait(timeout=10)
        shutil.rmtree(self.ray_dir, ignore_errors=True)


class RayCluster:
    """A head without the GPU resource (the server's driver attaches to it) and worker nodes that have it.

    The cluster takes a token of its own (`driver_env`, for whoever connects), as a real one should: set
    explicitly, so that no token file in the home folder (`ray get-auth-token`) changes how it starts."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.driver_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.folder = folder
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.driver_env, **env}
        self.port, client_port, dashboard_port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        self.client_address = f"ray://127.0.0.1:{client_port}"  # Ray Client, for a driver off the cluster
        self.nodes: list[RayNode] = []
        self.head = self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--node-ip-address",
                "127.0.0.1",
                "--ray-client-server-port",
                str(client_port),
                "--dashboard-port",
                str(dashboard_port),
                "--include-dashboard=false",
                "--num-cpus",
                "1",
                "--num-gpus",
                "0",
            ],
            HEAD_ENV,
        )

    def _start(
        self, name: str, args: list[str], env: dict[str, str] | None = None, wait: bool = True
    ) -> RayNode:
        common = [
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--disable-usage-stats",
            "--include-log-monitor=false",
        ]
        node = RayNode([*args, *common], {**self.env, **(env or {})}, self.folder / name)
        self.nodes.append(node)
        if wait:
            node.wait_started()
        return node

    def add_node(self, gpus: int = 1, resource: str = GPU_RESOURCE, wait: bool = True) -> RayNode:
        """A worker node with `gpus` of the stand-in GPU resource (and a CPU); without `wait` it starts
        while the caller goes on (`RayNode.wait_started` later), so nodes and servers start side by side."""
        return self._start(
            f"node-{len(self.nodes)}",
            [
                "--address",
                self.address,
                "--num-cpus",
                "1",
                "--num-gpus",
                "0",
                "--resources",
                json.dumps({resource: gpus}),
            ],
            wait=wait,
        )

    def server_env(self, address: str | None = None, resource: str = GPU_RESOURCE) -> dict[str, str]:
        """What an `i2v serve` needs to run its workers on this cluster (its head's address by default)."""
        return {
            "I2V_RUNNER": "ray",
            "I2V_RAY_ADDRESS": address or self.address,
            "I2V_RAY_GPU_RESOURCE": resource,
            **self.driver_env,
        }

    def node_of(self, pid: int) -> RayNode:
        """The node one of whose processes has this pid."""
        for node in self.nodes:
            if pid in node.pids():
                return node
        raise LookupError(f"no node of this cluster has a process {pid}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
