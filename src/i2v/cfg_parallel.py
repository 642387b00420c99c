"""CFG parallel: on a device group, CFG's conditional and unconditional passes run on different GPUs.

diffusers' Wan pipelines call the transformer twice per step, with the prompt's embeddings ("cond") and
then the negative prompt's ("uncond"), on the same latents and timestep. This hook (the same
recognition as `i2v.batched_cfg`) splits the pair by rank: on the conditional call the group's first
half runs the conditional pass and its second half the unconditional one, an all_gather across the
halves gives every rank both predictions (one exchange per step), and the second call gets the other
half back. The pipeline's own loop, guidance formula and scheduler then run on identical tensors on
every rank, so every rank steps to the same latents: nothing else is exchanged.

The group is a mesh of (cfg, ring, ulysses) = (2, 1, N/2) (`i2v.placement.group_mesh`): on four or more ranks each
half splits its pass's sequence with Ulysses (diffusers' `ContextParallelConfig(mesh=...)`), so the
hook sees the whole output of its half's pass, and the CFG exchange runs between matching ranks of the
two halves. Sequence ranks are adjacent (ranks 0-1 and 2-3 on four GPUs), so the all-to-all of every
attention layer stays between neighbours and only the once-a-step exchange crosses the halves.

This follows xDiT (xdit-project/xDiT, commit 175e0bfec974d0b44a0be9fa511df2f9f5ead080):
`xfuser/model_executor/pipelines/pipeline_wan_i2v.py` runs one pass per CFG rank and joins them with
`get_cfg_group().all_gather(noise_pred, separate_tensors=True)`, and `xfuser/core/distributed/
parallel_state.py` orders ranks "tp-sp-pp-cfg-dp" (sequence innermost, CFG outside it). xDiT gives CFG
rank 0 the unconditional pass; here rank 0 (which writes the clip) takes the conditional one, which
changes nothing: both predictions reach every rank. FastVideo (hao-ai-lab/FastVideo, commit
2f3d4074064e4d86f99dc784ebbaa296e6f5925f) has no CFG parallel yet (`fastvideo/models/loader/
fsdp_load.py`: "TODO(PY): device mesh for cfg parallel"), nor has cache-dit (vipshop/cache-dit, commit
f86744af7daa0f569fe4324e73e3e50cebf70f4c; its `has_separate_cfg` tells its cache which calls are CFG's);
diffusers 0.42.1's `ContextParallelConfig` has ring and Ulysses degrees only, and takes the mesh built here.

LTX-2's pipeline makes four passes a guided step in three calls (CFG's pair batched, then STG, then
modality isolation): `GuidancePassesParallel` gives each of two ranks two of them, with two exchanges
per step. diffusers cannot split LTX-2's sequence, so it stops at two ranks.

    mesh = group_mesh(GroupPlan(cfg=2, ulysses=1), device)  # i2v.placement
    hook = CFGParallel.attach(pipe.transformer, mesh)
    with hook.armed(prompt_embeds, negative_prompt_embeds):
        pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, ...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.distributed.device_mesh import DeviceMesh

from .batched_cfg import BatchedCFG


class CFGParallel(BatchedCFG):
    """Each CFG half of the group computes one of the pair; one all_gather shares them."""

    name = "i2v_cfg_parallel"

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.group = mesh.get_group("cfg")
        self.rank = mesh.get_local_rank("cfg")  # 0: the conditional pass; 1: the unconditional one
        if mesh.size(0) != 2:
            raise ValueError(f"CFG parallel splits two passes, not {mesh.size(0)}")

    def both(
        self,
        forward: Callable[..., Any],
        kwargs: dict[str, Any],
        positive: torch.Tensor,
        negative: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = kwargs["encoder_hidden_states"]  # the pipeline's (maybe cast) prompt embeddings
        mine = text if self.rank == 0 else negative.to(device=text.device, dtype=text.dtype)
        output = forward(**{**kwargs, "encoder_hidden_states": mine})[0].contiguous()
        both = [torch.empty_like(output) for _ in range(2)]
        dist.all_gather(both, output, group=self.group)
        return both[0], both[1]


class GuidancePassesParallel(ModelHook):
    """LTX-2's guided step on the two halves of a group: two passes each instead of four on one GPU.

    diffusers 0.42.1's `LTX2ConditionPipeline` makes three transformer calls per guided step: CFG's pair
    as one batch of two ([uncond, cond]), then the spatio-temporal guidance pass (STG: the positive
    prompt with the STG blocks perturbed) and the modality-isolation pass (`isolate_modalities=True`),
    each a batch of one. Here CFG half 0 runs the conditional row and the STG pass, half 1 the
    unconditional row and the modality pass: the first call exchanges the pair, the second call the
    two perturbed passes (the modality pass is run from the STG call's inputs with its two switches
    flipped, which is exactly the call the pipeline makes next) and the third call gets its output back.
    Two exchanges per step, each one all_gather of the video and audio predictions. A call it does not
    recognise (unarmed, the unguided refine stage, STG without modality guidance) runs as it would.
    """

    name = "i2v_guidance_passes_parallel"

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.group = mesh.get_group("cfg")
        self.rank = mesh.get_local_rank("cfg")
        self._armed = False
        self._perturbed_pair = False
        self._pending: tuple[torch.Tensor, ...] | None = None  # the modality pass's (video, audio)

    @classmethod
    def attach(cls, transformer: torch.nn.Module, mesh: DeviceMesh) -> Self:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        hook = registry.get_hook(cls.name)
        if hook is None:
            hook = cls(mesh)
            registry.register_hook(hook, cls.name)
        return hook

    @contextlib.contextmanager
    def armed(self, *, perturbed_pair: bool) -> Iterator[None]:
        """Split the passes of one guided pipeline call; `perturbed_pair`: it makes both the STG and the
        modality-isolation pass (else those run as they come, on every rank)."""
        self._armed, self._perturbed_pair, self._pending = True, perturbed_pair, None
        try:
            yield
        finally:
            self._armed, self._perturbed_pair, self._pending = False, False, None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        latents = kwargs.get("hidden_states")
        if not self._armed or args or latents is None or kwargs.get("return_dict", True):
            return forward(*args, **kwargs)
        if kwargs.get("isolate_modalities"):
            pending, self._pending = self._pending, None
            return pending if pending is not None else forward(**kwargs)
        if kwargs.get("spatio_temporal_guidance_blocks"):
            if not self._perturbed_pair:
                return forward(**kwargs)
            modality = {**kwargs, "isolate_modalities": True, "spatio_temporal_guidance_blocks": None}
            stg, self._pending = self._exchange(forward(**(kwargs if self.rank == 0 else modality)))
            return stg
        if latents.shape[0] == 2:  # CFG's pair, [uncond, cond]: every batched input has 2 rows
            row = 1 - self.rank  # half 0: the conditional row; half 1: the unconditional one
            mine = {key: _row(value, row) for key, value in kwargs.items()}
            cond, uncond = self._exchange(forward(**mine))
            return tuple(torch.cat([u, c]) for u, c in zip(uncond, cond, strict=True))
        return forward(**kwargs)

    def _exchange(self, outputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Both halves' outputs (half 0's, half 1's), through one all_gather of the outputs flattened."""
        flat = torch.cat([output.reshape(-1) for output in outputs])
        both = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(both, flat, group=self.group)
        sizes = [output.numel() for output in outputs]
        return tuple(
            tuple(part.view_as(output) for part, output in zip(gathered.split(sizes), outputs, strict=True))
            for gathered in both
        )


def _row(value: Any, row: int) -> Any:
    """One row of a batched input (a tensor with 2 rows); anything else as it is."""
    return (
        value[row : row + 1] if isinstance(value, torch.Tensor) and value.ndim and len(value) == 2 else value
    )
