"""Wan2.2 TI2V-5B: the standard-mode (720p, 24 fps) model.

The start image conditions the clip by replacing latent frame 0 at every step (`expand_timesteps=True`),
so the clip opens on it. The pipeline ignores `last_image` silently, so this backend declares that it
takes no end frame and the engine refuses one before it gets here.

The prompt is encoded here rather than in the pipeline so that CFG's two passes can run as one batched
forward (`i2v.batched_cfg`), or on a device group on two GPUs (`i2v.cfg_parallel`); the pipeline then
takes the embeddings instead of the text.

Sampling follows Wan's own code (Wan-Video/Wan2.2 `wan/textimage2video.py` and `wan/configs/`, commit
42bf4cfaa384bc21833865abc2f9e6c0e67233dc): 50 UniPC steps on Wan's flow schedule with shift 5, CFG 5.0,
and `sample_neg_prompt` when the negative prompt is empty. docs/models.md has the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5EncoderModel

from ..batched_cfg import BatchedCFG
from ..cfg_parallel import CFGParallel
from ..errors import ModelUnavailable
from ..footprint import (
    Activations,
    Component,
    Part,
    text_activations,
    transformer_activations,
    vae_stage_activations,
    video_bytes,
)
from ..geometry import Grid
from ..placement import step_cache
from ..speed import Speed
from .base import Backend, BackendSpec, Clip, ModelInputs, StepCallback, device_dtype, model_files
from .tiny_parts import save_untied_like_wan, tiny_umt5

# Wan's default negative prompt: `sample_neg_prompt` in Wan-Video/Wan2.2 wan/configs/shared_config.py
# (the same text in Wan2.1's), used when the negative prompt is empty (wan/textimage2video.py).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# The first transformers release that ties UMT5's token embedding for checkpoints saved untied (Wan's):
# 5.0.0-5.2.0 leave `encoder.embed_tokens` uninitialised (transformers PR #43880); checked by loading a
# checkpoint saved like Wan's with 5.0.0, 5.2.0 (untied) and 5.3.0, 5.24.0 (tied).
TIED_UMT5_SINCE = "5.3.0"
TEXT_TOKENS = 512  # Wan pads every prompt to 512 tokens
WAN_TILE = 256  # diffusers' AutoencoderKLWan tile_sample_min_height/width, once tiling is on


class WanFlowUniPCScheduler(UniPCMultistepScheduler):
    """diffusers' UniPC on Wan's own flow schedule.

    Wan's `FlowUniPCMultistepScheduler.set_timesteps(steps, shift=...)` (wan/utils/fm_solvers_unipc.py)
    spaces the unshifted sigmas from its table's largest, 1 - 1/1000, down to 0 (excluded), then shifts
    them and truncates the timesteps to integers. diffusers 0.42.1 spaces them from 1.0 to 1/1000, which
    moves every step but the first (at 50 steps the last timestep is 96 instead of Wan's 92). The solver
    itself is diffusers' UniPC (bh2, order 2), which Wan's file is modified from.
    """

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None, mu: Any = None
    ) -> None:
        if sigmas is None and num_inference_steps is not None and self.config.use_flow_sigmas:
            train = self.config.num_train_timesteps
            sigma_max = float(np.float32(1.0 - 1.0 / train))  # Wan's table is float32
            sigmas = np.linspace(sigma_max, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)


def wan_scheduler(config: Any, shift: float) -> WanFlowUniPCScheduler:
    """Wan's sampler for a pipeline's scheduler config: UniPC on Wan's flow schedule at `shift`."""
    return WanFlowUniPCScheduler.from_config(
        config,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",  # Wan's: the last step lands on sigma 0
    )


def check_text_encoder_tied(text_encoder: Any) -> None:
    """UMT5 embeds tokens with `shared`; an untied `encoder.embed_tokens` holds no trained weights at all.

    Raised rather than warned: a text encoder loaded that way silently ruins every prompt.
    """
    embed, shared = text_encoder.encoder.embed_tokens.weight, text_encoder.shared.weight
    if embed is shared or (embed.shape == shared.shape and torch.equal(embed, shared)):
        return
    raise ModelUnavailable(
        "the UMT5 text encoder loaded with its token embedding untied from `shared` (its weights were not "
        f"loaded): transformers {transformers.__version__} has this bug for checkpoints saved with "
        f"tie_word_embeddings false (transformers 5.0.0-5.2.0, PR #43880); install transformers>={TIED_UMT5_SINCE}"
    )


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
        default_negative_prompt=WAN_NEGATIVE_PROMPT,
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
    components = (
        Component("transformer", WanTransformer3DModel, "transformer", role="transformer", phase="denoise"),
        Component("text_encoder", UMT5EncoderModel, "text_encoder", role="text_encoder", phase="encode"),
        # The VAE stays float32: the 48-channel Wan2.2 VAE shows artefacts in bf16.
        Component("vae", AutoencoderKLWan, "vae", role="vae", float32=True),
    )
    configs = "wan2.2-ti2v-5b"
    # Whether the VAE encodes the whole clip's conditioning (FLF2V: first frame, zeros, last frame) or the
    # start image alone (TI2V replaces latent frame 0 with it).
    encodes_whole_clip: ClassVar[bool] = False
    # The tiny twin's transformer seed: a distilled variant has its own transformer and the same encoder
    # and VAE, as the real checkpoints do, so the twins share what the real models share.
    tiny_transformer_seed: ClassVar[int] = 0
    splits_cfg = True  # the pipeline's cond and uncond calls, which the CFG hooks recognise

    def __init__(
        self, spec: BackendSpec, device: torch.device, speed: Speed | None = None, *, ranks: int = 1
    ) -> None:
        super().__init__(spec, device, speed, ranks=ranks)
        self.batched_cfg: BatchedCFG | None = None  # CFGParallel on a group with CFG parallel

    def load(self) -> None:
        dtype = device_dtype(self.device)
        # The VAE stays float32: the 48-channel Wan2.2 VAE shows artefacts in bf16.
        vae = self.shared.get("vae") or AutoencoderKLWan.from_pretrained(
            self.spec.source, subfolder="vae", dtype=torch.float32
        )
        # The hub's model_index.json names WanPipeline (text only); the image pipeline takes the same parts.
        pipe = WanImageToVideoPipeline.from_pretrained(
            self.spec.source, **{**self.shared, "vae": vae}, dtype=dtype, expand_timesteps=True
        )
        self.prepare(pipe)

    @classmethod
    def activations(
        cls, parts: Mapping[str, Part], width: int, height: int, frames: int, *, batch: int, tiled: bool
    ) -> Activations:
        """Wan: L = T x H/(s p) x W/(s p) tokens (T = (frames - 1)/4 + 1 latent frames, s the VAE's spatial
        factor, p the 2x2 patch). Denoise: B x L x (8 D + 2 F) x 2 bytes. Decode (float32, one latent frame
        = 4 frames at a time): 2 x the clip (3 x frames x H x W x 4) + 4 x C x 4 x H/q x W/q x 4 for the
        top stage (C channels at 1/q of the size, q the VAE's patch), 256 px tiles when tiled. Encode: the
        larger of one UMT5 layer on 512 tokens and the VAE encoding the conditioning."""
        t, v = parts["transformer"].config, parts["vae"].config
        te = parts["text_encoder"].config
        element = 2 if parts["transformer"].size.bytes < 3 * parts["transformer"].size.params else 4
        v_element = 4 if parts["vae"].component.float32 else element
        spatial, temporal = v.get("scale_factor_spatial", 8), v.get("scale_factor_temporal", 4)
        patch = t["patch_size"]
        latent_frames = (frames - 1) // temporal + 1
        tokens = latent_frames * (height // (spatial * patch[1])) * (width // (spatial * patch[2]))
        dim = t["num_attention_heads"] * t["attention_head_dim"]
        denoise = transformer_activations(tokens, batch, dim, t["ffn_dim"], element)
        q = v.get("patch_size") or 1
        top = (v.get("decoder_base_dim") or v["base_dim"]) * v["dim_mult"][0]
        tile_h, tile_w = (min(height, WAN_TILE), min(width, WAN_TILE)) if tiled else (height, width)
        decode = 2 * video_bytes(frames, height, width, v_element) + vae_stage_activations(
            top, temporal, tile_h // q, tile_w // q, v_element
        )
        condition_frames = frames if cls.encodes_whole_clip else 1
        vae_encode = video_bytes(condition_frames, height, width, v_element) + vae_stage_activations(
            v["base_dim"] * v["dim_mult"][0],
            min(condition_frames, temporal),
            height // q,
            width // q,
            v_element,
        )
        text = text_activations(TEXT_TOKENS, te["d_model"], te["d_ff"], element)
        return Activations(
            encode=max(text, vae_encode),
            denoise=denoise,
            decode=decode,
            formula=f"{tokens} tokens, batch {batch}",
        )

    def prepare(self, pipe: WanImageToVideoPipeline) -> None:
        check_text_encoder_tied(pipe.text_encoder)
        pipe.scheduler = wan_scheduler(pipe.scheduler.config, self.spec.shift or 1.0)
        super().prepare(pipe)  # device and speed-ups
        if self.mesh is not None:  # each CFG half of the group runs one of the two passes
            self.batched_cfg = CFGParallel.attach(pipe.transformer, self.mesh)
        elif self.spec.guidance > 1.0 and self.speed.on(self.speed.batched_cfg, self.device):
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
        text_encoder, tokenizer = tiny_umt5(vocabulary=WAN_NEGATIVE_PROMPT)
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        )  # fmt: skip
        if cls.tiny_transformer_seed:  # a distilled variant: its own transformer (the last random part)
            torch.manual_seed(cls.tiny_transformer_seed)
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
        save_untied_like_wan(folder / "text_encoder")
