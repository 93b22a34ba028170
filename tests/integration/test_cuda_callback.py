"""InfluenceCallback on a CUDA device with its defaults (LiSSA on Gauss-Newton curvature, damping "auto"): the
solve and the scoring run on the module's device. Skipped cleanly when no GPU is present."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning_models import TinyDigitsData, TinyDigitsModel

from lightning_influence import InfluenceCallback
from lightning_influence.analysis import explain
from lightning_influence.core.problem import InfluenceProblem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_callback_defaults_on_cuda(monkeypatch, tmp_path):
    devices: dict[str, set[str]] = {"s_test": set(), "scores": set()}
    solve, scores = explain.solve_s_test_with_halves, InfluenceProblem.scores

    def recorded_solve(*args, **kwargs):
        vectors, *rest = solve(*args, **kwargs)
        devices["s_test"].add(vectors.device.type)
        return (vectors, *rest)

    def recorded_scores(self, *args, **kwargs):
        for block in scores(self, *args, **kwargs):
            devices["scores"].add(block.device.type)
            yield block

    monkeypatch.setattr(explain, "solve_s_test_with_halves", recorded_solve)
    monkeypatch.setattr(InfluenceProblem, "scores", recorded_scores)
    pl.seed_everything(0)
    callback = InfluenceCallback(num_worst=2, top_k=3, verbose=False, strict=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=tmp_path)  # without a logger the callback writes there
    model = TinyDigitsModel()
    trainer.fit(model, datamodule=TinyDigitsData())
    assert callback.analysed and next(model.parameters()).is_cuda
    assert devices == {"s_test": {"cuda"}, "scores": {"cuda"}}
    explanation = callback.last_explanation
    info = explanation.solver
    assert info.curvature == "gauss_newton" and info.converged == (info.residual <= info.residual_tol)
    values = [i.influence for p in explanation.points for i in p.harmful + p.helpful]
    assert len(values) == 2 * 2 * 3 and all(math.isfinite(v) for v in values)
