"""Residuals already measured: ``||(C + damping I) x - v|| / ||v||`` per row, remembered with the solution.

Each residual costs one curvature product per batch of the check subset. A LiSSA solve measures its estimate
to decide whether to stop; its record and the trust report then ask about the same solution, and get the
remembered rows instead of another pass.

On a training set larger than the check subset the verdict reads a seeded random sample of it, batch by batch,
until every row's estimate is decided (:func:`sampled_residual`): the mean of the sampled batches' products is an
unbiased estimate of ``C x`` and the spread of the batches gives its standard error, so a row is called below (or
above) the tolerance only when it is ``VERDICT_Z`` standard errors clear of it; a row that stays within reach of
the tolerance reads the whole set, where the estimate is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

#: Residuals remembered (a solve's last checks), with the solutions they are of.
RESIDUALS_KEPT = 3
#: A sampled verdict calls a row converged (or not) only when its estimate is this many standard errors clear of
#: the tolerance (one-sided, about 1 in 740 for a normal estimate).
VERDICT_Z = 3.0


@dataclass(frozen=True)
class ResidualEstimate:
    """A verdict's residual per row (``rows``), its standard error per row (``errors``: 0 where every example was
    read) and the training examples read (``examples`` of ``total``)."""

    rows: torch.Tensor
    errors: torch.Tensor
    examples: int
    total: int

    @property
    def sampled(self) -> bool:
        return self.examples < self.total

    def to_dict(self, z: float = VERDICT_Z) -> dict[str, Any]:
        return {"examples": self.examples, "of": self.total, "standard_error": float(self.errors.max()), "z": z}


class ResidualMemo:
    """The last :data:`RESIDUALS_KEPT` residuals, keyed by the content of the solution and the right-hand sides
    (a :func:`fingerprint` of each, not the tensors: on a model of a million parameters every solution kept would
    hold ``k x P`` numbers, and LiSSA's checks would keep three of them alive) and the damping."""

    def __init__(self) -> None:
        self._entries: list[tuple[tuple[Any, ...], tuple[Any, ...], float, ResidualEstimate]] = []
        self._probes: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def add(self, x: torch.Tensor, vectors: torch.Tensor, damping: float, rows: torch.Tensor | ResidualEstimate
            ) -> None:
        """Remember ``rows`` (exact residuals, or a sampled :class:`ResidualEstimate`) of ``x`` for ``vectors``."""
        if isinstance(rows, torch.Tensor):
            rows = ResidualEstimate(rows, torch.zeros_like(rows), 0, 0)
        entry = (self.fingerprint(x), self.fingerprint(vectors), damping, rows)
        self._entries = [*self._entries[-(RESIDUALS_KEPT - 1):], entry]

    def find(self, x: torch.Tensor, vectors: torch.Tensor, damping: float) -> torch.Tensor | None:
        found = self.find_estimate(x, vectors, damping)
        return None if found is None else found.rows

    def find_estimate(self, x: torch.Tensor, vectors: torch.Tensor, damping: float) -> ResidualEstimate | None:
        if not self._entries:
            return None
        x_key, v_key = self.fingerprint(x), self.fingerprint(vectors)
        for seen_x, seen_v, seen_damping, estimate in reversed(self._entries):
            if seen_damping == damping and _same_key(seen_x, x_key) and _same_key(seen_v, v_key):
                return estimate
        return None

    def fingerprint(self, t: torch.Tensor) -> tuple[Any, ...]:
        """Shape, dtype, device and per row the sum, the norm and the product with a fixed random vector: equal
        for equal tensors, and for different ones equal only if the difference is orthogonal to both the ones
        vector and a random one (probability zero), without keeping the tensor."""
        if t.numel() == 0:
            return tuple(t.shape), t.dtype, t.device, t.new_zeros(0)
        rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
        key = (rows.shape[1], rows.dtype, rows.device)
        if key not in self._probes:
            generator = torch.Generator().manual_seed(RESIDUALS_KEPT)
            self._probes[key] = torch.randn(rows.shape[1], generator=generator).to(rows.dtype).to(rows.device)
        digest = torch.stack([rows.sum(dim=1), rows.norm(dim=1), rows @ self._probes[key]]).detach()
        return tuple(t.shape), t.dtype, t.device, digest


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3])


# long: one pass with its running sums, its standard errors and the stopping rule read best together
def sampled_residual(product: Callable[[Any], torch.Tensor], batches: Iterable[tuple[Any, int]], x: torch.Tensor,
                     vectors: torch.Tensor, damping: float, total: int, tol: float, *, min_examples: int,
                     z: float = VERDICT_Z) -> ResidualEstimate:
    """``||(C + damping I) x - v|| / ||v||`` per row, ``C`` the mean curvature of ``total`` training examples,
    estimated from ``batches`` (``(batch, size)`` pairs of a random order of those examples, equal sizes but the
    last) read until every row is decided: ``z`` standard errors below or above ``tol``, after at least
    ``min_examples`` examples; a row never decided reads every batch (then the estimate is exact, its error 0).

    ``product(batch)`` is the batch's mean curvature times ``x``. The sampled batches' mean product is unbiased
    for ``C x``; its standard error per row is ``sqrt(s^2 / m * (1 - m / M))`` for ``m`` of ``M`` batches
    (without replacement), ``s^2`` the spread of the batch products, divided by ``||v||`` like the residual.
    """
    v_norm = vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
    summed = torch.zeros_like(x)
    spread = torch.zeros(len(x), dtype=torch.float64, device=x.device)  # sum over batches of ||p_b - mean||^2
    count, seen, size = 0, 0, 1
    rows = errors = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for batch, size in batches:
        part = product(batch)
        summed.add_(part, alpha=size)
        count, seen = count + size, seen + 1
        if seen > 1:  # Welford with equal weights: ||p - old mean||^2 (m-1)/m = ||p - new mean||^2 m/(m-1)
            deviation = part.sub_(summed, alpha=1.0 / count).norm(dim=1).double()
            spread += deviation.square() * (seen / (seen - 1))
        del part
        rows = _relative(summed, count, x, vectors, damping, v_norm)
        if count >= total:
            return ResidualEstimate(rows, torch.zeros_like(rows), count, total)
        if count < min_examples or seen < 2:
            continue
        batches_total = math.ceil(total / max(size, 1))
        variance = spread / (seen - 1) / seen * max(0.0, 1.0 - seen / batches_total)
        errors = (variance.sqrt() / v_norm.double()).to(rows.dtype)
        if bool(((rows + z * errors <= tol) | (rows - z * errors > tol)).all()):
            return ResidualEstimate(rows, errors, count, total)
    if count == 0:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    return ResidualEstimate(rows, errors if count < total else torch.zeros_like(rows), count, total)


def _relative(summed: torch.Tensor, count: int, x: torch.Tensor, vectors: torch.Tensor, damping: float,
              v_norm: torch.Tensor) -> torch.Tensor:
    """``||summed / count + damping x - v|| / ||v||`` per row, with one temporary."""
    applied = summed / count
    return applied.add_(x, alpha=damping).sub_(vectors).norm(dim=1) / v_norm


def relative_residual(applied: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``||A x - v|| / ||v||`` per row, given ``applied = A x``."""
    return (applied - vectors).norm(dim=1) / vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
