"""How a loaded pipeline is placed on its device and made fast; what `Backend.prepare` calls.

Everything here acts on a pipeline after its weights are read: the attention kernel (checked before it is
chosen), regional compile, fp8 weight storage and group offload for the presets, the Ulysses sequence
split across a device group (or across each CFG half of it, `i2v.cfg_parallel`), and the per-request step
cache. The settings themselves are `i2v.speed`, a group's plan `i2v.speed.group_plan`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from . import compiled_blocks
from .errors import I2VError
from .fp8 import quantize_fp8
from .shims import cpu_counts_as_one_accelerator
from .speed import GroupPlan, Speed

log = logging.getLogger(__name__)

MESH_DIMS = ("cfg", "ring", "ulysses")  # diffusers' context parallelism reads "ring" and "ulysses"
ALONE = GroupPlan()  # one device, or rank 0 of a group running a model by itself
# Fastest first. `native` (PyTorch's scaled_dot_product_attention) always works and is last.
ATTENTION_ORDER = ("_flash_3", "flash", "_native_cudnn", "native")


def group_mesh(plan: GroupPlan, device: torch.device) -> DeviceMesh:
    """The group's device mesh for a plan with CFG parallel (`i2v.cfg_parallel`); built collectively
    (every rank calls it).

    Row-major over ranks, so CFG half c holds ranks c * ulysses ... (c + 1) * ulysses - 1.
    """
    if dist.get_world_size() != plan.ranks:
        raise ValueError(f"a plan for {plan.ranks} ranks on a group of {dist.get_world_size()}")
    return init_device_mesh(device.type, (plan.cfg, 1, plan.ulysses), mesh_dim_names=MESH_DIMS)


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


def attention_splits(name: str) -> bool:
    """Whether diffusers can run this attention backend under context parallelism."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))


def choose_attention(wanted: str, device: torch.device, split: bool = False) -> str:
    """The attention backend to use: `wanted` when it is available, else the fastest one that is
    (with the sequence `split` across ranks, the fastest that can split it: FA3 cannot in diffusers 0.42)."""
    if device.type != "cuda":
        return "native"

    def usable(name: str) -> bool:
        return attention_available(name) and (not split or attention_splits(name))

    if wanted != "auto":
        if usable(wanted):
            return wanted
        log.warning("attention backend %r is not usable here; choosing one", wanted)
    return next(name for name in ATTENTION_ORDER if usable(name))


def split_sequence(model: Any, degree: int, device: torch.device, mesh: DeviceMesh | None = None) -> None:
    """Ulysses on one transformer: each rank keeps 1/degree of the tokens (the model's `_cp_plan`).

    Plain Ulysses needs the heads and the sequence to split evenly: the heads are checked here, and the
    backends pick grid sizes whose token count divides (`Grid.size_for(tokens_multiple=)`). diffusers'
    "ulysses_anything" mode would lift that, but its uneven all-to-all cannot be traced by torch.compile.
    `mesh` (`group_mesh`): split within this rank's CFG half; None: across the group.
    """
    from diffusers import ContextParallelConfig

    heads = model.config.num_attention_heads
    if heads % degree:
        raise I2VError(
            f"{type(model).__name__} has {heads} attention heads, which {degree} GPUs cannot split"
        )
    with cpu_counts_as_one_accelerator(device):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh))


def place(
    pipe: Any,
    device: torch.device,
    speed: Speed,
    *,
    fp8_modules: tuple[str, ...] = (),
    compile_blocks: bool = True,
    group: GroupPlan = ALONE,
    mesh: DeviceMesh | None = None,
) -> str:
    """Move a loaded pipeline onto `device` and apply the load-time speed settings; returns a summary.

    `fp8_modules` names the pipeline's transformers that go to fp8: fp8 matrix multiplies in `fast`
    (`i2v.fp8`, where the GPU has fp8 tensor cores), fp8 weight storage in `low-vram`;
    `compile_blocks` is False where the model switches LoRA adapters between calls (a recompile each time);
    `group` is how a device group runs the model (`i2v.speed.group_plan`): its `ulysses` > 1 splits each
    transformer's sequence across that many ranks, within `mesh`'s CFG halves where CFG parallel is on
    (the CFG hook itself is the backend's, as batched CFG is). The plan goes into the summary.
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
    split = group.ulysses > 1
    attention = choose_attention(speed.attention, device, split=split)
    if attention != "native":
        for model in transformers:
            model.set_attention_backend(attention)
    done.append(f"attention {attention}")
    if split:
        for model in transformers:
            split_sequence(model, group.ulysses, device, mesh)
    if group.ranks > 1 or group.note:
        done.append(group.describe())
    if compile_blocks and speed.on(speed.compile, device) and not speed.low_vram:  # offload hooks do not mix
        for model in transformers:
            # The context-parallel hook on the first block breaks its graph; the other blocks stay whole.
            compiled_blocks.compile_blocks(model, fullgraph=not split)
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
