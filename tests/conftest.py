"""Shared fixtures: tiny models in a per-session cache, test images, a loopback HTTP server."""

from __future__ import annotations

import http.server
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

# One compute thread per process. The suite runs more workers than CI's two cores (test.sh), each with
# servers, model workers and ranks of its own, all computing at once: with torch's default (a thread per core
# each) the OpenMP threads outnumber the cores and spin waiting for each other. Three processes of conv3d side
# by side here took 1.5x the CPU time (31 s against 21 s) and 1.6x as long at two threads each as at one. Set
# before numpy and torch load their thread pools; every process the tests start inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import av
import numpy as np
import pytest
from PIL import Image

# Fast x264 settings keep CI inside its budget; the encode path is the same code.
os.environ.setdefault("I2V_X264_PRESET", "ultrafast")
# The test servers live on loopback, which the URL fetcher refuses unless an operator trusts it.
os.environ.setdefault("I2V_FETCH_ALLOW", "127.0.0.1")

# `./test.sh` runs the suite on pytest-xdist workers. Each module is one unit of work, so its
# module-scoped servers start once, on one worker; the modules that start a Ray cluster are one unit, so two
# clusters never run at once on this machine.
SERIAL_GROUPS = {"test_ray": "ray", "test_scaleout": "ray"}
# The longest units first (a run's `--durations`, summed per unit), so the last one to start is a short one
# and no worker finishes long before the others; the rest follow in xdist's order.
LONGEST_FIRST = (
    "ray",
    "test_web",
    "test_bench",
    "test_device_rehearsal",
    "test_pull",
    "test_parallel",
    "test_hardening",
    "test_engine",
    "test_server",
    "test_pro",
    "test_storage",
    "test_several_servers",
    "test_server_lifecycle",
    "test_memory_server",
    "test_speed",
    "test_attacks",
    "test_cli",
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduler, with the module (or its entry in SERIAL_GROUPS) as the scope, the longest
    scopes handed out first.

    Not `--dist loadgroup` with `xdist_group` marks: on pytest 9.2 that silently stops grouping (xdist
    3.8 tags the group onto `item._nodeid`, which pytest no longer reads; pytest-dev/pytest-xdist#1386),
    and every module-scoped server then starts on both workers. The scope comes from the node id alone.
    """
    from xdist.scheduler import LoadScopeScheduling

    rank = {scope: n for n, scope in enumerate(LONGEST_FIRST)}
    here = Path(__file__).parent
    stale = [s for s in rank if s not in SERIAL_GROUPS.values() and not (here / f"{s}.py").is_file()]
    assert not stale, f"LONGEST_FIRST names no module or group: {stale}"

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::", 1)[0]).stem
            return SERIAL_GROUPS.get(module, module)

        def _assign_work_unit(self, node: object) -> None:
            longest = min(self.workqueue, key=lambda scope: rank.get(scope, len(rank)))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session builds its tiny twins afresh (save_pretrained), then loads them from there."""
    cache = Path(os.environ.get("I2V_TEST_CACHE_DIR") or tmp_path_factory.mktemp("i2v-cache"))
    os.environ["I2V_CACHE_DIR"] = str(cache)
    return cache


def make_image(width: int, height: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    """A smooth colourful picture (gradients and a disc) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    rgb = np.stack(
        [
            (base[0] + 200 * x / width) % 256,
            (base[1] + 200 * y / height) % 256,
            (base[2] + 100 * (x + y) / (width + height)) % 256,
        ],
        axis=-1,
    )
    disc = (x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.2) ** 2
    rgb[disc] = [250, 230, 120]
    image = Image.fromarray(rgb.astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def image_file(tmp_path: Path):
    """Write a test image and return its path: image_file(width, height, fmt="PNG", seed=0)."""

    def write(width: int, height: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> Path:
        path = tmp_path / f"img-{width}x{height}-{seed}.{fmt.lower()}"
        path.write_bytes(make_image(width, height, fmt, seed, mode))
        return path

    return write


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1: yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def probe(path: Path) -> dict[str, object]:
    """What a player sees in an mp4: size, fps, frame count (decoded), codec, pixel format, audio, metadata."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        info: dict[str, object] = {
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "fps": video.average_rate,
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
            "audio": [s.codec_context.name for s in container.streams.audio],
            "metadata": dict(container.metadata),
        }
        info["frames"] = sum(1 for _ in container.decode(video=0))
    return info


def decode_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """One real PostgreSQL server for the session (tests/pgserver.py), started on first use."""
    from pgserver import PostgresServer, binaries

    found = binaries()
    if found is None:
        pytest.skip("PostgreSQL is not installed (./setup.sh --dev installs Debian's postgresql)")
    server = PostgresServer(found)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh database on the session's PostgreSQL."""
    return postgres.new_database()
