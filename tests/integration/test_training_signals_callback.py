"""TrainingSignalsCallback under a Lightning Trainer: scheduled epochs, and a resumed fit keeps the signals."""

from __future__ import annotations

import glob

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from helpers import digits
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks.training_signals import TrainingSignalsCallback, scheduled_epochs


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loader() -> DataLoader:
    x, y = digits(torch.float32)
    return DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32, shuffle=False)


def _trainer(root, callbacks, max_epochs: int = 6) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, default_root_dir=root, deterministic=True)


def test_scheduled_epochs_are_geometric_by_default_and_include_the_last():
    assert scheduled_epochs(6, 4) == [0, 1, 2, 5]
    assert scheduled_epochs(6, 4, "even") == [0, 2, 3, 5]
    assert scheduled_epochs(100, 10)[-1] == 99 and len(scheduled_epochs(100, 10)) == 10
    assert scheduled_epochs(3, 10) == [0, 1, 2]
    assert scheduled_epochs(5, 1) == [4]


def test_callback_records_scheduled_epochs_and_resume_keeps_them(tmp_path):
    straight = TrainingSignalsCallback(checkpoints=4)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _trainer(tmp_path, [straight, saver]).fit(_Classifier(), _loader())
    assert straight.recorder.epochs_recorded == [0, 1, 2, 5]
    assert straight.recorder.signals["el2n"].shape == (96, 4)
    assert not straight.recorder.signals["el2n"].isnan().any()

    checkpoint = glob.glob(str(tmp_path / "ckpt" / "epoch=2*.ckpt"))[0]
    resumed = TrainingSignalsCallback(checkpoints=4)
    _trainer(tmp_path, [resumed]).fit(_Classifier(), _loader(), ckpt_path=checkpoint)
    assert resumed.recorder.epochs_recorded == [0, 1, 2, 5]
    for name, table in straight.recorder.signals.items():
        assert torch.allclose(resumed.recorder.signals[name], table, atol=1e-5), name
    rows = resumed.relabel_records(count=5)
    assert [r["rank"] for r in rows] == list(range(1, 6))  # 1-based, as every table the user reads
    assert all(r["given_label"] != r["predicted_label"] for r in rows)
    assert sum(r["count"] for r in resumed.confusion_records(10)) == 10


def test_early_stop_records_the_final_weights(tmp_path):
    class _StopAt2(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                trainer.should_stop = True

    callback = TrainingSignalsCallback(checkpoints=2)  # schedule [0, 5]; training stops after epoch 2
    _trainer(tmp_path, [callback, _StopAt2()]).fit(_Classifier(), _loader())
    assert callback.recorder.epochs_recorded == [0, 2]


def test_recording_leaves_the_training_as_it_is_without_it(tmp_path):
    # a dataset read through a DataLoader (which draws a seed from the global generator for every pass) and a
    # shuffled training loader: the recording passes must not change the order the training draws
    class _Rows(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    x, y = digits(torch.float32)
    weights = []
    for callbacks in ([], [TrainingSignalsCallback(checkpoints=4)]):
        pl.seed_everything(3)
        model = _Classifier()
        loader = DataLoader(_Rows(x[:96], y[:96]), batch_size=16, shuffle=True)
        _trainer(tmp_path, callbacks, max_epochs=4).fit(model, loader)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert callbacks[0].recorder.epochs_recorded == [0, 1, 2, 3]
    assert torch.equal(weights[0], weights[1])
