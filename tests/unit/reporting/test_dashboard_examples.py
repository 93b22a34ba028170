"""The renderings the reports carry for the dashboard: PNG thumbnails decode to the normalised pixels, other
inputs keep their first values, and which inputs the result records keep."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from lightning_influence.core.tensors.batching import keeps_input
from lightning_influence.dashboard.data import InfluenceData
from lightning_influence.reporting import report_to_dict
from lightning_influence.reporting.examples import MAX_THUMBNAIL_SIDE, MAX_VALUES, render_input
from lightning_influence.results import ExplainedPoint, Influencer, InfluenceReport, SolverSummary


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


def test_reports_written_before_the_examples_object_still_load(tmp_path):
    point = ExplainedPoint(7, 3, 8, 1.5, (Influencer(100, 0.25, 3, 3, 0.1, torch.arange(4.0)),),
                           (Influencer(150, -0.5, 8, 8, 0.2),), input=torch.zeros(1, 8, 8))
    report = report_to_dict(InfluenceReport(2, 20, "validation", 200, (point,), SolverSummary("cg", 0.1, True, 0.5)))
    assert report["examples"]["train"]["100"]["input"]["values"] == [0.0, 1.0, 2.0, 3.0]
    assert report["examples"]["train"]["150"]["input"] is None and report["examples"]["val"]["7"]["input"]["png"]
    del report["examples"]
    (tmp_path / "run" / "influence").mkdir(parents=True)
    (tmp_path / "run" / "influence" / "epoch=2.json").write_text(json.dumps(report))
    data = InfluenceData(tmp_path)
    assert data.runs()["runs"][0]["analyses"][0]["has_examples"] is False
    detail = data.point("run", 2, 7)
    assert detail["input"] is None and detail["harmful"][0]["label"] is None
    assert [e["train_index"] for e in detail["harmful"] + detail["helpful"]] == [100, 150]
    assert detail["harmful"][0]["loss_change_if_removed"] == pytest.approx(-0.25 / 200)
