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
from pathlib import Path

from ..errors import ModelUnavailable
from ..settings import TINY_PREFIX
from .base import Backend, BackendSpec, Clip, ModelInputs, StepCallback
from .fastwan import FastWanTI2V
from .ltx2 import LTX2, LTX2Distilled
from .wan_flf2v import WanFLF2V
from .wan_ti2v import WanTI2V

BACKENDS: dict[str, type[Backend]] = {
    cls.spec.name: cls for cls in (WanTI2V, FastWanTI2V, LTX2, LTX2Distilled, WanFLF2V)
}

__all__ = ["BACKENDS", "Backend", "BackendSpec", "Clip", "ModelInputs", "StepCallback", "resolve"]


def registered(extra_backends: tuple[str, ...] = ()) -> dict[str, type[Backend]]:
    """The built-in backends plus plugins (`module:Class`; the setting `I2V_EXTRA_BACKENDS`, comma-separated).

    Plugins let an operator add a model without patching i2v; the test suite adds its fault-injection
    backends this way, so none of them ships in the product's registry.
    """
    backends = dict(BACKENDS)
    for entry in extra_backends:
        module, _, attr = entry.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ModelUnavailable(f"I2V_EXTRA_BACKENDS: cannot load {entry!r} ({exc})") from exc
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ModelUnavailable(f"I2V_EXTRA_BACKENDS: {entry!r} is not a Backend subclass")
        backends[cls.spec.name] = cls
    return backends


def resolve(
    ref: str, tiny_dir: Path, extra_backends: tuple[str, ...] = ()
) -> tuple[type[Backend], BackendSpec]:
    """The backend class and spec for a model reference; a tiny twin's weights are built on first use."""
    name, _, source = ref.partition("=")
    name = name.strip()
    tiny = name.startswith(TINY_PREFIX)
    backends = registered(extra_backends)
    cls = backends.get(name.removeprefix(TINY_PREFIX))
    if cls is None:
        known = ", ".join(sorted(backends))
        raise ModelUnavailable(
            f"unknown model '{name}' (registered: {known}; prefix 'tiny-' for a tiny twin)"
        )
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
