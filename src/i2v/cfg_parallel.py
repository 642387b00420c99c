"""CFG parallel: on a device group, CFG's conditional and unconditional passes run on different GPUs.

diffusers' Wan pipelines call the transformer twice per step, with the prompt's embeddings ("cond") and
then the negative prompt's ("uncond"), on the same latents and timestep. This hook (the same
recognition as `i2v.batched_cfg`) splits the pair by rank: on the conditional call the group's first
half runs the conditional pass and its second half the unconditional one, an all_gather across the
halves gives every rank both predictions (one exchange per step), and the second call gets the other
half back. The pipeline's own loop, guidance formula and scheduler then run on identical tensors on
every rank, so every rank steps to the same latents: nothing else is exchanged.

The group is a mesh of (cfg, ring, ulysses) = (2, 1, N/2) (`group_mesh`): on four or more ranks each
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
fsdp_load.py`: "TODO(PY): device mesh for cfg parallel"); diffusers 0.42.1's `ContextParallelConfig`
has ring and Ulysses degrees only, and takes the mesh this module builds.

    mesh = group_mesh(GroupPlan(cfg=2, ulysses=1), device)
    hook = CFGParallel.attach(pipe.transformer, mesh)
    with hook.armed(prompt_embeds, negative_prompt_embeds):
        pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, ...)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .batched_cfg import BatchedCFG
from .speed import GroupPlan

MESH_DIMS = ("cfg", "ring", "ulysses")  # diffusers' context parallelism reads "ring" and "ulysses"


def group_mesh(plan: GroupPlan, device: torch.device) -> DeviceMesh:
    """The group's device mesh for a plan with CFG parallel; built collectively (every rank calls it).

    Row-major over ranks, so CFG half c holds ranks c * ulysses ... (c + 1) * ulysses - 1.
    """
    if dist.get_world_size() != plan.ranks:
        raise ValueError(f"a plan for {plan.ranks} ranks on a group of {dist.get_world_size()}")
    return init_device_mesh(device.type, (plan.cfg, 1, plan.ulysses), mesh_dim_names=MESH_DIMS)


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
