"""InfluenceCallback end to end on one process: TensorBoard events, JSON, agreement with the core, errors."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import digits
from helpers.lightning_models import TinyDigitsModel, read_events, tiny_datasets
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import lightning_influence as li
from lightning_influence import InfluenceCallback
from lightning_influence.reporting import load_full_scores


def _trainer(tmp_path, callback, epochs=2, **kwargs):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[callback] if callback else [], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, **kwargs,
    )


def _fit(tmp_path, callback, epochs=2, seed=0):
    pl.seed_everything(seed)
    train, val = tiny_datasets()
    model = TinyDigitsModel()
    trainer = _trainer(tmp_path, callback, epochs)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=25))
    return trainer, model


def test_fit_writes_tensorboard_and_json_that_match_the_core(tmp_path):
    callback = InfluenceCallback(num_worst=3, top_k=4, solver="exact", damping=0.05, every_n_epochs=1, verbose=False)
    trainer, model = _fit(tmp_path, callback)
    log_dir = trainer.logger.log_dir

    # one analysis per epoch; the fit-end one is skipped because the last validation saw the same weights
    assert [(e["epoch"], e["stage"]) for e in callback.analysed] == [(0, "validation"), (1, "validation")]
    events = read_events(log_dir)
    tags = events.Tags()
    image_tags = sorted(t for t in tags["images"] if t.startswith("influence/"))
    explained = [i for e in callback.analysed for i in e["val_indices"]]  # the worst points may change per epoch
    assert image_tags == sorted({f"influence/val_{i}/examples" for i in explained})
    for tag in image_tags:
        assert len(events.Images(tag)) == explained.count(int(tag.split("_")[1].split("/")[0]))
    text_tags = [t for t in tags["tensors"] if t.startswith("influence/")]
    assert "influence/summary/text_summary" in text_tags
    assert len(events.Tensors("influence/summary/text_summary")) == 2  # one per analysis, stepped by global step
    assert any(t.startswith("influence/") for t in tags["histograms"])
    assert "influence/time/s_test_seconds" in tags["scalars"]

    with open(f"{log_dir}/influence/epoch=1.json") as handle:
        record = json.load(handle)
    assert record["epoch"] == 1 and record["stage"] == "validation" and record["train_size"] == 240
    assert record["solver"]["solver"] == "exact" and record["solver"]["damping"] == 0.05
    assert len(record["points"]) == 3

    # the same numbers from the functional API on the final model, training data in dataset order
    train, val = tiny_datasets()
    chosen = [p["val_index"] for p in record["points"]]
    test_batch = val[chosen]
    # (the analysis averages over the default weight snapshots: one, after epoch 0 of 2)
    snapshots = [snapshot for _, snapshot in callback.snapshots.taken]
    assert len(snapshots) == 1
    scores = li.influence(model, lambda m, b: m.per_example_loss(b), DataLoader(train, batch_size=64), test_batch,
                          solver="exact", damping=0.05, snapshots=snapshots)
    for row, point in enumerate(record["points"]):
        assert [i for i, _ in point["harmful"]] == scores[row].topk(4).indices.tolist()
        assert [i for i, _ in point["helpful"]] == scores[row].topk(4, largest=False).indices.tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in point["harmful"]]), scores[row].topk(4).values,
                                   rtol=1e-4, atol=1e-6)
    # the worst points really are the highest-loss validation examples
    with torch.no_grad():
        losses = model.per_example_loss(val[:])
    assert set(chosen) == set(losses.topk(3).indices.tolist())


@pytest.mark.parametrize("damping", [0.1, "self_check"])  # "self_check" retrains the model in place, then restores it
def test_analysis_leaves_training_bit_identical(tmp_path, damping):
    callback = InfluenceCallback(num_worst=2, top_k=2, solver=li.LissaConfig(depth=20, batch_size=16),
                                 every_n_epochs=1, damping=damping, analyse_on_train_end=False, verbose=False)
    _, with_callback = _fit(tmp_path / "a", callback, epochs=3)
    _, without = _fit(tmp_path / "b", None, epochs=3)
    assert len(callback.analysed) == 3
    for (name, a), (_, b) in zip(with_callback.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name


def test_validate_analyses_and_sanity_check_does_not(tmp_path):
    callback = InfluenceCallback(val_indices=[0, 5], top_k=3, solver="cg", damping=1.0, analyse_on_train_end=False,
                                 verbose=False)
    train, val = tiny_datasets()
    model = TinyDigitsModel()
    trainer = _trainer(tmp_path, callback, epochs=1, num_sanity_val_steps=2)
    trainer.fit(model, DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))
    assert callback.analysed == []  # sanity check and plain validation during fit: nothing
    trainer.validate(model, DataLoader(val, batch_size=25), verbose=False)
    assert [e["stage"] for e in callback.analysed] == ["validate"]
    assert callback.analysed[0]["val_indices"] == [0, 5]
    assert {p.val_index for p in callback.last_explanation.points} == {0, 5}


def test_state_dict_round_trip_prevents_repeating_an_analysis(tmp_path):
    callback = InfluenceCallback(num_worst=1, top_k=1, solver="cg", damping=1.0, verbose=False)
    _fit(tmp_path, callback, epochs=1)
    state = callback.state_dict()
    assert json.loads(json.dumps(state)) == state
    restored = InfluenceCallback(num_worst=1, top_k=1, solver="cg", damping=1.0, verbose=False)
    restored.load_state_dict(state)
    assert restored.analysed == callback.analysed
    assert restored._already_done(callback.analysed[0]["global_step"])


def test_missing_loss_function_explains_both_fixes(tmp_path):
    train, val = tiny_datasets()
    trainer = _trainer(tmp_path, InfluenceCallback(), epochs=1)
    with pytest.raises(MisconfigurationException, match=r"loss_fn=.*per_example_loss"):
        trainer.fit(TinyDigitsModel(with_loss_method=False), DataLoader(train, batch_size=32), DataLoader(val))


class _Stream(IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


def test_iterable_training_data_says_to_pass_a_map_style_dataset(tmp_path):
    train, val = tiny_datasets()
    callback = InfluenceCallback(num_worst=1, strict=True, solver="cg", verbose=False)
    trainer = _trainer(tmp_path, callback, epochs=1)
    with pytest.raises(TypeError, match="map-style dataset.*train_dataset="):
        trainer.fit(TinyDigitsModel(), DataLoader(_Stream(train), batch_size=32), DataLoader(val, batch_size=25))


def test_out_of_range_val_indices_warn_and_training_goes_on(tmp_path):
    train, val = tiny_datasets()
    callback = InfluenceCallback(val_indices=[3, 600], solver="cg", verbose=False)
    trainer = _trainer(tmp_path, callback, epochs=1)
    with pytest.warns(UserWarning, match=r"(?s)val_indices.*\[600\].*below 60.*strict=True"):
        trainer.fit(TinyDigitsModel(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))
    assert trainer.state.finished and callback.analysed == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_indices": [1, 1]}, "duplicates"),
        ({"val_indices": [-1]}, "val_indices"),
        ({"num_worst": 0}, "num_worst"),
        ({"solver": "newton"}, "solver"),
        ({"damping": -1}, "damping"),
        ({"depth": 0}, "depth"),
        ({"scoring": "fast"}, "scoring"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        InfluenceCallback(**kwargs)


def test_flat_vector_inputs_get_tables_but_no_images(tmp_path):
    """Non-image data: markdown tables only."""
    x, y = digits(torch.float32)
    train = TensorDataset(x[:120].flatten(1), y[:120])
    val = TensorDataset(x[1500:1520].flatten(1), y[1500:1520])

    class Linear(TinyDigitsModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 10)

    callback = InfluenceCallback(num_worst=2, top_k=2, solver="exact", damping=0.05, verbose=False)
    trainer = _trainer(tmp_path, callback, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Linear(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=10))
    tags = read_events(trainer.logger.log_dir).Tags()
    assert not [t for t in tags["images"] if t.startswith("influence/")]
    assert len([t for t in tags["tensors"] if t.endswith("/table/text_summary")]) == 2


def test_misclassified_only_and_saved_full_scores(tmp_path):
    callback = InfluenceCallback(num_worst=60, top_k=2, solver="exact", damping=0.5, misclassified_only=True,
                                 save_scores=True, verbose=False)
    trainer, model = _fit(tmp_path, callback, epochs=1)
    _, val = tiny_datasets()
    with torch.no_grad():
        wrong = set((model(val[:][0]).argmax(1) != val[:][1]).nonzero().flatten().tolist())
    chosen = callback.analysed[-1]["val_indices"]
    assert wrong and set(chosen) == wrong  # fewer errors than num_worst: all of them, nothing else
    val_indices, scores = load_full_scores(f"{trainer.logger.log_dir}/influence/epoch=0-scores.json")
    assert scores.shape == (len(chosen), 240) and not scores.isnan().any()
    assert val_indices == chosen
    explanation = callback.last_explanation
    for row, point in enumerate(explanation.points):
        top = scores[row].topk(2)
        assert [e.train_index for e in point.harmful] == top.indices.tolist()


def test_mislabel_candidates_are_logged_and_written(tmp_path):
    callback = InfluenceCallback(num_worst=1, top_k=2, solver="cg", damping=1.0, mislabel_candidates=5,
                                 mislabel_rank=8, verbose=False)
    trainer, model = _fit(tmp_path, callback, epochs=1)
    log_dir = trainer.logger.log_dir
    tags = read_events(log_dir).Tags()
    assert "influence/mislabel/examples" in tags["images"]
    assert "influence/mislabel/table/text_summary" in tags["tensors"]
    with open(f"{log_dir}/influence/mislabel_epoch=0.json") as handle:
        record = json.load(handle)
    candidates = record["candidates"]
    assert len(candidates) == 5
    train, _ = tiny_datasets()
    expected = li.self_influence(model, lambda m, b: m.per_example_loss(b), DataLoader(train, batch_size=64),
                                 solver="lowrank", damping=1.0, rank=8)
    assert record["ranking"] == "el2n_separated"  # training signals recorded during the fit order the candidates
    assert record["rankings"]["self_influence"] == expected.topk(5, largest=False).indices.tolist()
    for c in candidates:
        assert c["self_influence"] == pytest.approx(float(expected[c["train_index"]]), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("bar", ["tqdm", "rich", "none"])
def test_progress_task_follows_the_trainer_bar_and_accepts_an_unknown_total(bar, capsys, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lightning_influence.callbacks import progress
    from lightning_influence.callbacks.progress import progress_task

    monkeypatch.setattr(progress, "_is_terminal", lambda: True)  # bars are for terminals (else: log lines)

    callbacks = {"tqdm": [TQDMProgressBar()], "rich": [RichProgressBar()], "none": []}[bar]
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=callbacks, enable_progress_bar=bar != "none",
                         enable_checkpointing=False, enable_model_summary=False)
    for total in (5, None):
        with progress_task(trainer, "influence: scoring", total) as advance:
            for _ in range(5):
                advance(1)
    err = capsys.readouterr().err
    if bar == "tqdm":
        assert "influence: scoring" in err and "0/5" in err and "0it" in err  # a bar with an end, then a counter


def test_two_callbacks_in_one_trainer_keep_their_own_checkpoint_state():
    from lightning.pytorch.trainer.call import _call_callbacks_load_state_dict, _call_callbacks_state_dict

    worst, chosen = InfluenceCallback(num_worst=4), InfluenceCallback(val_indices=[1, 2])
    assert worst.state_key != chosen.state_key
    worst.analysed.append({"epoch": 0, "global_step": 5, "stage": "fit_end", "val_indices": [7]})
    trainer = pl.Trainer(callbacks=[worst, chosen], logger=False, enable_progress_bar=False)
    state = _call_callbacks_state_dict(trainer)
    assert set(state) >= {worst.state_key, chosen.state_key}
    restored_worst, restored_chosen = InfluenceCallback(num_worst=4), InfluenceCallback(val_indices=[1, 2])
    fresh = pl.Trainer(callbacks=[restored_worst, restored_chosen], logger=False, enable_progress_bar=False)
    _call_callbacks_load_state_dict(fresh, {"callbacks": state})
    assert restored_worst.analysed == worst.analysed and restored_chosen.analysed == []


def test_old_solver_keywords_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"solver=LissaConfig\(depth=50, repeats=2\)"):
        callback = InfluenceCallback(depth=50, repeats=2)
    assert callback.solver_config == li.LissaConfig(depth=50, repeats=2)
    with pytest.warns(DeprecationWarning, match="num_candidates"):
        assert InfluenceCallback(candidates=5).settings.num_candidates == 5
    with pytest.raises(MisconfigurationException, match="unexpected keyword"):
        InfluenceCallback(detph=50)


def test_a_scalar_loss_is_reported_before_training(tmp_path):
    callback = InfluenceCallback(loss_fn=lambda module, batch: F.cross_entropy(module(batch[0]), batch[1]),
                                 verbose=False)
    train, val = tiny_datasets()
    trainer = _trainer(tmp_path, callback, epochs=1)
    with pytest.raises(MisconfigurationException, match="reduction='none'"):
        trainer.fit(TinyDigitsModel(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))
    assert trainer.global_step == 0  # not one training step was spent


def test_a_model_without_trainable_parameters_gets_our_message(tmp_path):
    model = TinyDigitsModel()
    model.requires_grad_(False)
    trainer = _trainer(tmp_path, InfluenceCallback(verbose=False), epochs=1)
    train, val = tiny_datasets()
    with pytest.raises(MisconfigurationException, match="has none .*Unfreeze"):
        trainer.fit(model, DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))


def test_a_lambda_loss_under_ddp_spawn_is_refused_in_setup_with_what_to_write():
    callback = InfluenceCallback(loss_fn=lambda module, batch: module.per_example_loss(batch), verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False)
    with pytest.raises(MisconfigurationException, match="picklable .*per_example_loss.*import path"):
        callback.setup(trainer, TinyDigitsModel(), "fit")


def test_validate_right_after_fit_does_not_repeat_the_analysis(tmp_path):
    callback = InfluenceCallback(num_worst=1, top_k=2, solver="cg", damping=1.0, verbose=False)
    trainer, model = _fit(tmp_path, callback, epochs=2)
    assert [(e["stage"], e["epoch"]) for e in callback.analysed] == [("fit_end", 1)]
    _, val = tiny_datasets()
    trainer.validate(model, DataLoader(val, batch_size=25), verbose=False)
    assert [(e["stage"], e["epoch"]) for e in callback.analysed] == [("fit_end", 1)]  # same weights: skipped


def test_fast_dev_run_and_sanity_check_are_skipped_like_lightning_callbacks(tmp_path):
    callback = InfluenceCallback(num_worst=1, top_k=1, solver="cg", damping=1.0, every_n_epochs=1, verbose=False)
    train, val = tiny_datasets()
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(TinyDigitsModel(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))
    assert callback.analysed == []  # a smoke test of the loop: no analysis (ModelCheckpoint skips it too)
    assert li.callbacks.base.should_skip_analysis(trainer)


def test_problem_config_reaches_the_callback_and_flat_arguments_beside_it_are_refused(tmp_path):
    setup = li.ProblemConfig(solver="cg", damping=1.0, parameters=["net.3"])
    callback = InfluenceCallback(num_worst=1, top_k=2, problem=setup, verbose=False)
    _fit(tmp_path, callback, epochs=1)
    solver = callback.last_explanation.solver
    assert (solver.solver, solver.damping) == ("cg", 1.0)
    with pytest.raises(MisconfigurationException, match=r"\['damping'\] beside `problem`"):
        InfluenceCallback(problem=setup, damping=0.5)


def test_default_damping_is_chosen_by_the_self_check_once_per_fit_and_reported(tmp_path):
    callback = InfluenceCallback(num_worst=3, top_k=4, every_n_epochs=1, analyse_on_train_end=False, verbose=False)
    trainer, model = _fit(tmp_path, callback, epochs=2)
    check = callback.damping_check
    assert check is not None and check.epoch == 0  # chosen at the first analysis, reused by the second
    assert check.candidates == li.config.SELF_CHECK_CANDIDATES
    assert check.retrainings == li.config.SELF_CHECK_RETRAININGS and check.epochs == 1  # half of 1 epoch, at least 1
    finite = [v for v in check.lds if v == v]
    assert finite and check.lds[check.candidates.index(check.chosen)] == max(finite)
    solver = callback.last_explanation.solver
    assert solver.damping == check.chosen and solver.damping_requested == "self_check"
    assert solver.damping_rule.startswith("self_check at epoch 0") and solver.converged
    with open(f"{trainer.logger.log_dir}/influence/epoch=1.json") as handle:
        written = json.load(handle)["solver"]
    assert written["damping"] == check.chosen
    assert written["damping_check"]["lds"] == pytest.approx(list(check.lds), nan_ok=True)
