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
from typing import Any

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


# LTX-2.0 (configs.md): transformer 18.88B, connectors 1.43B, video VAE 1.22B, latent upsampler 0.50B,
# Gemma-3-12B text encoder 12.19B (with its SigLIP vision tower, unused for text): about 69 GB in bf16.
LTX2_TRANSFORMER = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
    attention_head_dim=128, cross_attention_dim=4096, vae_scale_factors=(8, 32, 32), pos_embed_max_pos=20,
    base_height=2048, base_width=2048, audio_in_channels=128, audio_out_channels=128,
    audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
    audio_scale_factor=4, audio_pos_embed_max_pos=20, audio_sampling_rate=16000, audio_hop_length=160,
    num_layers=48, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
    norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840, attention_bias=True,
    attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True, causal_offset=1,
    timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000, rope_type="split",
    use_prompt_embeddings=True, perturbed_attn=False,
)  # fmt: skip
LTX2_CONNECTORS = dict(
    caption_channels=3840, text_proj_in_factor=49, video_connector_num_attention_heads=30,
    video_connector_attention_head_dim=128, video_connector_num_layers=2,
    video_connector_num_learnable_registers=128, audio_connector_num_attention_heads=30,
    audio_connector_attention_head_dim=128, audio_connector_num_layers=2,
    audio_connector_num_learnable_registers=128, connector_rope_base_seq_len=4096, rope_type="split",
)  # fmt: skip
LTX2_VAE = dict(
    latent_channels=128, block_out_channels=(256, 512, 1024, 2048), decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2), decoder_layers_per_block=(5, 5, 5, 5),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal",) * 3, upsample_residual=(True, True, True), upsample_factor=(2, 2, 2),
    patch_size=4, patch_size_t=1, spatial_compression_ratio=32, temporal_compression_ratio=8,
    encoder_causal=True, decoder_causal=False, decoder_spatial_padding_mode="reflect",
)  # fmt: skip
LTX2_UPSAMPLER = dict(
    in_channels=128, mid_channels=1024, num_blocks_per_stage=4, dims=3, spatial_upsample=True,
    temporal_upsample=False, rational_spatial_scale=2.0, use_rational_resampler=True,
)  # fmt: skip
GEMMA3_12B = dict(
    text_config=dict(
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256,
    ),
    # Gemma 3's SigLIP tower (not used to encode text; counted for memory).
    vision_config=dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=896, patch_size=14,
    ),
    mm_tokens_per_image=256,
)  # fmt: skip
LTX2_SCHEDULER = dict(
    use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
    max_image_seq_len=4096, shift_terminal=0.1,
)  # fmt: skip
# The stage-2 distilled LoRA's rank (ltx-2-19b-distilled-lora-384); random here, on the attention and
# feed-forward projections of every block.
LTX2_LORA_RANK = 384
LTX2_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def materialise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Give a model built under `init_empty_weights(include_buffers=False)` (parameters on `meta`, buffers
    real) random parameters on `device`, in seconds for billions of parameters.

    Like `to_empty()` followed by an init, except that the buffers `__init__` computed (RoPE tables,
    `inv_freq`: never saved, so a loaded model has them from `__init__` too) are kept, where `to_empty()`
    would leave garbage. Parameters get `dtype`, except those `from_pretrained` keeps in float32. The
    init: each module's own `reset_parameters()` where it has one (linear, conv, norms, embeddings), else
    ones for 1-D weights, zeros for biases and N(0, 0.02) for the rest, so values stay finite.
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            full = f"{module_name}.{name}".split(".")
            wanted = torch.float32 if keep & set(full) else dtype
            data = torch.empty(param.shape, device=device, dtype=wanted)
            if name == "bias":
                data.zero_()
            elif param.ndim == 1:
                data.fill_(1.0)
            else:
                data.normal_(0.0, 0.02)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module.__class__.__module__.startswith("torch.nn"):
                reset()
    return model.to(device).eval()  # the real buffers follow the parameters


def ltx2_pipeline(
    device: torch.device, configs: dict[str, Any] | None = None, lora_rank: int = LTX2_LORA_RANK
) -> tuple[Any, Any]:
    """LTX-2 with random weights, built on `meta` and materialised on `device`: (pipeline, upsampler).

    `configs` are the full-size ones by default; the CPU rehearsal passes the tiny twin's (read from its
    saved config files), so the same code builds both. The stage-2 LoRA is a random adapter of the real
    rank, registered under the backend's adapter name.
    """
    from accelerate import init_empty_weights
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from peft import LoraConfig
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

    from i2v.backends.ltx2 import STAGE2_ADAPTER, LTX2KeyframePipeline, _tiny_vocab

    full = configs is None
    configs = configs or {
        "transformer": LTX2_TRANSFORMER, "connectors": LTX2_CONNECTORS, "vae": LTX2_VAE,
        "audio_vae": None, "vocoder": None, "latent_upsampler": LTX2_UPSAMPLER, "text_encoder": GEMMA3_12B,
        "scheduler": LTX2_SCHEDULER,
    }  # fmt: skip
    dtype = device_dtype(device)
    torch.manual_seed(0)
    with init_empty_weights(include_buffers=False):
        parts = {
            "transformer": LTX2VideoTransformer3DModel.from_config(configs["transformer"]),
            "connectors": LTX2TextConnectors.from_config(configs["connectors"]),
            "vae": AutoencoderKLLTX2Video.from_config(configs["vae"]),
            # The audio VAE and vocoder are small (53M, 56M) and only run for audio: their defaults.
            "audio_vae": AutoencoderKLLTX2Audio.from_config(configs["audio_vae"] or {}),
            "vocoder": LTX2Vocoder.from_config(configs["vocoder"] or {}),
            "text_encoder": Gemma3ForConditionalGeneration(Gemma3Config(**configs["text_encoder"])),
        }
        upsampler = LTX2LatentUpsamplerModel.from_config(configs["latent_upsampler"])
    parts = {name: materialise(model, device, dtype) for name, model in parts.items()}
    upsampler = materialise(upsampler, device, dtype)
    with torch.device(device):  # the adapter's layers are made (and initialised) where they will run
        parts["transformer"].add_adapter(
            LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LTX2_LORA_TARGETS),
            adapter_name=STAGE2_ADAPTER,
        )
    parts["transformer"].to(device=device, dtype=dtype)  # the adapter's weights too
    # The real tokenizer cannot be downloaded; the pipeline pads every prompt to 1024 tokens, so the text
    # encoder's work is the real one whatever the words map to.
    tokenizer = GemmaTokenizer(vocab=_tiny_vocab(), merges=[])
    tokenizer.model_max_length = 1024
    if full:
        tokenizer.padding_side = "left"
    pipe = LTX2KeyframePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]), tokenizer=tokenizer, **parts
    )
    return pipe, upsampler


def ltx2_tiny_configs(folder: Path) -> dict[str, Any]:
    """The tiny LTX-2 twin's configs, read from the files `LTX2.build_tiny` saves."""
    import json

    from i2v.backends.ltx2 import LTX2, UPSAMPLER_FOLDER

    LTX2.build_tiny(folder)
    read = {name: json.loads((folder / name / "config.json").read_text()) for name in (
        "transformer", "connectors", "vae", "audio_vae", "vocoder", "text_encoder",
    )}  # fmt: skip
    read["latent_upsampler"] = json.loads((folder / UPSAMPLER_FOLDER / "config.json").read_text())
    read["scheduler"] = {
        k: v
        for k, v in json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).items()
        if not k.startswith("_")
    }
    text = read["text_encoder"]
    read["text_encoder"] = {
        k: text[k]
        for k in ("text_config", "vision_config", "mm_tokens_per_image", "image_token_index", "boi_token_index", "eoi_token_index")
        if k in text
    }  # fmt: skip
    return read
