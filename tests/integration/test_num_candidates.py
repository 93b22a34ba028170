"""Every entry point rejects a bad ``num_candidates`` with the one message of ``config.check_num_candidates``:
the functional API, the callback (when built, and before training for a count above the training-set size),
``correct_errors`` and the command line."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from helpers import LogisticRegression, cross_entropy_per_example, digits, loader
from helpers.lightning_models import TinyDigitsData, TinyDigitsModel
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.cli import main

#: The rejection of a value that is not None or a positive int, and of one above the training-set size.
NOT_A_COUNT = r"Expected `num_candidates` to be None or a positive int \(the nearest training examples scored per test" \
              r" point\), but got 0\. Pass a count such as num_candidates=100, or num_candidates=None to score every"
TOO_MANY = r"Expected `num_candidates` to be at most the training-set size {n}, but got {k}\. Pass a smaller count"
N_TRAIN = 60  # TinyDigitsData's training set below


def _quiet_trainer(**kwargs):
    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_the_functional_api_rejects_a_bad_count():
    torch.manual_seed(0)
    x, y = digits()
    model = LogisticRegression().double()
    for function in (li.influence, li.top_influences):
        with pytest.raises(ValueError, match=NOT_A_COUNT):
            function(model, cross_entropy_per_example, loader(x[:40], y[:40]), (x[40:42], y[40:42]), solver="exact",
                     num_candidates=0)
    with pytest.raises(ValueError, match=TOO_MANY.format(n=40, k=41)):
        li.influence(model, cross_entropy_per_example, loader(x[:40], y[:40]), (x[40:42], y[40:42]), solver="exact",
                     damping=1.0, num_candidates=41, preselect="always")


def test_the_callback_rejects_a_bad_count_when_built_and_a_too_large_one_before_training():
    with pytest.raises(MisconfigurationException, match=NOT_A_COUNT):
        li.InfluenceCallback(num_candidates=0)
    model = TinyDigitsModel()
    weights = [p.detach().clone() for p in model.parameters()]
    too_many = li.InfluenceCallback(num_candidates=N_TRAIN + 1, solver="exact", verbose=False)
    with pytest.raises(MisconfigurationException, match=TOO_MANY.format(n=N_TRAIN, k=N_TRAIN + 1)):
        _quiet_trainer(callbacks=[too_many]).fit(model, datamodule=TinyDigitsData(n_train=N_TRAIN, n_val=10))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # no training step was spent


def test_correct_errors_rejects_a_bad_count():
    x, y = digits(torch.float32)
    train, anchors = TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[100:104], y[100:104])
    options = {"train_dataloaders": DataLoader(train, batch_size=20), "solver": "exact", "damping": 1.0,
               "iterations": 1, "verbose": False}
    with pytest.raises(ValueError, match=NOT_A_COUNT):
        li.correct_errors(_quiet_trainer(), TinyDigitsModel(), anchors, num_candidates=0, **options)
    with pytest.raises(ValueError, match=TOO_MANY.format(n=N_TRAIN, k=N_TRAIN + 1)):
        li.correct_errors(_quiet_trainer(), TinyDigitsModel(), anchors, num_candidates=N_TRAIN + 1, **options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    pl.seed_everything(0)
    trainer = _quiet_trainer()
    trainer.fit(TinyDigitsModel(), datamodule=TinyDigitsData(n_train=N_TRAIN, n_val=10))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(("count", "expected"), [(0, NOT_A_COUNT), (N_TRAIN + 1, TOO_MANY.format(n=N_TRAIN, k=N_TRAIN + 1))],
                         ids=["zero", "above-the-training-set"])
def test_the_command_line_rejects_a_bad_count(checkpoint, tmp_path, capsys, count, expected):
    status = main(["influence", str(checkpoint), "--model", "helpers.lightning_models:TinyDigitsModel",
                   "--datamodule", "helpers.lightning_models:TinyDigitsData", "--datamodule-args",
                   f'{{"n_train": {N_TRAIN}, "n_val": 10}}', "--solver", "exact", "--damping", "0.5",
                   "--num-candidates", str(count), "--output-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("lightning-influence influence: error: Expected `num_candidates`"), err
    assert re.search(expected, err), err
    assert not (tmp_path / "out" / "influence").exists()  # rejected before the analysis wrote anything
