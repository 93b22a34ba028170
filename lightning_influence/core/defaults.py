"""Defaults of the curvature, damping and LiSSA checks, defined once (plain numbers: no torch import).

Each value is measured in ``benchmarks/curvature.py`` (results in ``benchmarks/curvature-results.json``) and
explained in ``docs/curvature.md``.
"""

from __future__ import annotations

#: Curvature used when none is given: the generalised Gauss-Newton matrix (positive semi-definite).
DEFAULT_CURVATURE = "gauss_newton"
CURVATURES = ("gauss_newton", "hessian")

#: ``damping="auto"`` is ``AUTO_DAMPING_FRACTION`` times the curvature's top eigenvalue, floored at the
#: optimizer's weight decay, and never above ``MAX_DAMPING_FRACTION`` times the top eigenvalue.
AUTO_DAMPING_FRACTION = 0.03
MAX_DAMPING_FRACTION = 0.1
DEFAULT_DAMPING = "auto"

#: Training examples (a fixed seeded subset) that the spectrum estimate and the residual check average over.
SUBSET_EXAMPLES = 2048
SUBSET_SEED = 0
#: Lanczos steps for the extreme eigenvalues used by the damping rule and the negative-curvature check.
SPECTRUM_STEPS = 30

#: With ``curvature="hessian"``, damping below ``|lambda_min|`` is raised to ``NEGATIVE_CURVATURE_MARGIN``
#: times ``|lambda_min|`` (Lanczos underestimates ``|lambda_min|``, so the margin keeps ``H + damping I`` PD).
NEGATIVE_CURVATURE_MARGIN = 1.25

#: ``converged`` means ``max_rows ||(C + damping I) x - v|| / ||v|| <= RESIDUAL_TOL`` on the subset above.
RESIDUAL_TOL = 0.1
#: LiSSA checks that residual every ``CHECK_EVERY`` steps of a repeat and stops the repeat once it is met.
CHECK_EVERY = 100
#: LiSSA restarts after a divergence (raising ``scale``, or damping under ``"hessian"``) before it raises.
MAX_RETRIES = 3
