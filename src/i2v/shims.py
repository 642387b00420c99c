"""Workarounds for bugs in the libraries we pin, each guarded by the versions it works around.

Each shim names the upstream behaviour it works around and applies only on the versions listed, and
tests/test_shims.py asserts that the bug still reproduces there: when an upgrade fixes it, that test fails
and says which shim to delete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import version

import torch

# diffusers records `rank % torch.accelerator.device_count()` as a rank's device when parallelism is
# enabled (ModelMixin._resolve_parallel_config); on a host without an accelerator that divides by zero.
CPU_RANK_DEVICE_COUNT_VERSIONS = ("0.42.1",)


def cpu_rank_shim_applies() -> bool:
    """Whether the installed diffusers is one the CPU-rank shim was written for."""
    return version("diffusers") in CPU_RANK_DEVICE_COUNT_VERSIONS


@contextlib.contextmanager
def cpu_counts_as_one_accelerator(device: torch.device) -> Iterator[None]:
    """While diffusers enables parallelism for a CPU rank, count the CPU as one accelerator.

    The value is recorded on the model's parallel config but unused for context parallelism on CPU (gloo),
    so 1 is as good as any. A no-op on GPU hosts and on diffusers versions without the bug.
    """
    needed = cpu_rank_shim_applies() and device.type == "cpu" and torch.accelerator.device_count() == 0
    if not needed:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]
