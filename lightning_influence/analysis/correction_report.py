"""A correction report in the user's terms: dataset indices of the anchors and the damping the solves used."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from lightning_influence.config import ANCHOR_SELECTIONS
from lightning_influence.results import CorrectionReport


def in_dataset_terms(report: CorrectionReport, anchors: Optional[list[int]],
                      heldout: Optional[list[int]]) -> CorrectionReport:
    """The report as a user reads it: anchor indices of the underlying dataset (e.g. validation indices) when the
    anchors are a ``Subset`` of it, and the damping as the number the solves used (``damping_requested`` keeps
    what was asked; each round has its own ``damping`` and ``residual``)."""
    settings = dict(report.settings)
    steps = report.iterations
    if anchors is not None:
        settings["anchor_dataset_indices"] = anchors
        steps = tuple(replace(r, anchor_indices=tuple(anchors[i] for i in r.anchor_indices),
                              chosen_indices=tuple(anchors[i] for i in r.chosen_indices)
                              if report.selection in ANCHOR_SELECTIONS else r.chosen_indices) for r in steps)
    if heldout is not None:
        settings["heldout_dataset_indices"] = heldout
    used = [r.damping for r in steps if r.damping is not None]
    if used:
        settings["damping"] = used[0] if max(used) == min(used) else {"first": used[0], "last": used[-1]}
    residuals = [r.residual for r in steps if r.residual is not None]
    if residuals:
        settings["residual_max"] = max(residuals)
    return CorrectionReport(report.selection, settings, report.before, steps)
