"""Damping chosen from the curvature's spectrum, and the negative-curvature check of the Hessian.

``damping="auto"``: ``AUTO_DAMPING_FRACTION * lambda_max`` of the curvature (Lanczos on curvature products
over a fixed seeded training subset), floored at the optimizer's weight decay, capped at
``MAX_DAMPING_FRACTION * lambda_max``. A number is used as given. Under ``curvature="hessian"`` a damping
below ``|lambda_min|`` is raised to ``NEGATIVE_CURVATURE_MARGIN * |lambda_min|`` (with a warning) unless
``allow_negative_curvature=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lightning_influence.config import (
    AUTO_DAMPING_FRACTION,
    MAX_DAMPING_FRACTION,
    NEGATIVE_CURVATURE_MARGIN,
    SELF_CHECK_DAMPING,
    SPECTRUM_STEPS,
    Damping,
    check_damping,
    register_damping_name,
)
from lightning_influence.core.curvature.base import Curvature, make_curvature
from lightning_influence.core.tensors.eigen import MatVec, lanczos


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalues of the curvature estimated by ``steps`` Lanczos steps on ``examples`` examples."""

    top: float
    bottom: float
    steps: int
    examples: int


@dataclass(frozen=True)
class DampingChoice:
    """The damping a solve uses and why.

    Attributes:
        value: lambda added to the curvature.
        requested: what was asked (a number or ``"auto"``).
        rule: how ``value`` was chosen, in words (goes into the solve info and reports).
        spectrum: the eigenvalue estimates behind it (None when none was needed).
        warnings: what the user should know (e.g. damping raised above the negative curvature).
    """

    value: float
    requested: Damping
    rule: str
    spectrum: Spectrum | None = None
    warnings: tuple[str, ...] = ()


def estimate_spectrum(matvec: MatVec, dim: int, examples: int, *, like: torch.Tensor, seed: int = 0,
                      steps: int = SPECTRUM_STEPS) -> Spectrum:
    """Top and bottom eigenvalue of a symmetric operator by ``steps`` Lanczos steps (seeded start vector).

    Ritz values lie inside the spectrum: ``top`` is a lower bound of ``lambda_max`` (tight after a few steps),
    ``bottom`` an upper bound of ``lambda_min`` (looser).
    """
    values, _ = lanczos(matvec, dim, steps, generator=torch.Generator().manual_seed(seed), like=like,
                        with_vectors=False)  # the values only: no [P, steps] Ritz vectors
    return Spectrum(float(values.max()), float(values.min()), len(values), examples)


def choose_damping(
    requested: Damping,
    curvature: Curvature | str,
    spectrum: Callable[[], Spectrum],
    weight_decay: float | None = None,
    allow_negative_curvature: bool = False,
) -> DampingChoice:
    """Resolve ``requested`` (see the module docstring); ``spectrum`` is called only when needed."""
    curvature, requested = make_curvature(curvature), check_damping(requested)
    if isinstance(requested, float) and curvature.psd:
        return DampingChoice(requested, requested, "given")
    if requested == SELF_CHECK_DAMPING:
        raise ValueError(
            "damping='self_check' chooses the damping by retraining the model, which the callbacks do (they know the"
            " training's optimiser). Here, run `lightning_influence.check_damping_by_retraining(...)` and pass its"
            " `.chosen` as `damping`, or pass a number or damping='auto'.")
    found = spectrum()
    if isinstance(requested, str):
        value, rule = DAMPING_RULES[requested].choose(found, weight_decay)
    else:
        value, rule = float(requested), "given"
    notes: list[str] = []
    if not curvature.psd and found.bottom < 0 and value + found.bottom <= 0:
        note = (
            f"damping={value:.3g} is below |lambda_min|={-found.bottom:.3g} of the curvature ({curvature.name}; Lanczos"
            f" estimate, lambda_max={found.top:.3g}): C + damping I is indefinite and the solve would diverge or flip"
            " signs."
        )
        if allow_negative_curvature:
            notes.append(note + " Kept because allow_negative_curvature=True.")
        else:
            raised = NEGATIVE_CURVATURE_MARGIN * -found.bottom
            notes.append(note + f" Raised to {raised:.3g} ({NEGATIVE_CURVATURE_MARGIN} x |lambda_min|); pass"
                         " curvature='gauss_newton' (positive semi-definite) to keep a small damping, or"
                         " allow_negative_curvature=True to insist.")
            value, rule = raised, f"{rule}; raised to {NEGATIVE_CURVATURE_MARGIN} x |lambda_min| of the Hessian"
        warnings.warn(notes[-1], stacklevel=3)
    return DampingChoice(value, requested, rule, found, tuple(notes))


class DampingRule:
    """A damping chosen from the curvature's spectrum (and the weight decay): ``damping=rule.name`` uses it.

    A subclass sets ``name`` and implements :meth:`choose`; ``register_damping_rule(Rule())`` makes the name valid
    wherever a damping is given (the callback, the functional API, ``ProblemConfig``, the command line).
    """

    name: ClassVar[str] = ""

    def choose(self, found: Spectrum, weight_decay: float | None) -> tuple[float, str]:
        """The damping and the rule in words (it goes into every solve record and report)."""
        raise NotImplementedError


class TopEigenvalueFraction(DampingRule):
    """``damping="auto"``: ``AUTO_DAMPING_FRACTION`` x lambda_max, floored at the weight decay, capped at
    ``MAX_DAMPING_FRACTION`` x lambda_max (``benchmarks/lds.py`` measures how it predicts retraining)."""

    name: ClassVar[str] = "auto"

    def choose(self, found: Spectrum, weight_decay: float | None) -> tuple[float, str]:
        top = max(found.top, 0.0)
        value = AUTO_DAMPING_FRACTION * top
        rule = f"auto: {AUTO_DAMPING_FRACTION} x lambda_max ({top:.3g})"
        if weight_decay is not None and weight_decay > value:
            value, rule = float(weight_decay), f"auto: the weight decay {weight_decay:.3g} (above {rule[6:]})"
        cap = MAX_DAMPING_FRACTION * top
        if value > cap > 0:
            value, rule = cap, f"{rule}, capped at {MAX_DAMPING_FRACTION} x lambda_max"
        if value <= 0:
            value = float(weight_decay or 1e-8)
            rule = f"auto: curvature is zero on the subset; {value:.3g}"
        return value, rule


#: Damping rule of each registered name.
DAMPING_RULES: dict[str, DampingRule] = {}


def register_damping_rule(rule: DampingRule) -> DampingRule:
    """Make ``damping=rule.name`` choose the damping with ``rule``."""
    if not isinstance(rule, DampingRule) or not rule.name:
        raise TypeError(f"Expected a DampingRule instance with a `name`, but got {rule!r}.")
    register_damping_name(rule.name)
    DAMPING_RULES[rule.name] = rule
    return rule


register_damping_rule(TopEigenvalueFraction())


def optimizer_weight_decay(optimizer: Any) -> float | None:
    """The largest ``weight_decay`` over an optimizer's parameter groups (None when it has none)."""
    groups = getattr(optimizer, "param_groups", None) or []
    values = [float(g.get("weight_decay", 0.0) or 0.0) for g in groups]
    return max(values) if values and max(values) > 0 else None
