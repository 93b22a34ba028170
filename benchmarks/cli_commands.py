#!/usr/bin/env python
"""The documented ``lightning-influence`` commands on the digits example's checkpoint, timed as a user runs them.

Runs, each in a fresh process from the repository root (``--threads auto``, no ``OMP_NUM_THREADS``): the
``influence`` and ``mislabel`` lines of docs/cli.md, the quickstart's ``influence`` line, ``influence
--config`` with the docs' YAML, ``verify-loo`` for validation example 33 and ``correct`` with their defaults.
Keeps each command's wall time, the 1-minute load average before it, and the figures it reports
(leave-one-out agreement, the correction's before/after accuracies and damping).

Writes ``benchmarks/cli-commands-results.json``.

Usage::

    python benchmarks/cli_commands.py --checkpoint runs/digits/version_0/checkpoints/epoch=14-step=330.ckpt
    python benchmarks/cli_commands.py            # trains the example's model first (15 epochs, no analyses)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("cli-commands-results.json")
MODEL = ["--model", "examples.digits:DigitsCNN", "--datamodule", "examples.digits:DigitsDataModule"]
CONFIG = """trainer:
  max_epochs: 15
  callbacks:
    - class_path: lightning_influence.InfluenceCallback
      init_args:
        num_worst: 8
        top_k: 8
        damping: auto
        solver:
          class_path: lightning_influence.LissaConfig
          init_args: {depth: 1000, repeats: 2}
        every_n_epochs: 5
    - class_path: lightning_influence.MislabelCallback
      init_args:
        candidates: 16
model:
  class_path: examples.digits.DigitsCNN
data:
  class_path: examples.digits.DigitsDataModule
"""


def commands(checkpoint: str, out: Path) -> dict[str, list[str]]:
    return {
        "influence (docs/cli.md)": ["influence", checkpoint, *MODEL, "--solver", "cg"],
        "mislabel (docs/cli.md)": ["mislabel", checkpoint, *MODEL, "--top", "16"],
        "influence (docs/quickstart.md)": ["influence", checkpoint, *MODEL, "--num-worst", "4", "--top-k", "6",
                                           "--solver", "cg", "--table", str(out / "top.csv")],
        "influence --config (docs/cli.md YAML)": ["influence", checkpoint, "--config", str(out / "config.yaml")],
        "verify-loo --val-index 33": ["verify-loo", checkpoint, *MODEL, "--val-index", "33"],
        "correct (defaults)": ["correct", checkpoint, *MODEL],
    }


def run(name: str, argv: list[str], out: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    target = out / name.split()[0].replace("-", "_") / str(abs(hash(name)))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lightning_influence.cli", *argv, "--output-dir", str(target)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    record: dict[str, Any] = {"command": "lightning-influence " + " ".join(argv), "seconds": round(time.perf_counter()
                              - start, 1), "load_before": round(load, 2), "exit_status": done.returncode}
    if done.returncode != 0:
        record["stderr_tail"] = done.stderr[-1500:]
    record["stdout_tail"] = done.stdout[-2500:]
    for path in sorted((target / "influence").glob("loo_epoch=*.json")):
        loo = json.loads(path.read_text())
        record["loo"] = {k: loo[k] for k in ("val_index", "pearson", "spearman", "slope", "sign_agreement", "damping",
                                             "l2", "steps_run", "resolved", "median_abs_predicted", "baseline_change")}
    for path in sorted((target / "influence").glob("correct_*.json")):
        report = json.loads(path.read_text())
        record["correct"] = {"before": {k: v["accuracy"] for k, v in report["before"].items()},
                             "after": {k: v["accuracy"] for k, v in report["after"].items()},
                             "damping": report["settings"].get("damping"),
                             "residual_max": report["settings"].get("residual_max")}
    print(name, {k: v for k, v in record.items() if not k.endswith("_tail")}, flush=True)
    return record


def train_checkpoint(directory: Path) -> str:
    """The example's checkpoint at the path the docs name (``checkpoints/epoch=14-step=330.ckpt``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cli_threads import train_checkpoint as train

    return str(train(directory, "checkpoints/epoch=14-step=330.ckpt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the example's checkpoint (default: train one)")
    parser.add_argument("--only", nargs="*", help="run only the commands whose name starts with these words")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.yaml").write_text(CONFIG)
        checkpoint = args.checkpoint or train_checkpoint(out / "run")
        chosen = {k: v for k, v in commands(checkpoint, out).items()
                  if not args.only or any(k.startswith(word) for word in args.only)}
        results = {name: run(name, argv, out) for name, argv in chosen.items()}
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous.update({"cpu_count": os.cpu_count(), "commands": {**previous.get("commands", {}), **results}})
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
