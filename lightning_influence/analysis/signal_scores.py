"""Mislabel scores from recorded training-signal tables (``[n_train, checkpoints]``: loss, margin, EL2N).

Pure torch. Every score is larger for a more likely mislabelled example; ``docs/mislabel.md`` defines them and
measures them (``benchmarks/mislabel.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_SCORE = "el2n_separated"
EARLY_FRACTION = 0.1
#: The exponent ``p`` of the separation weights ``(eta_k / max_k eta_k)^p`` of ``el2n_separated`` (chosen on the
#: lr and mlp settings of ``benchmarks/mislabel_rules.py``, checked on the cnn and text ones).
SEPARATION_POWER = 24


def _early_column(epochs: Sequence[int], early_fraction: float) -> int:
    """The first recorded checkpoint at or after ``early_fraction`` of the span from the first to the last."""
    first, last = epochs[0], epochs[-1]
    target = first + early_fraction * (last - first)
    return next(i for i, epoch in enumerate(epochs) if epoch >= target - 1e-9)


def separation_window(el2n: torch.Tensor, multiple: int = 2, plateau: float = 0.8) -> int:
    """Number of leading checkpoints averaged by the ``el2n_window`` score (the default before the geometric
    schedule: with it the window mostly spans the whole run).

    With ``V_k`` the variance of EL2N across examples at checkpoint ``k`` (1-based) and ``k* = argmax_k V_k``:
    the window ends at the later of ``multiple * k*`` and the last checkpoint of the run from ``k*`` on that
    keeps ``V_k >= plateau * V_{k*}``, capped at ``K``. EL2N lies in ``[0, sqrt 2]``; its spread across examples
    is largest when the model fits most examples (EL2N near 0) and not yet the rest: for a net that later
    memorises its flips, ``V`` then collapses and the window stops before the flips are fitted; for a model
    that never fits them (a regularised linear model) ``V`` stays on its plateau and the window covers it.
    Found without knowing which labels are wrong.
    """
    variance = torch.nan_to_num(el2n.double(), nan=0.0).var(dim=0)
    peak = int(variance.argmax())
    end = peak
    while end + 1 < len(variance) and variance[end + 1] >= plateau * variance[peak]:
        end += 1
    return min(el2n.shape[1], max(end + 1, multiple * (peak + 1)))


def component_scores(
    signals: dict[str, torch.Tensor], epochs: Sequence[int], early_fraction: float = EARLY_FRACTION,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Named mislabel scores from ``[n, checkpoints]`` tables; larger = more likely mislabelled.

    With ``K`` checkpoints ``k = 1..K`` (NaN entries, e.g. examples missing from a checkpoint, are skipped) and
    ``V_k`` the variance of EL2N across the examples at checkpoint ``k``:

    * ``el2n_separated`` (:data:`DEFAULT_SCORE`): ``sum_k w_k el2n_k / sum_k w_k`` with
      ``w_k = a_k (eta_k / max eta)^p``: ``a_k`` the fraction of examples whose given label the model predicts
      at checkpoint ``k`` and ``eta_k`` how cleanly EL2N splits into two groups there within each given
      ``labels`` class (:func:`separation`, :func:`separated_weighted`; without ``labels`` every example is
      taken as one class);
    * ``el2n_fitted``: ``sum_k V_k a_k el2n_k / sum_k V_k a_k``, each checkpoint weighted by the spread of EL2N
      (``V_k``) and by ``a_k`` (:func:`fitted_weighted`; the default before);
    * ``el2n_weighted``: the same with weights ``V_k`` alone (:func:`spread_weighted`; the default before that);
    * ``el2n_window``: the mean EL2N over the first ``separation_window(el2n)`` checkpoints;
    * ``final_loss``, ``final_el2n``, ``final_margin`` (= ``-margin``): the last checkpoint alone;
    * ``early_loss``, ``early_el2n``: the checkpoint at ``early_fraction`` of the recorded span;
    * ``mean_loss``, ``mean_el2n``: ``1/K sum_k`` of the signal (area under its curve over the checkpoints);
    * ``aum`` (= ``-1/K sum_k margin_k``): the area under the margin (Pleiss et al. 2020), negated;
      ``aum_window``: the same over the ``el2n_window`` checkpoints;
    * ``forgetting``: forgetting events between checkpoints (Toneva et al. 2019, :func:`forgetting_score`);
    * ``a+b``: the mean normalised rank of two of these (:func:`rank_mean`).
    """
    loss, margin, el2n = signals["loss"], signals["margin"], signals["el2n"]
    early = _early_column(epochs, early_fraction)
    window = separation_window(el2n)
    scores = {
        "el2n_window": el2n[:, :window].nanmean(dim=1),
        "mean_el2n": el2n.nanmean(dim=1),
        "mean_loss": loss.nanmean(dim=1),
        "aum": -margin.nanmean(dim=1),
        "aum_window": -margin[:, :window].nanmean(dim=1),
        "el2n_weighted": spread_weighted(el2n),
        "el2n_fitted": fitted_weighted(el2n, margin),
        "el2n_separated": separated_weighted(el2n, margin, labels),
        "forgetting": forgetting_score(margin),
        "early_el2n": el2n[:, early],
        "early_loss": loss[:, early],
        "final_loss": loss[:, -1],
        "final_el2n": el2n[:, -1],
        "final_margin": -margin[:, -1],
    }
    scores["el2n_window+aum"] = rank_mean(scores["el2n_window"], scores["aum"])
    scores["el2n_weighted+aum"] = rank_mean(scores["el2n_weighted"], scores["aum"])
    scores["el2n_window+final_margin"] = rank_mean(scores["el2n_window"], scores["final_margin"])
    return scores


def spread_weighted(el2n: torch.Tensor) -> torch.Tensor:
    """``sum_k V_k el2n_k / sum_k V_k`` with ``V_k`` the variance of EL2N across examples at checkpoint ``k``."""
    table = torch.nan_to_num(el2n.double(), nan=0.0)
    variance = table.var(dim=0)
    return (table * variance).sum(dim=1) / variance.sum().clamp(min=1e-12)


def fitted_weighted(el2n: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``sum_k V_k a_k el2n_k / sum_k V_k a_k``: :func:`spread_weighted` with each checkpoint's weight also
    scaled by ``a_k``, the fraction of examples with a positive margin (predicted as labelled) there.

    ``V_k`` is largest when about half the examples are fitted, which comes before the model has fitted all its
    clean examples when the labels are mostly right; ``a_k`` moves the weight towards the checkpoints where
    the clean examples are fitted and the flips not yet (a memorising net's late checkpoints keep little weight
    through ``V_k``). When no checkpoint predicts any example as labelled (every ``a_k = 0``) it is
    :func:`spread_weighted`.
    """
    table = torch.nan_to_num(el2n.double(), nan=0.0)
    fitted = (torch.nan_to_num(margin.double(), nan=-1.0) > 0).double().mean(dim=0)
    weight = table.var(dim=0) * fitted
    if float(weight.sum()) <= 1e-12:  # no checkpoint predicts any example as labelled: V_k alone
        return spread_weighted(el2n)
    return (table * weight).sum(dim=1) / weight.sum()


def separation(el2n: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``eta_k`` per checkpoint, in ``[0, 1]``: how much of EL2N's spread within the classes one threshold per
    class explains (Otsu's criterion, pooled over the given-label classes).

    Per class ``c`` and checkpoint, with the class's EL2N values sorted and split after the ``i``-th of ``n_c``,
    the between-group sum of squares is ``n_c (i / n_c) (1 - i / n_c) (m_low - m_high)^2``; its largest value
    over the splits, summed over the classes and divided by the within-class total sum of squares, is
    ``eta_k`` (0 where EL2N is constant within every class). Pooling within the classes keeps a model that
    predicts one class for every input (EL2N then takes one value per label: two groups, but not of fitted and
    unfitted examples) from reading as well separated. ``labels=None``: one class.
    """
    table = torch.nan_to_num(el2n.double(), nan=0.0)
    n = len(table)
    label = torch.zeros(n, dtype=torch.long) if labels is None else labels.long().clamp(min=0).cpu()
    label_order = torch.argsort(label, stable=True)
    classes, sizes = torch.unique_consecutive(label[label_order], return_counts=True)
    segment = torch.repeat_interleave(torch.arange(len(classes)), sizes)
    start = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    size = sizes[segment].double()
    position = (torch.arange(n) - start + 1).double()  # 1..n_c within each class
    out = torch.zeros(table.shape[1], dtype=torch.float64)
    for k in range(table.shape[1]):
        values = table[label_order, k]  # grouped by class
        low, span = values.min(), (values.max() - values.min()).clamp(min=1e-12)
        values = values[torch.argsort(segment + 0.5 * (values - low) / span)]  # by class, then by value: one sort
        running = values.cumsum(0)
        before = torch.cat([torch.zeros(1, dtype=torch.float64), running])[start]  # sum of the earlier classes
        low_sum = running - before
        total = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, segment, values)[segment]
        high = (size - position).clamp(min=1)
        between = position * (size - position) / size * (low_sum / position - (total - low_sum) / high) ** 2
        between = torch.where(position < size, between, torch.zeros_like(between))
        best = torch.zeros(len(classes), dtype=torch.float64).scatter_reduce_(0, segment, between, "amax")
        mean = total / size
        spread = float(((values - mean) ** 2).sum())
        out[k] = float(best.sum()) / spread if spread > 1e-12 else 0.0
    return out


def separated_weighted(el2n: torch.Tensor, margin: torch.Tensor, labels: torch.Tensor | None = None,
                       power: float = SEPARATION_POWER) -> torch.Tensor:
    """``sum_k w_k el2n_k / sum_k w_k`` with ``w_k = a_k (eta_k / max_k eta_k)^power``: EL2N averaged over the
    checkpoints where it splits most cleanly into two groups within the classes (:func:`separation`), each also
    weighted by ``a_k``, the fraction of examples with a positive margin there.

    A net fits the examples that agree with their class first; the checkpoints where the fitted and the not yet
    fitted examples stand furthest apart, relative to the spread inside each group, are those that tell a
    flipped label from a clean one best. Plausible (low-margin) flips sit close to the clean examples, so the
    checkpoint that separates them is a narrow window: a large ``power`` keeps the weight on the few best ones.
    Where no checkpoint separates anything (every ``eta_k`` or ``a_k`` zero) it is :func:`fitted_weighted`.
    """
    table = torch.nan_to_num(el2n.double(), nan=0.0)
    fitted = (torch.nan_to_num(margin.double(), nan=-1.0) > 0).double().mean(dim=0)
    eta = separation(table, labels)
    weight = fitted * (eta / eta.max().clamp(min=1e-12)) ** power
    if float(weight.sum()) <= 1e-12:
        return fitted_weighted(el2n, margin)
    return (table * weight).sum(dim=1) / weight.sum()


def forgetting_score(margin: torch.Tensor) -> torch.Tensor:
    """Forgetting events between consecutive checkpoints (Toneva et al. 2019) plus how late an example is learnt.

    ``events_i = #{k : margin_i,k-1 > 0 >= margin_i,k}``; an example never predicted right counts ``K`` events.
    ``score_i = events_i + first_i / (K + 1)`` with ``first_i`` the first checkpoint predicting the given label
    (``K`` when none), so ties break towards examples learnt later.
    """
    correct = torch.nan_to_num(margin, nan=-1.0) > 0
    k = margin.shape[1]
    events = (correct[:, :-1] & ~correct[:, 1:]).sum(dim=1).double()
    learnt = correct.any(dim=1)
    first = torch.where(learnt, correct.double().argmax(dim=1).double(), torch.full_like(events, float(k)))
    return torch.where(learnt, events, torch.full_like(events, float(k))) + first / (k + 1)


def rank_mean(*scores: torch.Tensor) -> torch.Tensor:
    """Mean of the normalised ranks (0 = least, 1 = most suspicious) of several scores."""
    out = torch.zeros(len(scores[0]), dtype=torch.float64)
    for score in scores:
        ranks = torch.empty(len(score), dtype=torch.float64)
        ranks[torch.argsort(torch.nan_to_num(score.double(), nan=float("-inf")), stable=True)] = torch.arange(
            len(score), dtype=torch.float64)
        out += ranks / max(1, len(score) - 1)
    return out / len(scores)


