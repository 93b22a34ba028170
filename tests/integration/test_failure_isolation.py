"""The analysis never costs the user their run: failures warn (strict raises), writes are atomic, resume keeps
the schedule; plus the callback's trust output (warnings once, leave-one-out option)."""

from __future__ import annotations

import glob
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import digits
from helpers.lightning_models import TinyDigitsModel
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback, LissaConfig
from lightning_influence.reporting import files, save_tensor_atomic, write_json_atomic


def Tiny() -> TinyDigitsModel:  # noqa: N802 - reads like the class it builds
    """A 650-parameter CNN, SGD with weight decay 1e-3."""
    return TinyDigitsModel(channels=4, lr=0.1)


def _loaders():
    x, y = digits(torch.float32)
    return (DataLoader(TensorDataset(x[:160], y[:160]), batch_size=32, shuffle=True),
            DataLoader(TensorDataset(x[1500:1540], y[1500:1540]), batch_size=20))


def _trainer(root, callbacks, epochs=1, logger=True, **kwargs):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
        logger=TensorBoardLogger(root, name="run") if logger else False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs,
    )


def _fit(root, callback, epochs=1, **kwargs):
    pl.seed_everything(0)
    trainer = _trainer(root, [callback], epochs, **kwargs)
    trainer.fit(Tiny(), *_loaders())
    return trainer


def _failing_loss(module, batch):
    raise RuntimeError("boom inside the user's loss")


def test_an_analysis_error_warns_and_training_finishes_strict_raises(tmp_path):
    callback = InfluenceCallback(loss_fn=_failing_loss, solver="cg", every_n_epochs=1, verbose=False)
    with pytest.warns(UserWarning, match=r"(?s)failed and was skipped.*boom.*Training goes on.*strict=True"):
        trainer = _fit(tmp_path / "a", callback, epochs=2)
    assert trainer.state.finished and trainer.current_epoch == 2 and callback.analysed == []
    strict = InfluenceCallback(loss_fn=_failing_loss, solver="cg", strict=True, verbose=False)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path / "b", strict)


def test_an_unwritable_results_directory_warns_before_training_and_skips_writing(tmp_path):
    (tmp_path / "influence").write_text("a file where the results directory should be")
    callback = InfluenceCallback(num_worst=1, top_k=2, solver="cg", damping=1.0, verbose=False)
    with pytest.warns(UserWarning) as record:
        trainer = _fit(tmp_path, callback, logger=False)
    messages = [str(w.message) for w in record]
    assert any("cannot write its results" in m and "default_root_dir" in m for m in messages)  # in setup
    assert any("failed while writing its results" in m for m in messages)  # and at the analysis
    assert trainer.state.finished and len(callback.analysed) == 1
    strict = InfluenceCallback(num_worst=1, top_k=2, solver="cg", damping=1.0, strict=True, verbose=False)
    with pytest.raises(MisconfigurationException, match="cannot write its results"):
        _fit(tmp_path, strict, logger=False)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "epoch=0.json"
    write_json_atomic(target, {"version": 1})
    scores = tmp_path / "epoch=0-scores.pt"
    save_tensor_atomic(scores, torch.arange(4))

    def half_then_fail(obj, handle):
        handle.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(files.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_tensor_atomic(scores, torch.arange(10))
    monkeypatch.setattr(files.os, "replace", lambda *args: (_ for _ in ()).throw(OSError("killed mid-rename")))
    with pytest.raises(OSError, match="killed"):
        write_json_atomic(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 1}
    assert torch.equal(torch.load(scores, weights_only=True), torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-scores.pt", "epoch=0.json"]


def test_resuming_from_a_mid_training_checkpoint_continues_the_analysis_schedule(tmp_path):
    options = {"num_worst": 1, "top_k": 2, "solver": "cg", "damping": 1.0, "every_n_epochs": 1,
               "analyse_on_train_end": False, "verbose": False}
    first = InfluenceCallback(**options)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    pl.seed_everything(0)
    _trainer(tmp_path, [first, checkpoints], epochs=2).fit(Tiny(), *_loaders())
    assert [e["epoch"] for e in first.analysed] == [0, 1]
    after_first_epoch = sorted(glob.glob(str(tmp_path / "ckpt" / "epoch=0*.ckpt")))
    assert len(after_first_epoch) == 1

    resumed = InfluenceCallback(**options)
    trainer = _trainer(tmp_path / "resumed", [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], epochs=3)
    trainer.fit(Tiny(), *_loaders(), ckpt_path=after_first_epoch[0])
    assert [e["epoch"] for e in resumed.analysed] == [0, 1, 2]  # epoch 0 from the checkpoint, not repeated
    steps = [e["global_step"] for e in resumed.analysed]
    assert steps == sorted(set(steps))
    written = sorted(Path(p).name for p in glob.glob(f"{trainer.logger.log_dir}/influence/epoch=*.json"))
    assert written == ["epoch=1.json", "epoch=2.json"]  # the resumed run wrote only the epochs it analysed


def test_trust_warnings_are_logged_once_and_shown_in_tensorboard(tmp_path):
    tiny_lissa = LissaConfig(depth=10, repeats=2, batch_size=4, refine=False)  # unrefined: the repeats make x
    callback = InfluenceCallback(num_worst=1, top_k=3, solver=tiny_lissa, damping=1e-4, every_n_epochs=1,
                                 analyse_on_train_end=False, verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, callback, epochs=2)
    trust = [str(w.message) for w in record if "Influence trust" in str(w.message)]
    assert sum("[small_lissa_batch]" in m for m in trust) == 1  # two analyses, one warning
    assert sum("[damping_below_weight_decay]" in m for m in trust) == 1  # SGD weight_decay=1e-3 read from the trainer
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert len(events.Tensors("influence/trust/warnings/text_summary")) == 2
    point = callback.last_explanation.points[0].val_index
    assert len(events.Scalars(f"influence/trust/val_{point}/repeat_spearman")) == 2
    with open(f"{trainer.logger.log_dir}/influence/epoch=1.json") as handle:
        record = json.load(handle)
    assert {"small_lissa_batch", "damping_below_weight_decay"} <= {w["code"] for w in record["trust"]["warnings"]}


def test_verify_loo_option_writes_predicted_and_actual_loss_changes(tmp_path):
    callback = InfluenceCallback(num_worst=1, top_k=3, solver="cg", damping=1.0, verify_loo=4, verify_loo_steps=3,
                                 strict=True, verbose=False)
    trainer = _fit(tmp_path, callback)
    with open(f"{trainer.logger.log_dir}/influence/loo_epoch=0.json") as handle:
        record = json.load(handle)
    point = callback.last_explanation.points[0]
    influences = {i.train_index: i.influence for i in (*point.harmful, *point.helpful)}
    assert record["val_index"] == point.val_index and record["optimizer"] == "SGD"
    assert len(record["train_indices"]) == 4
    assert [abs(influences[i]) for i in record["train_indices"]] == sorted(
        (abs(v) for v in influences.values()), reverse=True)[:4]
    assert record["predicted_loss_change"] == pytest.approx([-influences[i] / 160 for i in record["train_indices"]])
    assert all(a != 0 for a in record["actual_loss_change"])  # removing an example changed the retrained loss
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars("influence/trust/loo_spearman")[0].value == pytest.approx(record["spearman"])
    with pytest.raises(MisconfigurationException, match="verify_loo"):
        InfluenceCallback(top_k=2, verify_loo=5)
