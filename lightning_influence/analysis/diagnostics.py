"""Self-diagnosis of an analysis: how far to trust its s_test vectors and its top lists.

Three measurements per analysis, all computed the same way on every rank (no collective):

* the relative residual ``||(C + damping I) x - v|| / ||v||`` of each solved ``x = s_test``: the solver's own
  check (:meth:`InfluenceProblem.residual`, the curvature C of a fixed seeded subset of
  ``SUBSET_EXAMPLES`` training examples; the subset size is reported), so the verdict "converged" and this
  diagnosis never disagree;
* the agreement between independent LiSSA repeats: Pearson and Spearman correlation of the top-k training
  scores ``-x_half . grad L(z)`` computed from the even-numbered and the odd-numbered repeats;
* the model's distance from a minimum: ``||grad R + weight_decay theta|| / rms_i ||grad L(z_i)||`` estimated on a
  fixed subset of :data:`GRADIENT_EXAMPLES` examples (debiased for sampling: about 0 at a minimum).

Warnings follow the literature: Koh & Liang (2017) assume a minimum with a positive-definite Hessian;
Basu et al. (2021) found estimates fragile without weight decay and in deeper or wider networks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.memory import per_example_chunk
from lightning_influence.core.tensors.params import flatten
from lightning_influence.results import PointTrust, SolveInfo, TopInfluences, TrustReport, TrustWarning

#: Training examples whose per-example gradients measure the distance from a minimum.
GRADIENT_EXAMPLES = 512
#: Heuristic thresholds of the warnings (documented in docs/trust.md).
DEEP_WEIGHT_LAYERS = 8
WIDE_LAYER_UNITS = 1024
GRADIENT_RATIO_LIMIT = 0.1
RESIDUAL_LIMIT = 0.5
AGREEMENT_LIMIT = 0.5


def fixed_subset(n: int, size: int, seed: int = 0) -> list[int]:
    """All of ``range(n)`` when ``n <= size``, else ``size`` indices drawn by a seeded permutation (sorted)."""
    if n <= size:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())


def correlations(a: torch.Tensor, b: torch.Tensor) -> tuple[Optional[float], Optional[float]]:
    """Pearson and Spearman correlation of two score vectors (None when undefined: < 3 values or constant)."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef  # lazy: a few seconds to import

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.numel() < 3 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return None, None
    pearson, spearman = float(pearson_corrcoef(a, b)), float(spearman_corrcoef(a, b))
    return (pearson if math.isfinite(pearson) else None), (spearman if math.isfinite(spearman) else None)


def repeat_agreement(
    problem: InfluenceProblem, train: IndexedData, top: TopInfluences, half_a: torch.Tensor, half_b: torch.Tensor
) -> list[tuple[Optional[float], Optional[float]]]:
    """Per point, Pearson/Spearman of the scores of its top-k (harmful and helpful) examples under the two halves."""
    rows = [torch.cat([top.harmful_indices[r], top.helpful_indices[r]]).unique() for r in range(half_a.shape[0])]
    union = torch.cat(rows).unique()
    if union.numel() == 0:
        return [(None, None)] * len(rows)
    # the union's scores under both halves, its per-example gradients in chunks within the memory budget (the
    # union of 8 points' top lists is up to a few hundred examples: 1 GiB of gradients of a 1M-parameter model)
    listed = union.tolist()
    chunk = per_example_chunk(problem.num_params, len(listed), problem.device)
    halves = torch.cat([half_a, half_b])
    blocks = []
    for start in range(0, len(listed), chunk):
        g = problem.gradients(train.fetch(listed[start : start + chunk]))
        blocks.append(-(halves.to(g) @ g.T))
    scores = torch.cat(blocks, dim=1)  # [2 k, |union|]
    k = half_a.shape[0]
    position = {int(index): row for row, index in enumerate(listed)}
    result = []
    for r, indices in enumerate(rows):
        columns = [position[int(i)] for i in indices.tolist()]
        result.append(correlations(scores[r, columns], scores[k + r, columns]))
    return result


def gradient_ratio(
    problem: InfluenceProblem, train: IndexedData, subset: Sequence[int], weight_decay: float = 0.0
) -> float:
    """``||grad R + weight_decay theta|| / sqrt(mean_i ||g_i||^2)`` estimated from the per-example gradients g_i of
    ``subset``.

    With ``m = len(subset)`` of ``n`` examples the sample mean's squared norm is debiased by its sampling
    variance ``(mean_i ||g_i||^2 - ||mean_i g_i||^2) / m * (1 - m / n)``, so a model at a minimum reads about 0
    whatever m (exactly 0 when the subset is the whole training set).
    """
    chunk = per_example_chunk(problem.num_params, train.batch_size, problem.device)
    total, squares = None, 0.0
    for start in range(0, len(subset), chunk):
        g = problem.gradients(train.fetch(subset[start : start + chunk])).double()
        total = g.sum(0) if total is None else total + g.sum(0)
        squares += float((g**2).sum())
    if total is None:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    m = len(subset)
    mean = total / m
    second_moment = squares / m
    variance = max(second_moment - float(mean.norm()) ** 2, 0.0) / m * (1.0 - m / max(len(train), m))
    if weight_decay:
        mean = mean + weight_decay * flatten(problem.params).double()
    return math.sqrt(max(float(mean.norm()) ** 2 - variance, 0.0)) / max(math.sqrt(second_moment), 1e-300)


def structure_warnings(model: nn.Module) -> list[TrustWarning]:
    """BatchNorm/Dropout (handled by eval mode), and depth/width beyond which Basu et al. found estimates fragile."""
    warnings = []
    normalising = sorted({type(m).__name__ for m in model.modules()
                          if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))})
    if normalising:
        warnings.append(TrustWarning(
            "batchnorm_dropout", f"The model has {', '.join(normalising)}: the analysis runs in eval mode (BatchNorm"
            " uses its running statistics, dropout is off), so it explains the eval-mode function, not the noisy"
            " training-mode one. Nothing to do.", "info"))
    weights = [p for m in model.modules() for name, p in m.named_parameters(recurse=False)
               if name == "weight" and p.dim() >= 2 and p.requires_grad]
    if len(weights) > DEEP_WEIGHT_LAYERS:
        warnings.append(TrustWarning(
            "deep_model", f"The model has {len(weights)} trainable weight layers (> {DEEP_WEIGHT_LAYERS}): Basu et al."
            " (2021) found influence estimates degrade with depth. Check a few answers with `verify_leave_one_out`,"
            " or analyse only the last layers (freeze the others with requires_grad=False)."))
    widest = max((p.shape[0] for p in weights), default=0)
    if widest > WIDE_LAYER_UNITS:
        warnings.append(TrustWarning(
            "wide_model", f"The widest layer has {widest} units (> {WIDE_LAYER_UNITS}): Basu et al. (2021) found"
            " influence estimates degrade with width. Check a few answers with `verify_leave_one_out`."))
    return warnings


def setting_warnings(info: SolveInfo, damping: float, weight_decay: Optional[float]) -> list[TrustWarning]:
    """No damping / weight decay, a solve that did not converge (the solver's own settings: its
    :meth:`~lightning_influence.core.solvers.Solver.trust_warnings`)."""
    warnings = []
    if damping == 0:
        warnings.append(TrustWarning(
            "no_damping", "damping=0: a trained network's Hessian has negative and near-zero eigenvalues, so"
            " (H + 0 I)^-1 amplifies them. Set damping to at least the training weight decay (e.g. 0.01)."))
    if weight_decay is not None and weight_decay == 0:
        warnings.append(TrustWarning(
            "no_weight_decay", "The model was trained without weight decay: Basu et al. (2021) found influence"
            " estimates far less accurate without it (Koh & Liang assume a strictly convex objective). Train with"
            " weight decay, or keep damping well above 0."))
    elif weight_decay and damping < weight_decay:
        warnings.append(TrustWarning(
            "damping_below_weight_decay", f"damping={damping:g} is below the training weight decay {weight_decay:g}:"
            " the Hessian of the trained objective already includes weight_decay * I. Use damping >= weight decay."))
    if not info.converged:
        warnings.append(TrustWarning(
            "not_converged", f"The {info.solver} solve did not meet its convergence test. Raise `depth` (LiSSA) or"
            " `max_iter` (CG), or raise `damping`."))
    return warnings


def unconverged_points(points: Sequence[PointTrust], tolerance: Optional[float]) -> list[TrustWarning]:
    """The monitored points whose own s_test residual misses the solve's tolerance, named by validation index (the
    solve's verdict is about the worst of them; the others' lists can still be used)."""
    if tolerance is None:
        return []
    missed = [p for p in points if p.residual is not None and not p.residual <= tolerance]
    if not missed:
        return []
    named = ", ".join(f"{p.val_index} ({p.residual:.3g})" for p in missed[:20]) + (" ..." if len(missed) > 20 else "")
    return [TrustWarning(
        "points_not_converged", f"{len(missed)} of {len(points)} monitored point(s) did not converge (residual above"
        f" {tolerance:.3g}): validation indices {named}. Their harmful/helpful lists are unreliable; the other points"
        " converged. Raise `depth` (LiSSA) or `max_iter` (CG), or use solver='cg'.")]


def measurement_warnings(
    residuals: Sequence[Optional[float]], agreements: Sequence[Optional[float]], ratio: Optional[float], examples: int
) -> list[TrustWarning]:
    """Large residuals, disagreeing repeats and a model far from a minimum."""
    warnings = []
    large = [r for r in residuals if r is not None and not r <= RESIDUAL_LIMIT]
    if large:
        warnings.append(TrustWarning(
            "large_residual", f"{len(large)} s_test residual(s) ||(H + damping I) x - v|| / ||v|| exceed"
            f" {RESIDUAL_LIMIT} (worst {max(large):.3g}): the solve is inaccurate. Raise `depth`/`repeats` or"
            " `damping`, or use solver='cg'."))
    low = [a for a in agreements if a is not None and a < AGREEMENT_LIMIT]
    if low:
        warnings.append(TrustWarning(
            "repeats_disagree", f"For {len(low)} point(s) the top-k scores of two halves of the LiSSA repeats agree"
            f" poorly (Spearman {min(low):.2f} < {AGREEMENT_LIMIT}): the ranking is mostly noise. Raise `repeats`,"
            " `depth` or `batch_size`."))
    limit = GRADIENT_RATIO_LIMIT
    if ratio is not None and ratio > limit:
        warnings.append(TrustWarning(
            "model_not_converged", f"The training gradient is large (||grad R|| / rms ||grad L(z)|| = {ratio:.2f} >"
            f" {limit:.2f}): the model is far from a minimum, where influence functions assume it is (Koh & Liang"
            " 2017). Analyse later in training (every_n_epochs) or at the end of fit."))
    return warnings


def diagnose(
    problem: InfluenceProblem,
    train: IndexedData,
    val_indices: Sequence[int],
    gradients: torch.Tensor,
    s_vectors: torch.Tensor,
    halves: Optional[tuple[torch.Tensor, torch.Tensor]],
    top: TopInfluences,
    info: SolveInfo,
    weight_decay: Optional[float] = None,
) -> TrustReport:
    """All diagnostics of one analysis (see the module docstring)."""
    solution = s_vectors.to(gradients.dtype)
    residuals = problem.residual(solution, gradients).tolist()  # the solver's own check
    estimate = problem.residual_estimate(solution, gradients)  # a sampled verdict: the examples it read
    residual_examples = estimate.examples if estimate is not None and estimate.sampled else problem.residual_examples()
    agreement = (repeat_agreement(problem, train, top, *halves) if halves is not None
                 else [(None, None)] * len(val_indices))
    gradient_subset = fixed_subset(len(train), GRADIENT_EXAMPLES, seed=1)
    ratio = gradient_ratio(problem, train, gradient_subset, weight_decay or 0.0)
    top_eig = problem.solver.top_eigenvalue()
    points = tuple(PointTrust(int(i), _finite(r), p, s) for i, r, (p, s) in zip(val_indices, residuals, agreement))
    warnings = (structure_warnings(problem.model)
                + setting_warnings(info, problem.damping, weight_decay)
                + problem.solver.trust_warnings(top_eig)
                + measurement_warnings([p.residual for p in points], [p.repeat_spearman for p in points], ratio,
                                       len(gradient_subset))
                + unconverged_points(points, info.residual_tol))
    return TrustReport(points, tuple(warnings), residual_examples, _finite(ratio), len(gradient_subset), top_eig)


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None
