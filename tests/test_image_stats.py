"""The guard's image statistics (rl/guard/image_stats.py) on images built by hand, values derived by hand.

Luma is BT.601: black 0, white 0.299 + 0.587 + 0.114 = 1, grey g -> g / 255.
"""

from __future__ import annotations

import numpy as np
import pytest

from rl.guard.image_stats import (
    DARK_LUMA,
    batch_stats,
    brightness,
    colour_entropy,
    dark_share,
    edge_density,
    group_diversity,
)

BLACK = np.zeros((4, 4, 3), np.uint8)
WHITE = np.full((4, 4, 3), 255, np.uint8)


def grey(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def half_black_half_white(size: int = 4) -> np.ndarray:
    """Left half black, right half white."""
    image = np.zeros((size, size, 3), np.uint8)
    image[:, size // 2 :] = 255
    return image


def test_dark_share_and_brightness():
    assert dark_share(BLACK) == 1.0 and dark_share(WHITE) == 0.0
    assert dark_share(half_black_half_white()) == 0.5
    assert brightness(half_black_half_white()) == pytest.approx(0.5)
    # the threshold: grey 63 (luma 0.247) is dark, grey 64 (0.251) is not
    assert 63 / 255 < DARK_LUMA < 64 / 255
    assert dark_share(grey(63)) == 1.0 and dark_share(grey(64)) == 0.0
    assert brightness(grey(51)) == pytest.approx(0.2)
    # pure red: luma 0.299, not dark; pure blue: 0.114, dark
    red, blue = BLACK.copy(), BLACK.copy()
    red[..., 0], blue[..., 2] = 255, 255
    assert dark_share(red) == 0.0 and dark_share(blue) == 1.0 and brightness(blue) == pytest.approx(0.114)


def test_colour_entropy_in_bits():
    assert colour_entropy(WHITE) == 0.0  # one colour
    assert colour_entropy(half_black_half_white()) == pytest.approx(1.0)  # two colours, equal shares
    quarters = np.zeros((4, 4, 3), np.uint8)  # black, red, green, blue quarters: 2 bits
    quarters[:2, 2:, 0] = 255
    quarters[2:, :2, 1] = 255
    quarters[2:, 2:, 2] = 255
    assert colour_entropy(quarters) == pytest.approx(2.0)
    # 4 levels per channel: 0 and 63 fall in the same level (0..63), so no second colour
    same_level = grey(0)
    same_level[:, :2] = 63
    assert colour_entropy(same_level) == 0.0
    # one white pixel in 16: -(1/16 log2 1/16 + 15/16 log2 15/16) = 0.33729
    one_pixel = BLACK.copy()
    one_pixel[0, 0] = 255
    assert colour_entropy(one_pixel) == pytest.approx(0.3372900666, abs=1e-9)


def test_edge_density():
    assert edge_density(WHITE) == 0.0
    # 4x4 halves: the 3x3 gradient grid has one column of edges (between columns 1 and 2): 3 of 9
    assert edge_density(half_black_half_white()) == pytest.approx(1 / 3)
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    assert edge_density(checker) == 1.0  # every pixel differs from its neighbours
    faint = grey(0)
    faint[:, 2:] = 20  # a luma step of 0.078: below EDGE_STEP (0.1)
    assert edge_density(faint) == 0.0
    assert edge_density(np.zeros((1, 8, 3), np.uint8)) == 0.0  # no 2x2 neighbourhood


def test_group_diversity():
    assert group_diversity(np.stack([BLACK, WHITE])) == pytest.approx(1.0)
    assert group_diversity(np.stack([BLACK, BLACK])) == 0.0
    # pairs (black, white) 1, (black, black) 0, (white, black) 1: mean 2/3
    assert group_diversity(np.stack([BLACK, WHITE, BLACK])) == pytest.approx(2 / 3)
    # 32x32 thumbnails of 2x2 boxes: half the boxes differ by 1 -> 0.5
    big_black = np.zeros((32, 32, 3), np.uint8)
    assert group_diversity(np.stack([big_black, half_black_half_white(32)])) == pytest.approx(0.5)
    assert group_diversity(BLACK[None]) == 0.0  # one sample: nothing to compare


def test_batch_stats_are_means_over_images_and_groups():
    images = np.stack([BLACK, WHITE, half_black_half_white(), half_black_half_white()])  # 2 groups of 2
    metrics = batch_stats(images, group_size=2).metrics()
    assert metrics == pytest.approx({
        "images/dark_share": (1 + 0 + 0.5 + 0.5) / 4,
        "images/brightness": (0 + 1 + 0.5 + 0.5) / 4,
        "images/colour_entropy": (0 + 0 + 1 + 1) / 4,
        "images/edge_density": (0 + 0 + 1 / 3 + 1 / 3) / 4,
        "images/group_diversity": (1.0 + 0.0) / 2,  # black vs white; two identical images
    })
    with pytest.raises(ValueError, match="groups of 2"):
        batch_stats(images[:3], group_size=2)
