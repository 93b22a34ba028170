"""A small CNN on scikit-learn's digits: InfluenceCallback explains its worst validation predictions and
MislabelCallback finds its most suspicious training labels.

Run ``python examples/digits.py`` (45.4 s of wall time with the defaults on 2 CPU cores, the fastest
of the runs in benchmarks/digits-walltime-results.json; a busy machine takes longer), then open TensorBoard on
the printed log directory: the IMAGES tab shows each explained validation digit beside its most harmful and most helpful
training digits, TEXT has the same as tables, and HISTOGRAMS/SCALARS show the score distributions and the
solver's convergence (on this small set LiSSA solves by CG from the start: its residual per step); the
Influence tab shows all of it interactively, with the mislabel candidates (the 32 training
digits whose labels look most suspicious, from the training signals recorded during the run).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback, MislabelCallback

WEIGHT_DECAY = 1e-3


class DigitsCNN(pl.LightningModule):
    """About 2.5k parameters; tanh keeps the loss smooth, weight decay keeps the Hessian well conditioned."""

    def __init__(self, lr: float = 0.01, weight_decay: float = WEIGHT_DECAY) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Tanh(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """What InfluenceCallback differentiates: one loss per example, without the L2 term."""
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


class DigitsDataModule(pl.LightningDataModule):
    """The same split as :func:`digits_loaders`, for ``Trainer.fit(model, datamodule=...)`` and the command line."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        self.loaders = digits_loaders(self.hparams.batch_size, self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        return self.loaders[0]

    def val_dataloader(self) -> DataLoader:
        return self.loaders[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--every-n-epochs", type=int, default=5, help="also analyse every N epochs (0: only at the end)")
    args = parser.parse_args()

    pl.seed_everything(0)
    train_loader, val_loader = digits_loaders()
    logger = TensorBoardLogger(args.log_dir, name="digits")
    # default settings: Gauss-Newton curvature and damping chosen from its spectrum (docs/curvature.md); and, once
    # when fit ends, the 32 most suspicious training labels (ranked by training signals recorded during the run;
    # 16 eigenpairs for their self-influence column keep its cost near the s_test solve's, docs/mislabel.md)
    callbacks = [InfluenceCallback(num_worst=8, top_k=8, every_n_epochs=args.every_n_epochs),
                 MislabelCallback(candidates=32, rank=16)]
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
        log_every_n_steps=10, enable_model_summary=False,
    )
    trainer.fit(DigitsCNN(), train_loader, val_loader)
    print(f"\nOpen the results with:\n  tensorboard --logdir {logger.log_dir}\n"
          f"JSON results are in {logger.log_dir}/influence/")


if __name__ == "__main__":
    main()
