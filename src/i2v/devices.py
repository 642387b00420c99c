"""Device specs as users write them (no torch here: the HTTP layer validates I2V_DEVICES with it).

A spec is one device ("cuda:1", "cpu") or a group joined by "+" ("cuda:0+cuda:1"), whose engine splits
each request across its GPUs (i2v.parallel). "cpu+cpu" is a group of CPU ranks: no faster, but the same
code, which is how the parallel path is tested without GPUs.

A worker spec (one entry of `I2V_DEVICES`) may name the one mode its worker serves before an "@":
`pro@cuda:1+cuda:2`. A worker without a mode serves every mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from .errors import I2VError
from .request import MODES, Mode

GROUP_SEPARATOR = "+"
DEVICE = re.compile(r"^[a-z]+(:\d+)?$")  # torch's form: cpu, cuda, cuda:0, mps, xpu:1, ...


def device_group(spec: str | None) -> tuple[str, ...]:
    """The devices of a spec: "cuda:0+cuda:1" -> ("cuda:0", "cuda:1"); "cuda:1" -> ("cuda:1",); None -> ()."""
    if not spec:
        return ()
    devices = tuple(part.strip() for part in spec.split(GROUP_SEPARATOR))
    for device in devices:
        if not DEVICE.match(device):
            raise I2VError(
                f"device {spec!r}: {device!r} is not a device like cuda:0 or cpu "
                "(a group joins devices with '+', like cuda:0+cuda:1)"
            )
    gpus = [d for d in devices if d != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise I2VError(f"device {spec!r}: each GPU may appear once in a group")
    return devices


MODE_SEPARATOR = "@"


@dataclass(frozen=True)
class WorkerSpec:
    """One worker of `I2V_DEVICES`: its device (or group; None lets the engine choose) and its mode
    (None: every mode)."""

    device: str | None = None
    mode: Mode | None = None

    @property
    def modes(self) -> tuple[Mode, ...]:
        return (self.mode,) if self.mode else MODES

    def __str__(self) -> str:
        device = self.device or "default device"
        return f"{self.mode}{MODE_SEPARATOR}{device}" if self.mode else device


def worker_spec(spec: str | None) -> WorkerSpec:
    """`standard@cuda:0` -> WorkerSpec("cuda:0", "standard"); `cuda:0+cuda:1` -> every mode on that group."""
    if spec is None or not spec.strip():
        return WorkerSpec()
    mode, separator, device = spec.strip().rpartition(MODE_SEPARATOR)
    mode = mode.strip()
    if separator and mode not in MODES:
        raise I2VError(
            f"worker {spec.strip()!r}: {mode!r} is not a mode ({' or '.join(MODES)}), as in pro@cuda:1"
        )
    device_group(device)  # raises with the rule
    if not device.strip():
        raise I2VError(f"worker {spec.strip()!r}: a device follows the {MODE_SEPARATOR!r}, as in pro@cuda:1")
    return WorkerSpec(device=device.strip(), mode=cast(Mode, mode) if separator else None)
