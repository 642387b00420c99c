"""The tiny Wan twin as a backend whose weights are a hub repository: the hub stand-in's, for the pull tests.

It is `WanTI2V` as it is (its `load()` and the files it declares) with the tiny twin's grid and steps, so a
clip renders in seconds on a CPU. Registered through `I2V_EXTRA_BACKENDS=standin_backends:StandInWan`.
"""

from __future__ import annotations

import dataclasses

from i2v.backends.wan_ti2v import WanTI2V


class StandInWan(WanTI2V):
    spec = dataclasses.replace(
        WanTI2V.spec,
        name="standin-wan",
        source="standin/tiny-wan",
        grid=WanTI2V.tiny_grid,
        steps=WanTI2V.tiny_steps,
    )
