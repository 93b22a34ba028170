"""The influence step of ``selection="influence"``: move the weights the way retraining with the anchors
up-weighted would.

Up-weighting the anchors' mean loss ``L_A`` by a small ``eps`` in the training objective moves its minimum by
``-eps (H + damping I)^-1 grad L_A`` (the influence function's parameter change, Koh & Liang 2017, Sec. 2.1).
Fine-tuning on the anchors moves along ``-grad L_A`` instead, blind to which directions the rest of the training
data holds in place. The influence step takes the first direction, scaled so that it lowers the anchors' loss to
first order exactly as much as the gradient step of the same lr (``|g|^2 / (g . s)``, see
:func:`~lightning_influence.analysis.correction_steps.match_decrease`). Among all steps with that first-order
decrease it is the one that raises the damped training curvature's quadratic form ``d^T (H + damping I) d`` least:
it changes the anchors' loss while disturbing the training fit, and so the other examples, as little as possible.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_influence.analysis.correction_steps import match_decrease
from lightning_influence.config import ProblemConfig
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.distributed.collectives import Collectives
from lightning_influence.distributed.solve import solve_s_test
from lightning_influence.results import SolveInfo


def anchor_direction(model: nn.Module, loss_fn: LossFn, train: IndexedData, anchor_batch: Batch, setup: ProblemConfig,
                     collectives: Collectives) -> tuple[dict[str, torch.Tensor], SolveInfo]:
    """``s = (H + damping I)^-1 grad L_A`` for the anchors' mean loss, per parameter name (the solve's parameters),
    and how the solve went. Call on every rank: the solve's work is split over ranks, every rank gets the same."""
    problem = InfluenceProblem(model, loss_fn, train.loader(), setup)
    with analysis_mode(model):
        gradient = problem.gradients(anchor_batch).mean(dim=0, keepdim=True)
        s_vectors, info = solve_s_test(problem, gradient, collectives, None)
    chunks, start = {}, 0
    for name, p in problem.params.items():
        chunks[name] = s_vectors[0, start:start + p.numel()].reshape(p.shape).detach().clone()
        start += p.numel()
    return chunks, info


def take_influence_step(model: nn.Module, direction: dict[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Replace the gradients in ``.grad`` (the step on the anchors' loss) by ``direction`` where it covers a
    parameter, scaled by :func:`match_decrease` against the gradient; returns a copy of the gradient (the
    reference for rescaling after a later projection). Parameters the solve left out keep their gradient."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    grads = [g for _, g in named if g is not None]  # (all of them: narrows the type)
    reference: list[Optional[torch.Tensor]] = [g.detach().clone() for g in grads]
    with torch.no_grad():
        for (name, _), g in zip(named, grads):
            if name in direction:
                g.copy_(direction[name].to(device=g.device, dtype=g.dtype))
    match_decrease(grads, reference)
    return reference
