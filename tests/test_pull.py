"""Weights from the hub: `i2v pull`, the disk check, gated repos and the server's start-up downloads.

huggingface_hub's real download code runs against a stand-in for the hub on loopback (tests/hub_standin.py),
reached through HF_ENDPOINT, with the cache in a temporary HF_HOME. The stand-in serves the tiny twins
(`build_tiny`, saved with `save_pretrained`) as the default models' repositories, next to decoys a
backend must not fetch: another weight format, the root-level single-file checkpoints, assets.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hub_standin import HubStandIn, Repo
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from serverproc import MODEL, ServerProcess, data_uri
from tqdm import tqdm

from i2v.backends import BACKENDS, ensure_tiny
from i2v.backends.ltx2 import DISTILLED_LORA
from i2v.progress import format_bytes
from i2v.server.config import ConfigError, ServerConfig
from i2v.settings import Settings
from i2v.weights import _select

TESTS = Path(__file__).parent
WAN, LTX = "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Lightricks/LTX-2"
VAE = "vae/diffusion_pytorch_model.safetensors"
# huggingface_hub writes a download in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB), so the VAE's file is made
# larger than one chunk: a cut past the first chunk keeps that chunk, and the download resumes after it.
VAE_SIZE = DOWNLOAD_CHUNK_SIZE + 1_200_000  # about
DECOYS = {
    WAN: {
        "transformer/diffusion_pytorch_model.bin": b"pickle" * 2000,  # the same weights in another format
        "text_encoder/model.fp16.safetensors": b"variant" * 1000,  # a variant the default load skips
        "wan2.2_ti2v_5B_bf16.safetensors": b"single-file checkpoint" * 500,
        "assets/teaser.mp4": b"video" * 1000,
        "README.md": b"# Wan2.2\n",
    },
    LTX: {
        "ltx-2-19b-dev.safetensors": b"single-file checkpoint" * 500,
        "ltx-2-19b-distilled-fp8.safetensors": b"fp8 single-file" * 500,
        "ltx-2-spatial-upscaler-x2-1.0.safetensors": b"upscaler" * 500,
        "transformer/diffusion_pytorch_model.bin": b"pickle" * 2000,
        "README.md": b"# LTX-2\n",
    },
}


def padded(data: bytes, size: int) -> bytes:
    """The same tensors in a safetensors file of about `size` bytes, padded in its header's metadata."""
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    metadata = header.get("__metadata__", {})
    return save_safetensors(
        load_safetensors(data), metadata={**metadata, "padding": "0" * (size - len(data))}
    )


@pytest.fixture(scope="module")
def twins() -> dict[str, Path]:
    tiny_dir = Settings().tiny_dir
    return {name: ensure_tiny(BACKENDS[name], tiny_dir) for name in ("wan2.2-ti2v-5b", "ltx-2")}


@pytest.fixture
def hub(twins: dict[str, Path]) -> Iterator[HubStandIn]:
    """The default models' repositories, as the tiny twins with decoys beside them."""
    with HubStandIn() as standin:
        wan = standin.add_repo(WAN, twins["wan2.2-ti2v-5b"], extra=DECOYS[WAN])
        wan.files[VAE] = padded(wan.files[VAE], VAE_SIZE)
        standin.add_repo(LTX, twins["ltx-2"], extra=DECOYS[LTX])
        yield standin


def loaded(repo: Repo, decoys: dict[str, bytes] | None = None) -> set[str]:
    """The files the backend reads: the twin's own, none of the decoys (nor .gitattributes)."""
    return set(repo.files) - set(DECOYS[repo.id] if decoys is None else decoys) - {".gitattributes"}


def hub_env(hub: HubStandIn, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), **extra}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        env.pop(name, None)
    return env


def i2v(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "i2v", *args], capture_output=True, text=True, env=env, timeout=300
    )


def in_cache(tmp_path: Path, repo: str) -> set[str]:
    """The files of a repository's snapshot in the HF cache."""
    snapshots = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    return {
        p.relative_to(folder).as_posix()
        for folder in (snapshots.iterdir() if snapshots.is_dir() else ())
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_pull_fetches_what_the_backends_load_with_one_bar_and_resumes(
    hub: HubStandIn, tmp_path: Path
) -> None:
    env = hub_env(hub, tmp_path)
    wan, ltx = hub.repos[WAN], hub.repos[LTX]
    wanted = {WAN: loaded(wan), LTX: loaded(ltx)}
    total = sum(len(hub.repos[r].files[p]) for r, paths in wanted.items() for p in paths)

    # --dry-run: what the configured models (standard and pro) would fetch, file by file; nothing fetched
    dry = i2v(env, "pull", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for repo, paths in wanted.items():
        assert f"{repo}: {len(paths)} files, " in dry.stdout
        for path in paths:
            assert f"    {path}  {format_bytes(len(hub.repos[repo].files[path]))}\n" in dry.stdout
    assert f"would fetch {format_bytes(total)} into {tmp_path / 'hf' / 'hub'}" in dry.stdout
    assert not any(decoy in dry.stdout for decoys in DECOYS.values() for decoy in decoys)
    assert not hub.gets(WAN) and not hub.gets(LTX)

    # a run that stops part-way: the VAE's download fails; what completed stays in the cache
    hub.fail(WAN, VAE, 500)
    stopped = i2v(env, "pull")
    assert stopped.returncode == 2, stopped.stderr
    assert f"error: downloading {WAN} failed (HTTP 500 for {hub.url}/{WAN}/resolve/" in stopped.stderr
    assert "run `i2v pull` again to fetch the rest" in stopped.stderr
    kept = in_cache(tmp_path, WAN)
    assert VAE not in kept and kept < wanted[WAN]
    before = len(hub.served)

    # the next run fetches only what is missing; the connection drops mid-file once and the file resumes
    hub.fail(WAN, VAE, 0)
    cut_at = DOWNLOAD_CHUNK_SIZE + 100_000
    hub.cut_once(WAN, VAE, after=cut_at)
    done = i2v(env, "pull")
    assert done.returncode == 0, done.stderr
    gets = [s for s in hub.served[before:] if s.method == "GET"]
    assert {(s.repo, s.path) for s in gets} == {(WAN, p) for p in wanted[WAN] - kept} | {
        (LTX, p) for p in wanted[LTX]
    }
    first, rest = (s for s in gets if (s.repo, s.path) == (WAN, VAE))
    assert (first.range_start, first.sent) == (None, cut_at)  # cut after cut_at bytes
    # resumed after the chunk it had written: a Range request, and only the rest of the file went out
    size = len(wan.files[VAE])
    assert (rest.status, rest.range_start, rest.sent) == (
        206,
        DOWNLOAD_CHUNK_SIZE,
        size - DOWNLOAD_CHUNK_SIZE,
    )
    assert all(s.sent == len(hub.repos[s.repo].files[s.path]) for s in gets if (s.repo, s.path) != (WAN, VAE))
    assert "Trying to resume download" in done.stderr
    # one bar over all files: bytes of the total, rate, time left
    bar = done.stderr.replace("\r", "\n")
    missing = tqdm.format_sizeof(sum(len(hub.repos[r].files[p]) for r, p in {(s.repo, s.path) for s in gets}))
    assert "downloading wan2.2-ti2v-5b" in bar and "downloading ltx-2" in bar
    assert f"100%|██████████| {missing}/{missing} [" in bar, bar
    assert "B/s]" in bar
    wan_bytes = sum(len(wan.files[p]) for p in wanted[WAN])
    assert (
        f"wan2.2-ti2v-5b: {len(wanted[WAN])} files, {format_bytes(wan_bytes)} in {tmp_path / 'hf' / 'hub'}"
        in done.stdout
    )
    assert in_cache(tmp_path, WAN) == wanted[WAN] and in_cache(tmp_path, LTX) == wanted[LTX]
    assert not {s.path for s in hub.served} & (set(DECOYS[WAN]) | set(DECOYS[LTX]))

    # `i2v models`: each model's download size, and what the cache holds
    listed = i2v(env, "models")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert f"weights: {format_bytes(wan_bytes)}, all in the cache;" in lines["wan2.2-ti2v-5b"]
    assert "weights: size unknown (hub refused), nothing in the cache;" in lines["fastwan2.2-ti2v-5b"]


def test_pull_refuses_a_download_the_disk_cannot_hold_before_writing_a_byte(
    hub: HubStandIn, tmp_path: Path
) -> None:
    # the real free space of the disk, against a reserve it cannot keep: the whole disk
    env = hub_env(hub, tmp_path, I2V_MIN_FREE_DISK=str(shutil.disk_usage(tmp_path).total))
    needed = sum(len(hub.repos[r].files[p]) for r in (WAN, LTX) for p in loaded(hub.repos[r]))
    result = i2v(env, "pull")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(
        f"error: not enough disk space for the weights of wan2.2-ti2v-5b, ltx-2: they need {format_bytes(needed)}, "
        f"the HF cache at {tmp_path / 'hf' / 'hub'} has "
    ), message
    assert " free, and I2V_MIN_FREE_DISK keeps " in message and "setting HF_HOME (e.g. HF_HOME=" in message
    assert not hub.gets(WAN) and not hub.gets(LTX)
    assert not list((tmp_path / "hf").rglob("blobs")) and not list((tmp_path / "hf").rglob("*.incomplete"))


def test_a_gated_or_missing_repository_is_a_clear_error(
    hub: HubStandIn, twins: dict[str, Path], tmp_path: Path
) -> None:
    hub.add_repo("standin/gated-wan", twins["wan2.2-ti2v-5b"], gated=True)
    env = hub_env(hub, tmp_path)
    result = i2v(env, "pull", "wan2.2-ti2v-5b=standin/gated-wan", "ltx-2=standin/no-such-repo")
    assert result.returncode == 2
    assert (
        f"error: wan2.2-ti2v-5b: standin/gated-wan is gated: accept its licence on {hub.url}/standin/gated-wan "
        "while signed in to the hub, then give i2v that account's token: HF_TOKEN=hf_..."
    ) in result.stderr
    assert "error: ltx-2: standin/no-such-repo was not found on the hub (HTTP 401)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not hub.gets("standin/gated-wan")


def standin_backend_env(hub: HubStandIn, tmp_path: Path) -> dict[str, str]:
    """The environment for the `standin-wan` backend (tests/standin_backends.py): WanTI2V, its weights a repo."""
    return hub_env(hub, tmp_path) | {
        "I2V_EXTRA_BACKENDS": "standin_backends:StandInWan",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")])),
    }


def test_generate_shows_a_download_as_a_stage_of_its_bar(
    hub: HubStandIn, twins: dict[str, Path], image_file, tmp_path: Path
) -> None:
    """Without --verbose, missing weights download as a stage of the bar, in bytes with the rate.

    The model then refuses the end image (TI2V takes none) as soon as it is loaded: the clip itself is
    the other tests' business, and this keeps the test to the download and the load."""
    repo = hub.add_repo("standin/tiny-wan", twins["wan2.2-ti2v-5b"])
    image = str(image_file(640, 360))
    result = i2v(
        standin_backend_env(hub, tmp_path), "generate", "--prompt", "waves", "--mode", "pro",
        "--start-image", image, "--end-image", image, "--model", "standin-wan", "-o", str(tmp_path / "x.mp4"),
    )  # fmt: skip
    bar = result.stderr.replace("\r", "\n")
    total = tqdm.format_sizeof(sum(len(repo.files[p]) for p in loaded(repo, {})))
    assert f"downloading weights ██████████ {total}/{total} [" in bar and "B/s]" in bar, bar
    assert bar.index("loading inputs") < bar.index("downloading weights") < bar.index("loading model")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "error: end_image: model standin-wan cannot take an end frame; configure a keyframe model"
    )
    assert all(hub.bytes_served("standin/tiny-wan", p) == len(repo.files[p]) for p in loaded(repo, {}))


def test_the_server_downloads_at_start_reports_it_then_serves(
    hub: HubStandIn, twins: dict[str, Path], tmp_path: Path
) -> None:
    repo = hub.add_repo("standin/tiny-wan", twins["wan2.2-ti2v-5b"], extra=DECOYS[WAN])
    repo.files[VAE] = padded(repo.files[VAE], VAE_SIZE)
    hub.add_repo("standin/gated-wan", twins["wan2.2-ti2v-5b"], gated=True)
    hold = hub.hold("standin/tiny-wan", VAE, after=DOWNLOAD_CHUNK_SIZE + 1000)
    env = standin_backend_env(hub, tmp_path) | {
        "I2V_MODEL_STANDARD": "standin-wan",
        "I2V_MODEL_PRO": "standin-wan=standin/gated-wan",
        "I2V_PRELOAD": "standard",
        "HF_HUB_DOWNLOAD_TIMEOUT": "600",  # the held response stays open until the test releases it
    }
    server = ServerProcess(tmp_path / "data", env=env, model="default")
    try:
        assert hold.reached.wait(timeout=240), server.log_tail()
        health = wait_health(
            server,
            # the held file's first chunk is written (and reported) once the stand-in has sent it
            lambda h: (
                h["status"] == "DOWNLOADING"
                and any(
                    d["bytes_done"] >= DOWNLOAD_CHUNK_SIZE for d in h.get("setup", {}).get("downloads", [])
                )
            ),
        )
        (download,) = health["setup"]["downloads"]
        total = sum(len(repo.files[p]) for p in loaded(repo, DECOYS[WAN]))
        assert download["model"] == "standin-wan" and download["repo"] == "standin/tiny-wan"
        assert DOWNLOAD_CHUNK_SIZE <= download["bytes_done"] < download["bytes_total"] == total

        with server.http() as http:
            created = http.post(
                f"/v1/models/{MODEL}/predictions",
                json={"input": {"prompt": "waves", "start_image": data_uri(640, 360), "seed": 1}},
            ).json()
            waiting = wait_prediction(
                http, created["id"], lambda p: "downloading the model weights" in p["logs"]
            )
            assert waiting["status"] == "starting"
            assert waiting["logs"].startswith(
                "the worker is downloading the model weights (standin-wan from standin/tiny-wan: "
            )

            hold.release()
            assert server.wait_ready(timeout=240, states=("READY", "BUSY"))["status"] in ("READY", "BUSY")
            ran = server.wait_for(created["id"], {"succeeded", "failed"})
            assert ran["status"] == "succeeded", ran

            # the pro model's repository is gated: its prediction fails with what to do, naming the repo
            pro = http.post(
                f"/v1/models/{MODEL}/predictions",
                json={"input": {"prompt": "x", "start_image": data_uri(640, 360), "mode": "pro"}},
                headers={"prefer": "wait=60"},
            ).json()
            pro = server.wait_for(pro["id"], {"succeeded", "failed"})
        assert pro["status"] == "failed" and "standin/gated-wan is gated: accept its licence" in pro["error"]
        assert "HF_TOKEN=" in pro["error"]
        # every file the backend loads went out once (the load after the pull read the cache), no decoy
        for path in loaded(repo, DECOYS[WAN]):
            assert hub.bytes_served("standin/tiny-wan", path) == len(repo.files[path]), path
        assert not {s.path for s in hub.gets("standin/tiny-wan")} & set(DECOYS[WAN])
        assert "a worker is downloading standin-wan from standin/tiny-wan: " in server.log()
    finally:
        hold.release()
        server.stop()


def wait_health(server: ServerProcess, ok, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.base}/health-check", timeout=5).json()
        if ok(health):
            return health
        time.sleep(0.2)
    raise TimeoutError(f"health never matched; last {health}:\n{server.log_tail()}")


def wait_prediction(http: httpx.Client, prediction_id: str, ok, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/predictions/{prediction_id}").json()
        if ok(body):
            return body
        time.sleep(0.2)
    raise TimeoutError(f"prediction never matched: {body}")


def test_each_backend_declares_the_files_its_load_reads(twins: dict[str, Path]) -> None:
    """Every file of the tiny twin (the layout `save_pretrained` writes and `load()` reads) is selected,
    none of the repository's other formats or root-level checkpoints is."""
    for name, decoys in (("wan2.2-ti2v-5b", DECOYS[WAN]), ("ltx-2", DECOYS[LTX])):
        layout = {p.relative_to(twins[name]).as_posix() for p in twins[name].rglob("*") if p.is_file()}
        chosen = set(_select(layout | set(decoys) | {".gitattributes"}, BACKENDS[name].spec.files))
        assert chosen == layout, name
    ltx_layout = {p.relative_to(twins["ltx-2"]).as_posix() for p in twins["ltx-2"].rglob("*") if p.is_file()}
    assert DISTILLED_LORA in ltx_layout and any(p.startswith("latent_upsampler/") for p in ltx_layout)
    # the distilled checkpoint refines without the LoRA; FastWan is TI2V-5B's layout
    assert set(_select(ltx_layout, BACKENDS["ltx-2-distilled"].spec.files)) == ltx_layout - {DISTILLED_LORA}
    assert BACKENDS["fastwan2.2-ti2v-5b"].spec.files == BACKENDS["wan2.2-ti2v-5b"].spec.files


def test_disk_reserve_and_preload_settings_name_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2V_MIN_FREE_DISK", "20GB")
    assert Settings().min_free_disk == 20 * 10**9
    monkeypatch.setenv("I2V_MIN_FREE_DISK", "plenty")
    with pytest.raises(Exception, match="I2V_MIN_FREE_DISK: expected a size like 500MB, 20GB, 2GiB or 0"):
        Settings()
    monkeypatch.setenv("I2V_API_TOKEN", "t")
    assert ServerConfig().preload_modes == ("standard", "pro")  # unset: every mode the workers serve
    for value, modes in (("all", ("standard", "pro")), ("standard", ("standard",)), ("none", ())):
        monkeypatch.setenv("I2V_PRELOAD", value)
        assert ServerConfig().preload_modes == modes
    monkeypatch.setenv("I2V_PRELOAD", "pro")
    with pytest.raises(ConfigError, match="I2V_PRELOAD: Input should be 'all', 'standard' or 'none'"):
        ServerConfig()
