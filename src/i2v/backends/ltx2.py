"""LTX-2: the pro-mode (1080p, 24 fps) keyframe model, with its soundtrack on request.

How a clip is made, the way Lightricks' two-stage pipeline makes it:

    stage 1  LTX2ConditionPipeline at half size (sides multiples of 32), start image pinned at latent 0,
             end image as a keyframe at the last latent index; CFG + STG + modality guidance
    upsample LTX2LatentUpsamplePipeline: 2x in latent space (no decode in between)
    refine   stage 2 at full size on the upsampled latents, distilled sigmas, guidance 1.0
    decode   the video VAE (tiled); the audio VAE and vocoder only when the request asks for audio

The engine then crops and scales the frames to the exact output (1920x1088 -> 1920x1080).

Two registered names: `ltx-2` (Lightricks/LTX-2, the base model: 40 steps with guidance at stage 1 and
the distilled LoRA for stage 2) and `ltx-2-distilled` (a distilled checkpoint: 8 fixed sigmas without
guidance at stage 1, the same stage 2 without a LoRA).

Sampling follows Lightricks' own pipelines (Lightricks/LTX-2, commit
400fd31054597515f47125691032c04b1c3ee24e): `ltx-pipelines` `ti2vid_two_stages.py` and
`keyframe_interpolation.py` take stage 1's sigmas from `LTX2Scheduler().execute(steps)` (`ltx-core`
`components/schedulers.py`) without a latent, so at every size, length and keyframe count the shift is
the 4096-token anchor's, mu = 2.05, stretched to a terminal sigma of 0.1; the guidance and the default
negative prompt are `LTX_2_PARAMS` and `DEFAULT_NEGATIVE_PROMPT` in `utils/constants.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2ConditionPipeline,
    LTX2LatentUpsamplePipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from safetensors.torch import save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

from ..cfg_parallel import GuidancePassesParallel
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
from ..placement import group_mesh, place
from ..speed import Speed
from .base import Backend, BackendSpec, Clip, ModelInputs, StepCallback, device_dtype, model_files

UPSAMPLER_FOLDER = "latent_upsampler"
# Lightricks' LoRA that turns the base model into the distilled one for the refine stage.
DISTILLED_LORA = "ltx-2-19b-distilled-lora-384.safetensors"
STAGE2_ADAPTER = "stage_2_distilled"
# Stage 1's schedule: diffusers 0.42.1 computes mu from the token count (end keyframe included; about
# 3.6 at 960x544x121), Lightricks' pipelines always use the anchor's. A static shift of exp(mu) is the
# same curve, exp(mu) / (exp(mu) + 1/sigma - 1), on the pipeline's linspace(1, 1/steps, steps).
STAGE1_MU = 2.05
STAGE1_TERMINAL = 0.1
# LTX_2_PARAMS (LTX-2.0): CFG 3.0, STG 1.0 at block 29 (diffusers' default block, 28, is LTX-2.3's),
# modality guidance 3.0, rescale 0.7; the audio guider the same with CFG 7.0.
STG_BLOCK = 29
GUIDANCE: dict[str, Any] = {
    "guidance_scale": 3.0,
    "stg_scale": 1.0,
    "modality_scale": 3.0,
    "guidance_rescale": 0.7,
    "audio_guidance_scale": 7.0,
    "audio_stg_scale": 1.0,
    "audio_modality_scale": 3.0,
    "audio_guidance_rescale": 0.7,
}
# DEFAULT_NEGATIVE_PROMPT in ltx-pipelines utils/constants.py: the CLI's default negative prompt.
LTX2_NEGATIVE_PROMPT = (
    "has_subtitles, has_blurbox, transition from black, transition to black, speech_ending_short, "
    "blurry, out of focus, overexposed, underexposed, low contrast, washed out colors, excessive noise, "
    "grainy texture, poor lighting, flickering, motion blur, distorted proportions, unnatural skin tones, "
    "deformed facial features, asymmetrical face, missing facial features, extra limbs, disfigured hands, "
    "wrong hand count, artifacts around text, inconsistent perspective, camera shake, incorrect depth of "
    "field, background too sharp, background clutter, distracting reflections, harsh shadows, inconsistent "
    "lighting direction, color banding, cartoonish rendering, 3D CGI look, unrealistic materials, uncanny "
    "valley effect, incorrect ethnicity, wrong gender, exaggerated expressions, wrong gaze direction, "
    "mismatched lip sync, silent or muted audio, distorted voice, robotic voice, echo, background noise, "
    "off-sync audio, incorrect dialogue, added dialogue, repetitive speech, jittery movement, awkward "
    "pauses, incorrect timing, unnatural transitions, inconsistent framing, tilted camera, flat lighting, "
    "inconsistent tone, cinematic oversaturation, stylized filters, or AI artifacts."
)
# The diffusers pipeline's parts and the latent upsampler, as `load()` reads them; not the repo's root-level
# single-file checkpoints (ltx-2-19b-dev.safetensors, the fp8 copies, the upscalers), which that layout
# does not use.
PIPELINE_FILES = (
    "model_index.json", "scheduler/*", "tokenizer/*", *model_files("text_encoder", "model"),
    *model_files("transformer"), *model_files("connectors"), *model_files("vae"), *model_files("audio_vae"),
    *model_files("vocoder"), *model_files(UPSAMPLER_FOLDER),
)  # fmt: skip
TEXT_TOKENS = 1024  # the pipeline's max_sequence_length
# diffusers' AutoencoderKLLTX2Video tiles: 512 x 512 px, 16 frames.
LTX_TILE, LTX_TILE_FRAMES = 512, 16


class LTX2KeyframePipeline(LTX2ConditionPipeline):
    """diffusers' condition pipeline, with an end image on the clip's last frame.

    diffusers reads a condition's `index` as a latent index and places a keyframe at pixel frame
    (index - 1) * 8 + 1, so the last latent of a 121-frame clip puts it at frame 113, 0.3 s early.
    Lightricks' keyframe pipeline takes pixel frames, and an end frame is frame num_frames - 1 (120);
    this places a single-image keyframe on the last latent there. Nothing else changes.
    """

    _last_frame: int | None = None

    def __call__(self, *args: Any, num_frames: int, **kwargs: Any) -> Any:
        self._last_frame = num_frames - 1
        try:
            return super().__call__(*args, num_frames=num_frames, **kwargs)
        finally:
            self._last_frame = None

    def _prepare_keyframe_coords(
        self,
        keyframe_latent_num_frames: int,
        keyframe_latent_height: int,
        keyframe_latent_width: int,
        pixel_frame_idx: int,
        num_pixel_frames: int,
        fps: float,
        device: torch.device,
    ) -> torch.Tensor:
        ratio = self.vae_temporal_compression_ratio
        if self._last_frame is not None and num_pixel_frames == 1:
            last_latent = self._last_frame // ratio
            if pixel_frame_idx == (last_latent - 1) * ratio + 1:
                pixel_frame_idx = self._last_frame
        return super()._prepare_keyframe_coords(
            keyframe_latent_num_frames, keyframe_latent_height, keyframe_latent_width, pixel_frame_idx,
            num_pixel_frames, fps, device,
        )  # fmt: skip


class LTX2(Backend):
    spec = BackendSpec(
        name="ltx-2",
        source="Lightricks/LTX-2",
        fps=24,
        # Stage 1 sizes: 960x544 is 1080p halved (540 up to the 32 px grid); the refine stage doubles it.
        grid=Grid(max_area=960 * 544, multiple=32),
        frame_multiple=8,
        takes_end_frame=True,
        steps=40,
        guidance=GUIDANCE["guidance_scale"],
        shift=math.exp(STAGE1_MU),  # static: the same schedule at every size, length and keyframe count
        modes=("pro",),
        default_negative_prompt=LTX2_NEGATIVE_PROMPT,
        files=(*PIPELINE_FILES, DISTILLED_LORA),  # the base model refines with the distilled LoRA
    )
    tiny_grid = Grid(max_area=64 * 64, multiple=32)
    distilled: ClassVar[bool] = False
    fp8_modules: ClassVar[tuple[str, ...]] = ()  # the stage-2 LoRA switches on and off: no fp8 casting
    components = (
        Component(
            "transformer", LTX2VideoTransformer3DModel, "transformer", role="transformer", phase="denoise"
        ),
        Component(
            "text_encoder",
            Gemma3ForConditionalGeneration,
            "text_encoder",
            role="text_encoder",
            phase="encode",
        ),
        Component("connectors", LTX2TextConnectors, "connectors", phase="encode"),
        Component("vae", AutoencoderKLLTX2Video, "vae", role="vae"),
        Component("audio_vae", AutoencoderKLLTX2Audio, "audio_vae"),
        Component("vocoder", LTX2Vocoder, "vocoder"),
        Component(
            "latent_upsampler", LTX2LatentUpsamplerModel, UPSAMPLER_FOLDER, phase="denoise", in_pipeline=False
        ),
    )
    configs = "ltx-2"
    # The tiny twin's transformer and connectors seed: the distilled checkpoint has its own, and the
    # same Gemma and VAEs, as the real ones do.
    tiny_transformer_seed: ClassVar[int] = 0
    # Stage 1's guided passes split across a group of two (`i2v.cfg_parallel.GuidancePassesParallel`);
    # diffusers 0.42.1 cannot split LTX-2's sequence (see docs/speed.md).
    splits_cfg = True

    def __init__(
        self, spec: BackendSpec, device: torch.device, speed: Speed | None = None, *, ranks: int = 1
    ) -> None:
        super().__init__(spec, device, speed, ranks=ranks)
        self.upsampler: Any = None
        self.shifted_scheduler: Any = None
        self.fixed_scheduler: Any = None
        self.guidance_parallel: GuidancePassesParallel | None = None

    def model_size(self, output_size: tuple[int, int]) -> tuple[int, int]:
        """The refined (stage 2) size: twice the stage-1 size, which covers half the output on the 32 px grid.

        Stage 1 is scaled down to the grid's area when half the output is larger (the tiny twin).
        """
        half_w, half_h = output_size[0] / 2, output_size[1] / 2
        scale = min(1.0, math.sqrt(self.spec.grid.max_area / (half_w * half_h)))
        m = self.spec.grid.multiple
        return 2 * m * math.ceil(half_w * scale / m), 2 * m * math.ceil(half_h * scale / m)

    def load(self) -> None:
        dtype = device_dtype(self.device)
        shared = dict(self.shared)
        upsampler = shared.pop("latent_upsampler", None) or LTX2LatentUpsamplerModel.from_pretrained(
            self.spec.source, subfolder=UPSAMPLER_FOLDER, dtype=dtype
        )
        pipe = LTX2KeyframePipeline.from_pretrained(self.spec.source, **shared, dtype=dtype)
        if not self.distilled:
            pipe.load_lora_weights(self.spec.source, weight_name=DISTILLED_LORA, adapter_name=STAGE2_ADAPTER)
        self.prepare(pipe, upsampler=upsampler)

    def prepare(self, pipe: LTX2KeyframePipeline, *, upsampler: LTX2LatentUpsamplerModel) -> None:  # type: ignore[override]
        pipe.vae.enable_tiling()  # 1920x1088x241 does not decode in one piece on one GPU
        pipe.set_progress_bar_config(disable=True)
        # The pipeline batches CFG's passes itself; diffusers' step caches do not know LTX-2's blocks.
        # The base model switches its stage-2 LoRA on and off: neither compiled nor cast to fp8.
        self.placement = place(
            pipe, self.device, self.speed, fp8_modules=self.fp8_modules, compile_blocks=self.distilled,
            group=self.group,
        )  # fmt: skip
        self.pipe = pipe
        if self.group.cfg > 1:  # collective: every rank prepares in step
            self.mesh = group_mesh(self.group, self.device)
            self.guidance_parallel = GuidancePassesParallel.attach(pipe.transformer, self.mesh)
        # The VAE is the pipeline's, already placed; only the upsampler itself moves here.
        self.upsampler = LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=upsampler.to(self.device))
        self.upsampler.set_progress_bar_config(disable=True)
        # The base model's stage 1 takes Lightricks' fixed shift (STAGE1_MU) stretched to the terminal;
        # distilled sigma lists (stage 1 of the distilled checkpoint, every refine stage) run as given.
        self.shifted_scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, use_dynamic_shifting=False, shift=math.exp(STAGE1_MU),
            shift_terminal=STAGE1_TERMINAL,
        )  # fmt: skip
        self.fixed_scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None, shift=1.0
        )

    @classmethod
    def parts(cls, spec: BackendSpec, device_type: str) -> dict[str, Part]:
        """The parts; the base model's transformer also carries the stage-2 LoRA, counted from the
        file's header when the file is on this machine (it is not in the architecture configs)."""
        found = super().parts(spec, device_type)
        lora = None if cls.distilled else _local_file(spec.source, DISTILLED_LORA)
        if lora is not None:
            element = torch.finfo(device_dtype(torch.device(device_type))).bits // 8
            extra = lora_params(lora) * element
            part = found["transformer"]
            size = dataclasses.replace(
                part.size, bytes=part.size.bytes + extra, fp8_bytes=part.size.fp8_bytes + extra
            )
            found["transformer"] = dataclasses.replace(part, size=size)
        return found

    def modules(self) -> dict[str, torch.nn.Module]:
        found = super().modules()
        if self.upsampler is not None:
            found["latent_upsampler"] = self.upsampler.latent_upsampler
        return found

    @classmethod
    def activations(
        cls, parts: Mapping[str, Part], width: int, height: int, frames: int, *, batch: int, tiled: bool
    ) -> Activations:
        """LTX-2 at width x height (the refined size): L = T x H/32 x W/32 tokens (T = (frames - 1)/8 + 1),
        a quarter of them in stage 1. Denoise: max(B1 x L/4, L) x (8 D + 2 x 4 D) x 2 bytes, B1 = 2 with
        CFG (the pipeline batches it; STG and modality passes run alone), 1 distilled. Decode (always
        tiled, 512 px x 16 frames): 2 x the clip (3 x frames x H x W x 2) + 4 x C x 16 x 128 x 128 x 2.
        Encode: Gemma's 49 hidden states for two 1024-token prompts + one layer's activations. The audio
        stream (25 tokens a second) is left out."""
        t, v, te = parts["transformer"].config, parts["vae"].config, parts["text_encoder"].config
        text = te.get("text_config", te)
        element = 2 if parts["transformer"].size.bytes < 3 * parts["transformer"].size.params else 4
        spatial = v.get("spatial_compression_ratio", 32)
        temporal = v.get("temporal_compression_ratio", 8)
        latent_frames = (frames - 1) // temporal + 1
        tokens = latent_frames * (height // spatial) * (width // spatial)
        stage1 = latent_frames * (height // 2 // spatial) * (width // 2 // spatial)
        dim = t["num_attention_heads"] * t["attention_head_dim"]
        first = 1 if cls.distilled else 2
        denoise = transformer_activations(max(first * stage1, tokens), 1, dim, 4 * dim, element)
        patch = v.get("patch_size", 4)
        top = v["decoder_block_out_channels"][0]
        tile_h, tile_w = (min(height, LTX_TILE), min(width, LTX_TILE)) if tiled else (height, width)
        decode = 2 * video_bytes(frames, height, width, element) + vae_stage_activations(
            top, min(frames, LTX_TILE_FRAMES), tile_h // patch, tile_w // patch, element
        )
        hidden, layers = text["hidden_size"], text["num_hidden_layers"]
        encode = 2 * (layers + 1) * TEXT_TOKENS * hidden * element + text_activations(
            TEXT_TOKENS, hidden, text["intermediate_size"], element
        )
        return Activations(
            encode=encode,
            denoise=denoise,
            decode=decode,
            formula=f"{tokens} tokens at stage 2, {stage1} x {first} at stage 1",
        )

    def _stage1_settings(self, inputs: ModelInputs | None = None) -> dict[str, Any]:
        if self.distilled:  # the checkpoint was distilled to exactly these 8 sigmas
            steps = len(DISTILLED_SIGMA_VALUES)
            return {"num_inference_steps": steps, "sigmas": DISTILLED_SIGMA_VALUES, **_NO_GUIDANCE}
        stg_block = min(STG_BLOCK, self.pipe.transformer.config.num_layers - 1)
        return {
            "num_inference_steps": inputs.steps if inputs is not None and inputs.steps else self.spec.steps,
            **GUIDANCE,
            "spatio_temporal_guidance_blocks": [stg_block],
        }

    def total_steps(self, inputs: ModelInputs | None = None) -> int:
        return self._stage1_settings(inputs)["num_inference_steps"] + len(STAGE_2_DISTILLED_SIGMA_VALUES)

    def generate(self, inputs: ModelInputs, on_step: StepCallback) -> Clip:
        pipe = self.pipe
        generator = inputs.generator()
        conditions = [LTX2VideoCondition(frames=inputs.image, index=0)]
        if inputs.end_image is not None:
            conditions.append(LTX2VideoCondition(frames=inputs.end_image, index=-1))
        stage1 = self._stage1_settings(inputs)
        total = self.total_steps(inputs)
        common = {
            "conditions": conditions,
            "prompt": inputs.prompt,
            "negative_prompt": inputs.negative_prompt,
            "num_frames": inputs.model_frames,
            "frame_rate": float(self.spec.fps),
            "generator": generator,
            "use_cross_timestep": False,  # LTX-2.0 modulates cross-attention with its own modality's sigma
            "output_type": "latent",
            "return_dict": False,
        }

        if not self.distilled:
            pipe.disable_lora()
        pipe.scheduler = self.fixed_scheduler if self.distilled else self.shifted_scheduler
        split = self.guidance_parallel
        # Whether the pipeline makes both perturbed passes (its do_spatio_temporal_guidance and
        # do_modality_isolation_guidance); were it wrong, the passes would still come out right, only slower.
        stg = stage1["stg_scale"] > 0 or stage1["audio_stg_scale"] > 0
        perturbed_pair = stg and (stage1["modality_scale"] > 1 or stage1["audio_modality_scale"] > 1)
        with split.armed(perturbed_pair=perturbed_pair) if split else nullcontext():
            video_latents, audio_latents = pipe(
                **common,
                width=inputs.width // 2,
                height=inputs.height // 2,
                callback_on_step_end=self.step_callback(on_step, total),
                **stage1,
            )
        video_latents = self.upsampler(latents=video_latents, output_type="latent", return_dict=False)[0]

        if not self.distilled:
            pipe.enable_lora()
            pipe.set_adapters(STAGE2_ADAPTER, 1.0)
        pipe.scheduler = self.fixed_scheduler
        offset = stage1["num_inference_steps"]
        video_latents, audio_latents = pipe(
            **common,
            width=inputs.width,
            height=inputs.height,
            latents=video_latents,
            audio_latents=audio_latents,
            num_inference_steps=len(STAGE_2_DISTILLED_SIGMA_VALUES),
            sigmas=STAGE_2_DISTILLED_SIGMA_VALUES,
            noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0],  # re-noise the upsampled latents to sigma 0
            callback_on_step_end=self.step_callback(lambda step, _: on_step(offset + step, total), total),
            **_NO_GUIDANCE,
        )
        frames = self._decode_video(video_latents)
        audio = self._decode_audio(audio_latents) if inputs.audio else None
        return Clip(frames=frames, fps=self.spec.fps, audio=audio)

    def _decode_video(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        # LTX-2's VAE decodes at timestep 0 when it is timestep-conditioned (the pipeline's default).
        conditioned = vae.config.timestep_conditioning
        timestep = torch.zeros(latents.shape[0], device=latents.device) if conditioned else None
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="np")[0]

    def _decode_audio(self, latents: torch.Tensor) -> tuple[np.ndarray, int]:
        mel = self.pipe.audio_vae.decode(latents.to(self.pipe.audio_vae.dtype), return_dict=False)[0]
        waveform = self.pipe.vocoder(mel.to(self.pipe.vocoder.dtype))[0]
        return waveform.float().cpu().numpy(), int(self.pipe.vocoder.config.output_sampling_rate)

    @classmethod
    def build_tiny(cls, folder: Path) -> None:
        """A tiny LTX-2 with the real one's layout: pipeline, `latent_upsampler/`, and the stage-2 LoRA."""
        torch.manual_seed(0)
        text_encoder = Gemma3ForConditionalGeneration(
            Gemma3Config(
                text_config={
                    "vocab_size": len(_tiny_vocab()), "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                    "max_position_embeddings": 2048, "sliding_window": 64,
                },
                vision_config={
                    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                },
                mm_tokens_per_image=4, image_token_index=len(_tiny_vocab()) - 1,
                boi_token_index=len(_tiny_vocab()) - 3, eoi_token_index=len(_tiny_vocab()) - 2,
            )
        )  # fmt: skip
        text = text_encoder.config.text_config

        def transformer_and_connectors() -> tuple[LTX2VideoTransformer3DModel, LTX2TextConnectors]:
            transformer = LTX2VideoTransformer3DModel(
                in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
                num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=text.hidden_size,
                rope_double_precision=False, rope_type="split",
            )  # fmt: skip
            connectors = LTX2TextConnectors(
                caption_channels=text.hidden_size, text_proj_in_factor=text.num_hidden_layers + 1,
                video_connector_num_attention_heads=4, video_connector_attention_head_dim=8,
                video_connector_num_layers=1, video_connector_num_learnable_registers=None,
                audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8,
                audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
                connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False,
                causal_temporal_positioning=False, rope_type="split",
            )  # fmt: skip
            return transformer, connectors

        transformer, connectors = transformer_and_connectors()
        if cls.tiny_transformer_seed:  # a distilled variant: its own; the parts after it stay the base's
            with torch.random.fork_rng():
                torch.manual_seed(cls.tiny_transformer_seed)
                transformer, connectors = transformer_and_connectors()
        # The real VAE's compression (32x spatial, 8x temporal) with a few channels, so latents stay small.
        vae = AutoencoderKLLTX2Video(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
            decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True,) * 4,
            decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
            downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
            upsample_type=("spatiotemporal",) * 3, upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2),
            timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True,
            decoder_causal=False, spatial_compression_ratio=32, temporal_compression_ratio=8,
        )  # fmt: skip
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None,
            in_channels=2, resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height",
            dropout=0.0, mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True,
            mel_bins=8,
        )  # fmt: skip
        vocoder = LTX2Vocoder(
            in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[20, 8, 8],
            upsample_factors=[10, 4, 4], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
            leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
        )  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
            max_image_seq_len=4096, shift_terminal=0.1,
        )  # fmt: skip
        tokenizer = GemmaTokenizer(vocab=_tiny_vocab(), merges=[])
        tokenizer.model_max_length = 1024
        pipe = LTX2ConditionPipeline(
            scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, tokenizer=tokenizer,
            connectors=connectors, transformer=transformer, vocoder=vocoder,
        )  # fmt: skip
        pipe.save_pretrained(folder)
        LTX2LatentUpsamplerModel(in_channels=4, mid_channels=32, num_blocks_per_stage=1).save_pretrained(
            folder / UPSAMPLER_FOLDER
        )
        save_file(_tiny_lora(transformer), str(folder / DISTILLED_LORA))


_NO_GUIDANCE: dict[str, Any] = {
    # Distilled sampling: one forward per step, no CFG, STG or modality guidance for video or audio.
    "guidance_scale": 1.0,
    "audio_guidance_scale": 1.0,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 1.0,
    "audio_modality_scale": 1.0,
}


class LTX2Distilled(LTX2):
    spec = dataclasses.replace(
        LTX2.spec, name="ltx-2-distilled", source="rootonchair/LTX-2-19b-distilled", steps=8, guidance=1.0,
        shift=None, default_negative_prompt="",  # no guidance: the negative prompt is never used
        files=PIPELINE_FILES,  # no LoRA: the checkpoint is distilled already
    )  # fmt: skip
    tiny_steps = 8  # the distilled schedule is a fixed list of 8 sigmas
    distilled = True
    fp8_modules = ("transformer",)  # no LoRA
    tiny_transformer_seed = 1


def _local_file(source: str, name: str) -> Path | None:
    """A file of the model's repository on this machine (its folder, or the HF cache), else None."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, name)
    return Path(cached) if isinstance(cached, str) else None


def lora_params(path: Path) -> int:
    """The parameters in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())  # noqa: SIM118


def _tiny_vocab() -> dict[str, int]:
    """Gemma's special tokens, its 256 byte-fallback tokens, printable ASCII and the image markers."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += [chr(c) for c in range(33, 127)]
    tokens += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    return {token: index for index, token in enumerate(tokens)}


def _tiny_lora(transformer: LTX2VideoTransformer3DModel, rank: int = 2) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA on the video attention projections, in diffusers' key layout, like the distilled LoRA."""
    tensors = {}
    for index, block in enumerate(transformer.transformer_blocks):
        for name in ("to_q", "to_k", "to_v"):
            layer = block.attn1.__getattr__(name)
            prefix = f"transformer.transformer_blocks.{index}.attn1.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, layer.in_features) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(layer.out_features, rank) * 0.02
    return tensors
