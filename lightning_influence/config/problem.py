"""The problem-level knobs that travel together: solver, curvature, damping, weight decay, parameters, dtype.

:class:`ProblemConfig` is validated once, on construction, and accepted by every entry point: the callback
(``InfluenceCallback(problem=...)``, also as ``class_path``/``init_args`` in LightningCLI YAML), the functional
API (``li.influence(..., problem=...)``), ``correct_errors`` and the command line (``--problem``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lightning_influence.config.defaults import (
    CURVATURES,
    DEFAULT_CURVATURE,
    DEFAULT_DAMPING,
    DEFAULT_SOLVER,
    SELF_CHECK_DAMPING,
    expect,
)
from lightning_influence.config.solvers import Damping, SolverConfig, solver_config

#: Curvature names: the built-in two, plus any added by ``core.curvature.register_curvature``.
_CURVATURE_NAMES: list[str] = list(CURVATURES)
#: Analysis dtypes by name (a ``torch.dtype`` is accepted too).
DTYPE_NAMES = ("float32", "float64")
#: Which trainable parameters an analysis takes: None (all), module-name prefixes or globs, or a predicate.
ParameterSelector = Union[None, str, Sequence[str], Callable[[str, Any], bool]]


def register_curvature_name(name: str) -> None:
    """Make ``curvature=name`` valid (see :func:`lightning_influence.core.curvature.register_curvature`)."""
    expect(isinstance(name, str) and name.isidentifier(), "name", "a curvature name (an identifier)", name)
    if name not in _CURVATURE_NAMES:
        _CURVATURE_NAMES.append(name)


def curvature_names() -> tuple[str, ...]:
    """Every registered curvature name."""
    return tuple(_CURVATURE_NAMES)


#: Damping rule names: ``"auto"``, ``"self_check"`` (resolved by the callbacks, which can retrain) plus any added by
#: ``core.curvature.damping.register_damping_rule``.
_DAMPING_RULE_NAMES: list[str] = [DEFAULT_DAMPING, SELF_CHECK_DAMPING]


def register_damping_name(name: str) -> None:
    """Make ``damping=name`` valid (see :func:`lightning_influence.core.curvature.damping.register_damping_rule`)."""
    expect(isinstance(name, str) and name.isidentifier(), "name", "a damping rule name (an identifier)", name)
    if name not in _DAMPING_RULE_NAMES:
        _DAMPING_RULE_NAMES.append(name)


def check_damping(damping: Union[float, str]) -> Union[float, str]:
    """A damping rule's name (``"auto"``, ...) or a number >= 0 (used as given)."""
    if isinstance(damping, str) and damping in _DAMPING_RULE_NAMES:
        return damping
    expect(
        isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping >= 0,
        "damping",
        f"one of {tuple(_DAMPING_RULE_NAMES)} or a number >= 0 (the lambda added to the curvature)",
        damping,
    )
    return float(damping)


def check_curvature(curvature: str) -> str:
    expect(curvature in _CURVATURE_NAMES, "curvature", f"one of {curvature_names()}", curvature,
           "'gauss_newton' (the default) is positive semi-definite; 'hessian' is the true second derivative"
           " (indefinite before convergence).")
    return curvature


def _check_parameters(parameters: Any) -> Any:
    if isinstance(parameters, list):
        parameters = tuple(parameters)
    ok = (parameters is None or isinstance(parameters, str) or callable(parameters)
          or (isinstance(parameters, tuple) and len(parameters) > 0 and all(isinstance(p, str) for p in parameters)))
    expect(ok, "parameters", "None (every trainable parameter), a module-name prefix or glob, a non-empty list of"
           " them, or a predicate (name, param) -> bool", parameters)
    return parameters


@dataclass(frozen=True)
class ProblemConfig:
    """The influence problem ``(C + damping I) s = grad L(z_test)``: how it is posed and solved.

    Attributes:
        solver: a solver name (``"lissa"``, ``"cg"``, ``"exact"``, ``"lowrank"`` or a registered one) or a solver
            config (``LissaConfig(...)``, ...); a name becomes its default config.
        curvature: C: ``"gauss_newton"`` (default, positive semi-definite) or ``"hessian"`` (or a registered one).
        damping: lambda: a number >= 0 (used as given) or ``"auto"`` (chosen from the curvature's spectrum).
        weight_decay: the optimizer's weight decay (the floor of ``damping="auto"``; None: read from the trainer's
            optimizer where there is one).
        allow_negative_curvature: with a curvature that is not positive semi-definite, keep a damping below
            ``|lambda_min|`` (warned) instead of raising it.
        parameters: analyse only these trainable parameters (module-name prefixes or globs, e.g. LoRA adapters
            ``["*lora_*"]``, or a predicate ``(name, param) -> bool``); None: all of them.
        dtype: the analysis dtype, ``"float32"`` or ``"float64"`` (or a ``torch.dtype``); None: float32, or
            float64 for a float64 model.
    """

    solver: Union[str, SolverConfig] = DEFAULT_SOLVER
    curvature: str = DEFAULT_CURVATURE
    damping: Damping = DEFAULT_DAMPING
    weight_decay: Optional[float] = None
    allow_negative_curvature: bool = False
    parameters: Any = field(default=None)
    dtype: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", solver_config(self.solver))
        check_curvature(self.curvature)
        object.__setattr__(self, "damping", check_damping(self.damping))
        wd = self.weight_decay
        expect(wd is None or (isinstance(wd, (int, float)) and not isinstance(wd, bool) and wd >= 0), "weight_decay",
               "None or a number >= 0", wd)
        expect(isinstance(self.allow_negative_curvature, bool), "allow_negative_curvature", "a bool",
               self.allow_negative_curvature)
        object.__setattr__(self, "parameters", _check_parameters(self.parameters))
        dtype = self.dtype
        expect(dtype is None or dtype in DTYPE_NAMES or type(dtype).__name__ == "dtype", "dtype",
               f"None, one of {DTYPE_NAMES} or a torch.dtype", dtype)

    @property
    def solver_config(self) -> SolverConfig:
        """``solver`` as a config object (always one after construction)."""
        return self.solver  # type: ignore[return-value]


def resolve_problem(problem: Optional[ProblemConfig], solver: Union[str, SolverConfig] = DEFAULT_SOLVER,
                    damping: Damping = DEFAULT_DAMPING, curvature: str = DEFAULT_CURVATURE,
                    solver_options: Optional[dict[str, Any]] = None,
                    default_damping: Damping = DEFAULT_DAMPING) -> ProblemConfig:
    """One :class:`ProblemConfig` from ``problem=`` or from an entry point's flat ``solver``/``damping``/``curvature``
    arguments and solver options (not both: a flat argument changed beside ``problem=`` is an error naming it;
    ``default_damping`` is the entry point's own default of ``damping``)."""
    options = dict(solver_options or {})
    if problem is None:
        return ProblemConfig(solver=solver_config(solver, options), damping=damping, curvature=curvature)
    expect(isinstance(problem, ProblemConfig), "problem", "a ProblemConfig or None", problem)
    flat = {"solver": (solver, DEFAULT_SOLVER), "damping": (damping, default_damping),
            "curvature": (curvature, DEFAULT_CURVATURE)}
    changed = sorted(name for name, (value, default) in flat.items() if value != default) + sorted(options)
    if changed:
        raise ValueError(f"Got {changed} beside `problem`: set them on the ProblemConfig instead, e.g."
                         f" ProblemConfig({', '.join(f'{name}=...' for name in changed)}).")
    return problem


def problem_settings(settings: Any = None, config: Any = None, **legacy: Any) -> ProblemConfig:
    """A :class:`ProblemConfig` from the new form (``settings`` is one) or the old positional form ``(damping,
    solver config, curvature=..., weight_decay=..., ...)``, which still works with a deprecation warning."""
    if isinstance(settings, ProblemConfig):
        if config is not None or legacy:
            raise TypeError("Got loose problem arguments beside a ProblemConfig: set them on the ProblemConfig.")
        return settings
    warnings.warn("InfluenceProblem(model, loss_fn, data, damping, solver_config, curvature=..., ...) is deprecated:"
                  " pass one ProblemConfig(solver=..., damping=..., curvature=..., ...) instead.",
                  DeprecationWarning, stacklevel=3)
    legacy.setdefault("curvature", DEFAULT_CURVATURE)
    return ProblemConfig(solver=config if config is not None else "lissa", damping=settings, **legacy)
