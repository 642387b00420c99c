"""Cog predictor: the same model as `i2v serve`, packaged so it can be pushed to Replicate (`cog push`).

The inputs mirror `i2v.request.KlingRequest` field for field. Cog reads this signature without running it
(its static parser takes literal values only), so names, defaults, choices, bounds and descriptions are
written out here; tests/test_cog_predictor.py checks through Cog's own inspector that they equal
KlingRequest's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path as _LocalPath

sys.path.insert(0, str(_LocalPath(__file__).resolve().parent / "src"))  # the i2v package, copied in by Cog

from cog import BasePredictor, Input, Path

from i2v.request import KlingRequest


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the standard-mode model once; pro mode loads on its first request."""
        from i2v.engine import Engine  # I2V_DEVICE=cuda:0+cuda:1 splits each clip across both
        from i2v.settings import Settings

        settings = Settings()
        self.engine = Engine(settings.served_model, settings=settings)  # I2V_MODEL, e.g. "tiny"
        self.engine.backend("standard")

    def predict(
        self,
        mode: str = Input(
            description="Standard has a resolution of 720p, pro is 1080p. Both are 24fps.",
            default="standard",
            choices=["standard", "pro"],
        ),
        duration: int = Input(description="Duration of the video in seconds", default=5, choices=[5, 10]),
        prompt: str = Input(description="Text prompt for video generation", max_length=2500),
        end_image: Path | None = Input(
            description="Last frame of the video (pro mode is required when this parameter is set)",
            default=None,
        ),
        start_image: Path = Input(
            description="First frame of the video. You must use a start image with kling-v2.1."
        ),
        negative_prompt: str = Input(
            description="Things you do not want to see in the video", default="", max_length=2500
        ),
        seed: int | None = Input(
            description="Random seed. Leave blank to randomize; the seed used is reported.",
            default=None,
            ge=0,
            le=9223372036854775807,
        ),
        audio: bool = Input(
            description="Add the model's generated soundtrack (AAC) when the model makes one. "
            "Kling v2.1 clips are silent, so the default is no audio track.",
            default=False,
        ),
        preset: str | None = Input(
            description="Speed preset. default: the full model at full quality. fast: step caching, "
            "faster with a small loss of detail. turbo: a distilled few-step model, several times faster "
            "with some loss of quality. Leave blank for the server's preset.",
            default=None,
            choices=["default", "fast", "turbo"],
        ),
    ) -> Path:
        request = KlingRequest(
            mode=mode,
            duration=duration,
            prompt=prompt,
            end_image=end_image,
            start_image=start_image,
            negative_prompt=negative_prompt,
            seed=seed,
            audio=audio,
            preset=preset,
        )
        output = _LocalPath(tempfile.mkdtemp(prefix="i2v-")) / "output.mp4"
        result = self.engine.generate(request, output, on_progress=lambda p: print(p, flush=True))
        print(f"seed: {result.seed}")
        return Path(result.path)
