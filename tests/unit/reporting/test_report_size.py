"""A report's files do not grow with the training set (#29): the influence report lists each point's top
influencers and renders each listed example once; the mislabel report lists its candidates and the rankings as
long as the candidate list, whatever N."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.analysis.explain import explain
from lightning_influence.analysis.mislabel import find_mislabel_candidates
from lightning_influence.config import ExplainConfig, LissaConfig, ProblemConfig
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.reporting.files import write_mislabel_files, write_report_files
from lightning_influence.reporting.publish import influence_report


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def _report_sizes(n: int, tmp_path) -> tuple[int, int, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 64, 4))
    train, val = IndexedData(_images(n, 0), batch_size=64), IndexedData(_images(32, 1))
    setup = ProblemConfig(solver=LissaConfig(depth=20), damping=0.1)
    explanation = explain(model, _loss, train, val, setup, ExplainConfig(top_k=5, num_worst=4, diagnose=False))
    report = influence_report(explanation, epoch=0, global_step=0, stage="fit_end")
    influence = write_report_files(tmp_path / str(n), report)
    mislabel = find_mislabel_candidates(model, _loss, train, ProblemConfig(solver="lowrank", damping=0.1), 8)
    mislabel_path = write_mislabel_files(tmp_path / str(n), mislabel)
    listed = {str(i.train_index) for p in report.points for i in (*p.harmful, *p.helpful)}
    written = json.loads(influence.read_text())
    assert set(written["examples"]["train"]) == listed  # one rendering per listed example, not per listing
    return influence.stat().st_size, mislabel_path.stat().st_size, len(listed)


def test_report_files_do_not_grow_with_the_training_set(tmp_path):
    small_influence, small_mislabel, small_listed = _report_sizes(100, tmp_path)
    large_influence, large_mislabel, large_listed = _report_sizes(1600, tmp_path)
    # sixteen times the examples: the same lists, and a size set by how many distinct examples they list (a
    # small training set shares more influencers between points), never by N
    assert large_listed <= 2 * 4 * 5 and small_listed <= 2 * 4 * 5
    assert large_influence / large_listed < 1.1 * small_influence / small_listed
    assert large_mislabel < 1.1 * small_mislabel
