"""Pipelines for the GPU benchmark: the full-size architectures with random weights, or the tiny twins.

Timing does not depend on weight values, so the full-size models are built from their configs (values in
`shared/notes/configs.md`) with random weights, directly on the device: building on `meta` and calling
`to_empty()` would leave Wan's RoPE tables (computed in `__init__`, never saved) as garbage. The dtypes
follow what `from_pretrained` gives a loaded model: bf16 weights on CUDA, the Wan VAE in float32 (as
`WanTI2V.load` asks), and float32 where `from_pretrained` keeps it (`keep_in_fp32`).

The tiny size builds the backend's own tiny twin (`build_tiny`) and reads it back with `from_pretrained`,
so the CPU smoke run goes through the same code as the full-size one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5Config, UMT5EncoderModel

from i2v.backends.base import device_dtype
from i2v.backends.tiny_parts import word_level_tokenizer
from i2v.backends.wan_ti2v import WanTI2V

# Wan2.2 TI2V-5B (configs.md): transformer 5.0B, VAE 0.70B, UMT5-XXL encoder 5.68B parameters.
WAN_TI2V_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)  # fmt: skip
WAN_TI2V_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    # The decode's cost does not depend on these; neutral values keep the random latents in range.
    latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)  # fmt: skip
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
WAN_SCHEDULER = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def keep_in_fp32(model: torch.nn.Module, names: list[str] | set[str] | None) -> None:
    """Upcast the parameters `from_pretrained` would keep in float32: those whose dotted name contains one
    of `names` (diffusers' rule)."""
    for name, param in model.named_parameters():
        if any(keep in name.split(".") for keep in names or ()):
            param.data = param.data.float()


def wan_ti2v_full(device: torch.device) -> WanImageToVideoPipeline:
    """Wan2.2 TI2V-5B at full size with random weights, built on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        with default_dtype(torch.float32):  # the 48-channel Wan2.2 VAE runs in float32 (see WanTI2V.load)
            vae = AutoencoderKLWan(**WAN_TI2V_VAE)
        with default_dtype(device_dtype(device)):
            transformer = WanTransformer3DModel(**WAN_TI2V_TRANSFORMER)
            text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    # diffusers keeps `_keep_in_fp32_modules` in float32 for any dtype; transformers does so in bf16 only
    # for its `_strict` list (UMT5 has none: its `wo` stays bf16 as loaded).
    keep_in_fp32(transformer, transformer._keep_in_fp32_modules)
    keep_in_fp32(text_encoder, text_encoder._keep_in_fp32_modules_strict)
    # The real tokenizer cannot be downloaded; the pipeline pads every prompt to 512 tokens anyway, so the
    # encoder's work is the real one whatever the words map to.
    tokenizer = word_level_tokenizer(UMT5_XXL["vocab_size"])
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
        image_encoder=None,
        image_processor=None,
        expand_timesteps=True,
    )


def wan_ti2v_tiny(folder: Path, device: torch.device) -> WanImageToVideoPipeline:
    """The tiny twin, saved and read back the way `WanTI2V.load` reads the real weights."""
    WanTI2V.build_tiny(folder)
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    return WanImageToVideoPipeline.from_pretrained(
        folder, vae=vae, dtype=device_dtype(device), expand_timesteps=True
    )
