"""InfluenceCallback's mislabel analysis with training signals: recorded at the scheduled epochs, kept across a
resume, a mislabel-only mode, planted flips ranked high on the defaults, and the relabel export of its JSON.

These run the deprecated mislabel arguments of InfluenceCallback (still working this release; their warning is
tested in test_mislabel_callback_class.py, MislabelCallback's analysis is the same ``MislabelAnalysis``)."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import digits
from helpers.lightning_models import read_events
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback
from lightning_influence.cli import main
from lightning_influence.reporting.export import report_schema
from lightning_influence.reporting.tables import mislabel_confusion_markdown

pytestmark = pytest.mark.filterwarnings("ignore:InfluenceCallback's mislabel arguments:FutureWarning")

N_TRAIN = 400
FLIPS_3_TO_8 = 8  # asymmetric: digits 3 labelled 8
FLIPS_UNIFORM = 12


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def _planted() -> tuple[TensorDataset, torch.Tensor]:
    """``N_TRAIN`` digits with 8 threes labelled 8 and 12 uniform flips; returns the data and the flipped indices."""
    x, y = digits(torch.float32)
    x, y = x[:N_TRAIN], y[:N_TRAIN].clone()
    generator = torch.Generator().manual_seed(0)
    threes = (y == 3).nonzero().flatten()
    asym = threes[torch.randperm(len(threes), generator=generator)[:FLIPS_3_TO_8]]
    y[asym] = 8
    others = torch.tensor([i for i in torch.randperm(N_TRAIN, generator=generator).tolist() if i not in set(asym.tolist())])
    uniform = others[:FLIPS_UNIFORM]
    y[uniform] = (y[uniform] + torch.randint(1, 10, (FLIPS_UNIFORM,), generator=generator)) % 10
    return TensorDataset(x, y), torch.cat([asym, uniform])


def _trainer(root: Path, callbacks: list, max_epochs: int, name: str = "run") -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name=name),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, deterministic=True,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))


def _loader(data: TensorDataset) -> DataLoader:
    return DataLoader(data, batch_size=60, shuffle=False)


def _only(directory: Path, pattern: str) -> dict:
    (path,) = directory.glob(pattern)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def mislabel_run(tmp_path_factory):
    """Mislabel-only mode on the defaults, the whole training set ranked: the run directory and the callback."""
    root = tmp_path_factory.mktemp("mislabel")
    data, flipped = _planted()
    callback = InfluenceCallback(num_worst=0, mislabel_candidates="all", verbose=False)
    trainer = _trainer(root, [callback], max_epochs=40)
    trainer.fit(_Classifier(), _loader(data))
    return Path(trainer.logger.log_dir), callback, flipped


def test_mislabel_only_mode_writes_the_mislabel_report_and_no_explanation(mislabel_run):
    log_dir, callback, _ = mislabel_run
    files = sorted(p.name for p in (log_dir / "influence").iterdir())
    assert files == ["mislabel_epoch=39.json"]  # no epoch=N.json, no score shards
    assert callback.last_explanation is None and callback.analysed[-1]["val_indices"] == []
    tags = read_events(log_dir).Tags()["tensors"]
    assert "influence/mislabel/table/text_summary" in tags and "influence/mislabel/per_class/text_summary" in tags
    assert not any(t.startswith("influence/val_") for t in tags)


def test_signals_recorded_through_the_callback_rank_planted_flips_high(mislabel_run):
    log_dir, callback, flipped = mislabel_run
    assert callback.mislabel.signals.recorder.epochs_recorded == [0, 1, 2, 3, 4, 7, 11, 17, 26, 39]  # geometric
    report = _only(log_dir / "influence", "mislabel_epoch=*.json")
    assert report["ranking"] == "el2n_separated" and report["training_signals"]["recorded"] is True
    jsonschema.validate(report, report_schema("mislabel"))
    assert report["training_signals"]["epochs"] == callback.mislabel.signals.recorder.epochs_recorded
    order = [c["train_index"] for c in report["candidates"]]
    assert sorted(order) == list(range(N_TRAIN))  # "all": the JSON ranks the whole training set
    assert order == report["rankings"]["el2n_separated"]
    assert {"self_influence", "loss", "el2n_weighted", "final_loss", "aum"} <= set(report["rankings"])
    k = len(flipped)
    found = len(set(order[:k]) & set(flipped.tolist())) / k
    recall = {name: len(set(order[:k]) & set(flipped.tolist())) / k for name, order in report["rankings"].items()}
    assert found == recall["el2n_separated"] >= 0.85, recall  # recall at k = number of flips (0.9 when written)
    assert found > recall["self_influence"] and found > recall["loss"], recall  # both 0.6-0.75: the net memorised
    scores = [c["score"] for c in report["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert all(c["suggested_label"] != c["label"] for c in report["candidates"])
    estimated = report["estimated_flips"]  # the count of wrong labels and the flags
    assert 0.6 * k <= estimated["estimate"] <= 1.4 * k, (estimated, k)
    assert [c["flagged"] for c in report["candidates"]].count(True) == estimated["flagged"] == round(estimated["estimate"])
    assert estimated["plausible_low"] <= k <= estimated["plausible_high"], estimated  # the range holds the flips


def test_per_class_table_shows_the_asymmetric_confusion(mislabel_run):
    log_dir, callback, flipped = mislabel_run
    (event,) = read_events(log_dir).Tensors("influence/mislabel/per_class/text_summary")
    rows = _table_rows(event.tensor_proto.string_val[0].decode())
    assert {rows[0][0], rows[0][1]} == {"3", "8"}  # the planted 3 -> 8 flips: the pair confused most
    assert sum(int(r[2]) for r in rows) == 64  # the whole set is ranked: the top 10%, at least 64, counted
    top = replace(callback.last_mislabel, candidates=callback.last_mislabel.candidates[:len(flipped)])
    rows = _table_rows(mislabel_confusion_markdown(top))  # the top k = number of flips
    assert rows[0][:2] == ["8", "3"]  # given 8, suggested 3
    assert int(rows[0][2]) == sum(c.label == 8 and c.suggested_label == 3 for c in top.candidates) >= FLIPS_3_TO_8 // 2


def _table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and "given label" not in line and "---" not in line]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_export_relabel_round_trip(mislabel_run, tmp_path, suffix):
    log_dir, _, _ = mislabel_run
    (path,) = (log_dir / "influence").glob("mislabel_epoch=*.json")
    report = json.loads(path.read_text())
    out = tmp_path / f"relabel{suffix}"
    assert main(["export", str(path), "--relabel", str(out)]) == 0
    if suffix == ".json":
        rows = json.loads(out.read_text())
    else:
        with open(out, newline="") as handle:
            rows = list(csv.DictReader(handle))
    assert len(rows) == N_TRAIN
    for rank, (row, candidate) in enumerate(zip(rows, report["candidates"])):
        assert int(row["rank"]) == rank + 1 and int(row["train_index"]) == candidate["train_index"]  # 1-based (#27)
        assert int(row["loss_rank"]) == candidate["loss_rank"] + 1
        assert int(row["given_label"]) == candidate["label"]
        assert int(row["predicted_label"]) == int(row["new_label"]) == candidate["suggested_label"]
        assert float(row["score"]) == pytest.approx(candidate["score"])
        assert float(row["self_influence"]) == pytest.approx(candidate["self_influence"])


def test_relabel_export_needs_a_mislabel_report(tmp_path, capsys):
    path = tmp_path / "epoch=0.json"
    path.write_text(json.dumps({"points": [], "train_size": 0}))
    assert main(["export", str(path), "--relabel", str(tmp_path / "out.csv")]) == 2
    assert "needs a mislabel report" in capsys.readouterr().err


def test_signals_are_recorded_at_the_scheduled_epochs_and_kept_across_resume(tmp_path):
    data, _ = _planted()
    straight = InfluenceCallback(num_worst=0, mislabel_candidates=8, signal_checkpoints=4, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _trainer(tmp_path, [straight, saver], max_epochs=6, name="straight").fit(_Classifier(), _loader(data))
    recorder = straight.mislabel.signals.recorder
    assert recorder.epochs_recorded == [0, 1, 2, 5]  # geometric: dense early
    assert recorder.signals["el2n"].shape == (N_TRAIN, 4) and not recorder.signals["el2n"].isnan().any()

    checkpoint = glob.glob(str(tmp_path / "ckpt" / "epoch=2*.ckpt"))[0]
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("InfluenceCallback")]
    assert state["signals"]["recorder"]["epochs_recorded"] == [0, 1, 2]
    resumed = InfluenceCallback(num_worst=0, mislabel_candidates=8, signal_checkpoints=4, verbose=False)
    _trainer(tmp_path, [resumed], max_epochs=6, name="resumed").fit(_Classifier(), _loader(data), ckpt_path=checkpoint)
    again = resumed.mislabel.signals.recorder
    assert again.epochs_recorded == [0, 1, 2, 5]
    for name, table in recorder.signals.items():
        assert torch.allclose(again.signals[name], table, atol=1e-5), name
    assert [c.train_index for c in resumed.last_mislabel.candidates] == [
        c.train_index for c in straight.last_mislabel.candidates]


def test_training_signals_off_ranks_by_self_influence_and_says_what_it_costs(tmp_path):
    data, _ = _planted()
    callback = InfluenceCallback(num_worst=0, mislabel_candidates=5, training_signals=False, verbose=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(_Classifier(), _loader(data))
    report = _only(Path(trainer.logger.log_dir) / "influence", "mislabel_epoch=*.json")
    assert report["ranking"] == "self_influence" and report["training_signals"]["recorded"] is False
    assert "AUROC" in report["training_signals"]["note"]
    scores = [c["self_influence"] for c in report["candidates"]]
    assert scores == sorted(scores)


def test_mislabel_only_mode_needs_the_mislabel_analysis():
    with pytest.raises(MisconfigurationException, match="num_worst"):
        InfluenceCallback(num_worst=0)
    with pytest.raises(MisconfigurationException, match="verify_loo"):
        InfluenceCallback(num_worst=0, mislabel_candidates=4, verify_loo=2)
    with pytest.raises(MisconfigurationException, match="'all'"):
        InfluenceCallback(mislabel_candidates="some")
