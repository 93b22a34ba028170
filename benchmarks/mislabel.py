#!/usr/bin/env python
"""Finding flipped labels and counting them: the callback's training signals against loss, cleanlab and peers.

Four tasks: scikit-learn's digits (pixels / 16; per seed 1,200 training images) with three models, and the
generated keyword sequences of ``examples/text_classification.py`` (its ``KeywordSequences`` and ``TinyBert``;
400 training sequences, two classes). Six kinds of label noise on the training labels, chosen with a reference
logistic regression's 5-fold out-of-fold probabilities on the *clean* labels (bag of tokens for the text):

* ``asymR``: a fraction R of the examples, uniformly chosen, flipped to their class's most-confused class
  (two classes: three quarters of the flips taken from class 1, a quarter from class 0);
* ``uniformR``: flipped to a uniformly random other class;
* ``hardR``: the fraction R with the lowest reference margin ``p_true - max_{j != true} p_j``, flipped to their
  runner-up class (the plausible mistakes);

for R = 10% and 30%. Models and recipes (fixed length, as a user sets ``max_epochs``):

* ``lr``: ``nn.Linear(64, 10)``, full-batch Adam lr 0.05, mean CE + 1e-3/2 ||theta||^2, 500 epochs;
* ``mlp``: 64-64-10 tanh MLP, full-batch Adam lr 1e-2, weight decay 1e-4, 1,000 epochs (memorises the flips);
* ``cnn``: conv 3x3 (8 channels) + tanh + max-pool, 128-64-10 tanh head, same recipe, 400 epochs;
* ``text``: the example's 2-layer tiny BERT, AdamW lr 2e-3, weight decay 1e-2, batch 32, 12 epochs.

Two :class:`~lightning_influence.analysis.training_signals.TrainingSignalRecorder` per run: ``callback``, at
the epochs the callback records by default (``checkpoint_epochs(max_epochs, 10)``, geometric), which gives
every ranking and count of ours; ``dense``, every epoch, for the peers that need it. Rankings (larger = more
suspicious): ours = every ``component_scores()`` entry of the callback recorder (the default ``DEFAULT_SCORE``
included); peers: ``loss`` (final training loss), ``final_margin``, ``early_el2n_dense`` (EL2N at 10% of the
run, Paul et al. 2021), ``aum_dense`` (area under the margin over every epoch, Pleiss et al. 2020),
``forgetting_dense`` (forgetting events over every epoch, Toneva et al. 2019), ``cleanlab`` (5-fold
cross-validated out-of-fold probabilities of the same model and recipe, ``find_label_issues`` flagged first,
then self-confidence). Counts: ours (:func:`~lightning_influence.analysis.noise_count.estimate_flip_count` on
the callback recorder, with its interval) and cleanlab's (the number of issues it flags).

Metrics: AUROC, recall at 10% of the training set checked, recall at k = number of flips; the count estimate
against the true number (ratio, interval coverage) and whether its plausible range holds the truth (the range's
two rules chosen on ``CHOSEN_ON``, ``checks.count_split``); precision and recall of the flagged set; the cost of
the callback recorder as a fraction of the training time (training steps only). Mean over seeds. With
``--derive``, ``count.reference_agrees``: how many flips are relabelled to the class that the reference model
(trained on the clean labels) finds most probable, which no count from the data alone can call wrong.

Usage::

    nice -n 10 python benchmarks/mislabel.py                 # 3 seeds, every task and noise; writes the results
    python benchmarks/mislabel.py --quick                    # seed 0, mlp asym10 only, 3 folds, no JSON
    python benchmarks/mislabel.py --models mlp --seeds 1 --json /tmp/x.json --dump /tmp/dump   # raw tables too
    nice -n 10 python benchmarks/mislabel.py --threshold-samples 0.03 --seeds 2   # mislabel-threshold-results.json
    python benchmarks/mislabel.py --merge-threshold A.json B.json   # seeds run apart, into one results file

``--threshold-samples F`` trains every setting once more with a fraction F of the training examples (at least 16)
relabelled to a uniformly drawn other class, the threshold samples of Pleiss et al. (2020), and measures
:func:`~lightning_influence.analysis.noise_count.threshold_sample_count` for several scores and ``detected``
fractions against the true number of flips among the other examples (no peers, no cleanlab).
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.text_classification import KeywordSequences, TinyBert  # noqa: E402
from lightning_influence.analysis.noise_count import (  # noqa: E402
    COUNT_METHODS,
    confident_joint_mean,
    count_probabilities,
    estimate_flip_count,
    mixture_count,
    threshold_sample_count,
    threshold_sample_labels,
)
from lightning_influence.analysis.training_signals import (  # noqa: E402
    DEFAULT_SCORE,
    TrainingSignalRecorder,
    checkpoint_epochs,
)
from lightning_influence.config import DEFAULT_SIGNAL_CHECKPOINTS  # noqa: E402
from lightning_influence.core.tensors.data import IndexedData  # noqa: E402

N_DIGITS, N_TEXT = 1000, 320
NOISES = {f"{kind}{round(100 * rate)}": (kind, rate) for kind in ("asym", "uniform", "hard") for rate in (0.1, 0.3)}
EPOCHS = {"lr": 300, "mlp": 600, "cnn": 200, "text": 12}
LR_L2 = 1e-3
NET_WEIGHT_DECAY = 1e-4
EARLY = 0.1
PEERS = ("loss", "final_margin", "early_el2n_dense", "aum_dense", "forgetting_dense", "cleanlab")
CHOSEN_ON = ("lr", "mlp")  # the models the plausible range's two counts were chosen on; cnn and text check it
ALTERNATIVES = ("el2n_fitted", "el2n_weighted", "el2n_window", "el2n_weighted+aum")  # ours, checked as if each were the default
RESULTS = Path(__file__).with_name("mislabel-results.json")
THRESHOLD_RESULTS = Path(__file__).with_name("mislabel-threshold-results.json")
THRESHOLD_SCORES = ("aum", "el2n_weighted", "mean_loss")
THRESHOLD_DETECTED = (0.25, 0.5, 0.75, 0.9)


# -- data and noise --------------------------------------------------------------------------------------------
def digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images / 16.0, dtype=torch.float64), torch.tensor(labels)
    permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:N_DIGITS]
    return x[permutation], y[permutation]


def text_data(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
    data = KeywordSequences(N_TEXT, seed=100 + seed, flip=0.0)
    bag = F.one_hot(data.input_ids, 64).sum(dim=1).double()  # bag of tokens, for the reference model
    return {"input_ids": data.input_ids, "attention_mask": data.attention_mask}, data.labels, bag.numpy()


def reference_probabilities(features: np.ndarray, y: torch.Tensor, seed: int) -> torch.Tensor:
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return torch.from_numpy(cross_val_predict(LogisticRegression(C=1.0, max_iter=5000), features, y.numpy(),
                                              cv=folds, method="predict_proba"))


def add_noise(kind: str, rate: float, probs: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """Noisy labels; every flipped label differs from the true one."""
    generator = torch.Generator().manual_seed(1000 + seed)
    n, classes = probs.shape
    count = round(rate * n)
    noisy = y.clone()
    others = probs.scatter(1, y[:, None], -1.0)
    if kind == "hard":
        margin = probs.gather(1, y[:, None]).squeeze(1) - others.amax(dim=1)
        flips = torch.argsort(margin, stable=True)[:count]
        noisy[flips] = others.argmax(dim=1)[flips]
        return noisy
    if kind == "asym" and classes == 2:
        from_one = round(0.75 * count)
        ones, zeros = (y == 1).nonzero().flatten(), (y == 0).nonzero().flatten()
        flips = torch.cat([ones[torch.randperm(len(ones), generator=generator)[:from_one]],
                           zeros[torch.randperm(len(zeros), generator=generator)[: count - from_one]]])
        noisy[flips] = 1 - y[flips]
        return noisy
    flips = torch.randperm(n, generator=generator)[:count]
    if kind == "uniform":
        noisy[flips] = (y[flips] + torch.randint(1, classes, (count,), generator=generator)) % classes
    else:
        confusion = torch.stack([probs[y == c].sum(0) for c in range(classes)])
        confusion.fill_diagonal_(-1.0)
        noisy[flips] = confusion.argmax(dim=1)[y[flips]]
    return noisy


# -- models and training ---------------------------------------------------------------------------------------
def make_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "text":
        return TinyBert()
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


def take(x: Any, index: torch.Tensor) -> Any:
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


class Rows(torch.utils.data.Dataset):
    """``(inputs, label)`` rows of a tensor or a dict of tensors, fetched a batch at a time (``__getitems__``)."""

    def __init__(self, x: Any, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return take(self.x, torch.tensor([i])), self.y[i : i + 1]

    def __getitems__(self, indices: list[int]) -> Any:
        index = torch.as_tensor(indices)
        return take(self.x, index), self.y[index]


def _as_is(batch: Any) -> Any:
    return batch


def train(name: str, x: Any, y: torch.Tensor, seed: int, recorders: tuple[TrainingSignalRecorder, ...] = ()
          ) -> tuple[nn.Module, float]:
    """``(model, seconds of the training steps alone)``; the recorders run between epochs, timed by themselves."""
    model = make_model(name, seed)
    n = len(y)
    if name == "text":
        optimiser: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    elif name == "lr":
        optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=NET_WEIGHT_DECAY)
    data = IndexedData(Rows(x, y), collate_fn=_as_is, batch_size=n)
    generator = torch.Generator().manual_seed(seed)
    seconds = 0.0
    for epoch in range(EPOCHS[name]):
        began = time.perf_counter()
        model.train()
        batches = torch.randperm(n, generator=generator).split(32) if name == "text" else [torch.arange(n)]
        for index in batches:
            optimiser.zero_grad()
            objective = F.cross_entropy(model(take(x, index)), y[index])
            if name == "lr":
                objective = objective + 0.5 * LR_L2 * sum((p**2).sum() for p in model.parameters())
            objective.backward()
            optimiser.step()
        seconds += time.perf_counter() - began
        for recorder in recorders:
            recorder.record(model, data, epoch)
    return model.eval(), seconds


# -- rankings --------------------------------------------------------------------------------------------------
def forgetting_events(margin: torch.Tensor) -> torch.Tensor:
    """Toneva et al.: correct -> wrong transitions between consecutive records; never learned counts as most."""
    correct = margin > 0
    events = (correct[:, :-1] & ~correct[:, 1:]).sum(dim=1).double()
    never = ~correct.any(dim=1)
    return torch.where(never, torch.full_like(events, margin.shape[1]), events)


def cleanlab_run(name: str, x: Any, y: torch.Tensor, features: np.ndarray, seed: int, folds: int
                 ) -> tuple[torch.Tensor, int, float]:
    """cleanlab's ranking (flagged first, then self-confidence), its flagged count, and seconds."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    began = time.perf_counter()
    n, classes = len(y), int(y.max()) + 1
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs = np.zeros((n, classes))
    for fit, held_out in split.split(features, y.numpy()):
        fit_t, held_t = torch.from_numpy(fit), torch.from_numpy(held_out)
        model, _ = train(name, take(x, fit_t), y[fit_t], seed)
        with torch.no_grad():
            probs[held_out] = model(take(x, held_t)).softmax(dim=1).double().numpy()
    labels = y.numpy()
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    order = [int(i) for i in issues]
    flagged = set(order)
    order += [int(i) for i in np.argsort(quality, kind="stable") if int(i) not in flagged]
    score = torch.empty(n, dtype=torch.float64)
    score[torch.tensor(order)] = torch.arange(n, 0, -1, dtype=torch.float64)
    return score, len(issues), time.perf_counter() - began


def count_fields(recorder: TrainingSignalRecorder, flipped: torch.Tensor) -> dict[str, Any]:
    """The default count estimate against the truth, its flags' precision and recall, and every method's ratio."""
    true_flips = int(flipped.sum())
    count = estimate_flip_count(recorder)
    flagged = count.flagged
    return {"true": true_flips, "estimate": count.estimate, "low": count.low, "high": count.high,
            "ratio": count.estimate / true_flips, "covered": count.low <= true_flips <= count.high,
            "plausible_low": count.plausible_low / true_flips, "plausible_high": count.plausible_high / true_flips,
            "plausible_covers": count.plausible_low <= true_flips <= count.plausible_high,
            "flagged": int(flagged.sum()),
            "flagged_precision": float(flipped[flagged].double().mean()) if flagged.any() else 0.0,
            "flagged_recall": float(flipped[flagged].sum() / true_flips),
            "methods": {**{method: estimate_flip_count(recorder, method, resamples=0).estimate / true_flips
                           for method in COUNT_METHODS},
                        "confident_joint_peak_and_next": estimate_flip_count(
                            recorder, resamples=0, following=1).estimate / true_flips,
                        "confident_joint_mean": confident_joint_mean(recorder) / true_flips,
                        "mixture_half_el2n_fitted": mixture_count(recorder.scores("el2n_fitted")) / true_flips,
                        **{name: value / true_flips for name, value in candidate_counts(recorder).items()}}}


def candidate_counts(recorder: TrainingSignalRecorder) -> dict[str, float]:
    """Count rules tried against the confident joint, not in the library (``checks.count_methods``):

    * ``confident_joint_soft``: the examples the confident joint leaves out (no class reaches its threshold)
      added to their label's row spread by their probabilities at ``k*``, instead of the rows rescaled;
    * ``mixture_<score>``: a two-component Gaussian mixture (scikit-learn, seed 0) on the ranking score, the
      count the weight of the component with the larger mean times ``n``;
    * ``above_0.75_<score>``: the examples whose score exceeds 0.75 (EL2N lies in ``[0, sqrt 2]``).
    """
    from sklearn.mixture import GaussianMixture

    probs = count_probabilities(recorder)
    labels = recorder.labels.clamp(min=0)
    classes = probs.shape[1]
    one_hot = F.one_hot(labels, classes).double()
    per_label = one_hot.sum(dim=0)
    thresholds = (one_hot * probs).sum(dim=0) / per_label.clamp(min=1)
    left_out = ~(probs >= thresholds[None, :] - 1e-12).any(dim=1)
    joint = torch.zeros(classes, classes, dtype=torch.float64)
    kept = ~left_out
    assigned = torch.where(probs >= thresholds[None, :] - 1e-12, probs, torch.full_like(probs, -1.0)).argmax(dim=1)
    joint.index_put_((labels[kept], assigned[kept]), torch.ones(int(kept.sum()), dtype=torch.float64),
                     accumulate=True)
    joint.index_add_(0, labels[left_out], probs[left_out])
    out = {"confident_joint_soft": float(joint.sum() - joint.diagonal().sum())}
    for score in ("el2n_fitted", "el2n_weighted"):
        values = recorder.scores(score).double().numpy()[:, None]
        mixture = GaussianMixture(2, random_state=0).fit(values)
        out[f"mixture_{score}"] = float(len(values) * mixture.weights_[int(np.argmax(mixture.means_.ravel()))])
        out[f"above_0.75_{score}"] = float((values > 0.75).sum())
    return out


def derive(parts: list[Path], dump: Path) -> dict[str, Any]:
    """Merge results files and recompute every ranking and count of ours from the dumped recorder tables.

    The peers' metrics, the costs and the settings stay as measured; the callback recorder's rankings and the
    count estimate are recomputed with the library as it is now (so a rule changed after the run is measured on
    the same trained models).
    """
    merged: dict[str, Any] = {}
    for part in parts:
        stored = json.loads(part.read_text())
        if not merged:
            merged = stored
            merged["settings"]["models"] = list(stored["settings"]["models"])
        else:
            merged["results"].update(stored["results"])
            merged["settings"]["models"] += stored["settings"]["models"]
            merged["seconds"] += stored["seconds"]
    merged["settings"]["settings_done"] = list(merged["results"])
    for key, entry in merged["results"].items():
        name, noise = key.split("/")
        for seed, run in zip(merged["settings"]["seeds"], entry["runs"]):
            saved = torch.load(dump / f"{name}_{noise}_{seed}.pt", weights_only=False)
            recorder = TrainingSignalRecorder(len(saved["flipped"]), epochs=saved["callback"]["epochs_recorded"])
            recorder.load_state_dict(saved["callback"])
            ours = recorder.component_scores()
            peers = {k: v for k, v in run["metrics"].items() if k in PEERS}
            run["metrics"] = {**{k: metrics(v, saved["flipped"]) for k, v in ours.items()}, **peers}
            cleanlab = {k: run["count"][k] for k in ("cleanlab", "cleanlab_ratio")}
            run["count"] = {**count_fields(recorder, saved["flipped"]), **cleanlab,
                            "reference_agrees": reference_agreement(name, noise, seed)}
        entry.update(summarise(entry["runs"]))
    merged["settings"]["default"] = DEFAULT_SCORE
    merged["settings"]["plausible_range_chosen_on"] = list(CHOSEN_ON)
    merged["settings"]["derived"] = ("our rankings and counts recomputed by --derive from the dumped recorder tables"
                                     " of the same trained models; peers, costs and settings as measured")
    merged["checks"] = checks(merged["results"])
    return merged


def ranking_row(key: str, entry: dict[str, Any], score: str) -> dict[str, Any]:
    """``score`` against the best peer (and the final margin on lr), and whether it is at least level in both."""
    mean, best = entry["mean"][score], entry["best_peer"]
    row: dict[str, Any] = {f"{m}_vs_best_peer": mean[m] - best[m] for m in ("auroc", "recall@10%")}
    if key.startswith("lr/"):
        row.update({f"{m}_vs_final_margin": mean[m] - entry["mean"]["final_margin"][m]
                    for m in ("auroc", "recall@10%")})
    # -1e-6: recalls are float32 fractions
    row["ranking_holds"] = all(v >= -1e-6 for k, v in row.items() if k.endswith(("peer", "margin")))
    # the issue's goal: the best of loss, cleanlab-CV and early EL2N (and the final margin on lr) only
    three = {m: max(entry["mean"][p][m] for p in ("loss", "cleanlab", "early_el2n_dense")) for m in ("auroc", "recall@10%")}
    row["holds_vs_loss_cleanlab_early_el2n"] = all(mean[m] - three[m] >= -1e-6 for m in three) and all(
        v >= -1e-6 for k, v in row.items() if k.endswith("margin"))
    return row


def checks(results: dict[str, Any]) -> dict[str, Any]:
    """Which of the goals hold, per setting: the default against the best peer (and the final margin on lr),
    the count within 20% of the truth in every seed, the recording cost under 0.2 of the training time; and
    where the ranking goal would hold for each of :data:`ALTERNATIVES` as the default."""
    out: dict[str, Any] = {}
    for key, entry in results.items():
        row = ranking_row(key, entry, DEFAULT_SCORE)
        row["count_within_20pct"] = entry["count"]["within_20pct"] == len(entry["runs"])
        row["plausible_range_covers"] = entry["count"].get("plausible_covered") == len(entry["runs"])
        row["cost_under_0.2"] = entry["cost"]["callback_signals"] < 0.2
        out[key] = row
    out["all"] = {goal: sum(bool(r[goal]) for r in out.values()) for goal in
                  ("ranking_holds", "holds_vs_loss_cleanlab_early_el2n", "count_within_20pct", "cost_under_0.2",
                   "plausible_range_covers")}
    out["count_split"] = count_split(out)
    out["all"]["settings"] = len(results)
    out["count_methods"] = count_method_checks(results)
    out["ranking_alternatives"] = {}
    for score in ALTERNATIVES:
        holds = {key: ranking_row(key, entry, score)["ranking_holds"] for key, entry in results.items()
                 if score in entry["mean"]}
        models = sorted({key.split("/")[0] for key in holds})
        out["ranking_alternatives"][score] = {
            **{m: sum(v for k, v in holds.items() if k.split("/")[0] == m) for m in models},
            "all": sum(holds.values()), "fails": [key for key, v in holds.items() if not v]}
    return out


def count_split(rows: dict[str, Any]) -> dict[str, Any]:
    """The count goals on the models the plausible range was chosen on (``CHOSEN_ON``) and on the others."""
    out: dict[str, Any] = {}
    for part, chosen in (("chosen_on", True), ("checked_on", False)):
        keys = [k for k in rows if "/" in k and (k.split("/")[0] in CHOSEN_ON) == chosen]
        out[part] = {"models": sorted({k.split("/")[0] for k in keys}), "settings": len(keys),
                     **{goal: sum(bool(rows[k][goal]) for k in keys)
                        for goal in ("count_within_20pct", "plausible_range_covers")}}
    return out


def count_method_checks(results: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per count method (``count.methods`` of each run): in how many settings of each model, and of all, the
    estimate was within 20% of the truth in every seed."""
    methods = next(iter(results.values()))["runs"][0]["count"]["methods"]
    out: dict[str, dict[str, int]] = {}
    for method in methods:
        holds = {key: all(abs(r["count"]["methods"][method] - 1) <= 0.2 for r in entry["runs"])
                 for key, entry in results.items()}
        models = sorted({key.split("/")[0] for key in holds})
        out[method] = {**{m: sum(v for k, v in holds.items() if k.split("/")[0] == m) for m in models},
                       "all": sum(holds.values())}
    return out


def metrics(score: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    n = len(flipped)
    order = torch.argsort(score.double(), descending=True, stable=True)
    return {"recall@10%": float(flipped[order[: round(0.1 * n)]].sum() / flipped.sum()),
            "recall@k": float(flipped[order[: int(flipped.sum())]].double().mean()),
            "auroc": float(roc_auc_score(flipped.numpy(), torch.nan_to_num(score.double()).numpy()))}


def noisy_task(name: str, noise: str, seed: int) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    """``(inputs, noisy labels, flipped, features)`` of one setting (features: what the noise model and cleanlab
    read)."""
    kind, rate = NOISES[noise]
    if name == "text":
        x, y_true, features = text_data(seed)
    else:
        x, y_true = digits_split(seed)
        features = x.numpy()
    y = add_noise(kind, rate, reference_probabilities(features, y_true, seed), y_true, seed)
    return x, y, y != y_true, features


_REFERENCE: dict[tuple[str, int], Any] = {}


def reference_agreement(name: str, noise: str, seed: int) -> int:
    """How many of the setting's flipped labels are the class the reference model (trained on the clean labels,
    out of fold) finds most probable: flips that no model can call wrong from the data alone."""
    kind, rate = NOISES[noise]
    dataset = "text" if name == "text" else "digits"
    if (dataset, seed) not in _REFERENCE:
        if dataset == "text":
            _, y_true, features = text_data(seed)
        else:
            x, y_true = digits_split(seed)
            features = x.numpy()
        _REFERENCE[dataset, seed] = (y_true, reference_probabilities(features, y_true, seed))
    y_true, probs = _REFERENCE[dataset, seed]
    y = add_noise(kind, rate, probs, y_true, seed)
    flipped = y != y_true
    return int((probs.argmax(dim=1)[flipped] == y[flipped]).sum())


def run_one(name: str, noise: str, seed: int, folds: int, dump: Path | None) -> dict[str, Any]:
    x, y, flipped, features = noisy_task(name, noise, seed)
    n, epochs = len(y), EPOCHS[name]
    callback = TrainingSignalRecorder(n, epochs=checkpoint_epochs(epochs, DEFAULT_SIGNAL_CHECKPOINTS))
    dense = TrainingSignalRecorder(n, every_n_epochs=1)
    model, train_seconds = train(name, x, y, seed, (callback, dense))
    scores = callback.component_scores()
    early = round(EARLY * (epochs - 1))
    scores.update({"loss": dense.signals["loss"][:, -1], "final_margin": -dense.signals["margin"][:, -1],
                   "early_el2n_dense": dense.signals["el2n"][:, early],
                   "aum_dense": -dense.signals["margin"].mean(dim=1),
                   "forgetting_dense": forgetting_events(dense.signals["margin"])})
    scores["cleanlab"], cleanlab_count, cleanlab_seconds = cleanlab_run(name, x, y, features, seed, folds)
    true_flips = int(flipped.sum())
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({"flipped": flipped, "labels": y, "callback": callback.state_dict(),
                    "dense": {k: v for k, v in dense.signals.items()}, "cleanlab": scores["cleanlab"]},
                   dump / f"{name}_{noise}_{seed}.pt")
    with torch.no_grad():
        train_accuracy = float((model(x).argmax(dim=1) == y).double().mean())
    return {
        "metrics": {key: metrics(score, flipped) for key, score in scores.items()},
        "count": {**count_fields(callback, flipped), "cleanlab": cleanlab_count,
                  "cleanlab_ratio": cleanlab_count / true_flips},
        "cost": {"callback_signals": callback.seconds / train_seconds, "dense_signals": dense.seconds / train_seconds,
                 "cleanlab": cleanlab_seconds / train_seconds},
        "train_seconds": train_seconds, "epochs": epochs, "checkpoints": list(callback.epochs_recorded),
        "train_accuracy": train_accuracy, "flips": true_flips,
    }


# -- threshold samples (Pleiss et al. 2020) ------------------------------------------------------------------------


def threshold_fields(recorder: TrainingSignalRecorder, fake: torch.Tensor, flipped: torch.Tensor
                     ) -> dict[str, Any]:
    """Each score's threshold-sample count (every ``detected``) over the true number of flips among the other
    examples, and the ranking's quality on those examples (the threshold samples left out)."""
    real = ~fake
    true_flips = int(flipped[real].sum())
    scores = recorder.component_scores()
    counts: dict[str, Any] = {}
    for score in THRESHOLD_SCORES:
        for detected in THRESHOLD_DETECTED:
            estimate, low, high, _ = threshold_sample_count(scores[score], fake, detected)
            counts[f"{score}@{detected}"] = {"ratio": estimate / true_flips, "low": low / true_flips,
                                             "high": high / true_flips}
    return {"true": true_flips, "counts": counts,
            "metrics": {score: metrics(scores[score][real], flipped[real]) for score in THRESHOLD_SCORES}}


def threshold_run(name: str, noise: str, seed: int, fraction: float, dump: Path | None) -> dict[str, Any]:
    """One training with ``fraction`` of the training examples relabelled to a uniformly drawn wrong class
    (the threshold samples; at least 16); the count is of the flips among the other examples."""
    x, y, flipped, _ = noisy_task(name, noise, seed)
    n, classes = len(y), int(y.max()) + 1
    sources, wrong = threshold_sample_labels(y, max(16, round(fraction * n)), classes, seed)
    y_all = y.clone()
    y_all[sources] = wrong
    fake = torch.zeros(n, dtype=torch.bool)
    fake[sources] = True
    epochs = EPOCHS[name]
    recorder = TrainingSignalRecorder(n, epochs=checkpoint_epochs(epochs, DEFAULT_SIGNAL_CHECKPOINTS))
    _, train_seconds = train(name, x, y_all, seed, (recorder,))
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({"flipped": flipped, "fake": fake, "callback": recorder.state_dict()},
                   dump / f"threshold_{name}_{noise}_{seed}.pt")
    return {**threshold_fields(recorder, fake, flipped), "threshold_samples": int(fake.sum()),
            "train_seconds": train_seconds, "cost": recorder.seconds / train_seconds}


def threshold_main(args: argparse.Namespace) -> None:
    """``--threshold-samples F``: every setting once more with threshold samples; writes THRESHOLD_RESULTS."""
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    path = args.json or THRESHOLD_RESULTS
    began = time.perf_counter()
    results: dict[str, Any] = json.loads(path.read_text())["results"] if args.resume and path.exists() else {}
    for name in args.models.split(","):
        for noise in args.noises.split(","):
            key = f"{name}/{noise}"
            if key in results:
                continue
            runs = [threshold_run(name, noise, seed, args.threshold_samples, args.dump) for seed in seeds]
            results[key] = {"runs": runs, **summarise_threshold(runs)}
            best = results[key]["ratio"]
            print(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()), flush=True)
            settings = {"seeds": seeds, "fraction": args.threshold_samples, "minimum": 16, "epochs": EPOCHS,
                        "scores": THRESHOLD_SCORES, "detected": THRESHOLD_DETECTED,
                        "checkpoints": DEFAULT_SIGNAL_CHECKPOINTS}
            path.write_text(json.dumps({"settings": settings, "machine": machine(),
                                        "seconds": time.perf_counter() - began, "results": results,
                                        "checks": threshold_checks(results)}, indent=1))


def threshold_checks(results: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per threshold-sample count rule: in how many settings of each model, and of all, the estimate was within
    20% of the truth in every seed."""
    out: dict[str, dict[str, int]] = {}
    for rule in next(iter(results.values()))["ratio"]:
        holds = {key: entry["within_20pct"][rule] == len(entry["runs"]) for key, entry in results.items()}
        models = sorted({key.split("/")[0] for key in holds})
        out[rule] = {**{m: sum(v for k, v in holds.items() if k.split("/")[0] == m) for m in models},
                     "all": sum(holds.values())}
    return out


def threshold_markdown(stored: dict[str, Any]) -> str:
    """The threshold-sample table ``docs/mislabel.md`` quotes: mean estimate / true per rule, within 20%."""
    rules = ("el2n_weighted@0.75", "el2n_weighted@0.9", "aum@0.5", "aum@0.9")
    lines = ["| model, noise | " + " | ".join(f"`{r}`" for r in rules) + " |", "| --- |" + " --- |" * len(rules)]
    for key, entry in stored["results"].items():
        cells = [f"{entry['ratio'][r]:.2f} ({entry['within_20pct'][r]}/{len(entry['runs'])})" for r in rules]
        lines.append(f"| {key.replace('/', ', ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def threshold_merge(parts: list[Path]) -> dict[str, Any]:
    """Threshold-sample results files of other seeds merged into one: runs appended per setting, then the
    summaries and checks recomputed."""
    merged: dict[str, Any] = {}
    for part in parts:
        stored = json.loads(part.read_text())
        if not merged:
            merged = stored
            continue
        merged["settings"]["seeds"] += stored["settings"]["seeds"]
        merged["seconds"] += stored["seconds"]
        for key, entry in stored["results"].items():
            merged["results"][key]["runs"] += entry["runs"]
    for entry in merged["results"].values():
        entry.update(summarise_threshold(entry["runs"]))
    merged["checks"] = threshold_checks(merged["results"])
    return merged


def summarise_threshold(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = runs[0]["counts"]
    return {"ratio": {k: statistics.fmean(r["counts"][k]["ratio"] for r in runs) for k in keys},
            "within_20pct": {k: sum(abs(r["counts"][k]["ratio"] - 1) <= 0.2 for r in runs) for k in keys},
            "covered": {k: sum(r["counts"][k]["low"] <= 1 <= r["counts"][k]["high"] for r in runs) for k in keys},
            "cost": statistics.fmean(r["cost"] for r in runs)}


# -- summary ---------------------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    mean = {key: {m: statistics.fmean(r["metrics"][key][m] for r in runs) for m in runs[0]["metrics"][key]}
            for key in runs[0]["metrics"]}
    count = {field: statistics.fmean(float(r["count"][field]) for r in runs)
             for field in ("true", "estimate", "ratio", "flagged_precision", "flagged_recall", "cleanlab_ratio")}
    count["ratio_range"] = [min(r["count"]["ratio"] for r in runs), max(r["count"]["ratio"] for r in runs)]
    count["within_20pct"] = sum(abs(r["count"]["ratio"] - 1) <= 0.2 for r in runs)
    count["covered"] = sum(bool(r["count"]["covered"]) for r in runs)
    if "reference_agrees" in runs[0]["count"]:
        count["reference_agrees"] = statistics.fmean(r["count"]["reference_agrees"] for r in runs)
    if "plausible_covers" in runs[0]["count"]:
        count["plausible_covered"] = sum(bool(r["count"]["plausible_covers"]) for r in runs)
        count["plausible_range"] = [statistics.fmean(r["count"][f"plausible_{end}"] for r in runs)
                                    for end in ("low", "high")]
    cost = {key: statistics.fmean(r["cost"][key] for r in runs) for key in runs[0]["cost"]}
    best_peer = {m: max(mean[p][m] for p in PEERS if p != "final_margin") for m in ("auroc", "recall@10%")}
    return {"mean": mean, "count": count, "cost": cost, "best_peer": best_peer}


def print_summary(name: str, noise: str, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    mean = summary["mean"]
    print(f"\n### {name} {noise}: {runs[0]['flips']} flips, train accuracy "
          f"{[round(r['train_accuracy'], 3) for r in runs]}, checkpoints {runs[0]['checkpoints']}")
    for key, row in sorted(mean.items(), key=lambda item: -item[1]["auroc"]):
        marker = " <- default" if key == DEFAULT_SCORE else ""
        print(f"  {key:18s} AUROC {row['auroc']:.3f}  r@10% {row['recall@10%']:.3f}  r@k {row['recall@k']:.3f}{marker}")
    c = summary["count"]
    print(f"  count: true {c['true']:.0f}, estimate {c['estimate']:.1f} (ratio {c['ratio_range'][0]:.2f}-"
          f"{c['ratio_range'][1]:.2f}, within 20% in {c['within_20pct']}/{len(runs)}, interval covers "
          f"{c['covered']}/{len(runs)}), flagged precision {c['flagged_precision']:.3f} recall "
          f"{c['flagged_recall']:.3f}; cleanlab ratio {c['cleanlab_ratio']:.2f}")
    print(f"  cost x training: callback signals {summary['cost']['callback_signals']:.3f}, cleanlab "
          f"{summary['cost']['cleanlab']:.2f}", flush=True)


def markdown(stored: dict[str, Any]) -> str:
    """The tables ``docs/mislabel.md`` quotes, from a results file (every number is a value of the file)."""
    shown = ("loss", "cleanlab", "early_el2n_dense", "aum_dense", "forgetting_dense", "final_margin")
    lines = [f"| model, noise | {DEFAULT_SCORE} (default) | " + " | ".join(shown) + " | default - best peer |",
             "| --- |" + " --- |" * (len(shown) + 2)]
    for key, entry in stored["results"].items():
        mean = entry["mean"]
        cells = [f"{mean[k]['auroc']:.3f} / {mean[k]['recall@10%']:.3f}" for k in (DEFAULT_SCORE, *shown)]
        check = stored["checks"][key]
        lines.append(f"| {key.replace('/', ', ')} | " + " | ".join(cells)
                     + f" | {check['auroc_vs_best_peer']:+.3f} / {check['recall@10%_vs_best_peer']:+.3f} |")
    lines += ["", "| model, noise | true flips | estimate (mean) | estimate / true, per seed | within 20% | interval"
              " covers | plausible range / true (mean) | range covers | flagged: precision / recall |"
              " cleanlab flagged / true |", "| --- |" + " --- |" * 9]
    for key, entry in stored["results"].items():
        count, runs = entry["count"], entry["runs"]
        ratios = ", ".join(f"{r['count']['ratio']:.2f}" for r in runs)
        lines.append(f"| {key.replace('/', ', ')} | {count['true']:.0f} | {count['estimate']:.1f} | {ratios} | "
                     f"{count['within_20pct']}/{len(runs)} | {count['covered']}/{len(runs)} | "
                     f"{count['plausible_range'][0]:.2f}-{count['plausible_range'][1]:.2f} | "
                     f"{count['plausible_covered']}/{len(runs)} | "
                     f"{count['flagged_precision']:.3f} / {count['flagged_recall']:.3f} | "
                     f"{count['cleanlab_ratio']:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, 1 thread"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seed 0, mlp asym10 only, 3 folds, no JSON")
    parser.add_argument("--models", default="lr,mlp,cnn,text")
    parser.add_argument("--noises", default=",".join(NOISES))
    parser.add_argument("--json", type=Path, help=f"results file (default {RESULTS.name} for a full run)")
    parser.add_argument("--dump", type=Path, help="also save each run's recorded tables here")
    parser.add_argument("--markdown", action="store_true", help="print the docs tables from the results file")
    parser.add_argument("--derive", nargs="+", type=Path, metavar="PART",
                        help="merge these results files, recompute ours from --dump's tables, write --json")
    parser.add_argument("--threshold-samples", type=float, metavar="F",
                        help=f"train every setting with F of the training set as threshold samples; {THRESHOLD_RESULTS.name}")
    parser.add_argument("--resume", action="store_true", help="with --threshold-samples: skip settings in the file")
    parser.add_argument("--merge-threshold", nargs="+", type=Path, metavar="PART",
                        help=f"merge threshold-sample results of other seeds into --json ({THRESHOLD_RESULTS.name})")
    args = parser.parse_args(argv)
    if args.merge_threshold:
        (args.json or THRESHOLD_RESULTS).write_text(json.dumps(threshold_merge(args.merge_threshold), indent=1) + "\n")
        return
    if args.threshold_samples:
        torch.set_num_threads(1)
        threshold_main(args)
        return
    if args.markdown:
        stored = json.loads((args.json or RESULTS).read_text())
        print(threshold_markdown(stored) if "fraction" in stored["settings"] else markdown(stored))
        return
    if args.derive:
        merged = derive(args.derive, args.dump)
        for key, entry in merged["results"].items():
            print_summary(*key.split("/"), entry["runs"], entry)
        print(json.dumps(merged["checks"]["all"]))
        (args.json or RESULTS).write_text(json.dumps(merged, indent=1) + "\n")
        return
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    models = ["mlp"] if args.quick else args.models.split(",")
    noises = ["asym10"] if args.quick else args.noises.split(",")
    folds = 3 if args.quick else 5
    print(f"machine: {machine()}\nseeds {seeds}, noises {noises}, models {models}, folds {folds}", flush=True)
    path = args.json or (None if args.quick else RESULTS)
    began = time.perf_counter()
    results: dict[str, Any] = {}
    for name in models:
        for noise in noises:
            runs = [run_one(name, noise, seed, folds, args.dump) for seed in seeds]
            results[f"{name}/{noise}"] = {"runs": runs, **summarise(runs)}
            print_summary(name, noise, runs, results[f"{name}/{noise}"])
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
            if path is not None:  # written after every setting, so a run cut short keeps what finished
                settings = {"seeds": seeds, "models": models, "noises": noises, "settings_done": list(results),
                            "folds": folds, "epochs": EPOCHS, "n_train": {"digits": N_DIGITS, "text": N_TEXT},
                            "checkpoints": DEFAULT_SIGNAL_CHECKPOINTS, "default": DEFAULT_SCORE, "peers": PEERS}
                path.write_text(json.dumps({"settings": settings, "machine": machine(),
                                            "seconds": time.perf_counter() - began, "results": results}, indent=1))
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
