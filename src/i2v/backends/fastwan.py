"""FastWan2.2 TI2V-5B: the `turbo` preset's standard-mode model, TI2V-5B distilled to 3 steps.

FastVideo distilled Wan2.2 TI2V-5B with DMD (distribution matching distillation): the same architecture
and parts, sampled in 3 steps without CFG. Each step predicts the clean latents and re-noises them to the
next noise level; the levels are FastVideo's denoising steps 1000, 757 and 522, warped through the
model's flow shift as FastVideo's DMD pipeline does. So it is TI2V-5B with another scheduler, one
forward per step instead of two, and 3 steps instead of 50.

Caveat: these settings follow FastVideo's published configuration; no real weights were run here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .base import Clip, ModelInputs, StepCallback
from .wan_ti2v import WanTI2V

DMD_STEPS = (1000, 757, 522)


def dmd_sigmas(shift: float) -> list[float]:
    """FastVideo's DMD timesteps as sigmas on the shifted flow schedule: 1.0, 0.940, 0.845 at shift 5."""
    plain = [step / 1000 for step in DMD_STEPS]
    return [shift * s / (1 + (shift - 1) * s) for s in plain]


class DMDScheduler(FlowMatchEulerDiscreteScheduler):
    """Fixed DMD sigmas, whatever step count the pipeline asks for; stochastic steps (re-noise to the next).

    The Wan pipeline calls `set_timesteps(num_inference_steps)` and has no way to pass sigmas.
    """

    fixed_sigmas: ClassVar[list[float]] = [1.0]  # set per instance by FastWanTI2V.load

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any
    ) -> None:
        super().set_timesteps(sigmas=self.fixed_sigmas, device=device)


class FastWanTI2V(WanTI2V):
    spec = dataclasses.replace(
        WanTI2V.spec,
        name="fastwan2.2-ti2v-5b",
        source="FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
        steps=len(DMD_STEPS),
        guidance=1.0,  # distilled without CFG: one forward per step
    )
    tiny_steps = len(DMD_STEPS)
    cache_threshold = None  # three steps: nothing to skip
    tiny_transformer_seed = 1  # distilled: its own transformer; UMT5 and the VAE are TI2V-5B's

    def prepare(self, pipe: Any) -> None:
        super().prepare(pipe)
        # The renoising draws from torch's default generator (the pipeline passes none to `step`), so
        # `generate` seeds it: a seed still means the same clip on the same device.
        scheduler = DMDScheduler.from_config(
            self.pipe.scheduler.config, stochastic_sampling=True, shift=1.0, use_dynamic_shifting=False
        )
        scheduler.fixed_sigmas = dmd_sigmas(self.spec.shift or 1.0)
        self.pipe.scheduler = scheduler

    def total_steps(self, inputs: ModelInputs | None = None) -> int:
        return self.spec.steps  # the distilled schedule is fixed

    def generate(self, inputs: ModelInputs, on_step: StepCallback) -> Clip:
        torch.manual_seed(inputs.seed)
        return super().generate(inputs, on_step)
