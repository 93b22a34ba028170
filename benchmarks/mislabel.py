#!/usr/bin/env python
"""Finding flipped labels: signals recorded during training against final-weights rankings and cleanlab.

scikit-learn's digits (pixels / 16), a seeded split of 1,200 training / 597 test images. Three kinds of label
noise on the *training* labels, each chosen from a reference model (sklearn ``LogisticRegression``, 5-fold
out-of-fold probabilities on the clean labels):

* ``asym10``: 10% of the examples (uniformly chosen) flipped to their class's most-confused class (the
  class with the largest summed out-of-fold probability among the true class's examples);
* ``uniform30``: 30% flipped to a uniformly random other class;
* ``hard30``: the 30% with the lowest reference margin ``p_true - max_{j != true} p_j``, flipped to their
  runner-up class.

Three models, full-batch Adam (one step = one epoch), float64:

* ``lr``: ``nn.Linear(64, 10)``, ``mean CE + 1e-3/2 ||theta||^2``, lr 0.05, 500 epochs (near the minimum);
* ``mlp``: 64-64-10 tanh MLP, lr 1e-2, weight decay 1e-4, trained until training accuracy 1.0 (cap 3,000);
* ``cnn``: conv 3x3 (8 channels) + tanh + max-pool, 128-64-10 tanh head, same recipe and stop.

During training a :class:`~lightning_influence.analysis.training_signals.TrainingSignalRecorder` records loss,
logit margin and EL2N of every training example every ``RECORD_EVERY`` epochs (forward-only pass), and the
weights at each record are kept for the self-influence rankings. Rankings (each a score, larger = more
suspicious):

* from the recorder: ``el2n_window`` (the default: mean EL2N over the leading checkpoints chosen by
  ``separation_window``: past the one where EL2N varies most across examples), ``final_loss``, ``final_margin``,
  ``final_el2n`` (last checkpoint = final weights), ``early_loss``, ``early_el2n`` (checkpoint at 10% of
  training), ``mean_loss``, ``mean_el2n``, ``aum`` (areas under the curves over all checkpoints), and
  ``el2n_window@10``, ``mean_el2n@10`` (the same from 10 evenly spaced checkpoints only);
* ``si_final``: the library's self-influence ``|I(z, z)|`` at the final weights (lowrank, rank 64; damping
  1e-2 for the nets, 1e-3 = L2 for lr); ``si_early``: the same at the 10% snapshot;
* ``tracin_self``: ``sum_k ||grad L(z; theta_k)||^2`` over 10 evenly spaced snapshots (TracIn self-influence
  with a constant learning rate);
* ``cleanlab``: ``find_label_issues`` ranked by self-confidence on 5-fold out-of-fold probabilities (the
  same model and recipe per fold; sklearn LogisticRegression with the same L2 for lr), the flagged issues
  first then the rest by self-confidence; ``cleanlab_sc``: the self-confidence score alone;
* rank-average combinations (sum of the normalised ranks): ``el2n_window+si_early``, ``mean_el2n+aum``.

Metrics: recall at 5/10/20% of the training set checked, recall at k = number of flips (= precision at k),
AUROC (flipped vs clean), mean +- std over seeds, paired per-seed differences of the default ranking
``el2n_window`` against each other ranking (wins / ties / losses), and the time of each ranking as a multiple
of one training run of the same model (training steps only). Results go to ``benchmarks/mislabel-results.json``.

Usage::

    python benchmarks/mislabel.py              # seeds 3-5, 3 noise kinds, 3 models (654 s on 1 thread)
    python benchmarks/mislabel.py --quick      # 1 seed, asym10 only, 3 folds (~1 min), no JSON unless --json
    python benchmarks/mislabel.py --first-seed 0 --json design.json   # the seeds the default was chosen on
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_influence import self_influence
from lightning_influence.analysis.training_signals import TrainingSignalRecorder, separation_window
from lightning_influence.core.tensors.data import IndexedData

N_TRAIN = 1200
FRACTIONS = (0.05, 0.10, 0.20)
NOISES = {"asym10": 0.10, "uniform30": 0.30, "hard30": 0.30}
LR_L2 = 1e-3
NET_WEIGHT_DECAY = 1e-4
NET_DAMPING = 1e-2
RANK = 64
RECORD_EVERY = {"lr": 10, "mlp": 5, "cnn": 5}
LR_EPOCHS = 500
MAX_EPOCHS = 3000
TRACIN_SNAPSHOTS = 10
EARLY = 0.1
DEFAULT = "el2n_window"
RESULTS = Path(__file__).with_name("mislabel-results.json")


# -- data and noise --------------------------------------------------------------------------------------------
def split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images / 16.0, dtype=torch.float64), torch.tensor(labels)
    permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = permutation[:N_TRAIN], permutation[N_TRAIN:]
    return x[train], y[train], x[test], y[test]


def reference_probabilities(x: torch.Tensor, y: torch.Tensor, seed: int) -> np.ndarray:
    """Out-of-fold probabilities of a logistic regression on the *clean* labels (chooses the noise)."""
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_predict(LogisticRegression(C=1.0, max_iter=5000), x.numpy(), y.numpy(), cv=folds,
                             method="predict_proba")


def add_noise(kind: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """Noisy labels of ``kind``; every flipped label differs from the true one."""
    generator = torch.Generator().manual_seed(1000 + seed)
    count = round(NOISES[kind] * N_TRAIN)
    noisy = y.clone()
    if kind == "uniform30":
        flips = torch.randperm(N_TRAIN, generator=generator)[:count]
        noisy[flips] = (y[flips] + torch.randint(1, 10, (count,), generator=generator)) % 10
        return noisy
    probs = torch.from_numpy(reference_probabilities(x, y, seed))
    if kind == "asym10":
        confusion = torch.stack([probs[y == c].sum(0) for c in range(10)])
        confusion.fill_diagonal_(-1.0)
        most_confused = confusion.argmax(dim=1)
        flips = torch.randperm(N_TRAIN, generator=generator)[:count]
        noisy[flips] = most_confused[y[flips]]
        return noisy
    if kind == "hard30":
        others = probs.scatter(1, y[:, None], -1.0)
        margin = probs.gather(1, y[:, None]).squeeze(1) - others.amax(dim=1)
        flips = torch.argsort(margin, stable=True)[:count]
        noisy[flips] = others.argmax(dim=1)[flips]
        return noisy
    raise ValueError(kind)


# -- models and training ---------------------------------------------------------------------------------------
def make_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "lr":
        model = nn.Linear(64, 10)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    else:
        model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    return model.double()


class WholeTensors(TensorDataset):
    """A TensorDataset fetched a batch at a time (``__getitems__``), so the recorder's pass costs what the
    full-batch training step's data access costs (nothing) rather than 1,200 per-example collations."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _as_is(batch: Any) -> Any:
    return batch


def train(name: str, x: torch.Tensor, y: torch.Tensor, seed: int, recorder: TrainingSignalRecorder | None = None,
          snapshots: dict[int, dict] | None = None) -> tuple[nn.Module, int, float]:
    """Full-batch Adam; ``(model, epochs, seconds of the training steps alone)``.

    lr: fixed ``LR_EPOCHS``; nets: until the training step's own predictions fit every label (cap
    ``MAX_EPOCHS``). The recorder (and the snapshot copies) run between steps, outside the timed part.
    """
    model = make_model(name, seed)
    if name == "lr":
        optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=NET_WEIGHT_DECAY)
    data = IndexedData(WholeTensors(x, y), collate_fn=_as_is, batch_size=N_TRAIN)
    seconds, epoch, done = 0.0, 0, False
    while not done:
        began = time.perf_counter()
        optimiser.zero_grad()
        logits = model(x)
        objective = F.cross_entropy(logits, y)
        if name == "lr":
            objective = objective + 0.5 * LR_L2 * sum((p**2).sum() for p in model.parameters())
        objective.backward()
        optimiser.step()
        seconds += time.perf_counter() - began
        fitted = bool((logits.argmax(dim=1) == y).all())
        done = epoch + 1 >= (LR_EPOCHS if name == "lr" else MAX_EPOCHS) or (name != "lr" and fitted)
        if recorder is not None and (recorder.due(epoch) or done):
            recorder.record(model, data, epoch, force=done)
            if snapshots is not None:
                snapshots[epoch] = copy.deepcopy(model.state_dict())
        epoch += 1
    return model.eval(), epoch, seconds


def per_example_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets, reduction="none")


# -- rankings --------------------------------------------------------------------------------------------------
def self_influence_score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    began = time.perf_counter()
    scores = self_influence(model, per_example_loss, loader, solver="lowrank", damping=damping, rank=RANK)
    return -scores, time.perf_counter() - began  # |I(z, z)|


def squared_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.flatten(1).pow(2).sum(dim=1) for g in grads.values())


def cleanlab_scores(name: str, x: torch.Tensor, y: torch.Tensor, seed: int, folds: int) -> tuple[dict[str, torch.Tensor], float, int]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    began = time.perf_counter()
    split_ = StratifiedKFold(folds, shuffle=True, random_state=seed)
    if name == "lr":
        n_fold = N_TRAIN * (folds - 1) / folds
        probs = cross_val_predict(LogisticRegression(C=1.0 / (LR_L2 * n_fold), max_iter=5000), x.numpy(), y.numpy(),
                                  cv=split_, method="predict_proba")
    else:
        probs = np.zeros((N_TRAIN, 10))
        for fit, held_out in split_.split(x.numpy(), y.numpy()):
            model, _, _ = train(name, x[fit], y[fit], seed)
            with torch.no_grad():
                probs[held_out] = model(x[held_out]).softmax(dim=1).numpy()
    labels = y.numpy()
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    seconds = time.perf_counter() - began
    order = [int(i) for i in issues]
    flagged = set(order)
    order += [int(i) for i in np.argsort(quality, kind="stable") if int(i) not in flagged]
    combined = torch.empty(N_TRAIN, dtype=torch.float64)
    combined[torch.tensor(order)] = torch.arange(N_TRAIN, 0, -1, dtype=torch.float64)
    return {"cleanlab": combined, "cleanlab_sc": -torch.from_numpy(quality)}, seconds, len(issues)


def normalised_rank(score: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[torch.argsort(score.double(), stable=True)] = torch.arange(len(score), dtype=torch.float64)
    return ranks / (len(score) - 1)


# -- metrics ---------------------------------------------------------------------------------------------------
def metrics(score: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    order = torch.argsort(score.double(), descending=True, stable=True)
    out = {f"recall@{f:.0%}": float(flipped[order[: round(f * N_TRAIN)]].sum() / flipped.sum()) for f in FRACTIONS}
    out["recall@k"] = float(flipped[order[: int(flipped.sum())]].double().mean())
    out["auroc"] = float(roc_auc_score(flipped.numpy(), score.double().numpy()))
    return out


def run_one(name: str, noise: str, seed: int, folds: int) -> dict[str, Any]:
    x, y_true, _, _ = split(seed)
    y = add_noise(noise, x, y_true, seed)
    flipped = y != y_true
    recorder = TrainingSignalRecorder(N_TRAIN, every_n_epochs=RECORD_EVERY[name], start=RECORD_EVERY[name] - 1)
    snapshots: dict[int, dict] = {}
    model, epochs, train_seconds = train(name, x, y, seed, recorder, snapshots)
    epochs_recorded = recorder.epochs_recorded
    scores = recorder.component_scores(EARLY)
    k = len(epochs_recorded)
    ten = sorted({round(i * (k - 1) / (TRACIN_SNAPSHOTS - 1)) for i in range(TRACIN_SNAPSHOTS)})
    scores["mean_el2n@10"] = recorder.signals["el2n"][:, ten].mean(dim=1)
    ten_el2n = recorder.signals["el2n"][:, ten]
    scores["el2n_window@10"] = ten_el2n[:, : separation_window(ten_el2n)].mean(dim=1)
    per_record = recorder.seconds / k
    seconds = {key: (per_record if key.startswith("final") else
                     per_record * (_early_index(epochs_recorded) + 1) if key.startswith("early") else recorder.seconds)
               for key in scores}
    seconds["mean_el2n@10"] = seconds["el2n_window@10"] = per_record * len(ten)

    damping = LR_L2 if name == "lr" else NET_DAMPING
    scores["si_final"], seconds["si_final"] = self_influence_score(model, x, y, damping)
    early_epoch = epochs_recorded[_early_index(epochs_recorded)]
    early_model = make_model(name, seed)
    early_model.load_state_dict(snapshots[early_epoch])
    scores["si_early"], seconds["si_early"] = self_influence_score(early_model.eval(), x, y, damping)

    began = time.perf_counter()
    tracin = torch.zeros(N_TRAIN, dtype=torch.float64)
    probe = make_model(name, seed)
    for column in ten:
        probe.load_state_dict(snapshots[epochs_recorded[column]])
        tracin += squared_gradient_norms(probe.eval(), x, y)
    scores["tracin_self"], seconds["tracin_self"] = tracin, time.perf_counter() - began

    clean, seconds["cleanlab"], flagged = cleanlab_scores(name, x, y, seed, folds)
    scores.update(clean)
    seconds["cleanlab_sc"] = seconds["cleanlab"]
    for first, second in (("el2n_window", "si_early"), ("mean_el2n", "aum")):
        scores[f"{first}+{second}"] = normalised_rank(scores[first]) + normalised_rank(scores[second])
        seconds[f"{first}+{second}"] = seconds[first] + seconds[second]
    with torch.no_grad():
        train_accuracy = float((model(x).argmax(dim=1) == y).double().mean())
        began = time.perf_counter()
        for _ in range(5):
            model(x)
        forward_seconds = (time.perf_counter() - began) / 5
    return {
        "metrics": {key: metrics(score, flipped) for key, score in scores.items()},
        "cost": {key: value / train_seconds for key, value in seconds.items()},
        "seconds": {key: value for key, value in seconds.items()},
        "train_seconds": train_seconds, "epochs": epochs, "checkpoints": k, "early_epoch": early_epoch,
        "train_accuracy": train_accuracy, "flips": int(flipped.sum()), "cleanlab_flagged": flagged,
        "record_pass_over_train_step": per_record / (train_seconds / epochs),
        "forward_over_train_step": forward_seconds / (train_seconds / epochs),
    }


def _early_index(epochs: list[int]) -> int:
    first, last = epochs[0], epochs[-1]
    return next(i for i, e in enumerate(epochs) if e >= first + EARLY * (last - first) - 1e-9)


# -- summary ---------------------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} +- {std:.{digits}f}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = list(runs[0]["metrics"])
    names = list(runs[0]["metrics"][DEFAULT])
    table = {key: {m: [r["metrics"][key][m] for r in runs] for m in names} for key in keys}
    paired = {}
    for key in keys:
        if key == DEFAULT:
            continue
        paired[key] = {}
        for m in ("recall@10%", "auroc"):
            diffs = [r["metrics"][DEFAULT][m] - r["metrics"][key][m] for r in runs]
            paired[key][m] = {"mean": statistics.fmean(diffs), "wins": sum(d > 1e-9 for d in diffs),
                              "ties": sum(abs(d) <= 1e-9 for d in diffs), "losses": sum(d < -1e-9 for d in diffs)}
    cost = {key: statistics.fmean(r["cost"][key] for r in runs) for key in keys}
    mean = {key: {m: statistics.fmean(values) for m, values in row.items()} for key, row in table.items()}
    return {"per_seed": table, "mean": mean, "paired_default_minus": paired, "cost_x_training": cost}


def print_summary(name: str, noise: str, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print(f"\n### {name}, {noise}: {runs[0]['flips']} flips, epochs {[r['epochs'] for r in runs]}, "
          f"train accuracy {[round(r['train_accuracy'], 3) for r in runs]}, checkpoints {[r['checkpoints'] for r in runs]}\n")
    print("| ranking | recall@5% | recall@10% | recall@20% | recall@k | AUROC | cost x training | default - this, r@10% (W/T/L) | default - this, AUROC (W/T/L) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, row in summary["per_seed"].items():
        pair = summary["paired_default_minus"].get(key)
        pair_text = ["", ""] if pair is None else [
            f"{pair[m]['mean']:+.3f} ({pair[m]['wins']}/{pair[m]['ties']}/{pair[m]['losses']})" for m in ("recall@10%", "auroc")]
        print(f"| {key} | " + " | ".join(mean_std(row[m]) for m in row) + f" | {summary['cost_x_training'][key]:.3f} | "
              + " | ".join(pair_text) + " |")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=3,
                        help="seeds first..first+n-1; 0-2 were used to choose the default score, 3-5 are held out")
    parser.add_argument("--quick", action="store_true", help="1 seed, asym10 only, 3 folds")
    parser.add_argument("--models", default="lr,mlp,cnn")
    parser.add_argument("--noises", default=",".join(NOISES))
    parser.add_argument("--json", type=Path, help=f"results file (default {RESULTS.name} for a full run)")
    parser.add_argument("--summarise", type=Path, help="only re-print (and re-summarise in place) a results file")
    args = parser.parse_args(argv)
    if args.summarise is not None:
        stored = json.loads(args.summarise.read_text())
        for key, entry in stored["results"].items():
            entry.update(summarise(entry["runs"]))
            print_summary(*key.split("/"), entry["runs"], entry)
        stored["settings"]["default"] = DEFAULT
        args.summarise.write_text(json.dumps(stored, indent=1) + "\n")
        return
    torch.set_num_threads(1)
    seeds = [args.first_seed] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    noises = ["asym10"] if args.quick else args.noises.split(",")
    folds = 3 if args.quick else 5
    print(f"machine: {machine()}\nseeds {seeds}, noises {noises}, models {args.models}, folds {folds}")
    began = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        for noise in noises:
            runs = [run_one(name, noise, seed, folds) for seed in seeds]
            summary = summarise(runs)
            results[f"{name}/{noise}"] = {"runs": runs, **summary}
            print_summary(name, noise, runs, summary)
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
    total = time.perf_counter() - began
    print(f"\ntotal {total:.0f} s")
    path = args.json or (None if args.quick else RESULTS)
    if path is not None:
        settings = {"seeds": seeds, "noises": {n: NOISES[n] for n in noises}, "folds": folds, "n_train": N_TRAIN,
                    "record_every": RECORD_EVERY, "lr_epochs": LR_EPOCHS, "max_epochs": MAX_EPOCHS, "rank": RANK,
                    "damping": {"lr": LR_L2, "nets": NET_DAMPING}, "early_fraction": EARLY, "default": DEFAULT}
        path.write_text(json.dumps({"settings": settings, "machine": machine(), "seconds": total,
                                    "results": results}, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
