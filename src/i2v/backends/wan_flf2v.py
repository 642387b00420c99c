"""Wan2.1 FLF2V-14B: the Wan-family first-and-last-frame model, an alternative for pro mode.

It was trained for exactly this input: the VAE latents of the start image (frame 0) and the end image
(last frame) with zeros between are concatenated to the noise with a mask, and the CLIP ViT-H embeddings
of both images go in through cross-attention. It renders 720p at 16 fps, so the engine retimes its
81/161 frames to 121/241 at 24 fps (see `i2v.retime`) and the writer scales them to the exact output.

A start image alone is refused (`needs_end_frame`): Wan's FLF2V code has no start-only path (its
`MLPProj` adds learned positions for exactly two images' CLIP tokens, and `generate.py` always passes a
first and a last frame), and feeding the start image twice asks for a clip that returns to its start.

Settings from Wan-Video/Wan2.1 (commit 9737cba9c1c3c4d04b33fcad41c111989865d315): 50 steps and shift 16
(`generate.py`), guidance 5.0 (`generate.py`'s `--sample_guide_scale` and the Gradio app
`gradio/fl2v_14B_singleGPU.py`; the class default in `wan/first_last_frame2video.py` is 5.5), and the
negative prompt `flf2v_14B.sample_neg_prompt` (`wan/configs/__init__.py`) when none is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..footprint import Component
from ..geometry import Grid
from .base import BackendSpec, device_dtype, model_files
from .tiny_parts import save_untied_like_wan, tiny_umt5
from .wan_ti2v import WAN_NEGATIVE_PROMPT, WanTI2V

# flf2v_14B.sample_neg_prompt: "镜头切换，" before I2V-14B's "镜头晃动，" before the shared list.
FLF2V_NEGATIVE_PROMPT = "镜头切换，镜头晃动，" + WAN_NEGATIVE_PROMPT


class WanFLF2V(WanTI2V):
    """Loads differently from TI2V (a CLIP image encoder, 16 fps); generates the same way."""

    spec = BackendSpec(
        name="wan2.1-flf2v-14b",
        source="Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers",
        fps=16,
        grid=Grid(max_area=1280 * 720, multiple=16),  # the Wan2.1 VAE (8x) and the 2x2 patch
        frame_multiple=4,
        takes_end_frame=True,
        steps=50,
        guidance=5.0,
        shift=16.0,
        modes=("pro",),
        default_negative_prompt=FLF2V_NEGATIVE_PROMPT,
        needs_end_frame=True,
        # What load() reads: TI2V's parts plus the CLIP image encoder and its processor.
        files=(*WanTI2V.spec.files, *model_files("image_encoder", "model"), "image_processor/*"),
    )
    tiny_grid = Grid(max_area=64 * 64, multiple=16)
    components = (
        *WanTI2V.components[:2],
        # The VAE and the CLIP image encoder load in float32 (see load()).
        Component("vae", AutoencoderKLWan, "vae", role="vae", float32=True),
        Component("image_encoder", CLIPVisionModel, "image_encoder", float32=True, phase="encode"),
    )
    configs = "wan2.1-flf2v-14b"
    encodes_whole_clip = True

    def load(self) -> None:
        dtype = device_dtype(self.device)
        # The VAE and the CLIP image encoder stay float32 (Wan's own code runs CLIP in float16).
        vae = self.shared.get("vae") or AutoencoderKLWan.from_pretrained(
            self.spec.source, subfolder="vae", dtype=torch.float32
        )
        image_encoder = self.shared.get("image_encoder") or CLIPVisionModel.from_pretrained(
            self.spec.source, subfolder="image_encoder", dtype=torch.float32
        )
        pipe = WanImageToVideoPipeline.from_pretrained(
            self.spec.source, **{**self.shared, "vae": vae, "image_encoder": image_encoder}, dtype=dtype
        )
        self.prepare(pipe)  # FLF2V's sampling shift on Wan's UniPC schedule, as for TI2V

    @classmethod
    def build_tiny(cls, folder: Path) -> None:
        # Imported here: naming CLIPImageProcessor makes transformers warn about torchvision at import time.
        from transformers import CLIPImageProcessor

        torch.manual_seed(0)
        text_encoder, tokenizer = tiny_umt5(vocabulary=FLF2V_NEGATIVE_PROMPT)
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )  # fmt: skip
        # FLF2V: CLIP tokens of two 4x4-patch images (16 + class token each) get learned positions.
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, image_dim=4,
            pos_embed_seq_len=2 * (4 * 4 + 1),
        )  # fmt: skip
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=4, num_hidden_layers=2, num_attention_heads=2, image_size=4,
                intermediate_size=16, patch_size=1,
            )
        )  # fmt: skip
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=16.0
        )
        WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            image_encoder=image_encoder,
            image_processor=CLIPImageProcessor(crop_size=4, size=4),
        ).save_pretrained(folder)
        save_untied_like_wan(folder / "text_encoder")
