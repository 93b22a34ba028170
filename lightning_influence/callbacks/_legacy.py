"""The callback's deprecated keyword arguments: accepted with a DeprecationWarning that says what to write."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException

#: Solver options the constructor once took as keywords (now set on the solver config).
_LEGACY_SOLVER_OPTIONS = ("depth", "repeats", "batch_size", "scale", "seed", "tol", "max_iter")


def legacy_solver_options(options: dict[str, Any]) -> dict[str, Any]:
    """The solver keywords the constructor once took, with a deprecation warning; anything else is an error."""
    unknown = sorted(set(options) - set(_LEGACY_SOLVER_OPTIONS))
    if unknown:
        raise MisconfigurationException(f"InfluenceCallback got unexpected keyword argument(s) {unknown}.")
    given = {key: value for key, value in options.items() if value is not None}
    if given:
        warnings.warn(
            f"Passing solver options {sorted(given)} to InfluenceCallback is deprecated: pass a solver config, e.g."
            f" `solver=LissaConfig({', '.join(f'{k}={v!r}' for k, v in given.items())})`.",
            DeprecationWarning, stacklevel=3,
        )
    return given


def legacy_candidates(num_candidates: Optional[int], options: dict[str, Any]) -> Optional[int]:
    if "candidates" not in options:
        return num_candidates
    warnings.warn("`candidates=` is deprecated: pass `num_candidates=` (the same meaning).", DeprecationWarning,
                  stacklevel=3)
    return options.pop("candidates")
