#!/usr/bin/env python
"""Influence-guided error correction (FastIF Sec. 6.3) against fine-tuning on the anchors, on four tasks.

Tasks (``benchmarks/error_correction_tasks.py``): the digits 8/1 slice with logistic regression, an Adam-trained
MLP and a CNN, and generated text with a spurious keyword. Each run starts from the same trained weights and
calls :func:`lightning_influence.correct_errors` through a single-device CPU ``Trainer`` with the library's
defaults (budget, ``lr="auto"``, solver settings below) except ``selection`` and, off the automatic lr, ``lr``.

Selections: ``default`` (``correct_errors``' default selection and guard), ``helpful`` (FastIF: the most helpful
training examples, no guard), ``anchors`` (fine-tune on the anchors), ``anchors+random`` (the anchors with random
training examples), ``random`` and ``harmful``. Learning rates: the automatic one (a line search on the anchors,
see docs/error-correction.md) and a third and three times it; every selection of a seed uses the same three.
Measured: accuracy on the held-out slice and on validation outside the slice (never the guard) before and after.

``--study`` instead runs the design variants (guard, influence weights, anchors + helpful, reused s_test) at the
automatic lr; the default was chosen from the study on ``digits-linear`` and ``digits-mlp`` and is checked on
all four tasks by the main run. ``--plot PNG`` draws the Pareto plot from ``--json``'s file.

Usage::

    python benchmarks/error_correction.py --json benchmarks/error-correction-results.json \
        --plot docs/images/error-correction-pareto.png
    python benchmarks/error_correction.py --study --tasks digits-linear digits-mlp \
        --json benchmarks/error-correction-study-results.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl
from error_correction_tasks import TASKS, Task, accuracy, make_task, train_model

import lightning_influence as li
from lightning_influence.config import ANCHOR_SELECTIONS, CorrectionConfig

SELECTIONS = ("default", "helpful", "anchors", "anchors+random", "random", "harmful")
LR_FACTORS = (1 / 3, 1.0, 3.0)
SOLVER, SOLVER_OPTIONS = "cg", {"max_iter": 50, "tol": 1e-3}  # damping: the library's default ("auto")
#: --study design: name -> correct_errors arguments (at the automatic lr). The "anchors+..." variants step on the
#: plain sum of the two terms (project_replay=False), as when this study chose the selection and the guard.
VARIANTS = {
    "helpful": {"selection": "helpful", "guard_per_iteration": 0},
    "helpful+guard": {"selection": "helpful", "guard_per_iteration": 50},
    "helpful+guard, s_test reused": {"selection": "helpful", "guard_per_iteration": 50, "reuse_s_test": True},
    "weighted+guard": {"selection": "weighted", "guard_per_iteration": 50},
    "anchors+helpful": {"selection": "anchors+helpful", "guard_per_iteration": 0, "project_replay": False},
    "anchors+helpful+guard": {"selection": "anchors+helpful", "guard_per_iteration": 50, "project_replay": False},
    "anchors+helpful+guard, s_test reused": {"selection": "anchors+helpful", "guard_per_iteration": 50,
                                             "reuse_s_test": True, "project_replay": False},
    "anchors+protect": {"selection": "anchors+protect", "guard_per_iteration": 50, "project_replay": False},
    "anchors": {"selection": "anchors"},
    "anchors+random": {"selection": "anchors+random", "project_replay": False},
}
#: --study projection: the anchors' term weighted so that the replay cannot slow the anchors (project_replay,
#: the default) against the plain sum, on all four tasks.
PROJECTION_VARIANTS = {
    "anchors+helpful+guard, plain sum": {"selection": "anchors+helpful", "guard_per_iteration": 50,
                                         "project_replay": False},
    "anchors+helpful+guard, projected (default)": {},
    "anchors+protect, projected": {"selection": "anchors+protect"},
    "anchors+random, plain sum": {"selection": "anchors+random", "project_replay": False},
    "anchors+random, projected": {"selection": "anchors+random"},
    "anchors": {"selection": "anchors"},
}
#: --study protect: the protect projection (protect_per_step, the default 10) at other sample sizes and off (the
#: default before it), against anchors-only, on the three fast tasks (the CNN's default is in the main run).
PROTECT_VARIANTS = {
    "protect 10 (default)": {},
    "protect 5": {"protect_per_step": 5},
    "protect 20": {"protect_per_step": 20},
    "protect off (the previous default)": {"protect_per_step": 0},
    "anchors": {"selection": "anchors"},
}
#: --study influence: the influence step (selection="influence": the anchors, stepped along (H + damping I)^-1 grad
#: L_A) with the protect projection (10, the default) and without it, against anchors-only, on all four tasks.
INFLUENCE_VARIANTS = {
    "influence, protect 10": {"selection": "influence"},
    "influence, protect off": {"selection": "influence", "protect_per_step": 0},
    "anchors": {"selection": "anchors"},
}
#: --study constrained: the anchors' own gradient step, projected so that it raises none of the protect sample's
#: losses to first order (one constraint per example, GEM) and rescaled to the anchors' first-order decrease
#: (selection="constrained"), with protect samples of 10 (the default) and 20, against anchors-only, on all four tasks.
CONSTRAINED_VARIANTS = {
    "constrained, protect 10": {"selection": "constrained"},
    "constrained, protect 20": {"selection": "constrained", "protect_per_step": 20},
    "anchors": {"selection": "anchors"},
}
# The design and projection studies predate the protect projection: they run without it, as their files were made.
VARIANTS = {name: {**arguments, "protect_per_step": 0} for name, arguments in VARIANTS.items()}
PROJECTION_VARIANTS = {name: {**arguments, "protect_per_step": 0} for name, arguments in PROJECTION_VARIANTS.items()}
STUDIES = {"design": VARIANTS, "projection": PROJECTION_VARIANTS, "protect": PROTECT_VARIANTS,
           "influence": INFLUENCE_VARIANTS, "constrained": CONSTRAINED_VARIANTS}


def selection_arguments(selection: str) -> dict:
    if selection == "default":
        return {}
    if selection == "helpful":
        return {"selection": "helpful", "guard_per_iteration": 0}
    return {"selection": selection}


def run_one(task: Task, trained: torch.nn.Module, arguments: dict, seed: int, lr, log_dir: str) -> dict:
    model = copy.deepcopy(trained).train()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=log_dir,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    cpu = time.process_time()
    try:
        report = li.correct_errors(
            trainer, model, task.anchors, train_dataloaders=DataLoader(task.train, batch_size=256),
            heldout=task.heldout, val_dataloaders=DataLoader(task.overall, batch_size=512), guard=task.guard,
            lr=lr, solver=SOLVER, solver_options=SOLVER_OPTIONS, seed=seed, verbose=False, **arguments)
    except ValueError as err:  # e.g. a solve that failed: reported, not hidden
        return {"failed": str(err)}
    gc.collect()  # each run's trainer and module are reference cycles
    chosen = [int(task.train.tensors[1][i]) for r in report.iterations for i in r.chosen_indices] \
        if report.selection not in ANCHOR_SELECTIONS else []
    return {
        "slice_before": report.before["heldout"].accuracy, "slice_after": report.after["heldout"].accuracy,
        "others_before": accuracy(trained, task.others), "others_after": accuracy(model, task.others),
        "overall_before": report.before["val"].accuracy, "overall_after": report.after["val"].accuracy,
        "lr": report.settings["lr"], "selection": report.selection,
        "chosen_slice_label": chosen.count(task.slice_label), "chosen": len(chosen),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        **({"anchor_weights": [round(w, 4) for r in report.iterations for w in r.anchor_weights]}
           if report.iterations and report.iterations[0].anchor_weights is not None else {}),
        **({"protect_cosines": [round(c, 4) for r in report.iterations for c in r.protect_cosines]}
           if report.iterations and report.iterations[0].protect_cosines is not None else {}),
    }


def summary(rows: list[dict]) -> dict:
    """Mean over seeds (per cent / points) of the slice gain and the cost outside the slice (before - after)."""
    ok = [r for r in rows if "failed" not in r]
    if not ok:
        return {"failed": len(rows)}
    gain = [100 * (r["slice_after"] - r["slice_before"]) for r in ok]
    cost = [100 * (r["others_before"] - r["others_after"]) for r in ok]
    return {"slice_before": round(100 * statistics.mean(r["slice_before"] for r in ok), 1),
            "slice_after": round(100 * statistics.mean(r["slice_after"] for r in ok), 1),
            "slice_gain": round(statistics.mean(gain), 1), "slice_gain_per_seed": [round(g, 1) for g in gain],
            "cost_outside": round(statistics.mean(cost), 1), "cost_outside_per_seed": [round(c, 1) for c in cost],
            "failed": len(rows) - len(ok)}


def goals(tables: dict) -> dict:
    """Per task at the automatic lr: default's slice gain >= anchors', its cost <= half of anchors' (or <= 0),
    helpful (FastIF) and default above random and harmful on the slice."""
    verdicts = {}
    for task, by_lr in tables.items():
        auto = by_lr["auto"]
        d, a = auto["default"], auto["anchors"]
        if "slice_gain" not in d or "slice_gain" not in a:
            verdicts[task] = {"complete": False}
            continue
        after = {s: auto[s].get("slice_after", float("nan")) for s in auto}

        def above(selection: str, by_lr: dict = by_lr) -> bool:  # on the slice, above random and harmful, every lr
            return all(t[selection].get("slice_after", -1) > max(t["random"].get("slice_after", 101),
                                                                  t["harmful"].get("slice_after", 101))
                       for t in by_lr.values())

        verdicts[task] = {
            "gain_at_least_anchors": d["slice_gain"] >= a["slice_gain"],
            "cost_at_most_half_of_anchors": d["cost_outside"] <= max(a["cost_outside"] / 2, 0.0),
            "default_above_random_and_harmful": after["default"] > after["random"] and after["default"] > after["harmful"],
            "helpful_above_random_and_harmful": after["helpful"] > after["random"] and after["helpful"] > after["harmful"],
            "default_above_random_and_harmful_every_lr": above("default"),
            "helpful_above_random_and_harmful_every_lr": above("helpful"),
        }
    return verdicts


def print_tables(tables: dict, lrs: dict) -> None:
    for task, by_lr in tables.items():
        print(f"\n{task} (automatic lr per seed: {', '.join(f'{v:g}' for v in lrs[task])})\n")
        print("| lr | selection | slice before | slice after | slice gain | cost outside the slice | failed |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for lr, by_selection in by_lr.items():
            for selection, s in by_selection.items():
                print(f"| {lr} | {selection} | {s.get('slice_before', '-')} | {s.get('slice_after', '-')} |"
                      f" {s.get('slice_gain', '-')} | {s.get('cost_outside', '-')} | {s.get('failed', 0)} |")


def main_runs(args: argparse.Namespace, log_dir: str) -> dict:
    results: dict = {task: {} for task in args.tasks}
    lrs: dict = {task: [] for task in args.tasks}
    for name in args.tasks:
        for seed in args.seed_list:
            task = make_task(name, seed)
            trained = train_model(task, seed)
            first = run_one(task, trained, {}, seed, "auto", log_dir)  # the default: finds the automatic lr
            if "failed" in first:
                print(f"{name} seed {seed}: the default run failed: {first['failed']}", flush=True)
                continue
            auto = first["lr"]
            lrs[name].append(auto)
            for label, factor in zip(("auto/3", "auto", "auto*3"), LR_FACTORS):
                for selection in (SELECTIONS if args.selections is None else args.selections):
                    row = first if (selection == "default" and factor == 1.0) else run_one(
                        task, trained, selection_arguments(selection), seed, auto * factor, log_dir)
                    results[name].setdefault(label, {}).setdefault(selection, []).append(row)
                    print(f"{name} seed {seed} lr {label} ({auto * factor:.3g}) {selection:15s}"
                          f" {_line(row)}", flush=True)
    tables = {name: {lr: {s: summary(rows) for s, rows in by_sel.items()} for lr, by_sel in by_lr.items()}
              for name, by_lr in results.items()}
    print_tables(tables, lrs)
    verdicts = goals(tables) if args.selections is None else {}
    print("\ngoals at the automatic lr:", json.dumps(verdicts, indent=1))
    return {"tables": tables, "automatic_lr": lrs, "goals": verdicts, "results": results}


def study_runs(args: argparse.Namespace, log_dir: str) -> dict:
    variants = STUDIES[args.study]
    results: dict = {task: {v: [] for v in variants} for task in args.tasks}
    weights: dict = {task: [] for task in args.tasks}  # projected default: the anchors' weight of every step
    cosines: dict = {task: [] for task in args.tasks}  # the default's protect cosine of every step
    for name in args.tasks:
        for seed in args.seed_list:
            task = make_task(name, seed)
            trained = train_model(task, seed)
            for variant, arguments in variants.items():
                row = run_one(task, trained, arguments, seed, "auto", log_dir)
                results[name][variant].append(row)
                print(f"{name} seed {seed} {variant:38s} {_line(row)}", flush=True)
                if arguments in ({}, {"protect_per_step": 0}) and "anchor_weights" in row:
                    weights[name] += row["anchor_weights"]
                if variant == next(iter(variants)) and "protect_cosines" in row:
                    cosines[name] += row["protect_cosines"]
    tables = {name: {v: summary(rows) for v, rows in by_variant.items()} for name, by_variant in results.items()}
    for name, by_variant in tables.items():
        print(f"\n{name} (automatic lr)\n\n| variant | slice before | slice after | slice gain | cost outside the slice |")
        print("| --- | --- | --- | --- | --- |")
        for variant, s in by_variant.items():
            print(f"| {variant} | {s.get('slice_before')} | {s.get('slice_after')} | {s.get('slice_gain')} |"
                  f" {s.get('cost_outside')} |")
    out = {"study": args.study, "tables": tables, "results": results}
    if args.study in ("protect", "influence", "constrained"):
        out["versus_anchors"] = versus_anchors(tables)
        out["protect_projected_steps"] = {name: {"steps": len(c), "projected": sum(v < 0 for v in c)}
                                          for name, c in cosines.items()}
        print("\nagainst anchors:", json.dumps(out["versus_anchors"], indent=1))
        print("default's steps projected:", json.dumps(out["protect_projected_steps"], indent=1))
    if args.study == "projection":
        out["versus_anchors"] = versus_anchors(tables)
        out["anchor_weights"] = {name: weight_summary(w) for name, w in weights.items()}
        print("\nagainst anchors:", json.dumps(out["versus_anchors"], indent=1))
        print("anchors' weights of the default:", json.dumps(out["anchor_weights"], indent=1))
    return out


def versus_anchors(tables: dict) -> dict:
    """Per task and variant: slice gain >= anchors' and cost <= half of anchors' (or <= 0), means over seeds."""
    verdicts: dict = {}
    for name, by_variant in tables.items():
        a = by_variant.get("anchors", {})
        verdicts[name] = {v: {"gain_at_least_anchors": s["slice_gain"] >= a["slice_gain"],
                              "cost_at_most_half_of_anchors": s["cost_outside"] <= max(a["cost_outside"] / 2, 0.0)}
                          for v, s in by_variant.items() if v != "anchors" and "slice_gain" in s and "slice_gain" in a}
    return verdicts


def weight_summary(weights: list[float]) -> dict:
    """How often the projection changed a step (weight > 1) and how large the weights were."""
    if not weights:
        return {}
    above = [w for w in weights if w > 1]
    return {"steps": len(weights), "steps_reweighted": len(above),
            "median_weight": round(statistics.median(weights), 2), "max_weight": round(max(weights), 1)}


def _line(row: dict) -> str:
    if "failed" in row:
        return f"FAILED: {row['failed'][:200]}"
    return (f"slice {row['slice_before']:.3f} -> {row['slice_after']:.3f}  outside {row['others_before']:.3f} ->"
            f" {row['others_after']:.3f}  cpu {row['cpu_seconds']:.1f}s")


def plot(results_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = json.loads(results_file.read_text())["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), squeeze=False)
    markers = {"auto/3": "v", "auto": "o", "auto*3": "^"}
    colours = dict(zip(SELECTIONS, ("C3", "C0", "C2", "C4", "C7", "C1")))
    for ax, (task, by_lr) in zip(axes[0], tables.items()):
        for lr, by_selection in by_lr.items():
            for selection, s in by_selection.items():
                if "slice_gain" in s:
                    ax.scatter(s["cost_outside"], s["slice_gain"], marker=markers[lr], color=colours[selection],
                               s=50 if lr == "auto" else 25, label=selection if lr == "auto" else None)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("cost outside the slice (points)")
    axes[0][0].set_ylabel("held-out slice gain (points)")
    axes[0][0].legend(fontsize=7, title="o auto lr, v /3, ^ x3", title_fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def merge_studies(parts: list[dict], out: Path) -> None:
    """--merge for --study files (tasks run in separate processes): per-task entries side by side."""
    merged: dict = {"study": parts[0]["study"]}
    for key in ("tables", "results", "versus_anchors", "protect_projected_steps", "anchor_weights"):
        if key in parts[0]:
            merged[key] = {task: value for part in parts for task, value in part[key].items()}
    merged["settings"] = {**parts[0]["settings"], "tasks": [t for p in parts for t in p["settings"]["tasks"]]}
    merged["total"] = {"cpu_seconds": sum(p["total"]["cpu_seconds"] for p in parts),
                       "wall_seconds_per_process": [p["total"]["wall_seconds"] for p in parts]}
    print(markdown_tables(merged))
    out.write_text(json.dumps(merged, indent=1))


def merge(files: list[Path], out: Path) -> None:
    parts = [json.loads(f.read_text()) for f in files]
    if "study" in parts[0]:
        merge_studies(parts, out)
        return
    merged: dict = {key: {} for key in ("tables", "automatic_lr", "results")}
    for part in parts:
        for key in merged:
            merged[key].update(part[key])
    merged["goals"] = goals(merged["tables"])
    merged["settings"] = {**parts[0]["settings"], "tasks": [t for p in parts for t in p["settings"]["tasks"]]}
    merged["total"] = {"cpu_seconds": sum(p["total"]["cpu_seconds"] for p in parts),
                       "wall_seconds_per_process": [p["total"]["wall_seconds"] for p in parts]}
    print_tables(merged["tables"], merged["automatic_lr"])
    print("\ngoals at the automatic lr:", json.dumps(merged["goals"], indent=1))
    out.write_text(json.dumps(merged, indent=1))


def update(main_file: Path, parts: list[Path], note: str) -> None:
    """Replace the rows of the selections that ``parts`` (main runs with --selections) measured in ``main_file``
    (the others, e.g. baselines a code change does not touch, are kept), recompute the goals and record the
    update. The automatic lr of every task and seed must be the one the file has (the same trained weights)."""
    data = json.loads(main_file.read_text())
    updated: list = []
    for path in parts:
        part = json.loads(path.read_text())
        for task, lrs in part["automatic_lr"].items():
            if lrs != data["automatic_lr"][task]:
                raise SystemExit(f"{path}: automatic lr of {task} is {lrs}, the file's {data['automatic_lr'][task]}")
        for task, by_lr in part["results"].items():
            for lr, by_selection in by_lr.items():
                for selection, rows in by_selection.items():
                    data["results"][task][lr][selection] = rows
                    data["tables"][task][lr][selection] = part["tables"][task][lr][selection]
        updated.append({"file": path.name, "tasks": part["settings"]["tasks"],
                        "selections": part["settings"].get("selections"), **part["total"]})
    data["goals"] = goals(data["tables"])
    data.setdefault("updates", []).append({"note": note, "parts": updated,
                                           "cpu_seconds": sum(u["cpu_seconds"] for u in updated),
                                           "wall_seconds_per_process": [u["wall_seconds"] for u in updated]})
    print_tables(data["tables"], data["automatic_lr"])
    print("\ngoals at the automatic lr:", json.dumps(data["goals"], indent=1))
    main_file.write_text(json.dumps(data, indent=1))


def markdown_tables(data: dict) -> str:
    """A --study file's tables, one per task, as docs/error-correction.md prints them."""
    lines: list[str] = []
    for task, by_variant in data["tables"].items():
        lines += [f"**{task}**", "", "| variant | slice before | slice after | slice gain | cost outside the slice |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {v} | {s['slice_before']} | {s['slice_after']} | {s['slice_gain']} | {s['cost_outside']} |"
                  for v, s in by_variant.items()]
        lines.append("")
    return "\n".join(lines)


def markdown(results_file: Path) -> str:
    """The docs' tables (docs/error-correction.md) from a results file, as printed there."""
    data = json.loads(results_file.read_text())
    lines: list[str] = []
    if "automatic_lr" not in data:  # a --study file
        return markdown_tables(data)
    for task, by_lr in data["tables"].items():
        lrs = ", ".join(f"{v:.3g}" for v in data["automatic_lr"][task])
        lines += [f"**{task}** (automatic lr per seed: {lrs}); slice gain / cost outside the slice, points", "",
                  "| selection | " + " | ".join(f"lr {lr}" for lr in by_lr) + " |",
                  "| --- |" + " --- |" * len(by_lr)]
        for selection in SELECTIONS:
            cells = []
            for by_selection in by_lr.values():
                s = by_selection.get(selection, {})
                cells.append(f"{s['slice_gain']} / {s['cost_outside']}" if "slice_gain" in s else "failed")
            lines.append(f"| {selection} | " + " | ".join(cells) + " |")
        lines.append("")
    names = {"gain_at_least_anchors": "default's slice gain >= anchors'",
             "cost_at_most_half_of_anchors": "default's cost <= half of anchors' (or none)",
             "helpful_above_random_and_harmful_every_lr": "helpful > random and > harmful (every lr)",
             "default_above_random_and_harmful_every_lr": "default > random and > harmful (every lr)"}
    tasks = list(data["goals"])
    lines += ["| goal (automatic lr, mean over seeds) | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for key, label in names.items():
        lines.append(f"| {label} | " + " | ".join("yes" if data["goals"][t].get(key) else "no" for t in tasks) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--selections", nargs="+", choices=SELECTIONS, default=None, help="a subset (no goals)")
    parser.add_argument("--study", nargs="?", const="design", choices=STUDIES, default=None,
                        help="variants at the automatic lr: 'design' (default), 'projection', 'protect', 'influence'"
                        " or 'constrained'")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="draw the Pareto plot from --json's file")
    parser.add_argument("--plot-only", action="store_true", help="only draw the plot from an existing --json file")
    parser.add_argument("--markdown", action="store_true", help="print the docs' tables from --json's file")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="merge main-run results files (tasks"
                        " run in separate processes) into --json, recompute the goals and draw --plot")
    parser.add_argument("--update", type=Path, nargs="+", default=None, help="replace, in --json's main results"
                        " file, the rows of the selections these --selections runs measured; recompute the goals")
    parser.add_argument("--note", default="", help="with --update: why the rows were re-measured")
    args = parser.parse_args()
    if args.update:
        update(args.json, args.update, args.note)
        if args.plot is not None:
            plot(args.json, args.plot)
        return
    if args.merge:
        merge(args.merge, args.json)
        if args.plot is not None:
            plot(args.json, args.plot)
        return
    if args.markdown:
        print(markdown(args.json))
        return
    if args.plot_only:
        plot(args.json, args.plot)
        return
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as log_dir:
        out = study_runs(args, log_dir) if args.study else main_runs(args, log_dir)
    defaults = CorrectionConfig()
    out["settings"] = {"seeds": args.seed_list, "tasks": args.tasks, "selections": args.selections,
                       "project_replay": defaults.project_replay, "protect_per_step": defaults.protect_per_step,
                       "solver": SOLVER, "solver_options": SOLVER_OPTIONS,
                       "default_selection": defaults.selection, "guard_per_iteration": defaults.guard_per_iteration,
                       "iterations": defaults.iterations, "anchors_per_iteration": defaults.anchors_per_iteration,
                       "examples_per_iteration": defaults.examples_per_iteration,
                       "steps_per_iteration": defaults.steps_per_iteration, "optimizer": defaults.optimizer,
                       "machine": platform.machine(), "torch": torch.__version__}
    out["total"] = {"cpu_seconds": round(time.process_time() - start_cpu),
                    "wall_seconds": round(time.perf_counter() - start_wall)}
    print(f"\ntotal: {out['total']['cpu_seconds']} s CPU, {out['total']['wall_seconds']} s wall")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
        if args.plot is not None and not args.study:
            plot(args.json, args.plot)


if __name__ == "__main__":
    main()
