"""Classifier-free guidance in one batched forward, for pipelines that run its two passes one by one.

diffusers' Wan pipelines call the transformer twice per step, once with the prompt's embeddings
("cond") and once with the negative prompt's ("uncond"), on the same latents and timestep. This hook
on the transformer turns the first call into one forward over a batch of two and hands the second
half back on the second call, so the pipeline's own loop, scheduler and guidance formula run unchanged.
Fewer, larger kernels: the same arithmetic, so the frames match the sequential passes within float
rounding.

    hook = BatchedCFG.attach(pipe.transformer)
    with hook.armed(prompt_embeds, negative_prompt_embeds):
        pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, ...)

A call it does not recognise (other embeddings, no arming) runs as it would without the hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "i2v_batched_cfg"


class BatchedCFG(ModelHook):
    """Both passes on the first call, the second's result handed back on the second call.

    How both are computed is `both`: here one batched forward; `i2v.cfg_parallel` splits them by rank.
    """

    name = HOOK_NAME

    def __init__(self) -> None:
        super().__init__()
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (latents, t, uncond)

    @classmethod
    def attach(cls, transformer: torch.nn.Module, *args: Any) -> Self:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        hook = registry.get_hook(cls.name)
        if hook is None:
            hook = cls(*args)
            registry.register_hook(hook, cls.name)
        return hook

    @contextlib.contextmanager
    def armed(self, positive: torch.Tensor, negative: torch.Tensor) -> Iterator[None]:
        """Batch the passes of one pipeline call that uses these prompt and negative-prompt embeddings."""
        self._pair, self._pending = (positive, negative), None
        try:
            yield
        finally:
            self._pair, self._pending = None, None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        latents, timestep = kwargs.get("hidden_states"), kwargs.get("timestep")
        text = kwargs.get("encoder_hidden_states")
        if self._pair is None or args or latents is None or kwargs.get("return_dict", True):
            return forward(*args, **kwargs)
        positive, negative = self._pair
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is latents and pending[1] is timestep and _same(text, negative):
            return (pending[2],)  # the unconditional half of the batch run for the conditional call
        if not _same(text, positive):
            return forward(*args, **kwargs)
        cond, uncond = self.both(forward, kwargs, positive, negative)
        self._pending = (latents, timestep, uncond)
        return (cond,)

    def both(
        self,
        forward: Callable[..., Any],
        kwargs: dict[str, Any],
        positive: torch.Tensor,
        negative: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cond, uncond) predictions for the conditional call's `kwargs`: one forward, batch of two."""
        latents, timestep = kwargs["hidden_states"], kwargs["timestep"]
        image = kwargs.get("encoder_hidden_states_image")
        batched = {
            **kwargs,
            "hidden_states": torch.cat([latents, latents]),
            "timestep": torch.cat([timestep, timestep]),
            "encoder_hidden_states": torch.cat([positive, negative]),
            "encoder_hidden_states_image": torch.cat([image, image]) if image is not None else None,
        }
        cond, uncond = forward(**batched)[0].chunk(2)
        return cond, uncond


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    # The pipeline may cast the embeddings it was given; equal values are what matter.
    return a is b or (a is not None and a.shape == b.shape and torch.equal(a, b.to(a.dtype)))
