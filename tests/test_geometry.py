"""Output size, the model grid and the map between them."""

from __future__ import annotations

import pytest
from PIL import Image

from i2v.geometry import Grid, cover_crop_box, fit_image, output_size


@pytest.mark.parametrize(
    ("image", "short", "expected"),
    [
        ((1920, 1080), 720, (1280, 720)),
        ((1080, 1920), 720, (720, 1280)),
        ((1600, 1200), 720, (960, 720)),
        ((1000, 1000), 720, (720, 720)),
        ((2500, 1000), 720, (1800, 720)),
        ((1920, 1080), 1080, (1920, 1080)),
        ((1000, 1000), 1080, (1080, 1080)),
        ((1001, 1000), 720, (720, 720)),  # rounds to the nearest even width
        ((333, 500), 720, (720, 1082)),
    ],
)
def test_output_size(image: tuple[int, int], short: int, expected: tuple[int, int]) -> None:
    width, height = output_size(*image, short)
    assert (width, height) == expected
    assert width % 2 == 0 and height % 2 == 0 and min(width, height) == short


def test_wan_grid_matches_the_official_sizing() -> None:
    grid = Grid(max_area=1280 * 704, multiple=32)
    assert grid.size_for(16 / 9) == (1248, 704)
    assert grid.size_for(9 / 16) == (704, 1248)
    assert grid.size_for(1.0) == (960, 928)
    for aspect in (16 / 9, 9 / 16, 4 / 3, 1.0, 2.5, 0.4):
        width, height = grid.size_for(aspect)
        assert width % 32 == 0 and height % 32 == 0 and width * height <= 1280 * 704
        assert abs((width / height) / aspect - 1) < 0.1


def test_cover_crop_box_keeps_the_centre() -> None:
    assert cover_crop_box(1248, 704, 1280 / 720) == (0, 1, 1248, 703)
    assert cover_crop_box(400, 100, 2.0) == (100, 0, 300, 100)


def test_fit_image_gives_exact_size() -> None:
    image = Image.new("RGB", (1000, 700), "red")
    assert fit_image(image, (256, 128)).size == (256, 128)
