"""Device specs as users write them (no torch here: the HTTP layer validates I2V_DEVICES with it).

A spec is one device ("cuda:1", "cpu") or a group joined by "+" ("cuda:0+cuda:1"), whose engine splits
each request across its GPUs (i2v.parallel). "cpu+cpu" is a group of CPU ranks: no faster, but the same
code, which is how the parallel path is tested without GPUs.
"""

from __future__ import annotations

import re

from .errors import I2VError

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
