"""Regional compile of a transformer's repeated block, for every request shape.

Kling users send every aspect ratio and both durations, so the token count changes per request. With
static shapes dynamo compiles one graph per token count and, past `torch._dynamo.config.recompile_limit`
(8), gives up: silently running uncompiled, or with `fullgraph=True` failing the request. Measured on
the tiny TI2V twin (`python -m bench.recompiles`, figures in docs/benchmarks.md): static shapes hit the
limit within the standard and turbo models' 8 aspect ratios x 2 durations; torch's default (automatic
dynamic) recompiles at the first new token count, which after warm-up is a user's request; dynamic
shapes from the first call compile one graph per batch size (CFG batched: 2, turbo: 1) and no more,
so the warm-up's compile serves every later shape.

Each block's `forward` is compiled (not the module's call): diffusers' hooks (FirstBlockCache for the
`fast` request preset, context parallelism) wrap `forward` and then run eagerly around the compiled
block, instead of being traced into it, which fails under `fullgraph=True`.

All blocks share one code object, so they share one compiled graph per shape class: compiling costs
seconds, not minutes.
"""

from __future__ import annotations

from typing import Any

import torch


def compile_blocks(
    model: Any, *, fullgraph: bool = True, dynamic: bool | None = True, backend: str | Any = "inductor"
) -> int:
    """Compile each of `model`'s repeated blocks (its `_repeated_blocks` classes); returns how many.

    `dynamic=True` traces sizes symbolically from the first call (one graph for every token count);
    None is torch's automatic dynamic, False static shapes (both kept for the measurement).
    `backend="eager"` makes dynamo's bookkeeping cheap where only recompiles are counted.
    """
    classes = set(getattr(model, "_repeated_blocks", ()) or ())
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no _repeated_blocks to compile")
    count = 0
    for module in model.modules():
        if module.__class__.__name__ in classes:
            module.forward = torch.compile(
                module.forward, fullgraph=fullgraph, dynamic=dynamic, backend=backend
            )
            count += 1
    if not count:
        raise ValueError(f"none of {sorted(classes)} found in {type(model).__name__}")
    return count
