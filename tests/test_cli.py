"""The `i2v` command end to end, in a subprocess, as a user runs it (and in-process where only its
output and exit code are checked, each such check next to a real subprocess run of the same command)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import probe

from i2v.cli import main


def i2v(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "i2v", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=cwd,
        timeout=600,
    )


def last_line(text: str) -> str:
    """What stays on a terminal: the last line, after the progress bar cleared itself with \\r."""
    return text.replace("\r", "\n").strip().splitlines()[-1]


def test_generate_end_to_end(image_file, tmp_path: Path) -> None:
    start = image_file(720, 1280, "JPEG")
    out = tmp_path / "deep" / "clip.mp4"
    result = i2v("generate", "--prompt", "a bird over the sea", "--start-image", str(start), "--seed", "3",
                 "--model", "tiny", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "720x1280" in result.stdout and "121 frames @ 24 fps" in result.stdout and "seed 3" in result.stdout
    )
    assert "denoising" in result.stderr and "encoding video" in result.stderr  # the progress bar
    info = probe(out)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (720, 1280, 121, "h264")


def i2v_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str]:
    """`main()` as `python -m i2v` calls it: (exit code, stderr), without a new interpreter's imports.

    What main() sets for the libraries (their verbosity variables, a logger's propagation) is put back."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    hub_logger = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_logger, "propagate", hub_logger.propagate)
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_user_mistakes_print_one_line_and_exit_2(
    image_file, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    small, good = str(image_file(200, 200)), str(image_file(640, 360))
    cases = {
        ("--start-image", small): "error: start_image: image is 200x200; each side must be at least 300 px",
        ("--start-image", str(tmp_path / "none.png")): "error: start_image: no such image file",
        ("--start-image", good, "--end-image", good): "error: end_image: end_image requires mode 'pro'",
        ("--start-image", good, "--duration", "7"): "error: duration: Input should be 5 or 10",
        ("--start-image", good, "--model", "nope"): "error: unknown model 'nope'",
        (
            "--start-image",
            good,
            "--preset",
            "warp",
        ): "error: preset: Input should be 'default', 'fast' or 'turbo'",
        ("--start-image", good, "--device", "cuda:0+cuda:0"): (
            "error: device 'cuda:0+cuda:0': each GPU may appear once in a group"
        ),
    }
    for number, (args, expected) in enumerate(cases.items()):
        model = () if "--model" in args else ("--model", "tiny")
        argv = ("generate", "--prompt", "x", *args, *model, "-o", str(tmp_path / "x.mp4"))
        if number == 0:  # the command itself, as a user runs it; the rest through the same main()
            result = i2v(*argv)
            code, stderr = result.returncode, result.stderr
        else:
            code, stderr = i2v_in_process(capsys, monkeypatch, *argv)
        assert code == 2, (args, stderr)
        assert last_line(stderr).startswith(expected), (args, stderr)
        assert "Traceback" not in stderr
    assert not (tmp_path / "x.mp4").exists()


def test_models_lists_backends_and_weights() -> None:
    result = i2v("models")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("wan2.2-ti2v-5b"))
    assert "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in line and "default for standard" in line
    assert "weights: size unknown (hub unreachable), nothing in the cache" in line  # no hub here
    # Its memory, counted from the packaged configs on `meta` (docs/memory.md).
    assert "weights on cuda (packaged configs): transformer 10.02 GB (5.00B params, bf16)" in result.stdout
    assert "group offload (low-vram): 0.00 GB held" in result.stdout


def test_demo_falls_back_to_the_tiny_model_without_a_gpu(tmp_path: Path) -> None:
    result = i2v("demo", "-o", str(tmp_path / "demo.mp4"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("demo: no CUDA GPU here")
    info = probe(tmp_path / "demo.mp4")
    assert (info["width"], info["height"], info["frames"]) == (1280, 720, 121)
