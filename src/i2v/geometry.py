"""Sizes: the exact output size Kling promises, the model's own grid, and the map between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


def output_size(image_width: int, image_height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the clip: the short side fixed, the long side from the image's aspect, both even."""
    aspect = image_width / image_height
    if aspect >= 1:
        return _even(short_side * aspect), short_side
    return short_side, _even(short_side / aspect)


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


@dataclass(frozen=True)
class Grid:
    """Sizes a model generates at: sides multiples of `multiple`, area at most `max_area`."""

    max_area: int
    multiple: int

    def size_for(self, aspect: float, tokens_multiple: int = 1) -> tuple[int, int]:
        """The grid size closest in aspect to `aspect` (width/height), Wan2.2's `best_output_size` rule.

        Rounding the width first and the height first give two candidates; the one whose aspect is nearer
        wins. Both keep the area within `max_area`.

        `tokens_multiple`: the number of tokens per frame, (width / multiple) * (height / multiple) for our
        models, must divide by it, so that N GPUs can split the sequence evenly (i2v.parallel). When the
        nearest size does not, the best one that does within 20% of its area is taken.
        """
        m, area = self.multiple, self.max_area
        width = math.sqrt(area * aspect)
        height = area / width
        w1 = max(m, int(width // m * m))
        h1 = max(m, int(area / w1 // m * m))
        h2 = max(m, int(height // m * m))
        w2 = max(m, int(area / h2 // m * m))

        def error(size: tuple[int, int]) -> float:
            w, h = size
            return max(aspect / (w / h), (w / h) / aspect)

        best = min((w2, h2), (w1, h1), key=error)  # a tie goes to the height-first candidate, as in Wan
        if self.tokens(best) % tokens_multiple == 0:
            return best
        floor = 0.8 * best[0] * best[1]
        candidates = [
            (w, h)
            for h in range(m, area // m + 1, m)
            for w in range(area // h // m * m, m - 1, -m)
            if w * h >= floor and self.tokens((w, h)) % tokens_multiple == 0
        ]
        if not candidates:
            raise ValueError(f"no size on this grid near aspect {aspect:.3f} splits across {tokens_multiple}")
        # Pixels over aspect error, the error counted twice: a crop loses picture, fewer pixels only detail.
        return max(candidates, key=lambda size: size[0] * size[1] / error(size) ** 2)

    def tokens(self, size: tuple[int, int]) -> int:
        """Tokens per frame at a grid size: one per `multiple` x `multiple` pixels."""
        return (size[0] // self.multiple) * (size[1] // self.multiple)


def cover_crop_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The centred (left, top, right, bottom) box of a width x height picture with the given aspect.

    Scaling that box to the target fills it without distortion: at most a sliver of the edges is lost.
    """
    if width / height > aspect:
        new_width = round(height * aspect)
        left = (width - new_width) // 2
        return left, 0, left + new_width, height
    new_height = round(width / aspect)
    top = (height - new_height) // 2
    return 0, top, width, top + new_height


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize and centre-crop an image to exactly `size` (width, height), Lanczos filtered."""
    width, height = size
    box = cover_crop_box(image.width, image.height, width / height)
    return image.resize(size, Image.Resampling.LANCZOS, box=box)
