"""LiSSA with and without tail averaging on the digits example's CNN after 5 epochs (not converged), defaults
otherwise (Gauss-Newton, damping "auto", depth 1000, batch 128, residual tolerance from config.py).

Writes ``benchmarks/lissa-averaging-results.json``: per variant the worst residual, whether it converged,
the steps taken, the damping chosen and the s_test wall time (one process, one thread).
Run: ``OMP_NUM_THREADS=1 python benchmarks/lissa_averaging.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from digits import DigitsCNN, digits_loaders  # noqa: E402

from lightning_influence import LissaConfig  # noqa: E402
from lightning_influence.core.problem import InfluenceProblem  # noqa: E402
from lightning_influence.core.tensors.modes import analysis_mode  # noqa: E402
from lightning_influence.distributed.collectives import SingleProcess  # noqa: E402
from lightning_influence.distributed.solve import solve_s_test  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    train, val = digits_loaders()
    model = DigitsCNN()
    trainer = pl.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, train, val)
    x, y = next(iter(val))
    batch = (x[:8], y[:8])
    rows = []
    for average in (False, True):
        problem = InfluenceProblem(model, lambda m, b: m.per_example_loss(b), train, "auto",
                                   LissaConfig(average=average), weight_decay=model.hparams.weight_decay)
        with analysis_mode(model):
            gradients = problem.gradients(batch)
            start = time.perf_counter()
            _, info = solve_s_test(problem, gradients, SingleProcess(), None)
            seconds = time.perf_counter() - start
        rows.append({"average": average, "residual": info.residual, "residual_tol": info.residual_tol,
                     "converged": info.converged, "steps": info.iterations, "damping": info.damping,
                     "seconds": seconds})
        print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "lissa-averaging-results.json"
    out.write_text(json.dumps({"model": "examples/digits.py DigitsCNN, 5 epochs Adam", "test_points": 8,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
