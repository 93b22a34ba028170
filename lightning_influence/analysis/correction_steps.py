"""The arithmetic of one correction round and step: the guarded choice, loss weights by influence, the anchors'
weight against the replay, and the projections (A-GEM, GEM) that keep a step from raising a protect sample's loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from lightning_influence.core.per_example.losses import LossFn, check_per_example_losses
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.modes import analysis_mode


def influence_weights(scores: Sequence[float]) -> list[float]:
    """Loss weights proportional to how helpful each chosen example is (``-influence``, clipped at 0), with mean 1;
    equal weights when none is helpful."""
    helpful = torch.tensor([max(-float(v), 0.0) for v in scores], dtype=torch.float64)
    if float(helpful.sum()) <= 0:
        return [1.0] * len(scores)
    return (helpful * len(scores) / helpful.sum()).tolist()


def anchor_weight(g_anchors: Sequence[Optional[torch.Tensor]], g_chosen: Sequence[Optional[torch.Tensor]]) -> float:
    """``1 + max(0, -g_A . g_R / |g_A|^2)`` over matching parameter gradients (None: zero): the weight of the
    anchors' term that makes ``g_A . (g_R + w g_A) >= |g_A|^2`` (1 when ``g_A`` is zero)."""
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_anchors, g_chosen)
              if a is not None and b is not None)
    norm2 = sum(float(a.double().pow(2).sum()) for a in g_anchors if a is not None)
    return 1.0 + (max(0.0, -dot / norm2) if norm2 > 0 else 0.0)


def project_away(grads: Sequence[Optional[torch.Tensor]], g_protect: Sequence[Optional[torch.Tensor]]) -> float:
    """When the step's gradient ``g`` (``grads``, edited in place) would raise the protect sample's loss to first
    order (``g . g_P < 0``), remove its component along ``g_P``: ``g - (g . g_P / |g_P|^2) g_P`` (A-GEM, Chaudhry et
    al. 2019). Returns the cosine of ``g`` and ``g_P`` before the projection (0 when either is zero)."""
    pairs = [(a, b) for a, b in zip(grads, g_protect) if a is not None and b is not None]
    dot = sum((float((a.double() * b.double()).sum()) for a, b in pairs), 0.0)
    norm_p = sum((float(b.double().pow(2).sum()) for _, b in pairs), 0.0)
    norm_g = sum((float(g.double().pow(2).sum()) for g in grads if g is not None), 0.0)
    cosine = dot / (norm_p * norm_g) ** 0.5 if norm_p > 0 and norm_g > 0 else 0.0
    if dot < 0 and norm_p > 0:
        with torch.no_grad():
            for a, b in pairs:
                a.sub_(b.to(a.dtype), alpha=dot / norm_p)
    return cosine


def match_decrease(grads: Sequence[Optional[torch.Tensor]], reference: Sequence[Optional[torch.Tensor]]) -> float:
    """Scale ``grads`` (in place) by ``|r|^2 / (r . grads)`` for the reference gradient ``r``, so that a step along
    them lowers the reference's loss, to first order, exactly as much as a step along ``r`` itself; returns the
    scale (1, and ``grads`` unchanged, when ``r . grads <= 0``: no such positive scale exists)."""
    pairs = [(a, b) for a, b in zip(grads, reference) if a is not None and b is not None]
    dot = sum((float((a.double() * b.double()).sum()) for a, b in pairs), 0.0)
    norm2 = sum((float(b.double().pow(2).sum()) for b in reference if b is not None), 0.0)
    if dot <= 0 or norm2 <= 0:
        return 1.0
    scale = norm2 / dot
    with torch.no_grad():
        for a in grads:
            if a is not None:
                a.mul_(scale)
    return scale


def project_each(grads: Sequence[Optional[torch.Tensor]], g_each: Sequence[Sequence[Optional[torch.Tensor]]],
                 sweeps: int = 200) -> float:
    """The smallest change to the step's gradient ``g`` (``grads``, edited in place) after which the step raises
    none of the protect examples' losses to first order: ``min |d - g|^2`` subject to ``g_i . d >= 0`` for every
    example's gradient ``g_i`` (``g_each``, matching ``grads``; None: zero), the projection of GEM (Lopez-Paz &
    Ranzato 2017) with one constraint per protect example. Solved in its dual, ``d = g + sum_i v_i g_i`` with
    ``v >= 0`` minimising ``v^T M v / 2 + v^T G g`` (``M = G G^T``), by ``sweeps`` rounds of exact coordinate
    descent. Returns the smallest cosine between ``g`` and a ``g_i`` before the projection (negative: some example's
    loss would have risen, and ``g`` was changed; 0 without examples)."""
    keep = [i for i, g in enumerate(grads) if g is not None]
    if not keep or not g_each:
        return 0.0
    flat = torch.cat([_flat(grads[i]) for i in keep])
    rows = torch.stack([torch.cat([_flat(e[i]) if e[i] is not None else torch.zeros_like(_flat(grads[i]))
                                   for i in keep]) for e in g_each])
    norms = rows.norm(dim=1) * flat.norm()
    cosines = torch.where(norms > 0, rows @ flat / norms.clamp_min(1e-300), torch.zeros_like(norms))
    gram, linear = rows @ rows.T, rows @ flat
    v = torch.zeros(len(g_each), dtype=torch.float64)
    diag = gram.diagonal()
    for _ in range(sweeps if bool((linear < 0).any()) else 0):
        for i in range(len(v)):
            if diag[i] > 0:
                v[i] = max(0.0, float(v[i] - (gram[i] @ v + linear[i]) / diag[i]))
    if bool((v > 0).any()):
        new = flat + rows.T @ v
        start = 0
        with torch.no_grad():
            for i in keep:
                g = grads[i]
                assert g is not None
                g.copy_(new[start:start + g.numel()].reshape(g.shape).to(g.dtype))
                start += g.numel()
    return float(cosines.min())


def _flat(t: Optional[torch.Tensor]) -> torch.Tensor:
    assert t is not None
    return t.detach().double().flatten()


def guarded_top(indices: torch.Tensor, scores: torch.Tensor, k: int, by_guard: bool = False
                ) -> tuple[list[int], list[float]]:
    """The ``k`` most helpful (most negative ``scores[0]``) of the examples whose influence on the guard
    (``scores[1]``) is at most 0, then, if fewer pass, the rest by the most negative sum of both; ties by index.
    ``by_guard``: the roles swapped (the most helpful to the guard of those not harmful to the anchors). The
    scores returned are the chosen examples' influence on the anchors (``scores[0]``) either way."""
    order = indices.argsort()
    indices, scores = indices[order], scores[:, order].double()
    if by_guard:
        picked, _ = guarded_top(indices, scores[[1, 0]], k)
        position = {int(v): i for i, v in enumerate(indices.tolist())}
        return picked, [float(scores[0, position[i]]) for i in picked]
    passes = scores[1] <= 0
    first = torch.where(passes, scores[0], torch.inf).argsort(stable=True)[: int(passes.sum())]
    rest = torch.where(passes, torch.inf, scores[0] + scores[1]).argsort(stable=True)
    chosen = torch.cat([first, rest])[:k]
    return indices[chosen].tolist(), scores[0, chosen].tolist()


def example_gradients(loss_fn: LossFn, model: nn.Module, sample: tuple[Batch, int], params: Sequence[torch.Tensor]
                      ) -> list[tuple[torch.Tensor, ...]]:
    """The loss gradient of each example of ``sample`` (``(batch, size)``, eval mode), one tuple over ``params``."""
    with analysis_mode(model):
        losses = check_per_example_losses(loss_fn(model, sample[0]), sample[1])
        return [torch.autograd.grad(losses[j], params, retain_graph=j + 1 < sample[1], allow_unused=True)
                for j in range(sample[1])]
