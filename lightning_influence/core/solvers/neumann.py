"""LiSSA (Agarwal et al. 2017): a stochastic Neumann series for ``(H + damping I)^-1 v``.

With ``A_j = H_j + damping I`` for a fresh minibatch Hessian ``H_j`` each step::

    h_0 = v,   h_j = v + h_{j-1} - A_j h_{j-1} / scale,   x = h_J / scale

converges to ``A^-1 v`` when every eigenvalue of ``A_j / scale`` lies in (0, 2). The update step is a pure
function (:func:`lissa_step_`, in place); :func:`lissa_repeats` drives repeats whose minibatches depend only on
``(seed, repeat)``, so a repeat gives the same vector on whichever process runs it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from lightning_influence.config import LissaConfig
from lightning_influence.core.tensors.batching import Batch, prepare_batch
from lightning_influence.core.tensors.eigen import lanczos
from lightning_influence.results import SolveInfo

BatchHVP = Callable[[Batch, torch.Tensor], torch.Tensor]
StreamFactory = Callable[[int], Iterator[Batch]]
#: ``residual(estimate) -> float``: the worst relative residual of an estimate (the repeat stops below the tolerance).
StopCheck = Callable[[torch.Tensor], float]

#: A repeat is declared divergent when its update norm exceeds this multiple of ``||v||``.
DIVERGENCE_FACTOR = 1e4
#: ``scale="auto"``: the top eigenvalue of ``H_j + damping I`` is measured on ``SCALE_PROBE_BATCHES`` minibatches by
#: ``SCALE_PROBE_STEPS`` Lanczos steps each, and ``scale`` is ``SCALE_MARGIN`` times the largest. The recursion is
#: stable while every minibatch eigenvalue stays below ``2 * scale``, i.e. up to 1.5x the probes' maximum; steps to
#: converge grow in proportion to ``scale``. Measured in ``benchmarks/lissa_speed.py`` (``lissa-speed-results.json``).
SCALE_PROBE_BATCHES = 4
SCALE_PROBE_STEPS = 10
SCALE_MARGIN = 1.5
#: With ``refine``, a repeat hands the rest of the solve to conjugate gradient once its residual checks project
#: that it would need more than this multiple of ``depth`` steps to meet the tolerance.
HAND_OFF_FACTOR = 1.5


def series_steps(scale: float, damping: float, residual_tol: float) -> int:
    """Steps the series is predicted to need for ``residual_tol`` along its slowest direction (eigenvalue
    ``damping`` of a positive semi-definite curvature plus damping): ``scale / damping * ln(1 / residual_tol)``."""
    return math.ceil(scale / damping * math.log(1.0 / residual_tol))


def recursion_costs_more(scale: float, damping: float, work_per_step: int, examples: int, residual_tol: float,
                         cg_tol: float, *, check_every: int = 0, check_work: int = 0) -> tuple[bool, int, int]:
    """Whether the recursion is predicted to need more example products than conjugate gradient; with the two
    predictions ``(steps, cg_iterations)``.

    With a positive semi-definite curvature the slowest direction of ``H + damping I`` has eigenvalue at least
    ``damping``; its residual shrinks by ``1 - damping / scale`` per step, so reaching ``residual_tol`` takes about
    ``scale / damping * ln(1 / residual_tol)`` steps of ``work_per_step`` examples (``B`` times the repeats). A
    series with early-stop checks every ``check_every`` steps stops only at a check: its steps round up to the next
    one, and each check reads ``check_work`` examples (the check subset times the repeats). CG's bound is
    ``sqrt(kappa) / 2 * ln(2 / cg_tol)`` passes over the ``examples`` training examples with ``kappa`` the top
    eigenvalue (``scale / SCALE_MARGIN``, a minibatch's: above the whole set's) over ``damping``. The series'
    steps grow with the condition number and CG's with its square root, so on small training sets at small
    dampings CG is cheaper, on large ones the series.
    """
    steps = series_steps(scale, damping, residual_tol)
    checks = -(-steps // check_every) if check_every > 0 else 0
    series_work = (checks * check_every if checks else steps) * work_per_step + checks * check_work
    kappa = max(scale / SCALE_MARGIN / damping, 1.0)
    iterations = math.ceil(0.5 * math.sqrt(kappa) * math.log(2.0 / cg_tol))
    return series_work > iterations * examples, steps, iterations


class LissaDivergenceError(FloatingPointError):
    """The LiSSA recursion blew up: ``scale`` too small or ``damping`` below the negative curvature.

    Carries where it happened (``step``, ``repeat``, the minibatch ``batch``, ``scale``, ``damping``) so that
    the caller can measure that minibatch's eigenvalues and retry.
    """

    def __init__(self, message: str, *, step: int | None = None, repeat: int | None = None, batch: Batch = None,
                 scale: float | None = None, damping: float | None = None) -> None:
        super().__init__(message)
        self.step, self.repeat, self.batch, self.scale, self.damping = step, repeat, batch, scale, damping


def repeat_seed(seed: int, repeat: int) -> int:
    """The sampling seed of repeat ``repeat``: a function of ``(seed, repeat)`` only."""
    return (seed * 1_000_003 + repeat * 7_919 + 12_345) % (2**63 - 1)


def minibatch_stream(
    dataset: Dataset, batch_size: int, collate_fn: Callable | None, seed: int, device: torch.device
) -> Iterator[Batch]:
    """Endless minibatches of ``batch_size`` examples drawn by one persistent seeded shuffle of ``dataset``."""
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "Expected a map-style training dataset (with __len__ and __getitem__) for LiSSA's random minibatches,"
            " but got an IterableDataset. Pass a map-style dataset, or use solver='cg' or 'exact'."
        )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(cast(Sized, dataset), generator=generator),
        collate_fn=collate_fn,
        drop_last=len(dataset) >= batch_size,  # type: ignore[arg-type]
    )
    while True:
        for batch in loader:
            yield prepare_batch(batch, device)


def lissa_step_(h: torch.Tensor, v: torch.Tensor, hvp: torch.Tensor, damping: float, scale: float) -> torch.Tensor:
    """One Neumann step ``v + h - (H_j + damping I) h / scale``, computed in ``hvp`` (``H_j h``, overwritten and
    returned): no new ``[k, P]`` tensor.

    Each fresh tensor of tens of megabytes costs page faults on CPU (allocators map large blocks anew), which
    measured as much as the curvature product itself on a 1M-parameter MLP: the recursion reuses its buffers.
    """
    return hvp.add_(h, alpha=damping).mul_(-1.0 / scale).add_(h).add_(v)


def _damped(hvp: BatchHVP, batch: Batch, damping: float, x: torch.Tensor) -> torch.Tensor:
    return hvp(batch, x) + damping * x


def estimate_scale(hvp: BatchHVP, stream: Iterator[Batch], damping: float, dim: int, like: torch.Tensor,
                   part: tuple[int, int] = (0, 1)) -> float:
    """``SCALE_MARGIN`` times the largest top eigenvalue of ``H_j + damping I`` over probe minibatches.

    Measured on minibatches of the recursion's own size: small-batch curvatures have far larger top
    eigenvalues than the full one, and those are what the recursion must stay below. ``part=(r, R)`` measures
    only probe batches ``r, r + R, ...`` (the others are drawn and skipped, with their start vectors), so the
    maximum over the R parts is exactly the single-process estimate: R processes split the work.
    """
    generator = torch.Generator().manual_seed(0)
    largest = 0.0
    for index in range(SCALE_PROBE_BATCHES):
        batch = next(stream)
        if index % part[1] != part[0]:
            torch.randn(dim, generator=generator, dtype=torch.float64)  # the start vector lanczos draws
            continue
        values, _ = lanczos(functools.partial(_damped, hvp, batch, damping), dim, SCALE_PROBE_STEPS,
                            generator=generator, like=like, with_vectors=False)
        largest = max(largest, float(values.max()))
    return max(SCALE_MARGIN * largest, 1e-8)


def lissa_repeat(
    hvp: BatchHVP,
    stream: Iterator[Batch],
    v: torch.Tensor,
    damping: float,
    scale: float,
    config: LissaConfig,
    repeat: int,
    on_step: Callable[[], None] | None = None,
    stop: StopCheck | None = None,
    hand_off: bool = False,
    verdict: tuple[StopCheck, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One repeat: ``h_J / scale`` per row of ``v`` and its trace ``||h_j - h_{j-1}|| / ||h_j||`` (max over rows).

    ``stop(estimate)`` (a residual) is asked every ``config.check_every`` steps and at the end; the repeat
    ends at the first check where the tail average (``config.average``) or else the last iterate meets
    ``config.residual_tol``, and at the end keeps whichever of the two has the smaller residual. Without
    ``stop`` the tail average (or the last iterate) is returned. With ``hand_off`` it also ends once
    :func:`cannot_finish` says the checks will not meet the tolerance within the depth (the caller finishes).
    With ``verdict=(residual, from_step)`` (a cheap ``stop`` on a subset, the verdict on the whole set) a check
    that misses also asks the verdict once at or after ``from_step`` steps, then after twice as many, and so on:
    the subset check levels off at its sampling error while the whole-set residual may already be met.
    """
    tiny = torch.finfo(v.dtype).tiny
    v_norm = v.norm(dim=1).clamp_min(tiny)
    h = v.clone()
    trace = []
    tail = TailAverage(h) if getattr(config, "average", False) else None
    every = getattr(config, "check_every", 0)
    checks = _RepeatChecks(config, stop, hand_off, verdict)
    for step in range(1, config.depth + 1):
        batch = next(stream)
        h_next = lissa_step_(h, v, hvp(batch, h).detach(), damping, scale)
        update = row_distance(h_next, h)
        _check_growth(float((update / v_norm).max()), step, repeat, batch, scale, damping)
        h = h_next
        if tail is not None:
            tail.add(h)
        relative = float((update / h.norm(dim=1).clamp_min(tiny)).max())
        trace.append(relative)
        if on_step is not None:
            on_step()
        if config.tol > 0 and relative < config.tol:
            break
        if stop is not None and every > 0 and step % every == 0 and step < config.depth:
            met, ends = checks.ask(step, h, tail, scale)
            if met is not None:
                return met, torch.tensor(trace)
            if ends:
                break
    if stop is not None:
        return _best_estimate(h, tail, scale, stop), torch.tensor(trace)
    return (tail.mean(scale) if tail is not None else h / scale), torch.tensor(trace)


def _check_growth(growth: float, step: int, repeat: int, batch: Batch, scale: float, damping: float) -> None:
    """Raise :class:`LissaDivergenceError` when a step's update (relative to ``||v||``) blew up."""
    if math.isfinite(growth) and growth <= DIVERGENCE_FACTOR:
        return
    raise LissaDivergenceError(
        f"LiSSA diverged at step {step} of repeat {repeat} (update norm {growth:.3g} x ||v||) with"
        f" scale={scale:.4g} and damping={damping:.3g}. `scale` must exceed half the largest eigenvalue of"
        " the minibatch curvature plus damping: increase `scale` (e.g. 10x), use scale='auto', or raise"
        " `batch_size`. If the model has strong negative curvature, increase `damping`.",
        step=step, repeat=repeat, batch=batch, scale=scale, damping=damping,
    )


class _RepeatChecks:
    """A repeat's residual checks (see :func:`lissa_repeat`): the cheap ``stop``, the hand-off and the verdict."""

    def __init__(self, config: LissaConfig, stop: StopCheck | None, hand_off: bool,
                 verdict: tuple[StopCheck, int] | None) -> None:
        self.config, self.stop, self.hand_off, self.verdict = config, stop, hand_off, verdict
        self.missed: list[tuple[int, float]] = []  # (step, residual) of the checks that missed the tolerance

    def ask(self, step: int, h: torch.Tensor, tail: TailAverage | None, scale: float
            ) -> tuple[torch.Tensor | None, bool]:
        """``(estimate, False)`` when an estimate meets the tolerance, ``(None, True)`` when the repeat should hand
        off, else ``(None, False)``."""
        assert self.stop is not None  # noqa: S101 - only asked with a stop check
        tol, depth = self.config.residual_tol, self.config.depth
        met, missed = _first_meeting(h, tail, scale, self.stop, tol)
        if met is not None:
            return met, False
        self.missed.append((step, missed))
        if self.hand_off and cannot_finish(self.missed, depth, tol):
            return None, True
        if self.verdict is not None and step >= self.verdict[1]:
            met, _ = _first_meeting(h, tail, scale, self.verdict[0], tol)
            if met is not None:
                return met, False
            self.verdict = (self.verdict[0], 2 * step)
        return None, False


#: Columns per piece of :func:`row_distance`: its temporaries stay ``k x 2^16`` numbers, whatever P.
DISTANCE_PIECE = 2**16


def row_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||`` per row, in pieces of :data:`DISTANCE_PIECE` columns: no ``[k, P]`` temporary (on a model of a
    million parameters one such buffer per recursion is 4 MB per test point)."""
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], DISTANCE_PIECE):
        piece = a[:, start:start + DISTANCE_PIECE] - b[:, start:start + DISTANCE_PIECE]
        total += piece.square().sum(dim=1, dtype=torch.float64)
    return total.sqrt().to(a.dtype)


def _candidates(h: torch.Tensor, tail: TailAverage | None, scale: float) -> Iterator[torch.Tensor]:
    """The tail average (when kept) and the last iterate, divided by ``scale``, made one at a time (each is a
    ``[k, P]`` copy: the second only when it is asked for)."""
    if tail is not None:
        yield tail.mean(scale)
    yield h / scale


def cannot_finish(checks: Sequence[tuple[int, float]], depth: int, tol: float) -> bool:
    """Whether the series, at the rate of its last two residual checks, would still miss ``tol`` after
    ``HAND_OFF_FACTOR x depth`` steps (or stopped improving): then the remaining steps are better spent by the
    conjugate-gradient refinement (``LissaConfig.refine``), whose steps grow with the square root of the condition
    number where the series' grow with the condition number itself."""
    if len(checks) < 2:
        return False
    (before, earlier), (step, latest) = checks[-2], checks[-1]
    if latest >= earlier:
        return True
    per_step = math.log(latest / earlier) / (step - before)  # < 0
    return step + math.log(tol / latest) / per_step > HAND_OFF_FACTOR * depth


def _first_meeting(h: torch.Tensor, tail: TailAverage | None, scale: float, residual: StopCheck,
                   tol: float) -> tuple[torch.Tensor | None, float]:
    """The first candidate (tail average, then last iterate) whose residual is at most ``tol`` (else None), and
    the first candidate's residual.

    Once the recursion fluctuates around the solution the average is the better one, and one product decides;
    the last iterate is tried only when the average came within ``2 * tol`` (far from it, both miss).
    """
    candidates = _candidates(h, tail, scale)
    estimate = next(candidates)
    first = residual(estimate)
    if first <= tol:
        return estimate, first
    del estimate
    second = next(candidates, None) if first <= 2 * tol else None
    if second is not None and residual(second) <= tol:
        return second, first
    return None, first


def _best_estimate(h: torch.Tensor, tail: TailAverage | None, scale: float, residual: StopCheck) -> torch.Tensor:
    """The tail average or the last iterate, whichever has the smaller residual: the average wins once the
    recursion fluctuates around the solution, the last iterate while it still moves."""
    best, best_residual = None, math.inf
    for candidate in _candidates(h, tail, scale):
        found = residual(candidate)
        if best is None or found < best_residual:
            best, best_residual = candidate, found
        del candidate
    assert best is not None  # noqa: S101 - the last iterate is always a candidate
    return best


class TailAverage:
    """The mean of the recursion's iterates over the latest half of the steps, restarted after each power of two.

    The minibatch noise of the recursion leaves ``h_j`` fluctuating around the solution once it has converged;
    averaging the tail (Polyak-Ruppert) cuts that noise without storing iterates. The window restarts after
    steps 1, 2, 4, 8, ..., so at a check step ``2^m`` it holds steps ``2^(m-1) + 1 .. 2^m``, and it never reaches
    back into the early, still-moving iterates by more than half the steps (a longer window lags on slowly
    converging directions: measured on the logistic-regression reference test).
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.total, self.count, self.step = torch.zeros_like(like), 0, 0

    def add(self, h: torch.Tensor) -> None:
        self.step += 1
        previous = self.step - 1
        if previous & (previous - 1) == 0:  # the step after 0, 1, 2, 4, 8, ...: the window starts afresh
            self.total, self.count = torch.zeros_like(h), 0
        self.total += h
        self.count += 1

    def mean(self, scale: float = 1.0) -> torch.Tensor:
        """The window's mean divided by ``scale`` (one new tensor)."""
        return (self.total / max(self.count, 1)).div_(scale)


def lissa_repeats(
    hvp: BatchHVP,
    stream_for: StreamFactory,
    vectors: torch.Tensor,
    damping: float,
    scale: float,
    config: LissaConfig,
    repeat_ids: Sequence[int],
    on_step: Callable[[], None] | None = None,
    stop: StopCheck | None = None,
    hand_off: bool = False,
    verdict: tuple[StopCheck, int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum of the repeats ``repeat_ids`` (divide by ``config.repeats`` after combining) and their traces."""
    total = torch.zeros_like(vectors)
    traces = []
    for repeat in repeat_ids:
        x, trace = lissa_repeat(hvp, stream_for(repeat), vectors, damping, scale, config, repeat, on_step, stop,
                                hand_off, verdict)
        total += x
        traces.append(trace)
    return total, traces


def lissa_info(damping: float, scale: float, traces: list[torch.Tensor], config: LissaConfig, *,
               residual: float | None = None) -> SolveInfo:
    """Summarise LiSSA repeats: padded trace matrix ``[repeats, steps]`` and a convergence verdict.

    With ``residual`` (``max ||(C + damping I) x - v|| / ||v||`` of the averaged solution, see
    ``InfluenceProblem.residual``) converged means ``residual <= config.residual_tol``; without it, the old
    proxy (every repeat's last relative update below ``max(tol, 0.05)``) is used.
    """
    steps = max((len(t) for t in traces), default=0)
    trace = torch.full((len(traces), steps), float("nan"))
    for row, t in zip(trace, traces):
        row[: len(t)] = t
    if residual is not None:
        converged = residual <= config.residual_tol
    else:
        final = torch.stack([t[-1] for t in traces])
        converged = bool((final < max(config.tol, 0.05)).all())
    return SolveInfo("lissa", damping, converged, 0.0, scale=scale, trace=trace, iterations=steps,
                     residual=residual, residual_tol=config.residual_tol)
