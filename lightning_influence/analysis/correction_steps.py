"""The gradient arithmetic of one correction step: loss weights by influence, the anchors' weight against the
replay, and the A-GEM projection that keeps a step from raising a protect sample's loss (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch


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
