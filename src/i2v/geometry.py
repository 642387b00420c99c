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

    def size_for(self, aspect: float) -> tuple[int, int]:
        """The grid size closest in aspect to `aspect` (width/height), Wan2.2's `best_output_size` rule.

        Rounding the width first and the height first give two candidates; the one whose aspect is nearer
        wins. Both keep the area within `max_area`.
        """
        m, area = self.multiple, self.max_area
        width = math.sqrt(area * aspect)
        height = area / width
        w1 = max(m, int(width // m * m))
        h1 = max(m, int(area / w1 // m * m))
        h2 = max(m, int(height // m * m))
        w2 = max(m, int(area / h2 // m * m))

        def error(w: int, h: int) -> float:
            return max(aspect / (w / h), (w / h) / aspect)

        return (w1, h1) if error(w1, h1) < error(w2, h2) else (w2, h2)


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
