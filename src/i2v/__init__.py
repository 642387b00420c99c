"""i2v: self-hosted image-to-video behind the Kling v2.1 API, on open-weight diffusers models.

from i2v import generate
result = generate("out.mp4", prompt="waves roll in", start_image="photo.jpg", duration=5)
print(result.path, result.seed)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import Canceled, I2VError, InputError, ModelUnavailable
from .progress import Progress, ProgressCallback
from .request import KlingRequest

if TYPE_CHECKING:
    from .engine import Engine, Result

__all__ = [
    "Canceled",
    "Engine",
    "I2VError",
    "InputError",
    "KlingRequest",
    "ModelUnavailable",
    "Progress",
    "Result",
    "generate",
]

_engines: dict[str | None, Engine] = {}
_engines_lock = threading.Lock()


def generate(
    output: str | Path,
    *,
    model: str | None = None,
    on_progress: ProgressCallback | None = None,
    **inputs: Any,
) -> Result:
    """Render one clip from Kling v2.1 inputs (`prompt`, `start_image`, ...) to `output`.

    The engine for `model` is kept, so later calls reuse the loaded weights. I2V_DEVICE may name a GPU
    group ("cuda:0+cuda:1"): then each clip is split across its GPUs.
    """
    from .engine import Engine

    request = KlingRequest(**inputs)
    with _engines_lock:
        engine = _engines.get(model) or _engines.setdefault(model, Engine(model))
    return engine.generate(request, output, on_progress=on_progress)


def __getattr__(name: str) -> Any:
    # The engine pulls in torch and diffusers; import it only when it is asked for.
    if name in ("Engine", "Result"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
