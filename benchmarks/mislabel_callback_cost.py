#!/usr/bin/env python
"""What recording training signals costs inside ``InfluenceCallback`` under minibatch training.

``benchmarks/mislabel.py`` measures the recording with full-batch training (one step per epoch); a minibatch
epoch is many steps, so one forward pass over the training set is a smaller share of it. Here the callback
runs in mislabel-only mode (``num_worst=0``) on digits (1,200 training images, batch 32, Adam) for a 64-64-10
tanh MLP and a small CNN, with the default ``signal_checkpoints=10`` (geometric), for ``max_epochs`` 10 and 40. Per run:

* ``train_seconds``: the seconds inside the training epochs (steps and Lightning's loop, timed by a callback
  placed before the influence callback, so the recording and the analysis are not in it), the smaller of the
  fits with and without signals (the less disturbed one on a shared machine); ``fit_minus_analysis_seconds``,
  the rule before: the whole fit without signals minus its self-influence analysis (noisy where the analysis'
  time varies);
* ``record_seconds``: the recorder's time (its forward passes and the assembly), from the run with signals,
  plus one estimate of the number of wrong labels with its bootstrap interval (``count_seconds``);
* ``ratio = record_seconds / train_seconds`` (the figure the docs quote), ``ratio_of_fit`` the same over
  ``fit_minus_analysis_seconds`` (what it adds to the fit a user waits for), and the self-influence analysis'
  seconds over ``train_seconds`` for scale.

The whole measurement runs ``--repeats`` times (default 2), each pass kept in ``repeats`` with the one-minute
load average of the machine before and after it, and ``worst_ratio`` the largest ``ratio`` per setting: the
figures are timing-sensitive on a shared machine, so every pass is reported, not the better one (``--append``
adds a second invocation's passes to the file).

Usage: ``nice -n 5 python benchmarks/mislabel_callback_cost.py`` (about two minutes per pass on one thread);
writes ``benchmarks/mislabel-callback-cost-results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback
from lightning_influence.analysis.noise_count import estimate_flip_count

RESULTS = Path(__file__).with_name("mislabel-callback-cost-results.json")


class Classifier(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        if kind == "mlp":
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        else:
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                                     nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class EpochTimer(pl.Callback):
    """Seconds inside the training epochs (steps and Lightning's loop), from epoch start to the end hooks;
    placed before the influence callback, so its epoch-end work (the recording, the analysis) is not counted."""

    def __init__(self) -> None:
        self.seconds, self._began = 0.0, 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._began = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._began


def fit(kind: str, epochs: int, signals: bool) -> InfluenceCallback:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)[:1200]
    y = torch.tensor(labels)[:1200]
    callback = InfluenceCallback(num_worst=0, mislabel_candidates=16, training_signals=signals, verbose=False)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, callback],
                             default_root_dir=root)
        began = time.perf_counter()
        trainer.fit(Classifier(kind), DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
        callback.fit_seconds = time.perf_counter() - began
    callback.epoch_seconds = timer.seconds
    return callback


def measure() -> dict[str, dict]:
    """One pass over the four settings: ``{"mlp/10": {...}, ...}``."""
    runs = {}
    for kind in ("mlp", "cnn"):
        for epochs in (10, 40):
            plain, recorded = fit(kind, epochs, False), fit(kind, epochs, True)
            analysis = plain.last_mislabel.seconds
            train = min(plain.epoch_seconds, recorded.epoch_seconds)  # the less disturbed of the two fits
            recorder = recorded.mislabel.signals.recorder
            began = time.perf_counter()
            estimate_flip_count(recorder)  # what each analysis adds for the count and its interval
            count = time.perf_counter() - began
            record = recorder.seconds + count
            runs[f"{kind}/{epochs}"] = {
                "epochs_recorded": recorder.epochs_recorded,
                "train_seconds": train, "fit_minus_analysis_seconds": plain.fit_seconds - analysis,
                "record_seconds": record, "ratio": record / train,
                "ratio_of_fit": record / (plain.fit_seconds - analysis),
                "forward_seconds": recorder.seconds, "count_seconds": count,
                "self_influence_seconds": analysis, "self_influence_ratio": analysis / train,
            }
            print(f"{kind} {epochs} epochs: training {train:.2f} s, recording {record:.2f} s"
                  f" ({record / train:.3f} of training), self-influence {analysis:.2f} s", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="passes over the four settings (default 2)")
    parser.add_argument("--append", action="store_true",
                        help="add the passes to those already in the results file (a second invocation)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = json.loads(RESULTS.read_text())["repeats"] if args.append else []
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        runs = measure()
        repeats.append({"load_average_before": load, "load_average_after": os.getloadavg()[0], "runs": runs})
    worst = {name: max(r["runs"][name]["ratio"] for r in repeats) for name in repeats[0]["runs"]}
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}"
    RESULTS.write_text(json.dumps({"settings": {"n_train": 1200, "batch_size": 32, "signal_checkpoints": 10,
                                                "repeats": len(repeats)},
                                   "machine": machine + ", 1 thread", "worst_ratio": worst, "repeats": repeats},
                                  indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
