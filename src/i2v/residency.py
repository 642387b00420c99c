"""Which model parts are on the device, and the moves that make room: one `Residency` per executor.

Memory is a planned resource here, the way LLM servers plan KV-cache memory. The executor knows its
device's budget (`I2V_GPU_MEMORY`, else the free memory at start) and each model's need (i2v.memory).
Before a model loads or runs, `make_room` frees what it needs: idle models leave the device, least
recently used first, either to CPU memory (pinned on CUDA, so they come back at copy speed) or, when the
host has no room for them (`I2V_OFFLOAD_MEMORY`), dropped, to be read from disk again on their next use.
Every move is logged and reported to the request that caused it (so it is in the prediction's logs),
with its size and how long it took.

Parts with the same weights are held once: two models whose text encoder (or VAE) files have the same
content, at the same dtype and placement, get the same module (`shared_parts` hands it to the second
model's `from_pretrained`). Content is the files' SHA-256: taken from the HF cache's blob names (which are
the files' SHA-256) or computed once per file and remembered by path, size and modification time.
Transformers are never shared (LoRA adapters, fp8 casting and compilation change them per model).

A model placed with `shuttle` (i2v.memory) keeps its text encoder off the device while it denoises: a
hook on its transformer moves the encoder to CPU memory before the first denoising step, and a hook on
the encoder brings it back when it next runs (the next request, or LTX-2's second stage).

Group-offloaded models (`low-vram`) hold nothing on the device between requests; they are accounted by
their peak while they run and never moved.

On a CPU-only host the device and the host are the same memory: a move "to CPU memory" is then the same
`module._apply` call with nothing to copy, and only the accounting changes. That is how the tests run
this code; the copies themselves (and pinning) happen on a GPU only.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .backends import Backend
from .footprint import tensor_bytes
from .parsing import format_bytes
from .progress import Reporter

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 16 * 2**20
# Host memory left free when deciding between moving a model to CPU memory and dropping it.
HOST_MARGIN = 4 * 10**9
Where = Literal["device", "host", "streamed"]


def weight_files(source: str, subfolder: str) -> list[Path]:
    """A part's weight files where they are on this machine (a local folder, the HF cache); [] if not."""
    local = Path(source).expanduser()
    folder: Path | None = None
    if local.is_dir():
        folder = local / subfolder
    elif source.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source, f"{subfolder}/config.json")
        folder = Path(config).parent if isinstance(config, str) else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


class FileHashes:
    """SHA-256 of weight files: the HF cache's blob name when it is one, else computed once and kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._known: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def __call__(self, file: Path) -> str:
        real = Path(os.path.realpath(file))
        if _SHA256.match(real.name) and real.parent.name == "blobs":
            return real.name
        stat = real.stat()
        key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
        with self._lock:
            if key in self._known:
                return self._known[key]
        digest = hashlib.sha256()
        with real.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        with self._lock:
            self._known[key] = digest.hexdigest()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                staging = self.path.with_name(f"{self.path.name}.{os.getpid()}")
                staging.write_text(json.dumps(self._known))
                staging.replace(self.path)  # whole or not at all: several processes share the file
            except OSError as exc:  # a cache, not a requirement
                log.debug("cannot keep weight hashes in %s: %s", self.path, exc)
            return self._known[key]


def content_id(files: list[Path], hashes: FileHashes) -> str | None:
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{hashes(file)}\n".encode())
    return digest.hexdigest()


@dataclass
class Held:
    """One copy of a part on this executor, and the models that use it."""

    module: torch.nn.Module
    bytes: int
    where: Where
    users: set[str] = field(default_factory=set)


@dataclass
class Holding:
    """A loaded model: its parts (name -> held key), when it last ran, how it is placed."""

    parts: dict[str, str]
    text_encoders: tuple[str, ...]
    streamed: bool
    shuttle: bool
    extra: int  # planned peak above its weights (activations, streamed blocks), for a full-size run
    last_used: int = 0


def move(module: torch.nn.Module, device: torch.device, pin: bool) -> None:
    """Move a part's tensors to `device`; to the host into pinned memory when `pin` (CUDA only)."""
    if device.type != "cpu":
        module.to(device, non_blocking=True)
        return

    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor  # a CPU-only host: nothing to copy
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        return host.copy_(tensor)

    module._apply(to_host)  # what Module.to does, with a pinned destination


class Residency:
    """The parts an executor holds on its device and in CPU memory, within `budget` bytes of the device."""

    def __init__(
        self,
        device: torch.device,
        budget: int | None,
        *,
        offload_memory: int | None,
        hashes: FileHashes,
        drop: Callable[[str], None],
        can_drop: bool = True,
    ) -> None:
        self.device, self.budget = device, budget
        self.host = torch.device("cpu")
        self.offload_memory = offload_memory  # None: what the host has free; 0: never, drop instead
        self.hashes = hashes
        self._drop = drop  # the executor forgets a model (it loads again on its next use)
        # A device group's split models never drop: loading one again is a collective the other ranks,
        # which still hold it, would not join.
        self.can_drop = can_drop
        self.held: dict[str, Held] = {}
        self.models: dict[str, Holding] = {}
        self._tick = 0
        self._report: Reporter | None = None
        self._lock = threading.RLock()

    # what is where

    def on_device(self) -> int:
        return sum(h.bytes for h in self.held.values() if h.where == "device")

    def on_host(self) -> int:
        return sum(h.bytes for h in self.held.values() if h.where == "host")

    def resident_models(self) -> tuple[str, ...]:
        """The models all of whose parts are on the device now (streamed ones count), most recent first."""
        ready = [
            (holding.last_used, name)
            for name, holding in self.models.items()
            if all(self.held[key].where != "host" for key in holding.parts.values())
        ]
        return tuple(name for _, name in sorted(ready, reverse=True))

    def part_key(self, model: str, backend_cls: type[Backend], source: str, name: str, tag: str) -> str:
        """Who a part is: its weights' content (+ dtype and placement) when shareable, else its model's."""
        component = next(c for c in backend_cls.components if c.name == name)
        if component.role != "transformer":
            content = content_id(weight_files(source, component.subfolder), self.hashes)
            if content is not None:
                return f"{content}:{tag}:{'float32' if component.float32 else 'compute'}"
        return f"{model}/{name}"

    def part_keys(self, model: str, backend_cls: type[Backend], source: str, tag: str) -> dict[str, str]:
        return {
            c.name: self.part_key(model, backend_cls, source, c.name, tag) for c in backend_cls.components
        }

    def shared_parts(self, keys: dict[str, str]) -> dict[str, torch.nn.Module]:
        """Parts another loaded model already holds with the same weights."""
        with self._lock:
            return {name: self.held[key].module for name, key in keys.items() if key in self.held}

    # admitting a model

    def register(
        self,
        model: str,
        backend: Backend,
        keys: dict[str, str],
        *,
        streamed: bool,
        shuttle: bool,
        extra: int,
    ) -> None:
        """A model just loaded (its parts on the device, or streamed): hold its parts."""
        with self._lock:
            parts: dict[str, str] = {}
            for name, module in backend.modules().items():
                key = keys.get(name, f"{model}/{name}")
                held = self.held.get(key)
                if held is not None and held.module is not module:  # same weights, not taken: its own copy
                    key, held = f"{model}/{name}", None
                if held is None:
                    where: Where = "streamed" if streamed and _in_pipeline(backend, name) else "device"
                    held = Held(module, tensor_bytes(module) if where == "device" else 0, where)
                    self.held[key] = held
                elif held.where == "host":
                    held.where = "device"  # placing the new model moved it (pipe.to(device))
                held.users.add(model)
                parts[name] = key
            texts = tuple(
                parts[c.name] for c in backend.components if c.role == "text_encoder" and c.name in parts
            )
            self._tick += 1
            self.models[model] = Holding(parts, texts, streamed, shuttle, extra, self._tick)
            if shuttle:
                self._install_shuttle(model, backend)
            log.info(
                "%s holds %s on %s (%s of the budget %s in use)",
                model,
                format_bytes(sum(self.held[k].bytes for k in parts.values())),
                self.device,
                format_bytes(self.on_device()),
                format_bytes(self.budget) if self.budget is not None else "unlimited",
            )

    def acquire(self, model: str, extra: int, report: Reporter | None) -> None:
        """Before `model` runs: its parts on the device, and room for `extra` bytes more (its activations)."""
        with self._lock:
            holding = self.models[model]
            away = [k for k in holding.parts.values() if self.held[k].where == "host"]
            if holding.shuttle:  # the encoder comes back when it runs (its hook), after the room is made
                away = [k for k in away if k not in holding.text_encoders]
            self.make_room(sum(self.held[k].bytes for k in away) + extra, keep=model, report=report)
            if away:
                self._to_device(away, model, report)
            self._tick += 1
            holding.last_used = self._tick
            self._report = report

    def release(self) -> None:
        """The run is over (its reports stop here)."""
        self._report = None

    def make_room(self, needed: int, *, keep: str, report: Reporter | None) -> None:
        """Free the device until `needed` more bytes fit the budget: idle models leave, LRU first."""
        if self.budget is None:
            return
        with self._lock:
            keep_keys = set(self.models[keep].parts.values()) if keep in self.models else set()
            victims = sorted((h.last_used, name) for name, h in self.models.items() if name != keep)
            for _, victim in victims:
                if self.on_device() + needed <= self.budget:
                    return
                self._evict(victim, keep, keep_keys, report)
            if self.on_device() + needed > self.budget:
                line = (
                    f"memory: {keep} needs {format_bytes(needed)} more on {self.device} but only "
                    f"{format_bytes(max(0, self.budget - self.on_device()))} of the budget "
                    f"{format_bytes(self.budget)} is left with nothing else there; trying anyway"
                )
                log.warning("%s", line)
                _say(report, line)

    def would_drop(self, needed: int, *, keep: str) -> bool:
        """Whether making room for `needed` bytes now would drop a model (CPU memory has no room for it)
        rather than only move idle ones there: what `make_room` would do, without doing it."""
        if self.budget is None:
            return False
        with self._lock:
            on_device, to_host = self.on_device(), 0
            for _, victim in sorted((h.last_used, name) for name, h in self.models.items() if name != keep):
                if on_device + needed <= self.budget:
                    return False
                size = sum(
                    self.held[k].bytes
                    for k in self.models[victim].parts.values()
                    if self.held[k].where == "device"
                )
                if not self._host_room(to_host + size):
                    return True
                on_device, to_host = on_device - size, to_host + size
            return False

    def _evict(self, victim: str, keep: str, keep_keys: set[str], report: Reporter | None) -> None:
        holding = self.models[victim]
        leaving = [k for k in holding.parts.values() if k not in keep_keys and self.held[k].where == "device"]
        size = sum(self.held[k].bytes for k in leaving)
        if not leaving:
            return
        if self._host_room(size):
            clock = time.perf_counter()
            for key in leaving:
                move(self.held[key].module, self.host, pin=self.device.type == "cuda")
                self.held[key].where = "host"
            self._sync()
            seconds = time.perf_counter() - clock
            line = (
                f"memory: moved {victim} to CPU memory ({format_bytes(size)} in {seconds:.2f} s) "
                f"to make room for {keep}"
            )
        else:
            clock = time.perf_counter()
            self.forget(victim, keep_keys)
            self._drop(victim)
            _free_device_cache()
            seconds = time.perf_counter() - clock
            line = (
                f"memory: dropped {victim} ({format_bytes(size)} in {seconds:.2f} s; no room for it in "
                f"CPU memory, it loads again on its next use) to make room for {keep}"
            )
        log.info("%s", line)
        _say(report, line)

    def forget(self, model: str, keep_keys: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Let go of a model's parts (those no other model uses)."""
        with self._lock:
            holding = self.models.pop(model, None)
            if holding is None:
                return
            for key in holding.parts.values():
                held = self.held.get(key)
                if held is None:
                    continue
                held.users.discard(model)
                if not held.users and key not in keep_keys:
                    del self.held[key]

    def _host_room(self, size: int) -> bool:
        if not self.can_drop:
            return True
        if self.offload_memory == 0:
            return False
        if self.offload_memory is not None:
            return self.on_host() + size <= self.offload_memory
        import psutil

        return psutil.virtual_memory().available - size >= HOST_MARGIN

    def _to_device(self, keys: list[str], model: str, report: Reporter | None, what: str = "") -> None:
        clock = time.perf_counter()
        for key in keys:
            move(self.held[key].module, self.device, pin=False)
            self.held[key].where = "device"
        self._sync()
        seconds = time.perf_counter() - clock
        size = sum(self.held[k].bytes for k in keys)
        line = (
            f"memory: moved {model}{what} from CPU memory back to the device {self.device} "
            f"({format_bytes(size)} in {seconds:.2f} s)"
        )
        log.info("%s", line)
        _say(report, line)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # the text encoder off the device while denoising

    def _install_shuttle(self, model: str, backend: Backend) -> None:
        modules = backend.modules()
        holding = self.models[model]
        names = [c.name for c in backend.components if c.role == "text_encoder" and c.name in modules]
        transformers = [
            modules[c.name] for c in backend.components if c.role == "transformer" and c.name in modules
        ]

        def encoder_leaves(*_: object) -> None:
            with self._lock:
                for name in names:
                    key = holding.parts[name]
                    held = self.held[key]
                    if held.where != "device":
                        continue
                    clock = time.perf_counter()
                    move(held.module, self.host, pin=self.device.type == "cuda")
                    self._sync()
                    held.where = "host"
                    line = (
                        f"memory: moved {model}'s {name} to CPU memory while denoising "
                        f"({format_bytes(held.bytes)} in {time.perf_counter() - clock:.2f} s)"
                    )
                    log.info("%s", line)
                    _say(self._report, line)

        def encoder_returns(*_: object) -> None:
            with self._lock:
                for name in names:
                    key = holding.parts[name]
                    if self.held[key].where == "host":
                        self.make_room(self.held[key].bytes, keep=model, report=self._report)
                        self._to_device([key], model, self._report, what=f"'s {name}")

        for transformer in transformers:
            transformer.register_forward_pre_hook(encoder_leaves)
        for name in names:
            modules[name].register_forward_pre_hook(encoder_returns)


def _in_pipeline(backend: Backend, name: str) -> bool:
    return next((c.in_pipeline for c in backend.components if c.name == name), True)


def _say(report: Reporter | None, line: str) -> None:
    if report is not None:
        report(line)


def _free_device_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
