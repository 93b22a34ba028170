#!/usr/bin/env python
"""Wall time of the post-hoc commands with 1 torch thread and with one per core (``--threads``), as a new user runs them.

Trains the digits example's model without the callback (the example's settings: 15 epochs of Adam), saves its
checkpoint, then runs ``lightning-influence influence`` and ``mislabel`` on it in fresh processes (no
``OMP_NUM_THREADS`` in their environment) with ``--threads 1`` and ``--threads <cores>``, alternating the
settings, ``--repeats`` times each. The 1-minute load average before every run is kept beside its time: the
figures depend on what else the machine is doing.

Writes ``benchmarks/cli-threads-results.json`` (``docs/cli.md`` quotes it).

Usage::

    python benchmarks/cli_threads.py              # 2 repeats of each command and setting
    python benchmarks/cli_threads.py --repeats 1  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("cli-threads-results.json")
MODEL = ["--model", "examples.digits:DigitsCNN", "--datamodule", "examples.digits:DigitsDataModule"]
COMMANDS = {"influence": ["influence", "CKPT", *MODEL, "--quiet"],
            "mislabel": ["mislabel", "CKPT", *MODEL, "--top", "16", "--quiet"]}


def train_checkpoint(directory: Path, name: str = "digits.ckpt") -> Path:
    """The example's model after its 15 epochs (no analyses), saved as the Lightning checkpoint ``directory/name``."""
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl

    from examples.digits import DigitsCNN, digits_loaders

    pl.seed_everything(0)
    train, val = digits_loaders()
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsCNN(), train, val)
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def run(argv: list[str], threads: int, out: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lightning_influence.cli", *argv, "--threads", str(threads),
                           "--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return {"threads": threads, "seconds": round(seconds, 2), "load_before": round(load, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = sorted({1, cores})
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = train_checkpoint(Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in COMMANDS}
        for repeat in range(args.repeats):
            for name, argv in COMMANDS.items():
                for threads in settings if repeat % 2 == 0 else settings[::-1]:
                    record = run([str(checkpoint) if a == "CKPT" else a for a in argv], threads, Path(tmp) / "out")
                    runs[name].append(record)
                    print(name, record, flush=True)
                    write(cores, args.repeats, runs, settings)  # after every run: a partial file survives a stop


def write(cores: int, repeats: int, runs: dict[str, list[dict[str, Any]]], settings: list[int]) -> None:
    summary: dict[str, dict[str, float]] = {}
    for name, records in runs.items():
        median = {t: statistics.median(r["seconds"] for r in records if r["threads"] == t) for t in settings
                  if any(r["threads"] == t for r in records)}
        summary[name] = {f"median_seconds_threads_{t}": round(s, 1) for t, s in median.items()}
        if len(median) > 1:
            summary[name]["ratio_all_cores_to_one"] = round(median[cores] / median[1], 2)
    loads = [r["load_before"] for rs in runs.values() for r in rs]
    result = {"cores": cores, "repeats": repeats, "runs": runs, "summary": summary,
              "mean_load_before": round(statistics.mean(loads), 2) if loads else None}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
