"""fp8 matrix multiplies for the `fast` preset: the transformer blocks' linear layers in float8 (e4m3).

torchao's float8 dynamic quantization (`Float8DynamicActivationFloat8WeightConfig`, row-wise scales):
each weight is stored in fp8 with one scale per output row, each activation is cast to fp8 with one
scale per row as it arrives, and the product runs on the fp8 tensor cores (`torch._scaled_mm`), about
twice the bf16 rate on Ada, Hopper and later. Lossy (fp8 rounding); see docs/benchmarks.md.

Only the linear layers inside the repeated blocks are quantized: they hold nearly all the FLOPs, while the
embedders, norms and output head (small, and the most sensitive to rounding) stay in the compute dtype.

Where there are no fp8 tensor cores (CPU, GPUs before compute capability 8.9) or torchao is missing,
`quantize_fp8` changes nothing and logs what it fell back to.

(Storing weights in fp8 and computing in bf16, diffusers' `enable_layerwise_casting`, saves memory and
costs time: that is the `low-vram` placement's, not this.)
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

FP8_CAPABILITY = (8, 9)  # Ada (sm89), Hopper (sm90) and later have fp8 tensor cores
# torch._scaled_mm needs both matrix dimensions of the weight to be multiples of 16.
DIM_MULTIPLE = 16


def fp8_unsupported(device: torch.device) -> str | None:
    """Why fp8 matrix multiplies cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return f"the device is {device.type}, not a CUDA GPU with fp8 tensor cores"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} is compute capability {capability[0]}.{capability[1]}; fp8 tensor cores need 8.9+"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return None


def block_linears(model: torch.nn.Module) -> set[str]:
    """Dotted names of the linear layers inside the model's repeated blocks that fp8 can run."""
    blocks = set(getattr(model, "_repeated_blocks", ()) or ())
    names = set()
    for prefix, module in model.named_modules():
        if module.__class__.__name__ not in blocks:
            continue
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and all(
                n % DIM_MULTIPLE == 0 for n in (layer.in_features, layer.out_features)
            ):
                names.add(f"{prefix}.{name}")
    return names


def quantize_fp8(model: Any, device: torch.device, label: str = "transformer") -> bool:
    """Quantize the blocks' linear layers of `model` (already on `device`) to fp8 compute; True if done.

    Elsewhere nothing changes and a warning says so: the model keeps computing in its own dtype.
    """
    reason = fp8_unsupported(device)
    if reason is None:
        names = block_linears(model)
        if not names:
            reason = "it has no linear layers in repeated blocks that fp8 can run"
    if reason is not None:
        log.warning(
            "fast: no fp8 compute for the %s (%s); falling back to %s compute with the other speed-ups",
            label, reason, str(model.dtype).removeprefix("torch."),
        )  # fmt: skip
        return False
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(model, config, filter_fn=lambda module, name: name in names)
    log.info("fast: %d linear layers of the %s compute in fp8 (row-wise scales)", len(names), label)
    return True
