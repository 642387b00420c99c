"""How a loaded pipeline is placed on its device and made fast: the exact path and the presets.

Exact speed-ups, on by default where the hardware has them (CUDA); each keeps the output equal to the
stock pipeline's within bf16 noise:

- the fastest attention kernel installed: FlashAttention 3, then FlashAttention 2, then cuDNN's fused
  attention, then PyTorch's own (diffusers' `set_attention_backend`, checked before it is chosen);
- regional `torch.compile` of the transformer's repeated block (`i2v.compiled_blocks`): one block is
  compiled and reused by all of them, so compiling costs seconds, not minutes, with dynamic shapes so
  that every aspect ratio and duration runs the same graph;
- CFG's conditional and unconditional passes in one batched forward (`i2v.batched_cfg`), where the stock
  pipeline runs them one after the other.

Presets trade something for speed or memory, and say what:

- `fast`: step caching (diffusers' FirstBlockCache: a step whose first block barely changed reuses the
  rest of the last step's residual) per request; with the server's preset set to `fast`, the transformer
  blocks' matrix multiplies also run in fp8 (`i2v.fp8`) on GPUs with fp8 tensor cores (elsewhere a
  logged fallback). Lossy: see docs/benchmarks.md.
- `turbo`: a distilled few-step model for the mode (configured per mode, see `i2v.settings`).
- `low-vram`: the machine's preset, never a request's: transformer weights stored in fp8 (computed in
  bf16), group offload (blocks stream from CPU memory to the GPU as they run) and a tiled VAE decode, so
  standard mode fits a 24 GB GPU. Slower, and lossy (fp8 weight rounding).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import compiled_blocks
from .fp8 import quantize_fp8

log = logging.getLogger(__name__)

Preset = Literal["default", "fast", "turbo", "low-vram"]
PRESETS: tuple[str, ...] = ("default", "fast", "turbo", "low-vram")
REQUEST_PRESETS: tuple[str, ...] = ("default", "fast", "turbo")  # low-vram is how the server loads

# Fastest first. `native` (PyTorch's scaled_dot_product_attention) always works and is last.
ATTENTION_ORDER = ("_flash_3", "flash", "_native_cudnn", "native")


@dataclass(frozen=True)
class Speed:
    """The load-time speed settings of one server (or one Engine). None means: on where CUDA is."""

    preset: Preset = "default"
    attention: str = "auto"  # "auto" or a diffusers backend name (e.g. "sage", "_native_cudnn")
    compile: bool | None = None
    batched_cfg: bool | None = None
    warmup: bool | None = None
    # GPUs one request is split across (Ulysses, i2v.parallel); set from the worker's device group.
    context_parallel: int = 1

    @property
    def fp8(self) -> bool:
        return self.preset == "fast"

    @property
    def low_vram(self) -> bool:
        return self.preset == "low-vram"

    def on(self, flag: bool | None, device: torch.device) -> bool:
        return device.type == "cuda" if flag is None else flag


def attention_available(name: str) -> bool:
    """Whether diffusers can run this attention backend here (its package is installed and usable)."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ValueError):
        return False
    if name == "_native_cudnn":  # cuDNN attention needs an sm80+ GPU
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    return True


def splits_sequence(name: str) -> bool:
    """Whether diffusers can run this attention backend under context parallelism."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))


def choose_attention(wanted: str, device: torch.device, context_parallel: bool = False) -> str:
    """The attention backend to use: `wanted` when it is available, else the fastest one that is
    (under context parallelism, the fastest that can split the sequence: FA3 cannot in diffusers 0.42)."""
    if device.type != "cuda":
        return "native"

    def usable(name: str) -> bool:
        return attention_available(name) and (not context_parallel or splits_sequence(name))

    if wanted != "auto":
        if usable(wanted):
            return wanted
        log.warning("attention backend %r is not usable here; choosing one", wanted)
    return next(name for name in ATTENTION_ORDER if usable(name))


def place(
    pipe: Any,
    device: torch.device,
    speed: Speed,
    *,
    fp8_modules: tuple[str, ...] = (),
    compile_blocks: bool = True,
    context_parallel: int = 1,
) -> str:
    """Move a loaded pipeline onto `device` and apply the load-time speed settings; returns a summary.

    `fp8_modules` names the pipeline's transformers that go to fp8: fp8 matrix multiplies in `fast`
    (`i2v.fp8`, where the GPU has fp8 tensor cores), fp8 weight storage in `low-vram`;
    `compile_blocks` is False where the model switches LoRA adapters between calls (a recompile each time);
    `context_parallel` > 1 splits each transformer's sequence across that many ranks (`i2v.parallel`).
    """
    done = []
    if speed.low_vram:
        for name in fp8_modules:
            # Memory, not speed: weights stored in fp8 and upcast to the compute dtype layer by layer as
            # they run (slower); norms and embeddings stay as they are (_skip_layerwise_casting_patterns).
            model = getattr(pipe, name)
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)
            done.append(f"fp8 storage {name}")
        # Each transformer block (and text-encoder layer) moves to the GPU as it runs; with streams the
        # next block's copy overlaps the current one's compute.
        stream = device.type == "cuda"
        pipe.enable_group_offload(
            onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=stream
        )
        pipe.vae.enable_tiling()
        done.append("group offload, tiled VAE")
    else:
        pipe.to(device)
    for name in fp8_modules if speed.fp8 else ():
        # fp8 matrix multiplies where the GPU has fp8 tensor cores; elsewhere a logged fallback.
        if quantize_fp8(getattr(pipe, name), device, name):
            done.append(f"fp8 compute {name}")
    transformers = [m for m in (getattr(pipe, n, None) for n in ("transformer", "transformer_2")) if m]
    attention = choose_attention(speed.attention, device, context_parallel > 1)
    if attention != "native":
        for model in transformers:
            model.set_attention_backend(attention)
    done.append(f"attention {attention}")
    if context_parallel > 1:
        from .parallel import split_sequence

        for model in transformers:
            split_sequence(model, context_parallel, device)
        done.append(f"sequence split across {context_parallel} ranks")
    if compile_blocks and speed.on(speed.compile, device) and not speed.low_vram:  # offload hooks do not mix
        for model in transformers:
            # The context-parallel hook on the first block breaks its graph; the other blocks stay whole.
            compiled_blocks.compile_blocks(model, fullgraph=context_parallel == 1)
        done.append("compiled blocks")
    return ", ".join(done)


@contextlib.contextmanager
def step_cache(transformer: Any, threshold: float | None) -> Iterator[None]:
    """FirstBlockCache on `transformer` for one call (the `fast` preset); nothing when threshold is None."""
    if threshold is None:
        yield
        return
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield
    finally:
        transformer.disable_cache()
