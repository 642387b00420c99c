"""The GPU run, rehearsed on CPU in an environment made only of what the GPU machine will have.

That environment: a fresh Python 3.11 venv with the GPU machine's own packages at their versions
(bench/gpu-machine.txt, installed with --no-deps so nothing else comes in; torch is the CPU build) and the
wheels the run carries (bench/carry.txt, their cp311 builds, fetched by bench/wheels.sh). Then
`bench/device.sh` itself runs at tiny size, installing the wheels with the same command as on the GPU.
A package the run needs and neither list has fails here, not in the GPU's few minutes.

The venv and the wheels are cached (keyed by both lists), so only the first run pays for the install;
pip's own cache keeps a rebuild quick.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
PYTHON = shutil.which("python3.11")
CACHE = Path(os.environ.get("I2V_REHEARSAL_CACHE", Path.home() / ".cache" / "i2v-rehearsal"))
TORCH_CPU = "torch==2.13.0"  # the CPU build on disk here; the GPU machine has 2.11.0+cu130
TINY_RUN = [
    "--size",
    "tiny",
    "--device",
    "cpu",
    "--steps",
    "2",
    "--frames",
    "9",
    "--x264-preset",
    "ultrafast",
]

pytestmark = pytest.mark.skipif(PYTHON is None, reason="the rehearsal builds a Python 3.11 venv")


def machine_requirements() -> list[str]:
    """bench/gpu-machine.txt as pip requirements for Python 3.11 (its `cp311:` versions where given)."""
    requirements = []
    for line in (ROOT / "bench" / "gpu-machine.txt").read_text().splitlines():
        requirement, _, comment = line.partition("#")
        if not requirement.strip():
            continue
        name = requirement.split("==")[0].strip()
        override = re.search(r"cp311:\s*(\S+)", comment)
        requirements.append(f"{name}=={override.group(1)}" if override else requirement.strip())
    return requirements


def key() -> str:
    lists = b"".join((ROOT / "bench" / name).read_bytes() for name in ("gpu-machine.txt", "carry.txt"))
    return hashlib.sha256(lists + TORCH_CPU.encode()).hexdigest()[:12]


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def rehearsal() -> tuple[Path, Path]:
    """(the venv's python, the folder of cp311 wheels), built once per pair of lists."""
    lists = key()
    venv, wheels = CACHE / f"venv-{lists}", CACHE / f"wheels-{lists}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(CACHE / f"{lists}.lock"):  # another test run on this machine may be building the same
        return build(venv, wheels)


def build(venv: Path, wheels: Path) -> tuple[Path, Path]:
    if not (venv / "ready").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        assert PYTHON is not None
        made = run([PYTHON, "-m", "venv", str(venv)])
        assert made.returncode == 0, made.stderr
        python = str(venv / "bin" / "python")
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # pip for torch: the CPU build lies on this disk, where uv never looks
        torch = run([*pip, "--no-deps", TORCH_CPU])
        assert torch.returncode == 0, torch.stderr
        others = [r for r in machine_requirements() if not r.startswith("torch==")]
        # The rest with the test environment's uv (./setup.sh installs it) where there is one: the same
        # pinned wheels, in seconds; it installs nothing of its own into this venv.
        uv = Path(sys.executable).with_name("uv")
        installer = [str(uv), "pip", "install", "--python", python, "--quiet"] if uv.is_file() else pip
        installed = run([*installer, "--no-deps", "--only-binary=:all:", *others])
        assert installed.returncode == 0, installed.stderr
        (venv / "ready").write_text("\n".join(others) + "\n")
    if not (wheels / "ready").is_file():
        fetched = run(["bash", str(ROOT / "bench" / "wheels.sh"), "--python", "3.11", "--dest", str(wheels)])
        assert fetched.returncode == 0, fetched.stderr
        (wheels / "ready").write_text(fetched.stdout)
    return venv / "bin" / "python", wheels


def device_run(python: Path, wheels: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """bench/device.sh as the GPU call runs it, with only the rehearsal's Python and wheels around."""
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "LANG": "C.UTF-8",
        "OUT": str(tmp_path / "out"), "PYTHON": str(python), "WHEELS": str(wheels), "SITE": str(tmp_path / "site"),
        "HF_HUB_OFFLINE": "1", "I2V_X264_PRESET": "ultrafast", "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
    }  # fmt: skip
    return run(["bash", str(ROOT / "bench" / "device.sh"), *args], cwd=tmp_path, env=env)


def test_the_gpu_run_passes_on_cpu_with_only_the_machines_packages_and_the_carried_wheels(
    rehearsal: tuple[Path, Path], tmp_path: Path
) -> None:
    python, wheels = rehearsal
    # Nothing outside the two lists: the venv holds the machine's packages, pip and the venv's own.
    listed = {re.sub(r"[-_.]+", "-", r.split("==")[0]).lower() for r in machine_requirements()}
    found = run([str(python), "-m", "pip", "list", "--format=json"])
    extra = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(found.stdout)} - listed - {"pip"}
    assert not extra, f"the rehearsal venv holds packages the GPU machine may not: {extra}"

    result = device_run(python, wheels, tmp_path, *TINY_RUN, "--budget-s", "1200")
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["device.json", "device.log", "device.md"]
    parts = json.loads((out / "device.json").read_text())
    assert list(parts) == ["env", "standard", "pro", "fast", "turbo", "low-vram", "warmup"]
    assert all(part["status"] == "ok" for part in parts.values()), {n: p["status"] for n, p in parts.items()}
    assert parts["env"]["carried_differs"] == {}  # the carried versions are the listed ones
    assert parts["pro"]["ours_refine_s_per_step"] > 0
    standard = parts["standard"]  # bench.gpu's own report: both sides, the real step count's extrapolation
    assert standard["steps_timed"] == 2 and standard["steps_full"] == 50
    assert standard["transformer_tokens"] > 0 and standard["transformer_pflop_per_step"] > 0
    for side in ("stock", "ours"):
        for figure in (
            "text_encode_s",
            "s_per_step",
            "decode_s",
            "mp4_encode_s",
            "end_to_end_s",
            "transformer_tflops",
        ):
            assert standard[f"{side}_{figure}"] > 0, f"{side}_{figure}"
        assert standard[f"{side}_before_steps_s"] >= 0
        assert standard[f"{side}_peak_gpu_memory_gib"] is None  # no GPU: no GPU memory figure
        assert standard[f"{side}_end_to_end_s"] > 50 * standard[f"{side}_s_per_step"]
    assert (
        standard["ratio_ours_over_stock_s_per_step"] > 0 and standard["ratio_ours_over_stock_end_to_end"] > 0
    )
    # On CPU our path adds no speed-up, so the same modules, inputs and seed give the same frames.
    assert standard["frames_max_abs_diff"] == 0.0
    assert any(key.startswith("ours_new_shape_") for key in standard)
    assert parts["turbo"]["end_to_end_s"] > 0 and parts["warmup"]["warm_up_s"] > 0
    assert "fast: no fp8 compute" in (out / "device.log").read_text()  # the CPU's logged fallback
    assert "## pro" in (out / "device.md").read_text()


def test_the_rehearsal_fails_when_a_carried_wheel_is_missing(
    rehearsal: tuple[Path, Path], tmp_path: Path
) -> None:
    python, wheels = rehearsal
    partial = tmp_path / "wheels"
    partial.mkdir()
    for wheel in wheels.glob("*.whl"):
        if not wheel.name.startswith("ftfy-"):  # the Wan pipelines clean every prompt with it
            (partial / wheel.name).symlink_to(wheel)
    result = device_run(python, partial, tmp_path, *TINY_RUN, "--parts", "standard", "--budget-s", "600")
    assert result.returncode != 0
    standard = json.loads((tmp_path / "out" / "device.json").read_text())["standard"]
    assert standard["status"] == "failed (exit 1)"
    assert "ftfy" in standard["output_tail"]
