"""The report record of an explanation: the two records differ by the stamp (epoch, step, stage) and the
rank-local scores only, and every shared field travels from the one to the other by name."""

from __future__ import annotations

import dataclasses
import typing

import torch

from lightning_influence.reporting.publish import RANK_LOCAL, STAMP, influence_report
from lightning_influence.results import (
    ExplainedPoint,
    Explanation,
    Influencer,
    InfluenceReport,
    ScoreShard,
    SolveInfo,
    TrustReport,
)


def _fields(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def test_the_report_is_the_explanation_plus_its_stamp_minus_the_rank_local_scores():
    report, explanation = _fields(InfluenceReport), _fields(Explanation)
    assert set(report) - set(explanation) == set(STAMP)
    assert set(explanation) - set(report) == set(RANK_LOCAL)
    for name in set(report) & set(explanation):  # the same field with the same type on both
        assert report[name] == explanation[name], name


def test_every_shared_field_reaches_the_report():
    point = ExplainedPoint(val_index=4, label=3, prediction=5, loss=1.5, harmful=(Influencer(7, 0.25),),
                           helpful=(Influencer(9, -0.5),))
    solver = SolveInfo("cg", 0.1, True, 0.01)
    trust = TrustReport(points=(), warnings=())
    shard = ScoreShard(train_indices=torch.arange(3), scores=torch.zeros(1, 3))
    explanation = Explanation(points=(point,), solver=solver, timings={"total": 2.0}, train_size=3,
                              score_shard=shard, trust=trust)
    report = influence_report(explanation, epoch=2, global_step=40, stage="fit_end")
    assert (report.epoch, report.global_step, report.stage) == (2, 40, "fit_end")
    for name in set(_fields(InfluenceReport)) - set(STAMP):
        assert getattr(report, name) is getattr(explanation, name), name
