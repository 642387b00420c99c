"""What a model's parts weigh on a device, counted from their configs on the `meta` device (no weights).

Each backend lists its parts with weights (`Component`: the class, the subfolder, the dtype rule). A part's
config is read from where the weights are (a local folder, or the HF cache) and else from the copy the
package keeps (`i2v/backends/configs/<model>/<subfolder>/config.json`, the architecture values of the
published checkpoints): so a machine can say what fits before it downloads 70 GB, and a local folder
with another architecture is counted as it is. The part is then built on `meta` and its tensors summed:

    bytes = sum over parameters and persistent buffers of numel x the size of the dtype it loads in
            + non-persistent buffers (RoPE tables) as the model builds them

where the load dtype follows the libraries' own rules: bf16 on CUDA (float32 on a CPU) for every floating
tensor, float32 for a part the backend loads in float32 (the Wan VAE, CLIP), and float32 for the names in
diffusers' `_keep_in_fp32_modules` (transformers keeps its own list in float32 only for fp16 loads, or
strictly for `_keep_in_fp32_modules_strict`). Two more figures per part, for the placements, for the parts
a backend takes to fp8 (`Backend.fp8_modules`, its transformers):

- fp8: the `fast` preset's fp8 compute (i2v.fp8): the linear layers in the repeated blocks hold their
  weights in float8 e4m3 (1 byte each) with one float32 scale per output row, the rest as loaded;
- streamed: the most of it on the device at once under block-level group offload (`low-vram`), by
  diffusers' own grouping: the part's direct parameters and non-block children stay on the device while
  it runs, and its blocks (ModuleList/Sequential children, or `_group_offload_block_modules`) come one at
  a time, two with the CUDA stream's prefetch; an fp8 part counted with `low-vram`'s fp8 weight storage
  (diffusers' `enable_layerwise_casting`, applied to the meta model itself, so its skip rules are the
  library's).

`Activations` is the other half: the estimate of what one generation adds on top of the weights, each
backend's formula (see `Backend.activations`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

PACKAGED = "i2v.backends"
CONFIG_FILE = "config.json"
Role = Literal["transformer", "text_encoder", "vae", "other"]
Phase = Literal["encode", "denoise", "decode"]  # when a part runs; one phase runs at a time
# Under block-level group offload with a stream, the next block is copied while the current one runs.
STREAM_PREFETCH = 2


@dataclass(frozen=True)
class Component:
    """One part of a model with weights: the attribute it is known by, how it is built and loaded."""

    name: str  # the pipeline's attribute ("transformer", "text_encoder", ...) or the backend's own
    cls: type[torch.nn.Module]
    subfolder: str
    role: Role = "other"
    float32: bool = False  # loaded in float32 whatever the device's compute dtype
    phase: Phase = "decode"
    in_pipeline: bool = True  # False: the backend keeps it beside the pipeline (not group-offloaded)


@dataclass(frozen=True)
class Size:
    """What one part weighs: its parameter count and its bytes at the load dtypes, per placement."""

    params: int
    bytes: int  # resident, at the load dtypes
    fp8_bytes: int  # with the `fast` preset's fp8 compute (fp8 parts only; else = bytes)
    streamed_bytes: int  # the most on the device at once under `low-vram` (group offload, fp8 storage)


@dataclass(frozen=True)
class Part:
    component: Component
    size: Size
    config_from: str  # where the config was read: a path, or "packaged"
    config: Mapping[str, Any]


@dataclass(frozen=True)
class Activations:
    """What one generation adds to the device on top of the weights, per phase (they run one at a time)."""

    encode: int
    denoise: int
    decode: int
    formula: str

    @property
    def peak(self) -> int:
        return max(self.encode, self.denoise, self.decode)


def packaged_config(folder: str, subfolder: str) -> Path:
    return Path(str(resources.files(PACKAGED) / "configs" / folder / subfolder / CONFIG_FILE))


def find_config(source: str, subfolder: str, packaged_folder: str) -> tuple[dict[str, Any], str]:
    """A part's config: from the weights' own folder or the HF cache when there, else the packaged copy."""
    local = Path(source).expanduser()
    candidates: list[Path] = []
    if local.is_dir():
        candidates.append(local / subfolder / CONFIG_FILE)
    elif source.count("/") == 1:  # a hub id: the cached config.json, if this machine has one
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, f"{subfolder}/{CONFIG_FILE}")
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    path = packaged_config(packaged_folder, subfolder)
    return json.loads(path.read_text()), "packaged"


def build_on_meta(cls: type[torch.nn.Module], config: Mapping[str, Any]) -> torch.nn.Module:
    """The part with no weights: every tensor on `meta`, shapes from the config."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if issubclass(cls, ModelMixin):
            return cls.from_config(dict(config))
        config_class = cls.config_class  # a transformers model
        return cls(config_class.from_dict(dict(config)))


def _fp32_names(model: torch.nn.Module, dtype: torch.dtype) -> tuple[list[str], bool]:
    """The names kept in float32 at load, and whether they match as dotted parts (diffusers) or patterns."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        return list(type(model)._keep_in_fp32_modules or []), True
    plan = model._get_dtype_plan(dtype)  # type: ignore[operator]  # transformers' own rule
    return [pattern.replace("*", ".*") for pattern in plan], False


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the meta model the dtypes `from_pretrained(dtype=...)` would: floating tensors in `dtype`,
    the library's float32 exceptions in float32, non-persistent buffers as built."""
    names, dotted = _fp32_names(model, dtype)

    def kept(name: str) -> bool:
        if dotted:
            return any(part in name.split(".") for part in names)
        return any(re.search(pattern, name) for pattern in names)

    persistent = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in persistent and tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if kept(name) else dtype)


def nbytes(tensor: torch.Tensor) -> int:
    """A tensor's bytes; a wrapper subclass (torchao's float8 weights: fp8 data and float32 scales) is the
    sum of the tensors it holds, not its shape at the dtype it reports."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers of a module, each tensor once (tied weights are one tensor)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = nbytes(tensor)
    return sum(seen.values())


def streamed_bytes(module: torch.nn.Module) -> int:
    """The most of `module` on the device at once under diffusers' block-level group offload."""
    block_modules = set(getattr(module, "_group_offload_block_modules", None) or ())
    blocks: list[int] = []
    nested: list[int] = []
    in_groups: set[int] = set()
    for name, child in module.named_children():
        if name in block_modules:
            nested.append(streamed_bytes(child))
            in_groups |= {id(t) for t in [*child.parameters(), *child.buffers()]}
        elif isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
            for block in child:
                blocks.append(tensor_bytes(block))
                in_groups |= {id(t) for t in [*block.parameters(), *block.buffers()]}
    # The rest (direct tensors, non-block children) is one group, on the device for the whole forward.
    rest = {id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}
    resident = sum(size for key, size in rest.items() if key not in in_groups)
    return resident + max(STREAM_PREFETCH * max(blocks, default=0), max(nested, default=0))


def fp8_compute_bytes(model: torch.nn.Module) -> int:
    """Bytes once i2v.fp8 has quantized the blocks' linear layers: each weight 1 byte (float8 e4m3) and a
    float32 scale per output row (torchao's row-wise float8 weights); everything else as it is."""
    from .fp8 import block_linears

    layers = dict(model.named_modules())
    saved = 0
    for name in block_linears(model):
        weight = layers[name].weight
        saved += weight.numel() * weight.element_size() - (weight.numel() + 4 * weight.shape[0])
    return tensor_bytes(model) - saved


def fp8_storage(model: torch.nn.Module) -> None:
    """diffusers' fp8 layerwise weight storage (`low-vram`), applied to the meta model (its skip rules)."""
    compute = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)  # type: ignore[operator]


def size_of(component: Component, config: Mapping[str, Any], dtype: torch.dtype, fp8: bool) -> Size:
    model = build_on_meta(component.cls, config)
    cast_as_loaded(model, torch.float32 if component.float32 else dtype)
    params = sum(p.numel() for p in model.parameters())
    resident = tensor_bytes(model)
    fp8 = fp8 and hasattr(model, "enable_layerwise_casting")
    compute = fp8_compute_bytes(model) if fp8 else resident
    if fp8:
        fp8_storage(model)
    return Size(params=params, bytes=resident, fp8_bytes=compute, streamed_bytes=streamed_bytes(model))


@functools.lru_cache(maxsize=64)
def _cached_size(component: Component, config_json: str, dtype: torch.dtype, fp8: bool) -> Size:
    return size_of(component, json.loads(config_json), dtype, fp8)


def parts(
    components: tuple[Component, ...],
    source: str,
    packaged_folder: str,
    dtype: torch.dtype,
    *,
    fp8: tuple[str, ...] = (),
) -> dict[str, Part]:
    """Each part's size at `dtype` (the device's compute dtype), its config and where that came from;
    `fp8` names the parts the backend takes to fp8 (`Backend.fp8_modules`)."""
    found = {}
    for component in components:
        config, where = find_config(source, component.subfolder, packaged_folder)
        size = _cached_size(component, json.dumps(config, sort_keys=True), dtype, component.name in fp8)
        found[component.name] = Part(component=component, size=size, config_from=where, config=config)
    return found


# The pieces of the activation estimates (each backend's `activations` puts them together).
# Per block of a transformer running L tokens of width D with an MLP of width F, what is alive at once:
# the hidden states and the residual, the normed input (float32 in Wan's blocks: two widths), q, k, v and
# the attention output (fused attention keeps no L x L scores), and the MLP's hidden layer and its
# activation: 8 D + 2 F numbers per token.
BLOCK_WIDTHS_D, BLOCK_WIDTHS_F = 8, 2
# A VAE conv stage holds its input, its output, a norm and the causal cache of its neighbour frames.
VAE_STAGE_COPIES = 4


def transformer_activations(tokens: int, batch: int, dim: int, ffn: int, element: int) -> int:
    """batch x tokens x (8 dim + 2 ffn) x element bytes."""
    return batch * tokens * (BLOCK_WIDTHS_D * dim + BLOCK_WIDTHS_F * ffn) * element


def vae_stage_activations(channels: int, frames: int, height: int, width: int, element: int) -> int:
    """4 x channels x frames x height x width x element bytes: one conv stage at its resolution."""
    return VAE_STAGE_COPIES * channels * frames * height * width * element


def video_bytes(frames: int, height: int, width: int, element: int) -> int:
    """The decoded clip on the device (3 channels)."""
    return 3 * frames * height * width * element


def text_activations(tokens: int, dim: int, ffn: int, element: int) -> int:
    """A text encoder layer on its tokens (one prompt at a time): tokens x (4 dim + 2 ffn) x element."""
    return tokens * (4 * dim + 2 * ffn) * element
