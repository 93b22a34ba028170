"""How many training labels are wrong: an estimate with an interval, and a flag per example.

Pure torch, from the tables of a :class:`~lightning_influence.analysis.training_signals.TrainingSignalRecorder`
(rank 0). Both estimators read the predicted probabilities at one checkpoint: ``k*``, where EL2N varies most
across the training examples (the model fits the examples that agree with their class and not yet the flipped
ones, which a memorising net fits later). Averaging ``k*`` with the next checkpoint, the rule before, let a net
that starts memorising right after ``k*`` hide part of its flips; ``docs/mislabel.md`` measures both:

* ``confident_joint`` (default): cleanlab's calibrated confident joint (Northcutt et al. 2021) on those
  probabilities: per-class thresholds ``t_j`` (the mean ``p_j`` of the examples labelled ``j``), each
  example counted at the most probable class whose probability reaches its threshold (not counted when none
  does), the rows rescaled to the label counts; the off-diagonal mass is the estimate;
* ``disagree``: the examples whose most probable class (of those probabilities) is not the given one.

The interval is a percentile bootstrap over the training examples (the count recomputed on resampled
examples). The flagged examples are the first ``round(estimate)`` of the ranking (the default score), so the
threshold is the score of the last one flagged. ``docs/mislabel.md`` measures both.

The bootstrap interval is sampling error only; where flips are plausible (low-margin ones) the confident joint
misses most of them. The *plausible range* says how far the count may be off for that reason, from two counts
that err in opposite directions (chosen on logistic regression and an MLP, checked on a CNN and a tiny BERT in
``docs/mislabel.md``):

* ``plausible_low`` (:func:`confident_joint_mean`): the confident joint at every checkpoint, averaged with
  weights ``V_k`` (EL2N's variance across the examples): the labels the model is confident are wrong;
* ``plausible_high`` (:func:`mixture_count`): the examples a two-component Gaussian mixture on
  ``el2n_fitted`` puts in the component of larger mean: those that train like flips, plausible or not.

:func:`threshold_sample_count` is the calibration of Pleiss et al. (2020) instead: train with a few examples
given deliberately wrong labels (:func:`threshold_sample_labels`) and read the count off how the ranking scores
them. It needs that change to the training, so it is not the default; ``docs/mislabel.md`` measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lightning_influence.analysis.training_signals import DEFAULT_SCORE, TrainingSignalRecorder

COUNT_METHODS = ("confident_joint", "disagree")
DEFAULT_COUNT_METHOD = "confident_joint"
_BOOTSTRAP_ELEMENTS = 1 << 22  # probabilities compared at once per chunk of bootstrap resamples (32 MB as float64)


@dataclass(frozen=True)
class FlipCount:
    """An estimated number of wrong labels with a bootstrap interval, and the examples flagged."""

    method: str
    estimate: float
    low: float
    high: float
    threshold: float
    flagged: torch.Tensor  # bool [n]
    level: float = 0.95
    plausible_low: float = float("nan")
    plausible_high: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """``{"method", "estimate", "low", "high", "level", "flagged", "threshold", "fraction", "plausible_low",
        "plausible_high"}`` (builtins): ``flagged`` is the number of examples flagged, ``fraction`` the estimate
        over the training set size, ``plausible_*`` the plausible range (None where it was not computed)."""
        return {"method": self.method, "estimate": self.estimate, "low": self.low, "high": self.high,
                "level": self.level, "flagged": int(self.flagged.sum()), "threshold": self.threshold,
                "fraction": self.estimate / max(1, len(self.flagged)),
                "plausible_low": None if math.isnan(self.plausible_low) else self.plausible_low,
                "plausible_high": None if math.isnan(self.plausible_high) else self.plausible_high}


def count_probabilities(recorder: TrainingSignalRecorder, following: int = 0) -> torch.Tensor:
    """The predicted probabilities ``[n, classes]`` at checkpoint ``k*`` (:func:`peak_checkpoint`), averaged
    with the ``following`` checkpoints after it when asked (the rule before was ``following=1``)."""
    column = peak_checkpoint(recorder)
    if len(recorder.probabilities) <= column:
        raise RuntimeError("Expected per-checkpoint probabilities in the recorder (recorded since version 0.7).")
    columns = sorted({min(column + step, len(recorder.probabilities) - 1) for step in range(following + 1)})
    probs = torch.stack([recorder.probabilities[k].double() for k in columns]).mean(dim=0)
    if probs.isnan().all():  # a recorder resumed from a checkpoint written before probabilities were kept
        raise RuntimeError("Expected per-checkpoint probabilities at the separation checkpoint, but none were kept.")
    return torch.nan_to_num(probs, nan=0.0)


def peak_checkpoint(recorder: TrainingSignalRecorder) -> int:
    """The recorded checkpoint (0-based column) where EL2N varies most across the training examples."""
    if not recorder.signals or recorder.labels is None:
        raise RuntimeError("No training signals recorded on this process: record() first (rank 0 holds them).")
    return int(torch.nan_to_num(recorder.signals["el2n"].double(), nan=0.0).var(dim=0).argmax())


def confident_joint_count(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Off-diagonal mass of the calibrated confident joint of ``probs`` ``[n, C]`` and the given ``labels``."""
    classes = probs.shape[1]
    one_hot = torch.nn.functional.one_hot(labels, classes).double()
    per_label = one_hot.sum(dim=0)
    thresholds = (one_hot * probs).sum(dim=0) / per_label.clamp(min=1)
    above = probs >= thresholds[None, :] - 1e-12
    masked = torch.where(above, probs, -1.0)
    counted = above.any(dim=1)
    assigned = masked.argmax(dim=1)
    joint = torch.zeros(classes, classes, dtype=torch.float64)
    joint.index_put_((labels[counted], assigned[counted]), torch.ones(int(counted.sum()), dtype=torch.float64),
                     accumulate=True)
    row = joint.sum(dim=1, keepdim=True)
    calibrated = torch.where(row > 0, joint / row.clamp(min=1e-12) * per_label[:, None], joint)
    return float(calibrated.sum() - calibrated.diagonal().sum())


def confident_joint_mean(recorder: TrainingSignalRecorder) -> float:
    """``sum_k V_k CJ_k / sum_k V_k``: the confident joint count (:func:`confident_joint_count`) of every
    checkpoint's probabilities, weighted by the variance of EL2N across the examples there; checkpoints without
    probabilities are skipped (the lower end of the plausible range)."""
    if not recorder.signals or recorder.labels is None:
        raise RuntimeError("No training signals recorded on this process: record() first (rank 0 holds them).")
    labels = recorder.labels.clamp(min=0)
    variance = torch.nan_to_num(recorder.signals["el2n"].double(), nan=0.0).var(dim=0)
    total, weight = 0.0, 0.0
    for column, table in enumerate(recorder.probabilities):
        if column >= len(variance) or bool(table.isnan().all()):
            continue
        total += float(variance[column]) * confident_joint_count(torch.nan_to_num(table.double(), nan=0.0), labels)
        weight += float(variance[column])
    if weight <= 1e-12:
        raise RuntimeError("Expected per-checkpoint probabilities and a spread of EL2N across the examples.")
    return total / weight


def mixture_count(score: torch.Tensor, iterations: int = 300) -> float:
    """The examples a two-component 1-D Gaussian mixture on ``score`` (larger = more suspicious; NaN read as
    the smallest score) assigns (posterior > 1/2) to the component of larger mean: the upper end of the
    plausible range. Maximum likelihood by EM from a 1-D k-means split; deterministic and scale-free."""
    if iterations < 1:
        raise ValueError(f"Expected `iterations` >= 1, but got {iterations}.")
    u = score.double()
    u = torch.nan_to_num(u, nan=float(u[~u.isnan()].min()) if bool((~u.isnan()).any()) else 0.0)
    if len(u) < 4 or float(u.std()) < 1e-9:
        return 0.0
    floor = 1e-6 * float(u.var())
    centres = torch.quantile(u, torch.tensor([0.1, 0.9], dtype=torch.float64))
    for _ in range(100):  # 1-D k-means (Lloyd) for the start, as scikit-learn's GaussianMixture
        split = float(centres.mean())
        moved = torch.stack([u[u <= split].mean(), u[u > split].mean()])
        if bool(torch.equal(moved, centres)):
            break
        centres = moved
    upper = (u > float(centres.mean())).double()
    for _ in range(iterations):
        responsibilities = torch.stack([1 - upper, upper])  # [2, n]
        mass = responsibilities.sum(dim=1).clamp(min=1e-9)
        mean = (responsibilities * u).sum(dim=1) / mass
        squared = (u - mean[:, None]) ** 2
        var = ((responsibilities * squared).sum(dim=1) / mass).clamp(min=floor)
        log_density = -0.5 * squared / var[:, None] - 0.5 * var[:, None].log() + (mass / len(u)).log()[:, None]
        updated = log_density.softmax(dim=0)[1]
        if float((updated - upper).abs().max()) < 1e-10:
            upper = updated
            break
        upper = updated
    high = upper if float(mean[1]) >= float(mean[0]) else 1 - upper
    return float((high > 0.5).sum())


def weighted_counts(method: str, probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``method``'s count on each of ``B`` reweighted copies of the examples at once: ``weights`` ``[B, n]``
    (a bootstrap resample's multiplicities) in place of the examples themselves; equal to the count on the
    resampled examples (:func:`confident_joint_count` or the disagreements)."""
    given = probs.gather(1, labels[:, None]).squeeze(1)
    if method != "confident_joint":
        return weights @ (probs.scatter(1, labels[:, None], -1.0).amax(dim=1) > given).double()
    classes = probs.shape[1]
    one_hot = torch.nn.functional.one_hot(labels, classes).double()
    per_label = weights @ one_hot  # [B, C]
    floor = (weights @ (one_hot * probs)) / per_label.clamp(min=1) - 1e-12  # the thresholds, less the tolerance
    # The most probable class reaching its threshold, a class at a time over [B, n] (a strict > keeps the first
    # of equal ones, as argmax does): the same as the argmax over a [B, n, C] mask, in a fraction of the time.
    columns = probs.t().contiguous()
    best = torch.full(weights.shape, -1.0, dtype=probs.dtype)
    assigned = torch.zeros(weights.shape, dtype=torch.long)
    for j in range(classes):
        column = columns[j][None, :]
        candidate = torch.where(column >= floor[:, j : j + 1], column, -1.0)
        better = candidate > best
        best = torch.where(better, candidate, best)
        assigned.masked_fill_(better, j)
    mass = weights * (best > -1.0)  # an example no class's threshold admits is not counted
    cells = labels[None, :] * classes + assigned
    joint = torch.zeros(len(weights), classes * classes, dtype=torch.float64).scatter_add_(1, cells, mass)
    joint = joint.view(-1, classes, classes)
    row = joint.sum(dim=2, keepdim=True)
    calibrated = torch.where(row > 0, joint / row.clamp(min=1e-12) * per_label[:, :, None], joint)
    return calibrated.sum(dim=(1, 2)) - calibrated.diagonal(dim1=1, dim2=2).sum(dim=1)


def _count(method: str, probs: torch.Tensor, labels: torch.Tensor) -> float:
    if method == "confident_joint":
        return confident_joint_count(probs, labels)
    given = probs.gather(1, labels[:, None]).squeeze(1)
    return float((probs.scatter(1, labels[:, None], -1.0).amax(dim=1) > given).sum())


def estimate_flip_count(recorder: TrainingSignalRecorder, method: str = DEFAULT_COUNT_METHOD,
                        score: str = DEFAULT_SCORE, resamples: int = 200, level: float = 0.95,
                        seed: int = 0, following: int = 0) -> FlipCount:
    """Estimated number of wrong labels (``method``), a ``level`` bootstrap interval, and the flagged examples.

    Args:
        recorder: a recorder holding its tables (rank 0) with at least one checkpoint.
        method: one of :data:`COUNT_METHODS`.
        score: the ranking whose first ``round(estimate)`` examples are flagged.
        resamples: bootstrap resamples for the interval (0: the interval is the estimate itself).
        level: the interval's coverage.
        seed: the bootstrap's seed.
        following: checkpoints after ``k*`` whose probabilities are averaged in (:func:`count_probabilities`).
    """
    if method not in COUNT_METHODS:
        raise ValueError(f"Expected `method` to be one of {COUNT_METHODS}, but got {method!r}.")
    if not 0 < level < 1:
        raise ValueError(f"Expected `level` in (0, 1), but got {level}.")
    probs = count_probabilities(recorder, following)
    assert recorder.labels is not None
    labels = recorder.labels.clamp(min=0)
    estimate = _count(method, probs, labels)
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    draws = [torch.tensor([estimate], dtype=torch.float64)]
    chunk = max(1, _BOOTSTRAP_ELEMENTS // (n * probs.shape[1]))
    for first in range(0, resamples, chunk):  # a chunk of resamples at once, as multiplicities per example
        index = torch.randint(0, n, (min(chunk, resamples - first), n), generator=generator)
        weights = torch.zeros(len(index), n, dtype=torch.float64).scatter_add_(
            1, index, torch.ones(index.shape, dtype=torch.float64))
        draws.append(weighted_counts(method, probs, labels, weights))
    boot = torch.cat(draws)
    tail = (1 - level) / 2
    low, high = float(torch.quantile(boot, tail)), float(torch.quantile(boot, 1 - tail))
    scores = recorder.component_scores()
    if score not in scores:
        raise ValueError(f"Expected a score in {sorted(scores)}, but got {score!r}.")
    ranking = scores[score]
    flagged_count = min(n, max(0, int(math.floor(estimate + 0.5))))
    order = torch.argsort(torch.nan_to_num(ranking, nan=float("-inf")), descending=True, stable=True)
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[order[:flagged_count]] = True
    threshold = float(ranking[order[flagged_count - 1]]) if flagged_count else float("inf")
    try:
        plausible = plausible_range(recorder, scores["el2n_fitted"])
    except RuntimeError:  # no spread of EL2N at any checkpoint with probabilities: the count without its range
        plausible = (float("nan"), float("nan"))
    return FlipCount(method, estimate, min(low, estimate), max(high, estimate), threshold, flagged, level,
                     *plausible)


def plausible_range(recorder: TrainingSignalRecorder, el2n_fitted: torch.Tensor | None = None
                    ) -> tuple[float, float]:
    """``(low, high)``: :func:`confident_joint_mean` and :func:`mixture_count` of ``el2n_fitted`` (the recorder's
    score, unless given), in order."""
    confident = confident_joint_mean(recorder)
    mixture = mixture_count(recorder.scores("el2n_fitted") if el2n_fitted is None else el2n_fitted)
    return min(confident, mixture), max(confident, mixture)


# -- deliberately mislabelled threshold samples (Pleiss et al. 2020) ---------------------------------------------
def threshold_sample_labels(labels: torch.Tensor, count: int, classes: int, seed: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, wrong_labels)``: ``count`` training examples drawn without replacement and, for each, a
    uniformly random class other than its given label. Train with these labels in place of the given ones (the
    *threshold samples*, known to be wrong) to calibrate :func:`threshold_sample_count`.

    Raises:
        ValueError: for ``count`` outside ``[1, len(labels)]`` or fewer than two classes.
    """
    if classes < 2:
        raise ValueError(f"Expected `classes` >= 2, but got {classes}.")
    if not 1 <= count <= len(labels):
        raise ValueError(f"Expected `count` in [1, {len(labels)}], but got {count}.")
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, classes, (count,), generator=generator)
    return sources, (labels[sources].long() + shift) % classes


def threshold_sample_count(score: torch.Tensor, fake: torch.Tensor, detected: float = 0.5, resamples: int = 200,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float, float, float]:
    """``(estimate, low, high, threshold)``: the number of wrong labels among the real examples, calibrated by
    the threshold samples ``fake`` (bool ``[n]``, the examples trained with a deliberately wrong label).

    With ``t`` the score that a fraction ``detected`` of the threshold samples exceed, and ``q`` the fraction of
    them that do (``detected`` up to ties), the estimate is ``#{real i : score_i > t} / q``: a wrong label is taken
    to score like a deliberately wrong one, and a right label not to exceed ``t``. The interval is a percentile
    bootstrap resampling the real examples and the threshold samples apart.
    """
    if not 0 < detected < 1:
        raise ValueError(f"Expected `detected` in (0, 1), but got {detected}.")
    fake = fake.bool()
    if int(fake.sum()) < 2 or bool(fake.all()):
        raise ValueError("Expected at least two threshold samples and one real example.")
    score = torch.nan_to_num(score.double(), nan=float("-inf"))
    real, planted = score[~fake], score[fake]

    def count(real_scores: torch.Tensor, planted_scores: torch.Tensor) -> tuple[float, float]:
        threshold = float(torch.quantile(planted_scores, 1 - detected))
        rate = float((planted_scores > threshold).double().mean())
        if rate == 0:  # ties at the top: count at the threshold itself
            rate = float((planted_scores >= threshold).double().mean())
            return float((real_scores >= threshold).sum()) / rate, threshold
        return float((real_scores > threshold).sum()) / rate, threshold

    estimate, threshold = count(real, planted)
    generator = torch.Generator().manual_seed(seed)
    draws = [estimate]
    for _ in range(resamples):
        draws.append(count(real[torch.randint(0, len(real), (len(real),), generator=generator)],
                           planted[torch.randint(0, len(planted), (len(planted),), generator=generator)])[0])
    boot = torch.tensor(draws, dtype=torch.float64)
    tail = (1 - level) / 2
    low, high = float(torch.quantile(boot, tail)), float(torch.quantile(boot, 1 - tail))
    return estimate, min(low, estimate), max(high, estimate), threshold
