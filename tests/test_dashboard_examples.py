"""The renderings the reports carry for the dashboard: PNG thumbnails decode to the normalised pixels, other
inputs keep their first values, and which inputs the result records keep."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from lightning_influence.reporting.examples import MAX_THUMBNAIL_SIDE, MAX_VALUES, keeps_input, render_input


def decode(rendering: dict) -> np.ndarray:
    return imread(io.BytesIO(base64.b64decode(rendering["png"])), format="png")


def test_grey_image_round_trips_through_the_png_exactly_after_normalising():
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) * 16 - 3
    rendering = render_input(image)
    assert rendering["kind"] == "image" and rendering["shape"] == [1, 8, 8]
    pixels = decode(rendering)
    expected = ((image[0] - image.min()) / (image.max() - image.min())).numpy()
    assert pixels.shape == (8, 8)
    np.testing.assert_allclose(pixels, expected, atol=0.5 / 255 + 1e-6)


def test_large_rgb_image_is_averaged_down_to_the_thumbnail_size():
    image = torch.rand(3, 128, 96, generator=torch.Generator().manual_seed(1))
    pixels = decode(render_input(image))
    assert pixels.shape == (MAX_THUMBNAIL_SIDE, 48, 3)
    pooled = F.adaptive_avg_pool2d(image[None].double(), (64, 48))[0]
    expected = ((pooled - pooled.min()) / (pooled.max() - pooled.min())).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(pixels, expected, atol=0.5 / 255 + 1e-6)


def test_token_ids_and_features_keep_their_first_values():
    ids = render_input(torch.arange(100))
    assert ids == {"kind": "values", "shape": [100], "values": list(range(MAX_VALUES)), "truncated": True}
    features = render_input(torch.tensor([0.123456, -2.0, float("nan")]))
    assert features == {"kind": "values", "shape": [3], "values": [0.1235, -2.0, None], "truncated": False}
    assert render_input(None) is None


@pytest.mark.parametrize("x, kept", [
    (torch.zeros(3, 224, 224), True),  # an image of any size
    (torch.zeros(20), True),  # a tabular row
    (torch.zeros(512, dtype=torch.long), True),  # token ids
    (torch.zeros(5000), False),  # a large non-image input is not carried
    ("text", False),
])
def test_records_keep_images_and_small_inputs(x, kept):
    assert keeps_input(x) is kept
