"""InfluenceCallback end to end on one process: TensorBoard events, JSON, agreement with the core, errors."""

from __future__ import annotations

import glob
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import digits
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import lightning_influence as li
from lightning_influence import InfluenceCallback
from lightning_influence.reporting import load_full_scores


class TinyDigits(pl.LightningModule):
    def __init__(self, with_loss_method: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(64, 10))
        if not with_loss_method:
            self.per_example_loss = None

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)


def _data():
    x, y = digits(torch.float32)
    train = TensorDataset(x[:240], y[:240])
    val = TensorDataset(x[1500:1560], y[1500:1560])
    return train, val


def _trainer(tmp_path, callback, epochs=2, **kwargs):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[callback] if callback else [], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, **kwargs,
    )


def _fit(tmp_path, callback, epochs=2, seed=0):
    pl.seed_everything(seed)
    train, val = _data()
    model = TinyDigits()
    trainer = _trainer(tmp_path, callback, epochs)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=25))
    return trainer, model


def _events(log_dir):
    accumulator = EventAccumulator(glob.glob(f"{log_dir}/events.*")[0],
                                   size_guidance={"images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_fit_writes_tensorboard_and_json_that_match_the_core(tmp_path):
    callback = InfluenceCallback(num_worst=3, top_k=4, solver="exact", damping=0.05, every_n_epochs=1, verbose=False)
    trainer, model = _fit(tmp_path, callback)
    log_dir = trainer.logger.log_dir

    # one analysis per epoch; the fit-end one is skipped because the last validation saw the same weights
    assert [(e["epoch"], e["stage"]) for e in callback.analysed] == [(0, "validation"), (1, "validation")]
    events = _events(log_dir)
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
    train, val = _data()
    chosen = [p["val_index"] for p in record["points"]]
    test_batch = val[chosen]
    scores = li.influence(model, lambda m, b: m.per_example_loss(b), DataLoader(train, batch_size=64), test_batch,
                          solver="exact", damping=0.05)
    for row, point in enumerate(record["points"]):
        assert [i for i, _ in point["harmful"]] == scores[row].topk(4).indices.tolist()
        assert [i for i, _ in point["helpful"]] == scores[row].topk(4, largest=False).indices.tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in point["harmful"]]), scores[row].topk(4).values,
                                   rtol=1e-4, atol=1e-6)
    # the worst points really are the highest-loss validation examples
    with torch.no_grad():
        losses = model.per_example_loss(val[:])
    assert set(chosen) == set(losses.topk(3).indices.tolist())


def test_analysis_leaves_training_bit_identical(tmp_path):
    callback = InfluenceCallback(num_worst=2, top_k=2, depth=20, batch_size=16, every_n_epochs=1, damping=0.1,
                                 analyse_on_train_end=False, verbose=False)
    _, with_callback = _fit(tmp_path / "a", callback, epochs=3)
    _, without = _fit(tmp_path / "b", None, epochs=3)
    assert len(callback.analysed) == 3
    for (name, a), (_, b) in zip(with_callback.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name


def test_validate_analyses_and_sanity_check_does_not(tmp_path):
    callback = InfluenceCallback(val_indices=[0, 5], top_k=3, solver="cg", damping=1.0, analyse_on_train_end=False,
                                 verbose=False)
    train, val = _data()
    model = TinyDigits()
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
    assert restored._already_done(callback.analysed[0]["global_step"], "fit_end")


def test_missing_loss_function_explains_both_fixes(tmp_path):
    train, val = _data()
    trainer = _trainer(tmp_path, InfluenceCallback(), epochs=1)
    with pytest.raises(MisconfigurationException, match=r"loss_fn=.*per_example_loss"):
        trainer.fit(TinyDigits(with_loss_method=False), DataLoader(train, batch_size=32), DataLoader(val))


class _Stream(IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


def test_iterable_training_data_says_to_pass_a_map_style_dataset(tmp_path):
    train, val = _data()
    callback = InfluenceCallback(num_worst=1, strict=True, solver="cg", verbose=False)
    trainer = _trainer(tmp_path, callback, epochs=1)
    with pytest.raises(TypeError, match="map-style dataset.*train_dataset="):
        trainer.fit(TinyDigits(), DataLoader(_Stream(train), batch_size=32), DataLoader(val, batch_size=25))


def test_out_of_range_val_indices_warn_and_training_goes_on(tmp_path):
    train, val = _data()
    callback = InfluenceCallback(val_indices=[3, 600], solver="cg", verbose=False)
    trainer = _trainer(tmp_path, callback, epochs=1)
    with pytest.warns(UserWarning, match=r"(?s)val_indices.*\[600\].*below 60.*strict=True"):
        trainer.fit(TinyDigits(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))
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

    class Linear(TinyDigits):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 10)

    callback = InfluenceCallback(num_worst=2, top_k=2, solver="exact", damping=0.05, verbose=False)
    trainer = _trainer(tmp_path, callback, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Linear(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=10))
    tags = _events(trainer.logger.log_dir).Tags()
    assert not [t for t in tags["images"] if t.startswith("influence/")]
    assert len([t for t in tags["tensors"] if t.endswith("/table/text_summary")]) == 2


def test_misclassified_only_and_saved_full_scores(tmp_path):
    callback = InfluenceCallback(num_worst=60, top_k=2, solver="exact", damping=0.5, misclassified_only=True,
                                 save_scores=True, verbose=False)
    trainer, model = _fit(tmp_path, callback, epochs=1)
    _, val = _data()
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
    tags = _events(log_dir).Tags()
    assert "influence/mislabel/examples" in tags["images"]
    assert "influence/mislabel/table/text_summary" in tags["tensors"]
    with open(f"{log_dir}/influence/mislabel_epoch=0.json") as handle:
        record = json.load(handle)
    candidates = record["candidates"]
    assert len(candidates) == 5
    train, _ = _data()
    expected = li.self_influence(model, lambda m, b: m.per_example_loss(b), DataLoader(train, batch_size=64),
                                 solver="lowrank", damping=1.0, rank=8)
    assert [c["train_index"] for c in candidates] == expected.topk(5, largest=False).indices.tolist()


@pytest.mark.parametrize("bar", ["tqdm", "rich", "none"])
def test_progress_task_follows_the_trainer_bar_and_accepts_an_unknown_total(bar, capsys):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lightning_influence.callbacks.progress import progress_task

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
