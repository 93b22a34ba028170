"""MislabelCallback: the mislabel analysis in a callback of its own gives the report of
``InfluenceCallback(num_worst=0, mislabel_candidates=...)``, skips a fast_dev_run, and checks its arguments."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
from helpers.lightning_models import TinyDigitsModel, tiny_datasets
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_influence import InfluenceCallback, MislabelCallback


def _fit(root, callback, name, **trainer_args):
    pl.seed_everything(0)
    train, val = tiny_datasets()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name=name), callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         **({"max_epochs": 4} | trainer_args))
    trainer.fit(TinyDigitsModel(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=25))
    return trainer


def test_the_mislabel_callback_reports_what_the_influence_callback_reports(tmp_path):
    own = MislabelCallback(candidates=10, rank=8, signal_checkpoints=3, verbose=False)
    trainer = _fit(tmp_path, own, "own")
    embedded = InfluenceCallback(num_worst=0, mislabel_candidates=10, mislabel_rank=8, signal_checkpoints=3,
                                 verbose=False)
    _fit(tmp_path, embedded, "embedded")
    ours, theirs = own.last_report, embedded.last_mislabel
    assert [c.train_index for c in ours.candidates] == [c.train_index for c in theirs.candidates]
    assert ours.ranking == theirs.ranking and len(ours.candidates) == 10
    written = json.loads((tmp_path / "own" / "version_0" / "influence" / "mislabel_epoch=3.json").read_text())
    assert [c["train_index"] for c in written["candidates"]] == [c.train_index for c in ours.candidates]
    assert own.reported == [{"epoch": 3, "global_step": trainer.global_step}]
    assert own.state_dict()["reported"] == own.reported


def test_fast_dev_run_reports_nothing_and_bad_arguments_are_named(tmp_path):
    callback = MislabelCallback(candidates=5, rank=4, verbose=False)
    _fit(tmp_path, callback, "smoke", fast_dev_run=True)
    assert callback.reported == [] and callback.last_report is None
    for bad, name in (({"candidates": 0}, "candidates"), ({"candidates": "some"}, "mislabel_candidates"),
                      ({"every_n_epochs": -1}, "every_n_epochs")):
        with pytest.raises(MisconfigurationException, match=name):
            MislabelCallback(**bad)
