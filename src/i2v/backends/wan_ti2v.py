"""Wan2.2 TI2V-5B: the standard-mode (720p, 24 fps) model.

The start image conditions the clip by replacing latent frame 0 at every step (`expand_timesteps=True`),
so the clip opens on it. The pipeline ignores `last_image` silently, so this backend declares that it
takes no end frame and the engine refuses one before it gets here.

The prompt is encoded here rather than in the pipeline so that CFG's two passes can run as one batched
forward (`i2v.batched_cfg`); the pipeline then takes the embeddings instead of the text.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)

from ..batched_cfg import BatchedCFG
from ..geometry import Grid
from ..placement import step_cache
from ..speed import Speed
from .base import Backend, BackendSpec, Clip, ModelInputs, StepCallback, device_dtype, model_files
from .tiny_parts import tiny_umt5


class WanTI2V(Backend):
    spec = BackendSpec(
        name="wan2.2-ti2v-5b",
        source="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        fps=24,
        grid=Grid(max_area=1280 * 704, multiple=32),  # the model's trained area, sides on its 32 px grid
        frame_multiple=4,
        takes_end_frame=False,
        steps=50,
        guidance=5.0,
        shift=5.0,
        modes=("standard",),
        # What load() reads: the pipeline's parts in the diffusers layout (not the repo's examples or assets).
        files=(
            "model_index.json",
            "scheduler/*",
            "tokenizer/*",
            *model_files("text_encoder", "model"),
            *model_files("transformer"),
            *model_files("vae"),
        ),
    )
    tiny_grid = Grid(
        max_area=128 * 128, multiple=32
    )  # e.g. 160x96 for 16:9: the VAE decode dominates CPU time
    cache_threshold = 0.05
    splits_sequence = True

    def __init__(
        self, spec: BackendSpec, device: torch.device, speed: Speed | None = None, *, ranks: int = 1
    ) -> None:
        super().__init__(spec, device, speed, ranks=ranks)
        self.batched_cfg: BatchedCFG | None = None

    def load(self) -> None:
        dtype = device_dtype(self.device)
        # The VAE stays float32: the 48-channel Wan2.2 VAE shows artefacts in bf16.
        vae = AutoencoderKLWan.from_pretrained(self.spec.source, subfolder="vae", dtype=torch.float32)
        # The hub's model_index.json names WanPipeline (text only); the image pipeline takes the same parts.
        pipe = WanImageToVideoPipeline.from_pretrained(
            self.spec.source, vae=vae, dtype=dtype, expand_timesteps=True
        )
        self.prepare(pipe)

    def prepare(self, pipe: WanImageToVideoPipeline) -> None:
        pipe.scheduler = UniPCMultistepScheduler.from_config(
            pipe.scheduler.config,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=self.spec.shift,
        )
        super().prepare(pipe)  # device and speed-ups
        if self.spec.guidance > 1.0 and self.speed.on(self.speed.batched_cfg, self.device):
            self.batched_cfg = BatchedCFG.attach(pipe.transformer)

    def generate(self, inputs: ModelInputs, on_step: StepCallback) -> Clip:
        pipe, steps = self.pipe, self.total_steps(inputs)
        guided = self.spec.guidance > 1.0
        positive, negative = pipe.encode_prompt(
            inputs.prompt, inputs.negative_prompt, do_classifier_free_guidance=guided,
            max_sequence_length=512, device=pipe._execution_device,
        )  # fmt: skip
        batched = self.batched_cfg.armed(positive, negative) if self.batched_cfg and guided else nullcontext()
        cache = self.cache_threshold if inputs.step_cache else None
        with batched, step_cache(pipe.transformer, cache):
            end = {"last_image": inputs.end_image} if self.spec.takes_end_frame else {}
            result = pipe(
                image=inputs.image,
                **end,
                prompt_embeds=positive,
                negative_prompt_embeds=negative,
                height=inputs.height,
                width=inputs.width,
                num_frames=inputs.model_frames,
                num_inference_steps=steps,
                guidance_scale=self.spec.guidance,
                generator=inputs.generator(),
                output_type="np",
                callback_on_step_end=self.step_callback(on_step, steps),
            )
        return Clip(frames=result.frames[0], fps=self.spec.fps)

    @classmethod
    def build_tiny(cls, folder: Path) -> None:
        torch.manual_seed(0)
        text_encoder, tokenizer = tiny_umt5()
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        )  # fmt: skip
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        )  # fmt: skip
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
        )
        WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            image_encoder=None,
            image_processor=None,
            expand_timesteps=True,
        ).save_pretrained(folder)
