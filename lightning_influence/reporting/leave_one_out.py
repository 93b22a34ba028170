"""A leave-one-out check (:class:`~lightning_influence.LeaveOneOutCheck`) as a JSON record, TensorBoard scalars and
the lines a user reads: rounded figures, the slope and sign agreement beside the correlations, the damping
used, and whether the retraining resolved the changes it measures."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_influence.reporting._format import format_float, to_builtin
from lightning_influence.results import LeaveOneOutCheck

#: The retraining resolves the removals when its baseline's last step moved the test loss by less than this
#: share of the median predicted change.
RESOLUTION_SHARE = 0.1


#: The summary says the analysed weights are far from a minimum when the baseline moved the test loss by more than
#: this many median predicted changes.
FAR_FROM_MINIMUM = 10


def resolved(check: LeaveOneOutCheck) -> Optional[bool]:
    """Whether the baseline had settled: its last step moved the test loss by less than :data:`RESOLUTION_SHARE`
    of the median ``|predicted|`` (None when unknown)."""
    if check.last_step_change is None or not len(check.predicted):
        return None
    return check.last_step_change < RESOLUTION_SHARE * float(check.predicted.abs().median())


def leave_one_out_to_dict(check: LeaveOneOutCheck, val_index: int, **extra: Any) -> dict[str, Any]:
    """The JSON record of ``loo_epoch=N.json``; ``extra`` (epoch, solver, optimizer, ...) is added as given."""
    return to_builtin({
        "val_index": val_index, "train_indices": list(check.train_indices), "influence": check.influence,
        "predicted_loss_change": check.predicted, "actual_loss_change": check.actual,
        "pearson": check.pearson, "spearman": check.spearman, "slope": check.slope,
        "sign_agreement": check.sign_agreement, "damping": check.damping, "l2": check.l2,
        "l2_towards_zero": check.l2_towards_zero, "steps": check.steps, "steps_run": list(check.steps_run),
        "start_test_loss": check.start_test_loss, "base_test_loss": check.base_test_loss,
        "baseline_change": (None if check.start_test_loss is None else check.base_test_loss - check.start_test_loss),
        "last_step_change": check.last_step_change, "resolved": resolved(check),
        "median_abs_predicted": _median_abs(check.predicted), "median_abs_actual": _median_abs(check.actual),
        "train_size": check.train_size, "seconds": check.seconds, **extra,
    })


def write_leave_one_out_scalars(writer: Any, check: LeaveOneOutCheck, global_step: int) -> None:
    """``influence/trust/loo_{pearson,spearman,slope,sign_agreement}`` (the defined ones)."""
    for name in ("pearson", "spearman", "slope", "sign_agreement"):
        value = getattr(check, name)
        if value is not None:
            writer.add_scalar(f"influence/trust/loo_{name}", value, global_step=global_step)


def leave_one_out_summary(check: LeaveOneOutCheck, val_index: int, optimizer: str = "L-BFGS") -> str:
    """What the check did and found, in rounded figures, with a warning when it could not resolve the changes."""
    removed = len(check.train_indices)
    damping = "given influences" if check.damping is None else f"damping {format_float(check.damping, 3)}"
    lines = [
        f"Leave-one-out check, validation example {val_index}: {removed} training example(s) removed one at a time,"
        f" each run up to {check.steps} full-batch {optimizer} steps from the analysed weights ({_steps(check)};"
        f" float64; L2"
        f" {format_float(check.l2, 3)}, {format_float(check.l2_towards_zero, 3)} of it towards 0 and the rest towards"
        f" the analysed weights; influence with {damping}), {check.seconds:.0f} s.",
    ]
    if check.start_test_loss is not None:
        lines.append(
            f"  Baseline (nothing removed, same start and steps) moved its loss {format_float(check.start_test_loss)}"
            f" -> {format_float(check.base_test_loss)}; each change below is loss(removed) - loss(baseline)."
        )
    signs = "-" if check.sign_agreement is None else f"{round(check.sign_agreement * removed)}/{removed}"
    lines.append(
        f"  Predicted change -I/n vs actual: Pearson {format_float(check.pearson, 2)}, Spearman"
        f" {format_float(check.spearman, 2)}, slope {format_float(check.slope, 2)} (1 = magnitudes agree), signs"
        f" agree {signs}; median |predicted| {format_float(_median_abs(check.predicted), 2)}, median |actual|"
        f" {format_float(_median_abs(check.actual), 2)}."
    )
    drift = None if check.start_test_loss is None else abs(check.base_test_loss - check.start_test_loss)
    median = _median_abs(check.predicted)
    if drift is not None and median and drift > FAR_FROM_MINIMUM * median:
        lines.append(
            f"  The baseline itself moved the loss by {format_float(drift, 2)}, {drift / median:.0f} times the median"
            " predicted change: the analysed weights are far from a minimum of the retraining objective, so every"
            " run ends far from them and the prediction (made at them) can only agree roughly. A converged"
            " checkpoint, or a larger L2 (--l2, --damping), keeps the runs closer."
        )
    settled = resolved(check)
    if settled is False:
        lines.append(
            f"  Not resolved: the baseline's last step still moved the loss by {format_float(check.last_step_change, 2)},"
            f" more than {RESOLUTION_SHARE:g} of the median predicted change: the retraining had not settled, so the"
            " actual changes are mostly optimiser noise. Raise --steps (verify_loo_steps) or the L2 (--l2)."
        )
    elif settled:
        lines.append(f"  Resolved: the baseline's last step moved the loss by {format_float(check.last_step_change, 2)},"
                     f" under {RESOLUTION_SHARE:g} of the median predicted change.")
    return "\n".join(lines)


def _steps(check: LeaveOneOutCheck) -> str:
    if not check.steps_run:
        return "steps taken unknown"
    low, high = min(check.steps_run), max(check.steps_run)
    return f"{low} to {high} taken: a run stops once its loss settles" if low != high else f"{low} taken"


def _median_abs(values: torch.Tensor) -> Optional[float]:
    return float(values.abs().median()) if len(values) else None
