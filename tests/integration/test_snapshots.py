"""InfluenceCallback(snapshots=K): weight snapshots spread over the fit, the influence averaged over them."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch
from helpers.lightning_models import TinyDigitsModel, tiny_datasets
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

import lightning_influence as li
from lightning_influence import InfluenceCallback
from lightning_influence.callbacks._snapshots import SnapshotSchedule


def test_snapshot_epochs_are_spread_evenly_and_exclude_the_final_one():
    assert SnapshotSchedule(3).planned(15) == {4, 9}  # after epochs 5 and 10 (1-based)
    assert SnapshotSchedule(3).planned(4) == {1, 2}
    assert SnapshotSchedule(5).planned(3) == {0, 1}  # fewer epochs than snapshots: one per epoch
    assert SnapshotSchedule(1).planned(10) == set()
    assert SnapshotSchedule(3).planned(-1) == set()


def test_unbounded_fit_keeps_evenly_spaced_snapshots():
    schedule = SnapshotSchedule(3)
    schedule.taken = [(step, {"step": torch.tensor(step)}) for step in range(10, 50, 10)]  # 4 held
    picked = [int(s["step"]) for s in schedule.before(100)]
    assert picked == [10, 30]  # with the final weights: thirds of the run
    assert [int(s["step"]) for s in schedule.before(25)] == [10, 20]


def test_fit_end_report_is_the_functional_average_over_the_snapshots(tmp_path):
    pl.seed_everything(0)
    train, val = tiny_datasets()
    model = TinyDigitsModel()
    callback = InfluenceCallback(num_worst=2, top_k=3, solver="exact", damping=0.05, snapshots=3, verbose=False)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=25))
    steps = [step for step, _ in callback.snapshots.taken]
    assert steps == [16, 24]  # after epochs 2 and 3 of 4 (8 steps an epoch)
    with open(f"{trainer.logger.log_dir}/influence/epoch=3.json") as handle:
        record = json.load(handle)
    assert [s["converged"] for s in record["solver"]["settings"]["snapshots"]] == [True, True]
    chosen = [p["val_index"] for p in record["points"]]
    snapshots = [snapshot for _, snapshot in callback.snapshots.taken]
    loader = DataLoader(train, batch_size=64)
    scores = li.influence(model, lambda m, b: m.per_example_loss(b), loader, val[chosen], solver="exact",
                          damping=0.05, snapshots=snapshots)
    final_only = li.influence(model, lambda m, b: m.per_example_loss(b), loader, val[chosen], solver="exact",
                              damping=0.05)
    for row, point in enumerate(record["points"]):
        assert [i for i, _ in point["harmful"]] == scores[row].topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in point["harmful"]]), scores[row].topk(3).values,
                                   rtol=1e-4, atol=1e-6)
    assert not torch.allclose(scores, final_only, rtol=1e-2)  # the snapshots changed the answer
