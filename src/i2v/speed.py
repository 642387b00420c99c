"""The speed settings: the exact path and the presets (what `i2v.placement` applies; no torch here).

Exact speed-ups, on by default where the hardware has them (CUDA); each keeps the output equal to the
stock pipeline's within bf16 noise:

- the fastest attention kernel installed: FlashAttention 3, then FlashAttention 2, then cuDNN's fused
  attention, then PyTorch's own (diffusers' `set_attention_backend`, checked before it is chosen);
- regional `torch.compile` of the transformer's repeated block (`i2v.compiled_blocks`): one block is
  compiled and reused by all of them, so compiling costs seconds, not minutes, with dynamic shapes so
  that every aspect ratio and duration runs the same graph;
- CFG's conditional and unconditional passes in one batched forward (`i2v.batched_cfg`), where the stock
  pipeline runs them one after the other;
- on a device group, CFG's two passes on different GPUs (`i2v.cfg_parallel`), times Ulysses on four or
  more (`GroupPlan`, below).

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

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict

from .parsing import OptionalFlag

Preset = Literal["default", "fast", "turbo", "low-vram"]
RequestPreset = Literal["default", "fast", "turbo"]  # low-vram is how the server loads, never a request's
PRESETS: tuple[str, ...] = get_args(Preset)
REQUEST_PRESETS: tuple[str, ...] = get_args(RequestPreset)
SPEED_FLAGS = ("compile", "batched_cfg", "cfg_parallel", "warmup")


class HasDeviceType(Protocol):
    type: str  # a torch.device, without importing torch here


class Speed(BaseModel):
    """The load-time speed settings of one server (or one Engine). None means: on where CUDA is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset = "default"
    attention: str = "auto"  # "auto" or a diffusers backend name (e.g. "sage", "_native_cudnn")
    compile: OptionalFlag = None
    batched_cfg: OptionalFlag = None
    cfg_parallel: OptionalFlag = None  # on a device group; None: where it can (`group_plan`)
    warmup: OptionalFlag = None

    @property
    def fp8(self) -> bool:
        return self.preset == "fast"

    @property
    def low_vram(self) -> bool:
        return self.preset == "low-vram"

    def on(self, flag: bool | None, device: HasDeviceType) -> bool:
        return device.type == "cuda" if flag is None else flag

    def request_preset(self, asked: RequestPreset | None) -> RequestPreset:
        """A request's preset, else the server's (`low-vram` is how models load, not a per-request one)."""
        if asked is not None:
            return asked
        return self.preset if self.preset in REQUEST_PRESETS else "default"  # type: ignore[return-value]


@dataclass(frozen=True)
class GroupPlan:
    """How one generation uses a device group: CFG's passes across `cfg` halves of the group, each
    splitting its pass's sequence across `ulysses` ranks (`cfg * ulysses` ranks in all). 1 x 1: rank 0
    alone. `note` says why a plan is less than asked for (for the log)."""

    cfg: int = 1
    ulysses: int = 1
    note: str = ""

    @property
    def ranks(self) -> int:
        return self.cfg * self.ulysses

    def describe(self) -> str:
        """What the plan does, for the placement summary (`running X on cuda:0 (...)`)."""
        if self.cfg > 1 and self.ulysses > 1:
            text = f"CFG parallel across {self.cfg} groups x sequence split across {self.ulysses} ranks"
        elif self.cfg > 1:
            text = f"CFG parallel across {self.cfg} ranks"
        elif self.ulysses > 1:
            text = f"sequence split across {self.ulysses} ranks"
        else:
            text = "rank 0 alone"
        return f"{text} ({self.note})" if self.note else text


def group_plan(
    ranks: int, *, guided: bool, splits_cfg: bool, splits_sequence: bool, cfg_parallel: bool | None
) -> GroupPlan:
    """The plan for a model on a group of `ranks`.

    CFG parallel (`cfg_parallel` None: where it can; True: asked for; False: off) runs the conditional
    and unconditional passes on two halves of the group: it needs an even group, a model that samples
    with guidance (`guided`: a negative pass) and a backend whose passes can be split (`splits_cfg`).
    It exchanges one output per step where Ulysses all-to-alls every attention layer, so it comes first;
    the rest of the group splits each pass's sequence (`splits_sequence`). A model whose sequence does not
    split uses CFG parallel on a group of two only, and otherwise runs on rank 0 alone.
    """
    if ranks <= 1:
        return GroupPlan()
    if cfg_parallel is False:
        why_not = "CFG parallel off"
    elif not guided:
        why_not = "no CFG parallel: the model samples without guidance"
    elif not splits_cfg:
        why_not = "no CFG parallel: this pipeline's guidance passes are not split"
    elif ranks % 2:
        why_not = f"no CFG parallel: a group of {ranks} does not halve"
    elif splits_sequence or ranks == 2:
        return GroupPlan(cfg=2, ulysses=ranks // 2)
    else:
        why_not = f"CFG parallel would use 2 of {ranks} ranks"
    if splits_sequence:
        return GroupPlan(ulysses=ranks, note=why_not)
    return GroupPlan(note=f"{why_not}, and its sequence does not split")
