"""The registry of model backends, and how a model reference becomes a loadable spec.

A reference is a backend name (`wan2.2-ti2v-5b`), its tiny twin (`tiny-wan2.2-ti2v-5b`), or a name with
its weights somewhere else: `wan2.2-ti2v-5b=/models/ti2v` (a local folder) or `=org/repo` (a hub id).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..errors import ModelUnavailable
from ..settings import TINY_PREFIX
from .base import Backend, BackendSpec, Clip, ModelInputs, StepCallback

# Each built-in backend by its model name, as `module:Class` (its spec's name; a test checks they agree).
BUILTIN = {
    "wan2.2-ti2v-5b": "i2v.backends.wan_ti2v:WanTI2V",
    "fastwan2.2-ti2v-5b": "i2v.backends.fastwan:FastWanTI2V",
    "ltx-2": "i2v.backends.ltx2:LTX2",
    "ltx-2-distilled": "i2v.backends.ltx2:LTX2Distilled",
    "wan2.1-flf2v-14b": "i2v.backends.wan_flf2v:WanFLF2V",
}


def load_backend(entry: str, setting: str = "I2V_EXTRA_BACKENDS") -> type[Backend]:
    """The Backend subclass a `module:Class` entry names (a plugin, or a built-in one)."""
    module, _, attr = entry.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelUnavailable(f"{setting}: cannot load {entry!r} ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ModelUnavailable(f"{setting}: {entry!r} is not a Backend subclass")
    return cls


class _Registry(Mapping[str, type[Backend]]):
    """The built-in backends by name, each module imported on first use.

    A backend's module imports its diffusers pipeline, transformers and peft (seconds of start-up): a
    process that runs one model imports that model's module only, and one that runs a plugin's none.
    """

    def __getitem__(self, name: str) -> type[Backend]:
        return load_backend(BUILTIN[name], setting="the built-in backend")

    def __iter__(self) -> Iterator[str]:
        return iter(BUILTIN)

    def __len__(self) -> int:
        return len(BUILTIN)


BACKENDS: Mapping[str, type[Backend]] = _Registry()

__all__ = ["BACKENDS", "Backend", "BackendSpec", "Clip", "ModelInputs", "StepCallback", "resolve"]


def registered(extra_backends: tuple[str, ...] = ()) -> dict[str, str]:
    """The model names: the built-in backends plus plugins (`module:Class`; the setting `I2V_EXTRA_BACKENDS`,
    comma-separated), each name's `module:Class`. A plugin is imported here, for its spec's name.

    Plugins let an operator add a model without patching i2v; the test suite adds its fault-injection
    backends this way, so none of them ships in the product's registry.
    """
    backends = dict(BUILTIN)
    for entry in extra_backends:
        backends[load_backend(entry).spec.name] = entry
    return backends


def resolve(
    ref: str, tiny_dir: Path, extra_backends: tuple[str, ...] = ()
) -> tuple[type[Backend], BackendSpec]:
    """The backend class and spec for a model reference; a tiny twin's weights are built on first use."""
    name, _, source = ref.partition("=")
    name = name.strip()
    tiny = name.startswith(TINY_PREFIX)
    backends = registered(extra_backends)
    base = name.removeprefix(TINY_PREFIX)
    entry = backends.get(base)
    if entry is None:
        known = ", ".join(sorted(backends))
        raise ModelUnavailable(
            f"unknown model '{name}' (registered: {known}; prefix 'tiny-' for a tiny twin)"
        )
    cls = BACKENDS[base] if entry == BUILTIN.get(base) else load_backend(entry)
    if tiny:
        return cls, cls.tiny_spec(ensure_tiny(cls, tiny_dir))
    return cls, dataclasses.replace(cls.spec, source=source.strip()) if source.strip() else cls.spec


def tiny_folder(cls: type[Backend], tiny_dir: Path) -> Path:
    # The folder name carries a hash of the builder (and of the seed a variant gives its transformer),
    # so a changed tiny config never loads stale weights.
    builder = inspect.getsource(cls.build_tiny) + repr(getattr(cls, "tiny_transformer_seed", None))
    digest = hashlib.sha256(builder.encode()).hexdigest()[:10]
    return tiny_dir / f"{cls.spec.name}-{digest}"


def ensure_tiny(cls: type[Backend], tiny_dir: Path) -> Path:
    """Build the tiny twin with `save_pretrained` unless it is there; safe when processes race."""
    folder = tiny_folder(cls, tiny_dir)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    cls.build_tiny(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder
