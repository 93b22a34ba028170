"""Recovery from a LiSSA divergence: measure the diverging minibatch's eigenvalues and raise ``scale`` (an
eigenvalue spike) or, under the Hessian with negative curvature below the damping, the damping; after the last
retry, an error that states every measured eigenvalue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_influence.config import NEGATIVE_CURVATURE_MARGIN, SPECTRUM_STEPS, SUBSET_SEED
from lightning_influence.core.curvature.damping import estimate_spectrum
from lightning_influence.core.solvers.neumann import SCALE_MARGIN, LissaDivergenceError
from lightning_influence.core.tensors.batching import batch_size_of

if TYPE_CHECKING:
    from lightning_influence.core.problem import InfluenceProblem


def recover_from_divergence(problem: InfluenceProblem, error: LissaDivergenceError) -> dict[str, Any]:
    """See :meth:`InfluenceProblem.recover`: updates the problem's scale (or damping) and returns the record."""
    like = next(iter(problem.params.values()))
    batch = error.batch
    with torch.inference_mode(False), torch.enable_grad():
        found = estimate_spectrum(lambda v: problem.minibatch_hvp(batch, v), problem.num_params,
                                  batch_size_of(batch), like=like, seed=SUBSET_SEED, steps=SPECTRUM_STEPS)
    scale, damping = problem.lissa_scale(), problem.damping
    record: dict[str, Any] = {
        "step": error.step, "repeat": error.repeat, "batch_eigenvalue_max": found.top,
        "batch_eigenvalue_min": found.bottom, "scale_before": scale, "damping_before": damping,
    }
    negative = found.bottom + damping < 0 and found.top + damping <= scale
    if problem.curvature == "hessian" and negative and not problem.allow_negative_curvature:
        raised = max(2.0 * damping, NEGATIVE_CURVATURE_MARGIN * -found.bottom)
        note = (f"LiSSA diverged at step {error.step}: minibatch lambda_min={found.bottom:.3g} is below -damping;"
                f" damping raised from {damping:.3g} to {raised:.3g}.")
        record.update(reason="negative curvature: damping raised", damping_after=raised,
                      scale_after=scale + (raised - damping), note=note)
    else:
        record.update(reason="minibatch eigenvalue spike: scale raised", damping_after=damping,
                      scale_after=max(2.0 * scale, SCALE_MARGIN * (found.top + damping)), note="")
    problem.apply_recovery(record)
    return record


def divergence_error(problem: InfluenceProblem, error: LissaDivergenceError,
                     retries: list[dict[str, Any]]) -> LissaDivergenceError:
    """The error after the last retry, with every measured eigenvalue in its text."""
    measured = "; ".join(
        f"retry {i + 1}: minibatch eigenvalues [{r['batch_eigenvalue_min']:.3g}, {r['batch_eigenvalue_max']:.3g}],"
        f" {r['reason']} (scale {r['scale_before']:.3g} -> {r['scale_after']:.3g}, damping"
        f" {r['damping_before']:.3g} -> {r['damping_after']:.3g})"
        for i, r in enumerate(retries)
    ) or f"max_retries={len(retries)}"
    like = next(iter(problem.params.values()))
    with torch.inference_mode(False), torch.enable_grad():
        last = estimate_spectrum(lambda v: problem.minibatch_hvp(error.batch, v), problem.num_params,
                                 batch_size_of(error.batch), like=like, seed=SUBSET_SEED, steps=SPECTRUM_STEPS)
    found = problem.damping_choice().spectrum
    subset = "" if found is None else f"; on the check subset [{found.bottom:.3g}, {found.top:.3g}]"
    hint = "a larger `damping`, solver='cg', or a larger `batch_size`"
    if problem.curvature == "hessian":
        hint = "curvature='gauss_newton' (positive semi-definite), " + hint
    return LissaDivergenceError(
        f"{error} Still diverging after {len(retries)} retr{'y' if len(retries) == 1 else 'ies'} ({measured})."
        f" Curvature ({problem.curvature}) eigenvalues measured: minibatch at the divergence"
        f" [{last.bottom:.3g}, {last.top:.3g}]{subset}. Try {hint}.",
        step=error.step, repeat=error.repeat, batch=error.batch, scale=error.scale, damping=error.damping,
    )
