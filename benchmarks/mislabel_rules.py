#!/usr/bin/env python
"""Other ranking and count rules on the stored runs of ``benchmarks/mislabel.py`` (#30): chosen on two models,
checked on the other two, against the default ``el2n_fitted`` ranking and the ``confident_joint`` count.

No training: every rule reads the callback recorder's tables that ``benchmarks/mislabel.py --dump DIR`` saved
(10 geometric checkpoints per run: loss, margin, EL2N and the probabilities), and the peers' mean metrics that
``benchmarks/mislabel.py`` measured on the same trained models (``--results``, the derived results file).

* Ranking rules (larger = more suspicious), with ``V_k`` the variance of EL2N across the examples at checkpoint
  ``k``, ``a_k`` the fraction predicted as labelled there and ``c_k`` the share of the weights ``V_k a_k`` up to
  ``k``: see :data:`RANKING_RULES`. A rule *holds* in a setting when its mean AUROC and recall when a tenth is
  checked are at least the best of the final loss, cleanlab and early EL2N (and of the final margin on lr),
  the issue's target (``three``), and at least the best of every peer (``best``, the docs' table).
* Count rules: see :data:`COUNT_RULES`; a rule holds when it is within 20% of the true number in every seed.

Protocol: a rule is *chosen* when, on the models in ``CHOSEN_ON``, it holds in more settings than the default
and in every setting the default holds; a chosen rule is then checked on the other models (``CHECKED_ON``).
None of the rules below was chosen (``chosen`` in the results file), so the defaults stay.

Usage::

    python benchmarks/mislabel_rules.py --dump /tmp/mislabel-dump     # writes benchmarks/mislabel-rules-results.json
    python benchmarks/mislabel_rules.py --markdown                     # the tables docs/mislabel.md quotes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_influence.analysis.noise_count import confident_joint_count  # noqa: E402
from lightning_influence.analysis.signal_scores import (  # noqa: E402
    DEFAULT_SCORE,
    SEPARATION_POWER,
    component_scores,
    rank_mean,
    separation,
)

RESULTS = Path(__file__).with_name("mislabel-results.json")
OUT = Path(__file__).with_name("mislabel-rules-results.json")
CHOSEN_ON, CHECKED_ON = ("lr", "mlp"), ("cnn", "text")
THREE = ("loss", "cleanlab", "early_el2n_dense")  # the peers; "best" adds aum_dense, forgetting_dense
Tables = dict[str, Any]


def tables(saved: dict[str, Any]) -> Tables:
    """The callback recorder's tables of one stored run, NaN-free, with ``V_k`` and ``a_k``."""
    state = saved["callback"]
    el2n = torch.nan_to_num(state["signals"]["el2n"].double())
    margin = torch.nan_to_num(state["signals"]["margin"].double(), nan=-1.0)
    labels = state["labels"].clamp(min=0)
    return {"el2n": el2n, "margin": margin, "loss": torch.nan_to_num(state["signals"]["loss"].double()),
            "epochs": list(state["epochs_recorded"]), "labels": labels,
            "probs": [torch.nan_to_num(p.double()) for p in state["probabilities"]],
            "V": el2n.var(dim=0), "a": (margin > 0).double().mean(dim=0), "eta": separation(el2n, labels),
            "eta_pooled": separation(el2n)}


def weighted(table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (table * weights).sum(dim=1) / weights.sum().clamp(min=1e-12)


def column_ranks(table: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(table)
    for k in range(table.shape[1]):
        ranks[torch.argsort(table[:, k], stable=True), k] = torch.arange(len(table), dtype=table.dtype)
    return ranks / max(1, len(table) - 1)


def late(t: Tables, power: float) -> torch.Tensor:
    w = t["V"] * t["a"]
    return weighted(t["el2n"], w * (w.cumsum(0) / w.sum()) ** power)


def principal(t: Tables) -> torch.Tensor:
    centred = t["el2n"] - t["el2n"].mean(dim=0)
    loading = torch.linalg.svd(centred, full_matrices=False).Vh[0].abs()
    return t["el2n"] @ loading


def plateau_end(t: Tables, fraction: float = 0.8) -> torch.Tensor:
    w = t["V"] * t["a"]
    end = peak = int(w.argmax())
    while end + 1 < len(w) and w[end + 1] >= fraction * w[peak]:
        end += 1
    return t["el2n"][:, end]


def library(t: Tables, name: str) -> torch.Tensor:
    signals = {"el2n": t["el2n"], "margin": t["margin"], "loss": t["loss"]}
    return component_scores(signals, t["epochs"], labels=t["labels"])[name]


def separated(power: float, spread: float = 0.0, pooled: bool = False) -> Callable[[Tables], torch.Tensor]:
    """EL2N weighted by ``V_k^spread a_k (eta_k / max eta)^power`` (``pooled``: eta over all examples at once)."""
    def rule(t: Tables) -> torch.Tensor:
        eta = t["eta_pooled" if pooled else "eta"]
        return weighted(t["el2n"], t["V"] ** spread * t["a"] * (eta / eta.max()) ** power)
    return rule


POWERS = (4, 8, 12, 16, 24, 32, 48, 64)
#: The separation weights' grid: the default is the smallest power that holds in the most lr and mlp settings,
#: with the simplest weights among those (no ``V_k``).
SEPARATION_GRID = {**{f"separated_p{p}": (f"weights a_k (eta_k / max eta)^{p}", separated(p)) for p in POWERS},
                   **{f"separated_p{p}_spread": (f"weights V_k a_k (eta_k / max eta)^{p}", separated(p, 1.0))
                      for p in POWERS},
                   **{f"separated_p{p}_sqrt_spread": (f"weights V_k^(1/2) a_k (eta_k / max eta)^{p}",
                                                      separated(p, 0.5)) for p in POWERS},
                   **{f"separated_p{p}_pooled": (f"weights a_k (eta_k / max eta)^{p}, eta over all examples at once",
                                                 separated(p, pooled=True)) for p in (8, 16, 24)}}


RANKING_RULES: dict[str, tuple[str, Callable[[Tables], torch.Tensor]]] = {
    "el2n_fitted": ("the default before: EL2N weighted by V_k a_k", lambda t: library(t, "el2n_fitted")),
    DEFAULT_SCORE: (f"the default now: weights a_k (eta_k / max eta)^{SEPARATION_POWER}, eta per class",
                    lambda t: library(t, DEFAULT_SCORE)),
    "el2n_fitted_a2": ("weights V_k a_k^2", lambda t: weighted(t["el2n"], t["V"] * t["a"] ** 2)),
    "el2n_fitted_a4": ("weights V_k a_k^4", lambda t: weighted(t["el2n"], t["V"] * t["a"] ** 4)),
    "el2n_fitted_squared": ("weights (V_k a_k)^2", lambda t: weighted(t["el2n"], (t["V"] * t["a"]) ** 2)),
    "el2n_fitted_epochs": ("weights V_k a_k (epoch_k + 1)^(1/4): later checkpoints cover more epochs",
                           lambda t: weighted(t["el2n"], t["V"] * t["a"] * (torch.tensor(t["epochs"]) + 1.0) ** 0.25)),
    "el2n_fitted_late_0.25": ("weights V_k a_k c_k^(1/4): towards the later part of the separation", lambda t: late(t, 0.25)),
    "el2n_fitted_late_0.5": ("weights V_k a_k c_k^(1/2)", lambda t: late(t, 0.5)),
    "el2n_fitted_late_1": ("weights V_k a_k c_k", lambda t: late(t, 1.0)),
    "el2n_fitted_ranks": ("per-checkpoint ranks of EL2N, weights V_k a_k",
                          lambda t: weighted(column_ranks(t["el2n"]), t["V"] * t["a"])),
    "margin_fitted": ("minus the margin, weights V_k a_k", lambda t: weighted(-t["margin"], t["V"] * t["a"])),
    "loss_fitted": ("the loss, weights V_k a_k", lambda t: weighted(t["loss"], t["V"] * t["a"])),
    "el2n_principal": ("EL2N weighted by the first principal direction of the centred EL2N table", principal),
    "el2n_plateau_end": ("EL2N at the last checkpoint keeping V_k a_k >= 0.8 of its peak", plateau_end),
    "el2n_fitted+final_margin": ("rank mean of el2n_fitted and the final margin",
                                 lambda t: rank_mean(library(t, "el2n_fitted"), -t["margin"][:, -1])),
    **SEPARATION_GRID,
}


def peak(t: Tables) -> int:
    return int(t["V"].argmax())


def mean_probs(t: Tables) -> torch.Tensor:
    w = t["V"] * t["a"]
    return sum(float(wk) * p for wk, p in zip(w, t["probs"])) / float(w.sum())


def disagree(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) != labels).sum())


def below_threshold(t: Tables) -> float:
    """At ``k*``: the examples whose given label's probability is below its class's mean and for which another
    class reaches its own threshold (a plausible runner-up)."""
    probs, labels = t["probs"][peak(t)], t["labels"]
    one_hot = F.one_hot(labels, probs.shape[1]).double()
    thresholds = (one_hot * probs).sum(dim=0) / one_hot.sum(dim=0).clamp(min=1)
    given = probs.gather(1, labels[:, None]).squeeze(1)
    runner_up = (probs.scatter(1, labels[:, None], -1.0) >= thresholds[None, :]).any(dim=1)
    return float(((given < thresholds[labels]) & runner_up).sum())


def cj(t: Tables, k: int) -> float:
    return confident_joint_count(t["probs"][min(k, len(t["probs"]) - 1)], t["labels"])


def plateau_mean(t: Tables, fraction: float = 0.9) -> float:
    end = first = peak(t)
    while end + 1 < len(t["V"]) and t["V"][end + 1] >= fraction * t["V"][first]:
        end += 1
    return statistics.fmean(cj(t, k) for k in range(first, end + 1))


COUNT_RULES: dict[str, tuple[str, Callable[[Tables], float]]] = {
    "confident_joint": ("the default: the confident joint at k* = argmax V_k", lambda t: cj(t, peak(t))),
    "confident_joint_fitted_peak": ("the confident joint at argmax V_k a_k", lambda t: cj(t, int((t["V"] * t["a"]).argmax()))),
    "confident_joint_plateau": ("the confident joint averaged over k* and the checkpoints after it keeping V_k >= 0.9 V_k*",
                                plateau_mean),
    "confident_joint_fitted_mean": ("every checkpoint's confident joint averaged with weights V_k a_k",
                                    lambda t: float(sum(float(w) * cj(t, k) for k, w in enumerate(t["V"] * t["a"]))
                                                    / float((t["V"] * t["a"]).sum()))),
    "confident_joint_of_mean_probs": ("the confident joint of the probabilities averaged with weights V_k a_k",
                                      lambda t: confident_joint_count(mean_probs(t), t["labels"])),
    "below_class_threshold": ("given label below its class's threshold at k* with a runner-up above its own",
                              below_threshold),
    "disagree_mean_probs": ("argmax of the V_k a_k-averaged probabilities is not the given label",
                            lambda t: disagree(mean_probs(t), t["labels"])),
    "probability_mass": ("sum of 1 - p_y over the V_k a_k-averaged probabilities",
                         lambda t: float((1 - mean_probs(t).gather(1, t["labels"][:, None])).sum())),
    "mean_confident_joint_disagree": ("mean of the default and disagree_mean_probs",
                                      lambda t: 0.5 * (cj(t, peak(t)) + disagree(mean_probs(t), t["labels"]))),
    "median_of_three": ("median of the confident joint at k* and at k*+1 and disagree_mean_probs",
                        lambda t: statistics.median([cj(t, peak(t)), cj(t, peak(t) + 1), disagree(mean_probs(t), t["labels"])])),
    "geometric_confident_joint_disagree_peak": (
        "geometric mean of the default and the disagreements at k*",
        lambda t: (cj(t, peak(t)) * disagree(t["probs"][peak(t)], t["labels"])) ** 0.5),
}


def ranking_metrics(score: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    order = torch.argsort(score.double(), descending=True, stable=True)
    return {"auroc": float(roc_auc_score(flipped.numpy(), score.double().numpy())),
            "recall@10%": float(flipped[order[: round(0.1 * len(flipped))]].sum() / flipped.sum())}


def ranking_setting(key: str, entry: dict[str, Any], runs: list[tuple[Tables, torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mean = entry["mean"]
    for name, (_, rule) in RANKING_RULES.items():
        per_seed = [ranking_metrics(rule(t), flipped) for t, flipped in runs]
        row = {m: statistics.fmean(r[m] for r in per_seed) for m in ("auroc", "recall@10%")}
        for target, peers in (("three", list(THREE)), ("best", [*THREE, "aum_dense", "forgetting_dense"])):
            if key.startswith("lr/"):
                peers = [*peers, "final_margin"]
            gap = {m: row[m] - max(mean[p][m] for p in peers) for m in ("auroc", "recall@10%")}
            row[f"{target}_gap"] = [gap["auroc"], gap["recall@10%"]]
            row[f"holds_{target}"] = min(gap.values()) >= -1e-6  # recalls are float32 fractions
        out[name] = row
    return out


def count_setting(runs: list[tuple[Tables, torch.Tensor]]) -> dict[str, Any]:
    out = {}
    for name, (_, rule) in COUNT_RULES.items():
        ratios = [rule(t) / float(flipped.sum()) for t, flipped in runs]
        out[name] = {"ratios": ratios, "holds": all(abs(r - 1) <= 0.2 for r in ratios)}
    return out


def tally(rows: dict[str, dict[str, Any]], rules: list[str], flag: str) -> dict[str, Any]:
    """Per rule: settings held on the chosen and checked models, and those the default holds and it loses."""
    default = rules[0]
    out = {}
    for rule in rules:
        held = {key: bool(row[rule][flag]) for key, row in rows.items()}
        part = {name: sum(v for k, v in held.items() if k.split("/")[0] in models)
                for name, models in (("chosen_on", CHOSEN_ON), ("checked_on", CHECKED_ON))}
        lost = [k for k, v in held.items() if rows[k][default][flag] and not v]
        gained = [k for k, v in held.items() if v and not rows[k][default][flag]]
        out[rule] = {**part, "all": sum(held.values()), "gained": gained, "lost": lost,
                     "lost_on_chosen": [k for k in lost if k.split("/")[0] in CHOSEN_ON],
                     "chosen_by_protocol": False}
    for rule in rules[1:]:
        row = out[rule]
        row["chosen_by_protocol"] = row["chosen_on"] > out[default]["chosen_on"] and not row["lost_on_chosen"]
    return out


def study(dump: Path, results: dict[str, Any]) -> dict[str, Any]:
    ranking: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for key, entry in results["results"].items():
        model, noise = key.split("/")
        runs = []
        for seed in results["settings"]["seeds"]:
            saved = torch.load(dump / f"{model}_{noise}_{seed}.pt", weights_only=False)
            runs.append((tables(saved), saved["flipped"]))
        ranking[key] = ranking_setting(key, entry, runs)
        counts[key] = count_setting(runs)
        print(key, flush=True)
    checks = {"ranking_three": tally(ranking, list(RANKING_RULES), "holds_three"),
              "ranking_best": tally(ranking, list(RANKING_RULES), "holds_best"),
              "count": tally(counts, list(COUNT_RULES), "holds")}
    return {"settings": {"chosen_on": list(CHOSEN_ON), "checked_on": list(CHECKED_ON), "seeds": results["settings"]["seeds"],
                         "peers_from": str(RESULTS.relative_to(ROOT)), "baseline": "el2n_fitted",
                         "powers": list(POWERS), "default_power": SEPARATION_POWER,
                         "ranking_rules": {k: v[0] for k, v in RANKING_RULES.items()},
                         "count_rules": {k: v[0] for k, v in COUNT_RULES.items()}},
            "ranking": ranking, "count": counts, "checks": checks, "chosen": choose(checks)}


def choose(checks: dict[str, Any]) -> dict[str, Any]:
    """The protocol's pick: among the rules chosen on ``CHOSEN_ON`` for both ranking targets, the one holding in
    the most settings there, then the smallest separation power, then the simplest weights (the grid's order)."""
    order = {name: (float(name.split("_p")[1].split("_")[0]) if name in SEPARATION_GRID else float("inf"), i)
             for i, name in enumerate(RANKING_RULES)}
    qualified = [r for r in RANKING_RULES if checks["ranking_three"][r]["chosen_by_protocol"]
                 and not checks["ranking_best"][r]["lost_on_chosen"]]
    qualified.sort(key=lambda r: (-checks["ranking_three"][r]["chosen_on"] - checks["ranking_best"][r]["chosen_on"],
                                  *order[r]))
    return {"ranking": qualified[0] if qualified else None, "ranking_qualified": qualified,
            "count": [r for r, v in checks["count"].items() if v["chosen_by_protocol"]] or None}


def markdown(stored: dict[str, Any]) -> str:
    """The tables ``docs/mislabel.md`` quotes (every number a value of the results file)."""
    three, best = stored["checks"]["ranking_three"], stored["checks"]["ranking_best"]
    lines = ["| ranking rule | target held: lr+mlp / cnn+text / all | all peers: lr+mlp / cnn+text / all | gained |"
             " lost |", "| --- | --- | --- | --- | --- |"]
    for rule in RANKING_RULES:
        if rule in SEPARATION_GRID:
            continue
        row, other = three[rule], best[rule]
        lines.append(f"| `{rule}` | {row['chosen_on']} / {row['checked_on']} / {row['all']} | {other['chosen_on']} / "
                     f"{other['checked_on']} / {other['all']} | {', '.join(row['gained']) or '-'} | "
                     f"{', '.join(row['lost']) or '-'} |")
    families = {"": "a_k", "_sqrt_spread": "sqrt(V_k) a_k", "_spread": "V_k a_k", "_pooled": "a_k, eta pooled"}
    lines += ["", "| weights times (eta_k / max eta)^p | " + " | ".join(f"p = {p}" for p in POWERS) + " |",
              "| --- |" + " --- |" * len(POWERS)]
    for suffix, label in families.items():
        cells = []
        for p in POWERS:
            rule = f"separated_p{p}{suffix}"
            cells.append(f"{three[rule]['chosen_on']}/{three[rule]['checked_on']}, "
                         f"{best[rule]['chosen_on']}/{best[rule]['checked_on']}" if rule in three else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    misses = [k for k, r in stored["ranking"].items() if not r["el2n_fitted"]["holds_three"]]
    lines += ["", "| ranking rule | " + " | ".join(misses) + " |", "| --- |" + " --- |" * len(misses)]
    for rule in RANKING_RULES:
        if rule in SEPARATION_GRID:
            continue
        cells = [f"{stored['ranking'][k][rule]['three_gap'][0]:+.4f} / {stored['ranking'][k][rule]['three_gap'][1]:+.4f}"
                 for k in misses]
        lines.append(f"| `{rule}` | " + " | ".join(cells) + " |")
    lines += ["", "| count rule | within 20%: lr+mlp / cnn+text / all | gained | lost |", "| --- | --- | --- | --- |"]
    for rule, row in stored["checks"]["count"].items():
        lines.append(f"| `{rule}` | {row['chosen_on']} / {row['checked_on']} / {row['all']} | "
                     f"{', '.join(row['gained']) or '-'} | {', '.join(row['lost']) or '-'} |")
    return "\n".join(lines) + f"\n\nchosen: {stored['chosen']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", type=Path, help="the recorder tables benchmarks/mislabel.py --dump saved")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the peers' metrics on the same runs")
    parser.add_argument("--json", type=Path, default=OUT)
    parser.add_argument("--markdown", action="store_true", help="print the docs' tables from --json")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())))
        return
    if args.dump is None:
        parser.error("--dump is required (the tables of benchmarks/mislabel.py --dump)")
    stored = study(args.dump, json.loads(args.results.read_text()))
    args.json.write_text(json.dumps(stored, indent=1) + "\n")
    print(markdown(stored))


if __name__ == "__main__":
    main()
