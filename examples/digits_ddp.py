"""The digits example under DDP: the same model and InfluenceCallback, trained and analysed by several processes.

Run ``python examples/digits_ddp.py --devices 2`` (GPUs when available, else CPU processes; on a small CPU box
set ``OMP_NUM_THREADS=1``). For a quick look use ``--epochs 3 --damping 0.05``: after 3 epochs the net is far
from a minimum and LiSSA diverges at the default damping 1e-2, on one process as on two. Lightning starts the
other ranks by re-running this script, so everything that trains must stay under ``if __name__ == "__main__":``.

Every rank takes part in the analysis: the LiSSA repeats are split over ranks and summed with one all-reduce,
each rank scores every ``world_size``-th training example, and rank 0 merges the top-k lists and alone writes
TensorBoard and JSON (see ``docs/ddp.md``). The ``timeout`` makes a rank that never joins a collective fail the
run after 5 minutes instead of hanging it for the default 30.

Each process trains on its shard with batch size 64 / devices, so the effective batch (64) and the number of
optimizer steps per epoch match ``examples/digits.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import DigitsCNN, digits_loaders

from lightning_influence import InfluenceCallback, LissaConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs, or CPU processes without GPUs)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--every-n-epochs", type=int, default=5, help="also analyse every N epochs (0: only at the end)")
    parser.add_argument("--repeats", type=int, default=2, help="LiSSA repeats, split over the processes")
    parser.add_argument("--damping", type=float, default=1e-2,
                        help="lambda added to H; a few epochs from a minimum (e.g. --epochs 3) need about 0.05")
    args = parser.parse_args()

    pl.seed_everything(0)
    # Lightning adds a DistributedSampler to both loaders; the callback reads their datasets, not the samplers
    train_loader, val_loader = digits_loaders(batch_size=max(1, 64 // args.devices))
    logger = TensorBoardLogger(args.log_dir, name="digits_ddp")
    callback = InfluenceCallback(num_worst=8, top_k=8, damping=args.damping, solver=LissaConfig(repeats=args.repeats),
                                 every_n_epochs=args.every_n_epochs)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=args.devices,
        strategy=DDPStrategy(timeout=timedelta(minutes=5)), logger=logger, callbacks=[callback],
        log_every_n_steps=5, enable_model_summary=False,
    )
    trainer.fit(DigitsCNN(), train_loader, val_loader)
    if trainer.is_global_zero:
        print(f"\nOpen the results with:\n  tensorboard --logdir {logger.log_dir}\n"
              f"JSON results are in {logger.log_dir}/influence/")


if __name__ == "__main__":
    main()
