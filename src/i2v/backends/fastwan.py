"""FastWan2.2 TI2V-5B: the `turbo` preset's standard-mode model, TI2V-5B distilled to 3 steps.

FastVideo distilled Wan2.2 TI2V-5B with DMD (distribution matching distillation): the same architecture
and parts, sampled in 3 steps without CFG. FastVideo's PyTorch DMD stage (`DmdDenoisingStage` in
hao-ai-lab/FastVideo `fastvideo/pipelines/stages/denoising.py`, commit
2f3d4074064e4d86f99dc784ebbaa296e6f5925f), the code the published checkpoint was distilled and shown
with, feeds the transformer the raw timesteps 1000, 757 and 522, i.e. sigmas t/1000 (1.0, 0.757,
0.522), unwarped: the distillation script (`examples/distill/Wan2.2-TI2V-5B-Diffusers/Data-free/
distill_dmd_t2v_5B.sh`) runs without `--warp_denoising_step`, whose default is off. Each step predicts
the clean latents x0 and re-noises them to the next sigma with fresh noise; the last returns x0.
So it is TI2V-5B with another scheduler, one forward per step instead of two, and 3 steps instead of 50.

FastVideo looks each sigma up in its shift-8 training table (nearest entry), within 0.0005 of t/1000;
we use t/1000. Its DMD stage has no TI2V branch (the start image is not pinned there); we condition the
start image the TI2V way, as the base model does (latent 0 pinned, timestep 0 for its tokens).
Caveat: no real weights were run here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .base import Clip, ModelInputs, StepCallback
from .wan_ti2v import WanTI2V

# FastWan2_2_TI2V_5B_Config.dmd_denoising_steps in fastvideo/configs/pipelines/wan.py
DMD_STEPS = (1000, 757, 522)


class DMDScheduler(FlowMatchEulerDiscreteScheduler):
    """The DMD timesteps as given (sigma = t/1000), whatever step count the pipeline asks for.

    With `stochastic_sampling` each step computes x0 = x - sigma * v and re-noises it to the next sigma,
    (1 - sigma') * x0 + sigma' * noise; the last step's next sigma is 0, so it returns x0.
    The Wan pipeline calls `set_timesteps(num_inference_steps)` and has no way to pass sigmas.
    """

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any
    ) -> None:
        super().set_timesteps(
            timesteps=list(DMD_STEPS),
            sigmas=[step / self.config.num_train_timesteps for step in DMD_STEPS],
            device=device,
        )


class FastWanTI2V(WanTI2V):
    spec = dataclasses.replace(
        WanTI2V.spec,
        name="fastwan2.2-ti2v-5b",
        source="FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
        steps=len(DMD_STEPS),
        guidance=1.0,  # distilled without CFG: one forward per step, no negative prompt
        shift=None,  # the DMD timesteps are used unshifted
        default_negative_prompt="",
    )
    tiny_steps = len(DMD_STEPS)
    cache_threshold = None  # three steps: nothing to skip
    tiny_transformer_seed = 1  # distilled: its own transformer; UMT5 and the VAE are TI2V-5B's

    def prepare(self, pipe: Any) -> None:
        super().prepare(pipe)
        # The re-noising draws from torch's default generator (the pipeline passes none to `step`), so
        # `generate` seeds it: a seed still means the same clip on the same device.
        self.pipe.scheduler = DMDScheduler(
            num_train_timesteps=self.pipe.scheduler.config.num_train_timesteps, shift=1.0,
            stochastic_sampling=True,
        )  # fmt: skip

    def total_steps(self, inputs: ModelInputs | None = None) -> int:
        return self.spec.steps  # the distilled schedule is fixed

    def generate(self, inputs: ModelInputs, on_step: StepCallback) -> Clip:
        torch.manual_seed(inputs.seed)
        return super().generate(inputs, on_step)
