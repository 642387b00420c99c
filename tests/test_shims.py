"""Each shim in i2v.shims still works around a live bug: when an upgrade fixes one, its test fails here,
saying which shim to delete (and which version guard to drop)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import diffusers
import pytest
import torch

from i2v import shims

# A CPU rank enabling Ulysses on a host without an accelerator, as each rank of `cpu+cpu` does. The group
# here has one rank, so past the device count the mesh of two cannot be built: what matters is whether
# diffusers gets past its device count.
ENABLE_PARALLELISM = textwrap.dedent(
    """
    import sys, tempfile, pathlib
    import torch, torch.distributed as dist
    from diffusers import ContextParallelConfig, WanTransformer3DModel
    from i2v.shims import cpu_counts_as_one_accelerator
    store = pathlib.Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", init_method=store.as_uri(), rank=0, world_size=1)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=16, ffn_dim=8, num_layers=1,
    )
    config = ContextParallelConfig(ulysses_degree=2)
    try:
        if sys.argv[1] == "shimmed":
            with cpu_counts_as_one_accelerator(torch.device("cpu")):
                model.enable_parallelism(config=config)
        else:
            model.enable_parallelism(config=config)
    except Exception as exc:
        print(type(exc).__name__)
    else:
        print("enabled")
    """
)


def enable_parallelism(how: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", ENABLE_PARALLELISM, how], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(torch.accelerator.device_count() > 0, reason="the bug shows only without an accelerator")
def test_the_cpu_rank_shim_is_still_needed() -> None:
    assert shims.cpu_rank_shim_applies(), (
        f"diffusers {diffusers.__version__} is not a version the CPU-rank shim was written for "
        f"({', '.join(shims.CPU_RANK_DEVICE_COUNT_VERSIONS)}): check whether its bug is fixed"
    )
    assert enable_parallelism("plain") == "ZeroDivisionError", (
        "diffusers no longer divides by torch.accelerator.device_count() on a CPU host: "
        "delete i2v.shims.cpu_counts_as_one_accelerator and its use in i2v.placement"
    )
    assert enable_parallelism("shimmed") != "ZeroDivisionError"  # past the device count
