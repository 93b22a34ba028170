"""The deprecated keyword arguments of the callback and of ``correct_errors``: accepted with a warning that says
what to write instead."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_influence.callbacks._mislabel import MislabelAnalysis, mislabel_count
from lightning_influence.config import DEFAULT_SIGNAL_CHECKPOINTS, LowRankConfig

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


#: ``InfluenceCallback``'s mislabel arguments (deprecated) and the ``MislabelCallback`` argument of each.
MISLABEL_ARGUMENTS = {"mislabel_candidates": "candidates", "mislabel_rank": "rank", "training_signals": "training_signals",
                      "signal_checkpoints": "signal_checkpoints", "signals_outputs_fn": "signals_outputs_fn"}


def legacy_mislabel(given: dict[str, Any]) -> MislabelAnalysis:
    """The mislabel analysis that ``InfluenceCallback``'s deprecated mislabel arguments ask for (off when none is
    given), run as before; passing any of them warns once (``FutureWarning``) with the ``MislabelCallback`` call
    that replaces them.

    Raises:
        ValueError: a bad value, named by its ``InfluenceCallback`` argument.
    """
    passed = {name: value for name, value in given.items() if value is not None}
    if passed:
        replacement = ", ".join(f"{MISLABEL_ARGUMENTS[name]}={_shown(value)}" for name, value in passed.items())
        warnings.warn(
            f"InfluenceCallback's mislabel arguments ({', '.join(passed)}) are deprecated and will be removed in a"
            f" future release: pass `MislabelCallback({replacement})` to the Trainer instead, beside the"
            " InfluenceCallback (docs/mislabel.md).",
            FutureWarning, stacklevel=3,
        )
    count = mislabel_count(_or(given["mislabel_candidates"], 0))
    try:
        return MislabelAnalysis(count, _or(given["mislabel_rank"], LowRankConfig.rank),
                                given["training_signals"], _or(given["signal_checkpoints"], DEFAULT_SIGNAL_CHECKPOINTS),
                                given["signals_outputs_fn"])
    except ValueError as err:
        raise ValueError(str(err).replace("`rank`", "`mislabel_rank`")) from err


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _shown(value: Any) -> str:
    """A value as the replacement call writes it (a function by its name)."""
    return str(getattr(value, "__name__", repr(value))) if callable(value) else repr(value)


def legacy_correction_candidates(candidates: Any, num_candidates: Optional[int], train_indices: Optional[Sequence[int]]
                                 ) -> tuple[Optional[int], Optional[Sequence[int]]]:
    """``correct_errors(candidates=)`` once meant both: an int is ``num_candidates``, a sequence ``train_indices``."""
    if candidates is None:
        return num_candidates, train_indices
    warnings.warn("`candidates=` is deprecated: pass `num_candidates=` (an int: nearest neighbours per anchor) or"
                  " `train_indices=` (the training indices to choose from).", DeprecationWarning, stacklevel=3)
    if isinstance(candidates, int) and not isinstance(candidates, bool):
        return candidates, train_indices
    return num_candidates, candidates
