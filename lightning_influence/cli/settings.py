"""The analysis settings of a post-hoc run: the callback's ``init_args`` from a config, overridden by flags.

Builds the same config objects the callback builds (and validates them the same way), without constructing
a callback. Lightning-free; torch-free until a config names a loss function.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning_influence.cli.loading import UsageError, import_object
from lightning_influence.config import (
    DEFAULT_CURVATURE,
    DEFAULT_DAMPING,
    DEFAULT_SOLVER,
    SOLVERS,
    Damping,
    ExplainConfig,
    LowRankConfig,
    ProblemConfig,
    SolverConfig,
    check_curvature,
    check_damping,
    solver_config,
)

#: Callback arguments that are solver options (the flags --depth, --repeats, ...; legacy callback keywords).
SOLVER_OPTIONS = ("depth", "repeats", "batch_size", "scale", "seed", "tol", "max_iter")
#: Callback argument name -> ExplainConfig field, where they differ.
_EXPLAIN_RENAMES = {"save_scores": "keep_full_scores", "candidates": "num_candidates"}


@dataclass(frozen=True)
class AnalysisSettings:
    """What one post-hoc analysis runs with."""

    explain: ExplainConfig
    solver: SolverConfig
    damping: Damping
    mislabel: LowRankConfig
    mislabel_count: Optional[int]  # None: the whole training set ("all")
    loss_fn: Any = None
    curvature: str = DEFAULT_CURVATURE
    problem_fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # parameters, dtype, weight_decay, ...

    def problem(self, weight_decay: Optional[float], solver: Optional[SolverConfig] = None) -> ProblemConfig:
        """The analysis's :class:`ProblemConfig` (``solver``: another solver config than the explanation's;
        ``weight_decay``: the checkpoint's, unless the config's ``problem`` sets one)."""
        fields = {"weight_decay": weight_decay, **self.problem_fields}
        return ProblemConfig(solver=solver or self.solver, damping=self.damping, curvature=self.curvature, **fields)


def analysis_settings(callback_args: dict[str, Any], flags: dict[str, Any]) -> AnalysisSettings:
    """Settings from a config's ``InfluenceCallback`` arguments overridden by command-line ``flags``."""
    problem = _init_args(callback_args.get("problem"))  # InfluenceCallback(problem=ProblemConfig(...)) in the YAML
    merged = {**{k: v for k, v in callback_args.items() if k != "problem"}, **problem, **flags}
    explain_fields = {f.name for f in dataclasses.fields(ExplainConfig)}
    try:
        explain_args = {_EXPLAIN_RENAMES.get(k, k): v for k, v in merged.items()
                        if _EXPLAIN_RENAMES.get(k, k) in explain_fields}
        if explain_args.get("num_worst") == 0:  # a mislabel-only callback config: nothing to explain there
            explain_args.pop("num_worst")
        if explain_args.get("val_indices") is not None:
            explain_args["val_indices"] = tuple(explain_args["val_indices"])
        return AnalysisSettings(
            explain=ExplainConfig(**explain_args),
            solver=_solver(merged.get("solver", DEFAULT_SOLVER), {k: merged[k] for k in SOLVER_OPTIONS
                                                                 if merged.get(k) is not None}),
            damping=check_damping(merged.get("damping", DEFAULT_DAMPING)),
            # None: left at the (deprecated) InfluenceCallback default, as a saved config.yaml writes it
            mislabel=LowRankConfig(rank=_given(merged, "mislabel_rank", LowRankConfig.rank)),
            mislabel_count=_count(_given(merged, "mislabel_candidates", 0)),
            loss_fn=_loss_fn(merged.get("loss_fn")),
            curvature=check_curvature(merged.get("curvature", DEFAULT_CURVATURE)),
            problem_fields={k: problem[k] for k in _PROBLEM_EXTRAS if problem.get(k) is not None},
        )
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err


#: ProblemConfig fields beside solver, damping and curvature (which have flags of their own).
_PROBLEM_EXTRAS = ("weight_decay", "allow_negative_curvature", "parameters", "dtype")


def _init_args(value: Any) -> dict[str, Any]:
    """The fields of a YAML dataclass entry: ``class_path``/``init_args``, a plain mapping (as LightningCLI saves
    a dataclass argument) or an object with those attributes; None gives no fields."""
    if value is None:
        return {}
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        args = value.get("init_args", value) if "class_path" in value else value
        args = args.as_dict() if hasattr(args, "as_dict") else dict(args or {})
        return {k: v for k, v in args.items() if k not in ("class_path", "__path__")}
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _given(merged: dict[str, Any], key: str, default: Any) -> Any:
    return default if merged.get(key) is None else merged[key]


def _count(value: Any) -> Optional[int]:
    """``mislabel_candidates``: an int >= 0, or ``"all"`` (None: every training example)."""
    if value == "all":
        return None
    if int(value) < 0:
        raise ValueError(f"Expected `mislabel_candidates` to be an int >= 0 or 'all', but got {value!r}.")
    return int(value)


def _solver(solver: Any, options: dict[str, Any]) -> SolverConfig:
    """A solver name, a config object or a YAML ``class_path``/``init_args`` entry, with ``options`` applied
    where the solver has such a field (the flags are shared by all solvers)."""
    if hasattr(solver, "class_path") or (isinstance(solver, dict) and "class_path" in solver):
        get = solver.get if isinstance(solver, dict) else lambda key, default=None: getattr(solver, key, default)
        init_args: Any = get("init_args") or {}
        init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
        cls = import_object(str(get("class_path")), "the solver `class_path`")
        solver = cls(**init_args)
    elif isinstance(solver, dict) or hasattr(solver, "as_dict"):  # a config object jsonargparse flattened to its fields
        solver = _solver_from_fields(solver.as_dict() if hasattr(solver, "as_dict") else dict(solver))
    config: Union[str, SolverConfig] = solver
    if isinstance(config, str):
        fields = {f.name for f in dataclasses.fields(solver_config(config))}
        return solver_config(config, {k: v for k, v in options.items() if k in fields})
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in options.items() if k in fields})


def _solver_from_fields(values: dict[str, Any]) -> SolverConfig:
    """The solver config whose fields are exactly these (as in the ``config.yaml`` LightningCLI saves: a
    dataclass argument is written as its fields, without ``class_path``), else the first that has them all."""
    classes = [type(solver_config(name)) for name in SOLVERS]
    exact = [c for c in classes if {f.name for f in dataclasses.fields(c)} == set(values)]
    fitting = exact or [c for c in classes if set(values) <= {f.name for f in dataclasses.fields(c)}]
    if not fitting:
        raise ValueError(f"Expected `solver` to be a solver name ({', '.join(SOLVERS)}), a `class_path`/`init_args`"
                         f" entry or the fields of one solver config, but got the fields {sorted(values)}.")
    return fitting[0](**values)


def _loss_fn(value: Optional[Any]) -> Any:
    if isinstance(value, str):
        module, _, name = value.partition(":") if ":" in value else value.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise UsageError(f"Could not import the loss function `{value}`: {err}.") from err
    return value
