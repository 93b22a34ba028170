#!/usr/bin/env python
"""Which self-check and snapshot schedule make the callbacks' default predict retraining best? (a study for #25)

On the seven models of ``benchmarks/lds.py`` (its cached retrainings, seeds and evaluation: LDS against 50
half-subset retrainings), this varies three parts of the callbacks' default one at a time and together:

* ``K``: how many weight snapshots the influence is averaged over (spread evenly over the fit by
  ``snapshot_epochs``, the final weights included; 1 = the final weights alone);
* ``grid``: the self-check's candidate dampings, the decades ``1e-4 ... 1`` or the half-decades between them too;
* ``check``: what the self-check scores each candidate with, the final weights' influence alone (the package
  until now) or the influence averaged over the same ``K`` snapshots the analysis reports (``averaged``);
* per-snapshot damping (``final_scaled``, exact models only): the damping the final-weights check chose, times
  each snapshot's top Gauss-Newton eigenvalue over the final weights' (every member damped alike relative to its
  own curvature, instead of the same absolute damping).

``--curvature regression_mlp`` adds the exact sweep under the Hessian beside the Gauss-Newton matrix (squared error:
the two differ by the residual term); ``--summarise`` writes, per variant at ``K = 3``, each model's LDS, its
change from the default and its margin over EK-FAC's best damping option (from ``lds-results.json``).

The self-check's retrainings are the package's own (``retrain_on_halves`` with the callbacks' settings: the
training's optimiser and batch size, half its epochs, 10 retrainings, the check's seed, 32 validation points
outside the evaluation set where the data have any); they are cached beside ``lds.py``'s. Every influence here is
exact (one eigendecomposition of the Gauss-Newton matrix per snapshot) up to 20k parameters, and CG for
``tiny_bert``, as in ``lds.py``'s sweep. Writes ``benchmarks/lds-snapshots-results.json``.

Usage::

    python benchmarks/lds_snapshots.py --models regression_mlp,tiny_bert
    python benchmarks/lds_snapshots.py --models relu_mlp_adam --ks 1,3 --output /tmp/relu.json  # fewer snapshots
    python benchmarks/lds_snapshots.py --models "" --summarise --merge /tmp/relu.json  # into the results file

The results file was written that way: K = 1, 2, 3, 5, 8 on five models, 1, 2, 3 on the tanh MLP (3 epochs) and
1, 3 on the ReLU MLP (one eigendecomposition per snapshot), the per-snapshot damping merged in from runs with
K = 1, 3 (and 5).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds  # noqa: E402

from lightning_influence.analysis.damping_check import retrain_on_halves  # noqa: E402
from lightning_influence.config.defaults import SELF_CHECK_RETRAININGS, SELF_CHECK_SEED  # noqa: E402
from lightning_influence.core.tensors.data import IndexedData  # noqa: E402
from lightning_influence.core.trajectory import snapshot_epochs  # noqa: E402

RESULTS = lds.ROOT / "benchmarks" / "lds-snapshots-results.json"
DECADES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HALF_DECADES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
GRIDS = {"decades": DECADES, "half_decades": HALF_DECADES}
KS = (1, 2, 3, 5, 8)
#: the package's default until this study: decades, scored on the final weights, 3 snapshots
CURRENT = ("decades", "final", 3)


def concat(a: lds.Data, b: lds.Data) -> lds.Data:
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


def check_retrainings(name: str, spec: lds.Spec, model: torch.nn.Module, train_data: lds.Data, val: lds.Data
                      ) -> dict[str, Any]:
    """The package's self-check retrainings with the callbacks' settings (cached)."""
    key = json.dumps([name, lds.spec_key(spec), "check-v1", SELF_CHECK_RETRAININGS, SELF_CHECK_SEED], sort_keys=True)
    path = lds.CACHE / f"lds-check-{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    batch = spec.batch or lds.size(train_data)
    epochs = 1 if spec.optimizer == "lbfgs" else max(1, spec.epochs // 2)
    train = IndexedData.from_loader(lds.loader_of(train_data, batch))
    with torch.random.fork_rng():
        found = retrain_on_halves(model, spec.loss, train, val, lds.training_optimizer_of(spec), epochs=epochs,
                                  batch_size=batch, seed=SELF_CHECK_SEED)
    out = {"masks": found.masks, "losses": found.losses, "epochs": found.epochs, "seconds": found.seconds}
    torch.save(out, path)
    return out


def trained_model(name: str) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    """``lds.py``'s spec, data, cached retraining record and full model (eval mode) of ``name``."""
    spec = lds.SPECS[name]
    train_data, test = spec.data(spec.n_train, spec.n_test)
    args = argparse.Namespace(subsets=50, check_subsets=10, trak_models=5, quick=False, retrain=False)
    record = lds.retrainings(name, spec, train_data, test, args)
    model = spec.build()
    model.load_state_dict(record["state"])
    model.eval()
    return spec, train_data, test, record, model


def run_model(name: str, ks: tuple[int, ...]) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec, train_data, test, record, model = trained_model(name)
    val, disjoint = lds.validation_points(spec, test)
    check = check_retrainings(name, spec, model, train_data, val)
    points = concat(test, val)
    n_test = lds.size(test)
    exact = sum(p.numel() for p in model.parameters()) <= 20_000
    # the snapshots every schedule needs, from one seeded rerun of the full training
    wanted = set().union(*(snapshot_epochs(spec.epochs, k) for k in ks)) if spec.optimizer != "lbfgs" else set()
    taken: dict[int, dict[str, torch.Tensor]] = {}
    if wanted:
        lds_planned = lds.snapshot_epochs
        lds.snapshot_epochs = lambda epochs, count: wanted  # type: ignore[assignment]
        try:
            snaps: list[dict[str, torch.Tensor]] = []
            again = lds.train(spec, train_data, snapshots=snaps)
        finally:
            lds.snapshot_epochs = lds_planned  # type: ignore[assignment]
        assert all(torch.equal(v, record["state"][k]) for k, v in again.state_dict().items())
        taken = dict(zip(sorted(wanted), snaps))
    members = {spec.epochs - 1: lds.Attributions(name, spec, model, train_data, points, exact=exact)}
    for epoch, snap in taken.items():
        members[epoch] = lds.Attributions(name, spec, lds.snapshot_model(spec, snap), train_data, points, exact=exact)
    t_members = time.perf_counter() - t0
    grid = sorted(set(lds.SWEEP) | set(HALF_DECADES))
    cache: dict[tuple[int, float], torch.Tensor] = {}

    def scores(epoch: int, d: float) -> torch.Tensor:
        if (epoch, d) not in cache:
            cache[(epoch, d)] = members[epoch].at(d)
        return cache[(epoch, d)]

    schedules = {}
    for k in ks:
        epochs = sorted(snapshot_epochs(spec.epochs, k) & set(members)) + [spec.epochs - 1]
        if spec.optimizer == "lbfgs":
            epochs = [spec.epochs - 1]
        evaluation, checked, scaled = {}, {}, {}
        for d in grid:
            avg = sum(scores(e, d) for e in epochs) / len(epochs)
            evaluation[d] = float(lds.lds(avg[:n_test], record["masks"], record["losses"]).mean())
            per_point = lds.lds(avg[n_test:], check["masks"], check["losses"])
            checked[d] = float(per_point[per_point.isfinite()].mean())
            if exact:  # per-snapshot damping: d times the snapshot's top eigenvalue over the final weights'
                top = {e: float(members[e].eigh[0][-1]) for e in epochs}
                final_top = top[spec.epochs - 1]
                avg = sum(members[e].at(d * top[e] / final_top) for e in epochs) / len(epochs)
                scaled[d] = float(lds.lds(avg[:n_test], record["masks"], record["losses"]).mean())
        schedules[k] = {"epochs": [e + 1 for e in epochs], "lds": evaluation, "check_lds": checked,
                        "lds_scaled": scaled}
    best_fixed = max(schedules[1]["lds"].values())
    rules = {}
    for grid_name, candidates in GRIDS.items():
        for scored in ("final", "averaged"):
            for k in ks:
                table = schedules[k if scored == "averaged" else 1]["check_lds"]
                chosen = max(candidates, key=lambda d: table[d])
                value = schedules[k]["lds"][chosen]
                rules[f"{grid_name}/{scored}/K{k}"] = {"damping": chosen, "lds": round(value, 4),
                                                      "gap_to_best_fixed": round(best_fixed - value, 4)}
                if scored == "final" and schedules[k]["lds_scaled"]:  # the same choice, each snapshot scaled
                    value = schedules[k]["lds_scaled"][chosen]
                    rules[f"{grid_name}/final_scaled/K{k}"] = {"damping": chosen, "lds": round(value, 4),
                                                              "gap_to_best_fixed": round(best_fixed - value, 4)}
    out = {
        "model": name, "epochs": spec.epochs, "validation_disjoint_from_test": disjoint,
        "check_retraining_epochs": check["epochs"], "check_retraining_seconds": round(check["seconds"], 1),
        "best_fixed_final_weights": round(best_fixed, 4),
        "schedules": {str(k): {"epochs": v["epochs"], "lds": {f"{d:g}": round(x, 4) for d, x in v["lds"].items()},
                               "check_lds": {f"{d:g}": round(x, 4) for d, x in v["check_lds"].items()},
                               "lds_scaled": {f"{d:g}": round(x, 4) for d, x in v["lds_scaled"].items()}}
                      for k, v in schedules.items()},
        "rules": rules, "seconds_members": round(t_members, 1), "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"[{name}] best fixed {best_fixed:.4f}; {out['seconds']}s", flush=True)
    for k, v in out["schedules"].items():
        print(f"  K={k} epochs {v['epochs']}\n    lds   " + " ".join(f"{d}:{x:.3f}" for d, x in v["lds"].items())
              + "\n    scaled " + " ".join(f"{d}:{x:.3f}" for d, x in v["lds_scaled"].items())
              + "\n    check " + " ".join(f"{d}:{x:.3f}" for d, x in v["check_lds"].items()))
    for rule, r in rules.items():
        print(f"  {rule}: {r['damping']:g} -> {r['lds']:.4f} (gap {r['gap_to_best_fixed']:+.4f})")
    return out


def curvature_compare(name: str) -> dict[str, Any]:
    """The exact fixed-damping sweep of the final weights under the Gauss-Newton matrix and under the Hessian
    (None where ``lambda_min + d <= 0``: the damped Hessian is not positive definite there)."""
    from lightning_influence.core.tensors.modes import analysis_mode
    from lightning_influence.functional import make_problem

    spec, train_data, test, record, model = trained_model(name)
    g_train, g_test = lds.gradients(model, spec, train_data), lds.gradients(model, spec, test)
    out: dict[str, Any] = {}
    for curvature in ("gauss_newton", "hessian"):
        problem = make_problem(model, spec.loss, lds.loader_of(train_data), "exact", 1.0,
                               {**lds.options_of(spec), "curvature": curvature})
        with analysis_mode(model):
            w, q = problem.curvature_eigh()
        w, q = w.double(), q.double()
        a, b = g_test @ q, g_train @ q
        sweep = {}
        for d in sorted(set(lds.SWEEP) | {0.2}):
            ok = float(w[0]) + d > 0
            sweep[f"{d:g}"] = (round(float(lds.lds(-(a / (w + d)) @ b.T, record["masks"], record["losses"]).mean()), 4)
                               if ok else None)
        out[curvature] = {"min_eigenvalue": float(w[0]), "top_eigenvalue": float(w[-1]), "lds": sweep}
        print(f"[{name}] {curvature}: min {float(w[0]):.4g} top {float(w[-1]):.4g} {sweep}", flush=True)
    return out


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """Per variant at K = 3: LDS per model, change from the default's, margin over EK-FAC's best option."""
    peers = json.loads(lds.RESULTS.read_text())["models"]
    out: dict[str, Any] = {}
    current = "/".join(map(str, CURRENT[:2])) + f"/K{CURRENT[2]}"
    for variant in (f"{g}/{c}/K3" for g in GRIDS for c in ("final", "averaged", "final_scaled")):
        row: dict[str, Any] = {}
        for name, m in doc["models"].items():
            if variant not in m["rules"]:
                continue
            rows = peers[name]["rows"]["peers"]
            ekfac = max(rows[k]["lds"] for k in ("kronfluence_ekfac_default", "kronfluence_ekfac_heuristic"))
            value = m["rules"][variant]["lds"]
            row[name] = {"damping": m["rules"][variant]["damping"], "lds": value,
                         "change": round(value - m["rules"][current]["lds"], 4),
                         "over_ekfac_best": round(value - ekfac, 4)}
        out[variant] = row
    return out


def merge(models: dict[str, Any], other: dict[str, Any]) -> None:
    """Add another run's schedules, their fields and its rules to ``models`` (what is already there is kept: the
    runs are seeded, so a model's shared values agree; ``--merge`` checks that they do)."""
    for name, m in other.items():
        if name not in models:
            models[name] = m
            continue
        mine = models[name]
        for rule, value in m["rules"].items():
            assert rule not in mine["rules"] or mine["rules"][rule] == value, (name, rule)
            mine["rules"].setdefault(rule, value)
        for k, schedule in m["schedules"].items():
            target = mine["schedules"].setdefault(k, schedule)
            for field, value in schedule.items():
                target.setdefault(field, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(lds.SPECS))
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--curvature", default="", help="models whose Gauss-Newton and Hessian sweeps to compare")
    parser.add_argument("--summarise", action="store_true", help="only recompute the summary of the results file")
    parser.add_argument("--merge", default="", help="results files of other runs of this script to merge in")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ks = tuple(int(k) for k in args.ks.split(","))
    path = Path(args.output)
    doc = json.loads(path.read_text()) if path.exists() else {}
    models, curvature = doc.get("models", {}), doc.get("curvature", {})
    if not args.summarise:
        for name in filter(None, args.models.split(",")):
            models[name] = run_model(name, ks)
        for name in filter(None, args.curvature.split(",")):
            curvature[name] = curvature_compare(name)
    for other in filter(None, args.merge.split(",")):
        merge(models, json.loads(Path(other).read_text())["models"])
    doc = {"description": __doc__.split("\n")[0], "current_default": "/".join(map(str, CURRENT)),
           "grids": {k: list(v) for k, v in GRIDS.items()}, "models": models, "curvature": curvature}
    doc["summary_k3"] = summarise(doc)
    print(json.dumps(doc["summary_k3"], indent=1))
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
