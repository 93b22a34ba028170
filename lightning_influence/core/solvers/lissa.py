"""The LiSSA solver: the Neumann recursion of :mod:`~lightning_influence.core.solvers.neumann` with its scale, its
recovery from a divergence and its retries, the repeats split over ranks (FastIF's scheme).

Rank r runs repeats r, r + R, ...; each repeat depends only on ``(seed, repeat)``, so the combined answer does
not depend on the number of ranks. The sums of the even- and of the odd-numbered repeats travel stacked in one
sum over ranks; their means are the halves the trust report compares. After a divergence every rank adopts the
first diverging rank's recovery (a larger ``scale``, or under a curvature that is not positive semi-definite a
larger damping) and the repeats run again, at most ``max_retries`` times.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_influence.config import (
    CG_TOL,
    NEGATIVE_CURVATURE_MARGIN,
    REFINE_MAX_ITER,
    REFINE_MIN_ITER,
    SPECTRUM_STEPS,
    SUBSET_SEED,
    CGConfig,
    LissaConfig,
)
from lightning_influence.core.curvature.damping import estimate_spectrum
from lightning_influence.core.solvers.base import ONE_PROCESS, OnStep, Ranks, Solver
from lightning_influence.core.solvers.cg import CGSolver
from lightning_influence.core.solvers.neumann import (
    SCALE_MARGIN,
    BatchHVP,
    LissaDivergenceError,
    estimate_scale,
    lissa_info,
    lissa_repeats,
    minibatch_stream,
    recursion_costs_more,
    repeat_seed,
    series_steps,
)
from lightning_influence.core.solvers.step_batch import choose_step_batch, shrink_applies
from lightning_influence.core.tensors.batching import Batch, batch_size_of
from lightning_influence.results import SolveInfo, STest, TrustWarning


def _identity(vectors: torch.Tensor) -> torch.Tensor:
    return vectors


#: Below this LiSSA batch size the trust report warns (minibatch curvatures of few examples spike).
SMALL_LISSA_BATCH = 8


class LissaSolver(Solver):
    """LiSSA (see the module docstring); ``config`` is a :class:`~lightning_influence.config.LissaConfig`."""

    name: ClassVar[str] = "lissa"
    split: ClassVar[str] = "repeats"
    stores_jacobian: ClassVar[bool] = True
    config: LissaConfig

    def __init__(self, config: LissaConfig, problem: Any) -> None:
        super().__init__(config, problem)
        self._scale: float | None = None
        self._chosen: tuple[int, dict[int, float]] | None = None  # choose_batch's size and the scales it probed

    @property
    def hvp_method(self) -> str:
        return self.config.hvp_method

    @property
    def check_batch_size(self) -> int:
        return self.config.batch_size

    @classmethod
    def progress_steps(cls, config: LissaConfig, ranks: Ranks = ONE_PROCESS) -> int:
        return config.depth * len(range(ranks.rank, config.repeats, ranks.world_size))

    # -- scale -----------------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The recursion's ``scale``: the configured number, or estimated once on minibatches of size B."""
        if self._scale is None:
            self._scale = self.estimate_scale() if self.config.scale == "auto" else float(self.config.scale)
        return self._scale

    @property
    def has_scale(self) -> bool:
        return self._scale is not None

    @property
    def step_batch_size(self) -> int:
        """Training examples per recursion step: ``batch_size``, or the size :meth:`choose_batch` picked."""
        return self._chosen[0] if self._chosen is not None else self.config.batch_size

    def estimate_scale(self, part: tuple[int, int] = (0, 1), batch_size: int | None = None) -> float:
        """The ``scale="auto"`` estimate (not cached) on minibatches of ``batch_size`` (default: the recursion's), or
        with ``part=(r, R)`` this rank's share of it: the maximum over the R parts is the single-process estimate."""
        like = next(iter(self.problem.params.values()))
        stream = self.stream(repeat_seed(self.config.seed, -1), batch_size)
        hvp, damping, _ = self.operator()
        return estimate_scale(hvp, stream, damping, self.problem.num_params, like, part)

    @property
    def preconditioned(self) -> bool:
        """The recursion runs on the preconditioned operator (a preconditioner is set and the curvature is PSD)."""
        return self.config.preconditioner is not None and self.problem.curvature.psd

    def operator(self) -> tuple[BatchHVP, float, Callable[[torch.Tensor], torch.Tensor]]:
        """What the recursion iterates on: ``(hvp, damping, root)``. Plain: ``H_j`` and the damping, ``root`` the
        identity. Preconditioned: ``B_j = R (H_j + damping I) R`` with ``R = P^-1/2`` and damping 0, ``root = R``;
        the recursion then solves ``B y = R v`` and ``x = R y`` (``R`` is linear: it commutes with sums)."""
        problem = self.problem
        if not self.preconditioned:
            return problem.minibatch_hvp, problem.damping, _identity
        assert self.config.preconditioner is not None  # noqa: S101 - checked by `preconditioned`
        kronecker, damping = self.kronecker(self.config.preconditioner), problem.damping

        def root(vectors: torch.Tensor) -> torch.Tensor:
            return kronecker.apply(vectors, damping, power=0.5)

        def hvp(batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
            rooted = root(vectors)
            return root(problem.minibatch_hvp(batch, rooted).add_(rooted, alpha=damping))

        return hvp, 0.0, root

    def prepare(self, ranks: Ranks = ONE_PROCESS) -> None:
        """Build the preconditioner (its data passes split over ranks) and estimate ``scale="auto"`` once, its probe
        batches split over ranks (the maximum of the parts)."""
        if self.preconditioned:
            assert self.config.preconditioner is not None  # noqa: S101 - checked by `preconditioned`
            self.kronecker(self.config.preconditioner, ranks.sum if ranks.world_size > 1 else None,
                           (ranks.rank, ranks.world_size))
        if self.config.scale == "auto" and not self.has_scale and ranks.world_size > 1:
            _, parts = ranks.gather(lambda: self.estimate_scale((ranks.rank, ranks.world_size)))
            self._scale = max(parts)

    def top_eigenvalue(self) -> float | None:
        """The top eigenvalue of the recursion's ``H_j + damping I`` (what ``scale`` must exceed): the scale
        estimate's own probe, divided by its margin."""
        if self.config.scale == "auto":
            return self.scale / SCALE_MARGIN
        return self.estimate_scale() / SCALE_MARGIN

    def choose_batch(self) -> None:
        """Adopt ``step_batch.choose_step_batch``'s size and scale where ``shrink_applies`` (once; alike on all ranks)."""
        if self._chosen is None and shrink_applies(self):
            size, self._scale, probed = choose_step_batch(self)
            self._chosen = size, probed

    def stream(self, seed: int, batch_size: int | None = None) -> Iterator[Batch]:
        """Endless seeded minibatches of ``batch_size`` (default: the recursion's) examples (stored rows if stored)."""
        problem = self.problem
        if not isinstance(problem.train_loader, DataLoader):
            raise TypeError(
                "Expected `train_loader` to be a torch DataLoader for solver='lissa' (it samples minibatches from"
                f" its dataset), but got {type(problem.train_loader).__name__}. Wrap the data in a DataLoader."
            )
        size = batch_size or self.step_batch_size
        rows = problem.products.rows_stream(size, seed)
        if rows is not None:
            return rows
        loader = problem.train_loader
        return minibatch_stream(loader.dataset, size, loader.collate_fn, seed, problem.device)

    # -- the recursion ---------------------------------------------------------------------------------------
    def partial(self, vectors: torch.Tensor, repeat_ids: Sequence[int], on_step: OnStep | None = None,
                *, early_stop: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sum over repeats ``repeat_ids`` of ``h_J / scale``, and their traces. With ``early_stop`` a repeat ends
        once its own estimate meets ``residual_tol`` (checked every ``check_every`` steps)."""
        config = self.config
        hvp, damping, root = self.operator()

        def stop(estimate: torch.Tensor) -> float:
            return float(self.problem.check_residual(root(estimate), vectors).max())

        # the hand-off to CG trusts the checks' trend only where they see the whole training set: a subset's check
        # levels off at its own sampling error while the series, drawing from every example, still improves; there
        # the whole-set verdict is asked from the predicted steps on (the series may have met it already)
        whole = self.problem.check_is_whole()
        verdict = None
        if early_stop and not whole and damping > 0:
            verdict = (lambda estimate: float(self.problem.residual(root(estimate), vectors).max()),
                       series_steps(self.scale, damping, config.residual_tol))
        total, traces = lissa_repeats(hvp, lambda r: self.stream(repeat_seed(config.seed, r)), root(vectors), damping,
                                      self.scale, config, repeat_ids, on_step, stop if early_stop else None,
                                      config.refine and whole, verdict)
        return root(total), traces

    # long: the retry loop, the split over ranks and the combination read best in one place
    def solve(self, vectors: torch.Tensor, on_step: OnStep | None = None, ranks: Ranks = ONE_PROCESS) -> STest:
        config = self.config
        if config.repeats < ranks.world_size and ranks.rank == 0:
            warnings.warn(
                f"LiSSA repeats={config.repeats} < {ranks.world_size} processes: {ranks.world_size - config.repeats}"
                f" rank(s) idle during s_test. Set `repeats` to a multiple of the number of processes (e.g."
                f" {ranks.world_size}): a lower-variance s_test in the same time.", stacklevel=4)
        start = time.perf_counter()
        self.prepare(ranks)
        route = self.cg_route()
        if route is not None:
            return self._solve_by_cg(vectors, ranks, start, route)
        self.choose_batch()
        ids = list(range(ranks.rank, config.repeats, ranks.world_size))
        halves = [[i for i in ids if i % 2 == parity] for parity in (0, 1)]
        retries: list[dict[str, Any]] = []
        while True:
            outcome, gathered = ranks.gather(
                lambda: self._run_halves(vectors, halves, on_step, can_retry=len(retries) < config.max_retries,
                                         runs_all=len(ids) == config.repeats),
                lambda result: (result[0], result[1], result[3]))
            diverged = [shared for shared in gathered if shared[0] == "diverged"]
            if not diverged:
                break
            if len(retries) >= config.max_retries:
                if outcome[0] == "diverged":
                    raise self.divergence_error(outcome[2], retries) from outcome[2]
                raise RuntimeError(f"LiSSA diverged on another rank after {len(retries)} retries: {diverged[0][1]}")
            record = diverged[0][1]  # every rank adopts the first diverging rank's recovery: the same state everywhere
            self.adopt(record)
            retries.append(record)
        even_odd = ranks.sum(outcome[2])
        x = (even_odd[0] + even_odd[1]) / config.repeats
        traces = [t for _, t in sorted((pair for shared in gathered for pair in shared[1]), key=lambda p: p[0])]
        known = [shared[2] for shared in gathered if shared[2] is not None]
        residual = known[0] if known else self.problem.split_residual(x, vectors, ranks)
        refined = None
        if config.refine and residual > config.residual_tol:
            x, residual, refined = self.refine(x, vectors, ranks)
        info = self.record(traces, x, vectors, retries, residual)
        if refined is not None:
            info = dataclasses.replace(info, settings={**info.settings, "refined_iterations": refined})
        halves_means = None
        if config.repeats >= 2 and refined is None:  # after a refinement the repeats' halves no longer make x
            halves_means = (even_odd[0] / len(range(0, config.repeats, 2)),
                            even_odd[1] / len(range(1, config.repeats, 2)))
        return STest(x, dataclasses.replace(info, seconds=time.perf_counter() - start), halves_means)

    def _run_halves(self, vectors: torch.Tensor, halves: list[list[int]], on_step: OnStep | None, can_retry: bool,
                    runs_all: bool) -> tuple[Any, ...]:
        """This rank's sums of its even and odd repeats and their traces: ``("ok", traces, sums, residual)``, where
        ``residual`` is the known residual of the whole solution when this rank ran every repeat (else None); after
        a divergence ``("diverged", recovery record or message, error, None)`` (the record when a retry is left)."""
        sums: list[torch.Tensor] = []
        traces: list[tuple[int, torch.Tensor]] = []
        try:
            for half in halves:
                total, half_traces = self.partial(vectors, half, on_step)
                sums.append(total)
                traces.extend(zip(half, half_traces))
        except LissaDivergenceError as error:
            return "diverged", self.recover(error) if can_retry else str(error), error, None
        known = None
        if runs_all and traces:
            known = self.problem.known_residual(torch.stack(sums).sum(dim=0) / len(traces), vectors)
        return "ok", traces, torch.stack(sums), None if known is None else float(known.max())

    def cg_route(self) -> dict[str, int] | None:
        """The predictions that send the whole solve to conjugate gradient (:func:`recursion_costs_more`), or None
        where the recursion runs: always with ``route="recursion"`` or ``refine`` off, under a curvature that is not
        positive semi-definite, when the recursion is preconditioned or the training set has no length. The same on
        every rank (the scale is). Each repeat's early-stop checks read min(N, check subset) examples."""
        config, problem = self.config, self.problem
        dataset = getattr(problem.train_loader, "dataset", None)
        if (config.route == "recursion" or not config.refine or self.preconditioned or problem.damping <= 0
                or not problem.curvature.psd or isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized)):
            return None
        n, repeats = len(dataset), config.repeats
        dearer, steps, iterations = recursion_costs_more(self.scale, problem.damping, config.batch_size * repeats, n,
                                                         config.residual_tol, CG_TOL, check_every=config.check_every,
                                                         check_work=min(n, problem.subset_examples or n) * repeats)
        return {"predicted_steps": steps, "predicted_cg_iterations": iterations} if dearer else None

    def _solve_by_cg(self, vectors: torch.Tensor, ranks: Ranks, start: float, route: dict[str, int]) -> STest:
        """The whole solve by conjugate gradient (the points split over ranks), recorded as a LiSSA solve whose
        recursion took no steps (``iterations == 0``), with the predictions that chose it, the CG steps as its
        refinement and CG's residuals as its trace."""
        solved = CGSolver(CGConfig(max_iter=REFINE_MAX_ITER), self.problem).solve(vectors, ranks=ranks)
        info = self.record([], solved.vectors, vectors, [], solved.info.residual)
        settings = {**info.settings, "solved_by": "cg", **route, "refined_iterations": solved.info.iterations}
        info = dataclasses.replace(info, settings=settings, trace=solved.info.trace,  # CG's residuals: trace_name
                                   seconds=time.perf_counter() - start)
        return STest(solved.vectors, info, None)

    def record(self, traces: list[torch.Tensor], x: torch.Tensor, vectors: torch.Tensor,
               retries: Sequence[dict[str, Any]], residual: float | None = None) -> SolveInfo:
        """The record of a solve: traces, the residual of the averaged ``x`` (``converged`` means it met
        ``residual_tol``; computed here unless given), how the damping was chosen, and the retries."""
        residual = float(self.problem.residual(x, vectors).max()) if residual is None else residual
        info = lissa_info(self.problem.damping, self.scale, traces, self.config, residual=residual)
        settings: dict[str, Any] = {"preconditioner": self.config.preconditioner if self.preconditioned else None}
        if self._chosen is not None:
            settings.update(step_batch_size=self._chosen[0], batch_scales={str(b): s for b, s in sorted(self._chosen[1].items())})
        return dataclasses.replace(info, **self.problem.damping_fields(), retries=tuple(retries), settings=settings)

    def refine_budget(self) -> int:
        """CG iterations of a refinement: about as many example products as the repeats took (``J T B``), so a
        refinement at most doubles the solve's cost, within ``[REFINE_MIN_ITER, REFINE_MAX_ITER]``."""
        config = self.config
        examples = max(1, len(self.problem.train_loader.dataset))  # type: ignore[arg-type, attr-defined]
        work = config.depth * config.repeats * config.batch_size
        return int(min(REFINE_MAX_ITER, max(REFINE_MIN_ITER, -(-work // examples))))

    def refine(self, x: torch.Tensor, vectors: torch.Tensor, ranks: Ranks = ONE_PROCESS
               ) -> tuple[torch.Tensor, float, int]:
        """``x + e`` with ``e`` the conjugate-gradient solution of ``(C + damping I) e = v - (C + damping I) x``
        (full training set, points split over ranks); its worst residual and the steps CG took."""
        problem = self.problem
        with torch.inference_mode(False), torch.enable_grad():
            remaining = vectors - problem.damped_hvp(x)
        correction = CGSolver(CGConfig(max_iter=self.refine_budget()), problem).solve(remaining, ranks=ranks)
        x = x + correction.vectors
        return x, problem.split_residual(x, vectors, ranks), correction.info.iterations

    # -- recovery --------------------------------------------------------------------------------------------
    def recover(self, error: LissaDivergenceError) -> dict[str, Any]:
        """Measure the diverging minibatch's eigenvalues, then raise ``scale`` (an eigenvalue spike) or, under a
        curvature that is not positive semi-definite with negative curvature below the damping, the damping;
        adopt the change and return its record."""
        problem = self.problem
        found = self._batch_spectrum(error.batch)
        scale, damping = self.scale, problem.damping
        recursion_damping = self.operator()[1]
        record: dict[str, Any] = {
            "step": error.step, "repeat": error.repeat, "batch_eigenvalue_max": found.top,
            "batch_eigenvalue_min": found.bottom, "scale_before": scale, "damping_before": damping,
        }
        negative = found.bottom + damping < 0 and found.top + damping <= scale
        if not problem.curvature.psd and negative and not problem.settings.allow_negative_curvature:
            raised = max(2.0 * damping, NEGATIVE_CURVATURE_MARGIN * -found.bottom)
            note = (f"LiSSA diverged at step {error.step}: minibatch lambda_min={found.bottom:.3g} is below -damping;"
                    f" damping raised from {damping:.3g} to {raised:.3g}.")
            record.update(reason="negative curvature: damping raised", damping_after=raised,
                          scale_after=scale + (raised - damping), note=note)
        else:
            record.update(reason="minibatch eigenvalue spike: scale raised", damping_after=damping,
                          scale_after=max(2.0 * scale, SCALE_MARGIN * (found.top + recursion_damping)), note="")
        self.adopt(record)
        return record

    def adopt(self, record: dict[str, Any]) -> None:
        """Take a recovery record's scale and damping (the same record on every rank: the same state)."""
        if record["damping_after"] != self.problem.damping:
            self.problem.raise_damping(record["damping_after"], "raised after a LiSSA divergence", record["note"])
        self._scale = record["scale_after"]

    def divergence_error(self, error: LissaDivergenceError, retries: list[dict[str, Any]]) -> LissaDivergenceError:
        """The error after the last retry, with every measured eigenvalue in its text."""
        measured = "; ".join(
            f"retry {i + 1}: minibatch eigenvalues [{r['batch_eigenvalue_min']:.3g}, {r['batch_eigenvalue_max']:.3g}],"
            f" {r['reason']} (scale {r['scale_before']:.3g} -> {r['scale_after']:.3g}, damping"
            f" {r['damping_before']:.3g} -> {r['damping_after']:.3g})"
            for i, r in enumerate(retries)
        ) or f"max_retries={len(retries)}"
        last = self._batch_spectrum(error.batch)
        found = self.problem.damping_choice().spectrum
        subset = "" if found is None else f"; on the check subset [{found.bottom:.3g}, {found.top:.3g}]"
        curvature = self.problem.curvature
        hint = "a larger `damping`, solver='cg', or a larger `batch_size`"
        if not curvature.psd:
            hint = "curvature='gauss_newton' (positive semi-definite), " + hint
        return LissaDivergenceError(
            f"{error} Still diverging after {len(retries)} retr{'y' if len(retries) == 1 else 'ies'} ({measured})."
            f" Curvature ({curvature.name}) eigenvalues measured: minibatch at the divergence"
            f" [{last.bottom:.3g}, {last.top:.3g}]{subset}. Try {hint}.",
            step=error.step, repeat=error.repeat, batch=error.batch, scale=error.scale, damping=error.damping,
        )

    def _batch_spectrum(self, batch: Batch) -> Any:
        """Extreme eigenvalues of the recursion's operator on ``batch`` (``H_j``, or ``B_j`` when preconditioned)."""
        problem = self.problem
        like = next(iter(problem.params.values()))
        hvp = self.operator()[0]
        with torch.inference_mode(False), torch.enable_grad():
            return estimate_spectrum(lambda v: hvp(batch, v), problem.num_params,
                                     batch_size_of(batch), like=like, seed=SUBSET_SEED, steps=SPECTRUM_STEPS)

    # -- trust -----------------------------------------------------------------------------------------------
    def trust_warnings(self, top: float | None) -> list[TrustWarning]:
        config, found = self.config, []
        if top is not None and config.scale != "auto" and float(config.scale) < SCALE_MARGIN * top:
            found.append(TrustWarning(
                "scale_below_top_eigenvalue", f"scale={config.scale:g} is below {SCALE_MARGIN} x the estimated top"
                f" eigenvalue {top:.4g} of the minibatch curvature plus damping (what scale='auto' uses): the"
                " recursion diverges along directions above 2 x scale. Use scale='auto' or"
                f" scale >= {SCALE_MARGIN * top:.3g}."))
        if config.batch_size < SMALL_LISSA_BATCH:
            found.append(TrustWarning(
                "small_lissa_batch", f"LiSSA batch_size={config.batch_size} (< {SMALL_LISSA_BATCH}): minibatch"
                " Hessians of few examples have far larger top eigenvalues than the full one, so the recursion needs"
                " a large scale and is divergence-prone. Raise `batch_size` or use more `repeats`."))
        return found
