"""MislabelCallback: the mislabel analysis in a callback of its own gives the report of the deprecated
``InfluenceCallback(num_worst=0, mislabel_candidates=...)``, whose warning names it; it skips a fast_dev_run and
checks its arguments."""

from __future__ import annotations

import json
import warnings

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
    with pytest.warns(FutureWarning, match="MislabelCallback"):
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


def _outputs(module, batch):
    return module(batch[0]), batch[1]


def test_the_influence_callback_mislabel_arguments_warn_once_and_name_the_replacement():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the explanation alone, or with MislabelCallback: no warning
        InfluenceCallback(num_worst=2)
        MislabelCallback(candidates=10)
    with pytest.warns(FutureWarning) as caught:
        embedded = InfluenceCallback(num_worst=0, mislabel_candidates=10, mislabel_rank=8, signal_checkpoints=3,
                                     signals_outputs_fn=_outputs, verbose=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    replacement = "MislabelCallback(candidates=10, rank=8, signal_checkpoints=3, signals_outputs_fn=_outputs)"
    assert f"pass `{replacement}` to the Trainer instead" in message
    assert message.startswith("InfluenceCallback's mislabel arguments (mislabel_candidates, mislabel_rank,")
    assert caught[0].filename == __file__  # points at the user's line
    # the named replacement configures the same analysis
    replaced = MislabelCallback(candidates=10, rank=8, signal_checkpoints=3, signals_outputs_fn=_outputs)
    ours, theirs = replaced.analysis, embedded.mislabel
    assert (ours.count, ours.config, ours.signals.checkpoints, ours.signals.outputs_fn) == (
        theirs.count, theirs.config, theirs.signals.checkpoints, theirs.signals.outputs_fn)
    with pytest.warns(FutureWarning, match="training_signals=False"):  # any of them warns, even with the analysis off
        assert not InfluenceCallback(num_worst=2, training_signals=False).mislabel.enabled
    with pytest.warns(FutureWarning), pytest.raises(MisconfigurationException, match="`mislabel_rank`"):
        InfluenceCallback(mislabel_candidates=5, mislabel_rank=0)
