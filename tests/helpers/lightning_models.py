"""A tiny LightningModule and DataModule on digits, importable by path for the command-line tests."""

from __future__ import annotations

import glob
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import digits


class TinyDigitsModel(pl.LightningModule):
    """A 650-parameter CNN with ``per_example_loss`` (what InfluenceCallback differentiates by default)."""

    def __init__(self, channels: int = 4, lr: float = 0.1, with_loss_method: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not with_loss_method:
            self.per_example_loss = None  # type: ignore[assignment]
        self.net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(16 * channels, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=1e-3)


class TinyDigitsData(pl.LightningDataModule):
    def __init__(self, n_train: int = 200, n_val: int = 40, batch_size: int = 50) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        x, y = digits(torch.float32)
        n, m = self.hparams.n_train, self.hparams.n_val
        self.train_set = TensorDataset(x[:n], y[:n])
        self.val_set = TensorDataset(x[1500:1500 + m], y[1500:1500 + m])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


def cross_entropy_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """The same per-example loss as a free function, for ``--loss-fn`` and ``loss_fn`` in YAML.

    jsonargparse checks a callable's annotations against ``LossFn``: the return annotation must be Tensor.
    """
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


def tiny_datasets() -> tuple[TensorDataset, TensorDataset]:
    """240 training and 60 validation digits (float32) for the callback tests."""
    x, y = digits(torch.float32)
    return TensorDataset(x[:240], y[:240]), TensorDataset(x[1500:1560], y[1500:1560])


def read_events(log_dir: Any) -> EventAccumulator:
    """Every event of the run in ``log_dir`` (images, tensors, scalars, histograms unsampled)."""
    accumulator = EventAccumulator(glob.glob(f"{log_dir}/events.*")[0],
                                   size_guidance={"images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator
