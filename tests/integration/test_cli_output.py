"""What a new user reads from `lightning-influence` tells the truth (#27): verify-loo's check and its figures,
correct's JSON, the notes, hints and errors, the console table at 80 columns, 1-based ranks, threads."""

from __future__ import annotations

import json
import math
import re
from argparse import Namespace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning_models import TinyDigitsData, TinyDigitsModel
from rich.console import Console

from lightning_influence.cli import main
from lightning_influence.cli.retraining import correction_verdict
from lightning_influence.cli.threads import choose_threads, idle_cores
from lightning_influence.reporting.console import mislabel_table
from lightning_influence.reporting.relabel import relabel_rows
from lightning_influence.results import CorrectionReport, Metrics, MislabelCandidate, MislabelReport, SolveInfo

MODEL = ["--model", "helpers.lightning_models:TinyDigitsModel", "--datamodule", "helpers.lightning_models:TinyDigitsData"]


class NaNTrainData(TinyDigitsData):
    """TinyDigitsData with a NaN pixel in training example 7."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        x, y = self.train_set.tensors
        x = x.clone()  # the digits tensors are shared by every test
        x[7, 0, 3, 3] = math.nan
        self.train_set = type(self.train_set)(x, y)


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint where Lightning puts one: ``<run>/checkpoints/tiny.ckpt``."""
    path = tmp_path_factory.mktemp("run") / "version_0" / "checkpoints" / "tiny.ckpt"
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyDigitsModel(), datamodule=TinyDigitsData())
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    return path


def test_verify_loo_reports_a_check_a_user_can_believe(run_checkpoint, tmp_path, capsys):
    assert main(["verify-loo", str(run_checkpoint), *MODEL, "--num-points", "5", "--steps", "20", "--damping", "0.5",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = (tmp_path / "influence").glob("loo_epoch=*.json")
    record = json.loads(path.read_text())
    assert record["damping"] == record["l2"] == 0.5  # the retraining objective's curvature is the prediction's
    assert record["l2_towards_zero"] == pytest.approx(1e-3) and record["weight_decay"] == pytest.approx(1e-3)
    predicted, actual = torch.tensor(record["predicted_loss_change"]), torch.tensor(record["actual_loss_change"])
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    assert record["slope"] == pytest.approx(slope)
    assert record["sign_agreement"] == pytest.approx(float((predicted.sign() == actual.sign()).double().mean()))
    assert record["baseline_change"] == pytest.approx(record["base_test_loss"] - record["start_test_loss"])
    assert record["resolved"] is True and record["last_step_change"] < 0.1 * record["median_abs_predicted"]
    assert len(record["steps_run"]) == 6 and max(record["steps_run"]) <= 20
    # float64 and the mostly proximal L2: the retraining measures the removals, and they agree with the predictions
    assert record["pearson"] > 0.9 and record["sign_agreement"] == 1.0 and 0.5 < record["slope"] < 2.0
    assert re.search(r"Pearson 0\.\d\d?,", out) and "slope" in out and "signs agree 5/5" in out
    assert "Baseline (nothing removed" in out and "Resolved" in out
    assert not re.search(r"\d\.\d{6,}", out.split("Results:")[0])  # rounded figures only


def test_verify_loo_reports_the_number_behind_auto_damping(run_checkpoint, tmp_path, capsys):
    assert main(["verify-loo", str(run_checkpoint), *MODEL, "--num-points", "3", "--steps", "5",
                 "--output-dir", str(tmp_path)]) == 0
    record = json.loads(next((tmp_path / "influence").glob("loo_epoch=*.json")).read_text())
    assert record["damping_requested"] == "auto" and isinstance(record["damping"], float) and record["damping"] > 0
    assert record["l2"] == record["damping"] and f"damping {record['damping']:.3g}" in capsys.readouterr().out


def test_verify_loo_says_when_the_retraining_has_not_settled(run_checkpoint, tmp_path, capsys):
    assert main(["verify-loo", str(run_checkpoint), *MODEL, "--num-points", "3", "--steps", "1", "--l2", "0",
                 "--damping", "0.5", "--output-dir", str(tmp_path), "--quiet"]) == 0
    record = json.loads(next((tmp_path / "influence").glob("loo_epoch=*.json")).read_text())
    out = capsys.readouterr().out
    assert record["resolved"] is False and "Not resolved" in out and "Raise --steps" in out


def test_a_nan_training_input_is_named_before_the_analysis(run_checkpoint, tmp_path, capsys):
    argv = [str(run_checkpoint), "--model", "helpers.lightning_models:TinyDigitsModel", "--datamodule",
            "test_cli_output:NaNTrainData", "--output-dir", str(tmp_path)]
    assert main(["influence", *argv]) == 2
    err = capsys.readouterr().err
    assert "dataset indices 7 (nan)" in err and "validation" not in err
    assert main(["mislabel", *argv]) == 2 and "dataset indices 7" in capsys.readouterr().err


def test_fewer_points_than_asked_are_explained_with_a_word_and_the_hint_names_the_run(run_checkpoint, capsys):
    assert main(["influence", str(run_checkpoint), *MODEL, "--solver", "exact", "--damping", "0.5", "--num-worst",
                 "100", "--misclassified-only", "--top-k", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads(next((run_checkpoint.parent / "tiny-influence" / "influence").glob("epoch=*.json")).read_text())
    explained = len(report["points"])
    assert explained < 100
    assert f"Explained {explained} of the 100 validation points asked for" in out and "misclassified" in out
    run = run_checkpoint.parent.parent
    assert f"tensorboard --logdir {run}" in out and "checkpoints/tiny-influence" in out  # the run and the analysis


def test_correct_says_when_it_fixed_nothing_and_what_to_change():
    before = {"anchors": Metrics(2.0, 0.0, 10), "heldout": Metrics(2.1, 0.0, 10), "val": Metrics(0.1, 0.977, 400)}
    after = {"anchors": Metrics(1.9, 0.0, 10), "heldout": Metrics(2.0, 0.0, 10), "val": Metrics(0.1, 0.975, 400)}
    from lightning_influence.results import CorrectionIteration

    step = CorrectionIteration(1, (3, 5), (1, 2), (-0.1, -0.2), 2.0, 1.9, after, 1.0, 0.02, 0.01, True)
    report = CorrectionReport("helpful", {}, before, (step,))
    args = Namespace(iterations=10, steps_per_iteration=1, lr=0.01, optimizer="sgd", examples_per_iteration=10)
    text = correction_verdict(report, args)
    assert text.startswith("Nothing fixed") and "heldout 0.000 -> 0.000" in text and "val 0.977 -> 0.975" in text
    assert "--lr" in text and "--selection random" in text
    assert "each on 10 chosen training example(s)." in text and "--anchor-label" not in text  # the anchors stayed wrong
    fitted_anchors = {**after, "anchors": Metrics(0.5, 1.0, 10)}
    text = correction_verdict(CorrectionReport("influence", {}, before, (step,)), args)
    assert "each on the round's 2 sampled anchors." in text
    text = correction_verdict(CorrectionReport("anchors+helpful", {}, before, (step.__class__(
        *[getattr(step, f) for f in ("iteration", "anchor_indices", "chosen_indices", "chosen_influence",
                                     "anchor_loss_before", "anchor_loss_after")], fitted_anchors, 1.0),)), args)
    assert "each on 10 chosen training example(s) and the round's 2 sampled anchors." in text
    assert "--anchor-label or --anchor-indices" in text
    fixed = {**after, "heldout": Metrics(1.0, 0.5, 10)}
    assert correction_verdict(CorrectionReport("helpful", {}, before, (step.__class__(
        *[getattr(step, f) for f in ("iteration", "anchor_indices", "chosen_indices", "chosen_influence",
                                     "anchor_loss_before", "anchor_loss_after")], fixed, 1.0),)), args) == ""


def _mislabel_report(signals: bool) -> MislabelReport:
    candidates = tuple(MislabelCandidate(train_index=1000 + i, self_influence=-1.6543 * (i + 1), loss=2.0 - 0.1 * i,
                                         loss_rank=i, label=i, prediction=i + 1, score=0.93 if signals else None,
                                         suggested_label=3 if signals else None) for i in range(3))
    solver = SolveInfo("lowrank", damping=0.0261, converged=True, seconds=0.2, settings={"rank": 8})
    return MislabelReport(1, 10, 1400, candidates, solver, 0.3, ranking="self_influence",
                          signals={"epochs": [1], "seconds": 1.0, "default": "x"} if signals else None)


@pytest.mark.parametrize("signals", [False, True])
def test_the_mislabel_table_never_cuts_its_numbers_at_80_columns(signals):
    console = Console(width=80, record=True)
    console.print(mislabel_table(_mislabel_report(signals)))
    text = console.export_text()
    assert all(value in text for value in ("-1.65e+00", "-3.31e+00", "-4.96e+00")) and "…" not in text


def test_relabel_ranks_are_one_based_like_the_console():
    from lightning_influence.reporting import mislabel_to_dict

    report = mislabel_to_dict(_mislabel_report(False))
    rows = relabel_rows(report)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["loss_rank"] for r in rows] == [c["loss_rank"] + 1 for c in report["candidates"]] == [1, 2, 3]


def test_threads_auto_leaves_busy_cores_alone_and_explicit_choices_win(monkeypatch):
    assert idle_cores(2, 0.4) == 2 and idle_cores(2, 1.6) == 1 and idle_cores(2, 6.0) == 1 and idle_cores(8, None) == 8
    assert choose_threads(3, {"OMP_NUM_THREADS": "1"})[0] == 3
    assert choose_threads("auto", {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    monkeypatch.setattr("lightning_influence.cli.threads.usable_cores", lambda: 4)
    assert choose_threads("auto", {}, load=1.2)[0] == 3


def test_the_threads_flag_sets_torchs_threads(run_checkpoint, tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["export", "x.json"]) == 2  # export has no --threads: nothing set
        assert torch.get_num_threads() == before
        assert main(["influence", str(run_checkpoint), *MODEL, "--solver", "exact", "--damping", "0.5", "--num-worst",
                     "1", "--threads", "2", "--output-dir", str(tmp_path), "--quiet"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
