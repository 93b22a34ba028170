"""One influence problem: a model, its per-example loss, the training data, the curvature and its damping.

Holds what every solver shares (the trainable parameters, the curvature products, the damping, the fixed check
subset and its residual check) and exposes each step of the data flow once: test gradients -> s_test -> scores.
The solve itself belongs to the solver object of the configured solver (:mod:`~lightning_influence.core.solvers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_influence.config import (
    CHECK_MIN_EXAMPLES,
    CURVATURE_EXAMPLES,
    RESIDUAL_TOL,
    SUBSET_EXAMPLES,
    SUBSET_SEED,
    ExactConfig,
    ProblemConfig,
    SolverConfig,
)
from lightning_influence.config.problem import problem_settings
from lightning_influence.core.curvature import make_curvature
from lightning_influence.core.curvature.damping import DampingChoice, Spectrum, choose_damping, estimate_spectrum
from lightning_influence.core.curvature.estimates import SPECTRUM_CACHE, tensor_digest, weights_fingerprint
from lightning_influence.core.curvature.products import dataset_product
from lightning_influence.core.curvature.training import TrainingCurvature
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.losses import FunctionalLoss, LossFn
from lightning_influence.core.scoring import iter_scores
from lightning_influence.core.solvers import ONE_PROCESS, Ranks, Solver, make_solver
from lightning_influence.core.tensors.batching import Batch, batch_size_of, prepare_batch, slice_batch
from lightning_influence.core.tensors.data import subset_batches
from lightning_influence.core.tensors.params import model_device, num_parameters, trainable_parameters
from lightning_influence.core.tensors.residual import (
    ResidualEstimate,
    ResidualMemo,
    sampled_residual,
)
from lightning_influence.results import SolveInfo, STest

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
#: The seed of the verdict's random order of the training set (not the check subset's: LiSSA stopped on that one).
VERDICT_SEED = SUBSET_SEED + 1


class InfluenceProblem:
    """Influence of the training data of ``train_loader`` on test points, for ``model`` as it is now.

    Call inside :func:`~lightning_influence.core.tensors.modes.analysis_mode` (the public functions do).

    Args:
        model: the trained module; only its trainable parameters count (``settings.parameters`` narrows them).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses, without the L2 term. For the Gauss-Newton
            curvature it must call ``model(...)`` once (or be a :class:`~lightning_influence.core.curvature.products.SplitLoss`).
        train_loader: the training data; iterated in its own order for scoring, its dataset sampled by LiSSA.
        settings: the :class:`~lightning_influence.config.ProblemConfig` (solver, curvature, damping, weight decay,
            parameters, dtype). ``problem.damping`` is the resolved damping.
        subset_examples: training examples (fixed seeded subset) for the spectrum and the residual check
            (None: all).
        store_jacobian: Gauss-Newton products from the stored output Jacobian when it fits (the same matrix;
            :mod:`~lightning_influence.core.curvature.jacobian`); False always differentiates through the model.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, train_loader: Iterable[Batch], settings: Any = None,
                 config: Optional[SolverConfig] = None, *, subset_examples: int | None = SUBSET_EXAMPLES,
                 store_jacobian: bool = True, **legacy: Any) -> None:
        self.settings = problem_settings(settings, config, **legacy)
        dtype = self.settings.dtype
        self.model = model
        self.loss = FunctionalLoss(model, loss_fn, _DTYPES[dtype] if isinstance(dtype, str) else dtype)
        self.params = trainable_parameters(model, self.settings.parameters, self.loss.dtype)
        self._engine: PerExampleEngine | None = None
        self.num_params = num_parameters(self.params)
        self.device = model_device(model)
        self.train_loader = train_loader
        self.curvature = make_curvature(self.settings.curvature)
        self.subset_examples = subset_examples
        self._choice: DampingChoice | None = None
        self._spectrum: Spectrum | None = None
        self._subset: list[Batch] | None = None
        self._check_is_whole: bool | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._residuals = ResidualMemo()
        self.solver: Solver = make_solver(self.settings.solver, self)
        self.products = TrainingCurvature(self.loss, self.params, self.curvature, self.solver.hvp_method, train_loader,
                                          self.device, store_jacobian and self.solver.stores_jacobian)

    def with_settings(self, settings: ProblemConfig) -> InfluenceProblem:
        """The same model and training data under other ``settings`` (another damping or solver). When the
        curvature, parameters and dtype are the same and both solvers take products alike, the new problem shares
        this one's curvature products, so a stored output Jacobian is built once for both."""
        other = InfluenceProblem(self.model, self.loss.loss_fn, self.train_loader, settings,
                                 subset_examples=self.subset_examples)
        same = (settings.curvature, settings.parameters, settings.dtype) == (
            self.settings.curvature, self.settings.parameters, self.settings.dtype)
        if same and (other.solver.hvp_method, other.solver.stores_jacobian) == (
                self.solver.hvp_method, self.solver.stores_jacobian):
            other.products = self.products
        return other

    @property
    def config(self) -> SolverConfig:
        """The solver's config."""
        return self.settings.solver_config

    # -- damping --------------------------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        """The damping the solvers use (resolved from ``"auto"`` and checked on first use)."""
        return self.damping_choice().value

    def damping_choice(self) -> DampingChoice:
        """The damping, how it was chosen and the eigenvalue estimates behind it (computed once)."""
        if self._choice is None:
            with torch.inference_mode(False), torch.enable_grad():
                choice = choose_damping(self.settings.damping, self.curvature, self.spectrum,
                                        self.settings.weight_decay, self.settings.allow_negative_curvature)
                if choice.spectrum is not None:  # the reports say what the estimate read
                    choice = dataclasses.replace(choice, rule=f"{choice.rule} (spectrum of {choice.spectrum.examples}"
                                                 " training examples)")
                self._choice = choice
        return self._choice

    def raise_damping(self, value: float, reason: str, note: str) -> None:
        """Use the larger damping ``value`` from now on (a solver's recovery), recorded in the damping's rule."""
        choice = self.damping_choice()
        self._choice = dataclasses.replace(choice, value=value, rule=f"{choice.rule}; {reason}",
                                           warnings=(*choice.warnings, note))

    def spectrum(self) -> Spectrum:
        """Extreme eigenvalues of the curvature: exact when the solver computes them anyway, else Lanczos on a fixed
        seeded subsample of ``CURVATURE_EXAMPLES`` training examples (``curvature.spectrum_steps`` steps: the top
        alone for a PSD curvature, both ends otherwise), made once per set of weights (:data:`SPECTRUM_CACHE`)."""
        if self._spectrum is None:
            exact = self.solver.exact_spectrum()
            if exact is not None:
                n = sum(batch_size_of(b) for b in self.train_batches())
                self._spectrum = Spectrum(exact[1], exact[0], self.num_params, n)
            else:
                self._spectrum = SPECTRUM_CACHE.get(self._spectrum_key(), self._estimate_spectrum)
        return self._spectrum

    def _curvature_units(self) -> list[Batch]:
        """The curvature estimates' subsample (``CURVATURE_EXAMPLES``) as the products take it (index chunks of the
        stored Jacobian without reading the data, else its batches)."""
        indices = self.products.indices(CURVATURE_EXAMPLES, SUBSET_SEED)
        if indices is not None and self.products.stored() is not None:
            return self.products.units([], indices)
        return self.products.units(list(self.training_subset(CURVATURE_EXAMPLES, SUBSET_SEED)), indices)

    def _estimate_spectrum(self) -> Spectrum:
        units = self._curvature_units()
        return estimate_spectrum(lambda v: dataset_product(self.products, units, v), self.num_params,
                                 sum(batch_size_of(b) for b in units), like=next(iter(self.params.values())),
                                 seed=SUBSET_SEED, steps=self.curvature.spectrum_steps)

    def _spectrum_key(self) -> tuple[Any, ...]:
        """What the spectrum depends on: the weights, the loss on the subsample's first batch, the curvature, dtype,
        parameters and subsample (:mod:`~lightning_influence.core.curvature.estimates`)."""
        first = next(iter(self.training_subset(CURVATURE_EXAMPLES, SUBSET_SEED)), None)
        with torch.no_grad():
            probe = () if first is None else (("losses", self.loss(self.params, slice_batch(first, 0, 8))),)
        indices = self.products.indices(CURVATURE_EXAMPLES, SUBSET_SEED)
        return (weights_fingerprint(self.model), tensor_digest(probe), self.curvature.name, str(self.loss.dtype),
                tuple(self.params), self.curvature.spectrum_steps, None if indices is None else tuple(indices))

    # -- gradients and curvature products -------------------------------------------------------------------
    def gradients(self, batch: Batch) -> torch.Tensor:
        """``[B, P]`` per-example gradients ``grad L(z)`` of ``batch`` (module hooks, no vmap: any model)."""
        return self.per_example.grads(prepare_batch(batch, self.device)).detach()

    @property
    def per_example(self) -> PerExampleEngine:
        """The hook-based per-example engine (its ``plan`` says which parameters took which path)."""
        if self._engine is None:
            self._engine = PerExampleEngine(self.loss, self.params)
        return self._engine

    def train_batches(self) -> Iterator[Batch]:
        for batch in self.train_loader:
            yield prepare_batch(batch, self.device)

    def minibatch_hvp(self, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
        """``C_b V`` for the curvature ``C_b`` of the mean loss over ``batch`` (a
        :class:`~lightning_influence.core.curvature.jacobian.RowBatch` of training indices when the Jacobian is stored)."""
        return self.products(batch, vectors)

    def damped(self, product: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``product + damping * vectors``: a curvature product ``C V`` made the damped one ``(C + damping I) V``."""
        return product + self.damping * vectors

    def damped_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + damping I) V`` over the whole training set."""
        return self.damped(dataset_product(self.products, self._whole_units(), vectors), vectors)

    def check_batches(self) -> list[Batch]:
        """The fixed seeded training subset of the spectrum estimate and the residual check (kept in memory)."""
        if self._subset is None:
            self._subset = list(self.training_subset(self.subset_examples, SUBSET_SEED))
        return self._subset

    def check_units(self) -> list[Batch]:
        """The check subset as the products see it: its batches, or index chunks of the stored Jacobian (then the
        batches are not read)."""
        indices = self.products.indices(self.subset_examples, SUBSET_SEED)
        stored = indices is not None and self.products.stored() is not None
        return self.products.units([] if stored else self.check_batches(), indices)

    def check_is_whole(self) -> bool:
        """Whether the check subset is the whole training set (at most ``subset_examples`` examples, or data that
        is not a map-style loader, which the subset reads whole); decided once, the training set being fixed."""
        if self._check_is_whole is None:
            everything = self.products.indices(None, 0)
            self._check_is_whole = (everything is None or self.subset_examples is None
                                    or self.subset_examples >= len(everything))
        return self._check_is_whole

    def residual_examples(self) -> int:
        """Training examples the verdict :meth:`residual` averages the curvature over."""
        everything = self.products.indices(None, 0)
        return len(everything) if everything is not None else sum(batch_size_of(b) for b in self.check_batches())

    def _whole_units(self) -> Iterable[Batch]:
        """The whole training set as the products take it: index chunks when stored, else the loader's batches."""
        return self.products.units([], self.products.indices(None, 0)) or self.train_batches()

    def check_product(self, x: torch.Tensor, part: tuple[int, int] = (0, 1), *, whole: bool = False
                      ) -> tuple[torch.Tensor, int]:
        """``(sum_b |b| C_b x, sum_b |b|)`` over check batches ``r, r + R, ...`` for ``part=(r, R)`` (with ``whole``
        the batches of the whole training set): summed over the R parts (e.g. by an all-reduce) and divided, it is
        ``C x`` over the check subset (the whole set)."""
        units = self._whole_units() if whole else self.check_units()
        with torch.inference_mode(False), torch.enable_grad():
            total, count = torch.zeros_like(x), 0
            for batch in islice(units, part[0], None, part[1]):
                size = batch_size_of(batch)
                total.add_(self.products(batch, x), alpha=size)  # in place: no [k, P] temporaries per batch
                count += size
        return total, count

    def residual(self, x: torch.Tensor, vectors: torch.Tensor,
                 product: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """The verdict on a solve: ``||(C + damping I) x - v|| / ||v||`` per row, with C over the whole training set
        (``product``: the :meth:`check_product` of ``x`` over it, when already computed, e.g. combined over ranks).

        Of the whole set, not the fixed check subset: the subset's curvature differs from the whole one by a sampling
        error, and at a small damping ``(C_subset - C) x`` alone can exceed the tolerance for the exact solution
        (measured: 0.37 on 20,000 examples at damping 0.01, ``benchmarks/s_test.py``). On a set larger than the
        check subset it is estimated (:meth:`sampled_residual`): read in a random order until every row is
        ``VERDICT_Z`` standard errors clear of the tolerance, so the verdict's side of the tolerance holds with
        that confidence and a row near it reads the whole set (:meth:`residual_estimate` says how many examples
        were read and the standard errors)."""
        rows = self.known_residual(x, vectors)
        if rows is None:
            if product is None and not self.check_is_whole():
                estimate = self.sampled_residual(x, vectors)
                self._residuals.add(x, vectors, self.damping, estimate)
                return estimate.rows
            total, count = self.check_product(x) if product is None else product
            rows = self._relative(total, count, x, vectors)
            self._residuals.add(x, vectors, self.damping, rows)
        return rows

    def sampled_residual(self, x: torch.Tensor, vectors: torch.Tensor) -> ResidualEstimate:
        """The verdict on a training set larger than the check subset: read in a seeded random order (another seed
        than the check subset's, which LiSSA's stopping already looked at) until every row is decided, at least
        ``subset_examples`` examples (:func:`~lightning_influence.core.tensors.residual.sampled_residual`)."""
        everything = self.products.indices(None, 0)
        assert everything is not None  # noqa: S101 - a whole-set check otherwise (check_is_whole)
        order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(VERDICT_SEED)).tolist()
        units: Iterable[Batch] = self.products.units([], order)
        if not units:
            loader: Any = self.train_loader
            size = max(loader.batch_size or 1, self.solver.check_batch_size)
            units = (prepare_batch(b, self.device) for b in DataLoader(Subset(loader.dataset, order), batch_size=size,
                                                                        collate_fn=loader.collate_fn))
        with torch.inference_mode(False), torch.enable_grad():
            return sampled_residual(lambda batch: self.products(batch, x), ((b, batch_size_of(b)) for b in units), x,
                                    vectors, self.damping, len(everything), RESIDUAL_TOL,
                                    min_examples=self.subset_examples or 0)

    def residual_estimate(self, x: torch.Tensor, vectors: torch.Tensor) -> ResidualEstimate | None:
        """How the remembered verdict on ``x`` was measured (rows, standard errors, examples read), or None."""
        return self._residuals.find_estimate(x, vectors, self.damping)

    def check_residual(self, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """:meth:`residual` on the check subset only: the cheap test LiSSA repeats stop on, read in the subset's
        seeded random order until every row is decided against the solver's tolerance, at least
        ``CHECK_MIN_EXAMPLES`` examples (a row near it reads the whole subset). Where the subset is the whole set it
        is the verdict itself (and remembered as such)."""
        if self.check_is_whole():
            return self.residual(x, vectors)
        units, tol = self.check_units(), getattr(self.config, "residual_tol", RESIDUAL_TOL)
        with torch.inference_mode(False), torch.enable_grad():
            return sampled_residual(lambda batch: self.products(batch, x), ((b, batch_size_of(b)) for b in units), x,
                                    vectors, self.damping, sum(batch_size_of(b) for b in units), tol,
                                    min_examples=CHECK_MIN_EXAMPLES).rows

    def _relative(self, total: torch.Tensor, count: int, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``||total / count + damping x - v|| / ||v||`` per row, in ``total``'s own memory (overwritten): no
        ``[k, P]`` temporaries on a large model."""
        applied = total.div_(count).add_(x, alpha=self.damping).sub_(vectors)
        return applied.norm(dim=1) / vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)

    def split_residual(self, x: torch.Tensor, vectors: torch.Tensor, ranks: Ranks = ONE_PROCESS) -> float:
        """The worst row of :meth:`residual`, its curvature product split over ``ranks`` (one sum combines it)."""
        whole = not self.check_is_whole()
        if whole and ranks.world_size == 1:  # one process: the sampled verdict; several: the whole set, split
            return float(self.residual(x, vectors).max())
        (total, count), _ = ranks.gather(lambda: self.check_product(x, (ranks.rank, ranks.world_size), whole=whole),
                                         lambda _: None)
        combined = ranks.sum(torch.cat([total.flatten(), total.new_tensor([count])]))
        product = (combined[:-1].reshape(x.shape), int(round(float(combined[-1]))))
        return float(self.residual(x, vectors, product).max())

    def known_residual(self, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor | None:
        """The rows of an earlier :meth:`residual` of equal ``x`` and ``vectors`` at the current damping, or None."""
        return self._residuals.find(x, vectors, self.damping)

    def training_subset(self, examples: int | None, seed: int) -> Iterator[Batch]:
        """A fixed seeded subset of the training data in batches of at least the solver's ``check_batch_size``."""
        for batch in subset_batches(self.train_loader, examples, seed, self.solver.check_batch_size):
            yield prepare_batch(batch, self.device)

    def curvature_eigh(self, max_parameters: int = ExactConfig().max_parameters) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, Q)`` of the dense curvature over the whole training set (float64, ascending; small models)."""
        if self._eigh is None:
            if self.num_params > max_parameters:
                raise ValueError(f"Expected at most {max_parameters} trainable parameters for solver='exact' (it"
                                 f" builds the {self.num_params} x {self.num_params} curvature matrix), but got"
                                 f" {self.num_params}. Use solver='lissa' or 'cg'.")
            matrix = self.products.dense_matrix(self.curvature, self.train_batches(), self.solver.stores_jacobian)
            self._eigh = torch.linalg.eigh(matrix.double())
        return self._eigh

    # -- solving --------------------------------------------------------------------------------------------
    def solve(self, vectors: torch.Tensor, on_step: Callable[[], None] | None = None,
              ranks: Ranks = ONE_PROCESS) -> STest:
        """``(C + damping I)^-1 v`` for every row of ``vectors`` with the configured solver (its work split over
        ``ranks``)."""
        result = self.solver.solve(vectors, on_step, ranks)
        estimate = self.residual_estimate(result.vectors, vectors)
        if estimate is None or not estimate.sampled:
            return result
        settings = {**result.info.settings, "residual_estimate": estimate.to_dict()}
        return dataclasses.replace(result, info=dataclasses.replace(result.info, settings=settings))

    def self_influence(self, gradients: torch.Tensor) -> tuple[torch.Tensor, SolveInfo | None]:
        """``I(z, z) = -g^T (C + damping I)^-1 g`` for each row ``g`` of ``gradients``: quadratic forms of the
        solver's factorised inverse when it has one (no solve record), else a solve of the rows (and its record)."""
        forms = self.solver.quadratic_forms(gradients)
        if forms is not None:
            return -forms, None
        result = self.solve(gradients)
        return -(result.vectors * gradients).sum(dim=1), result.info

    def damping_fields(self) -> dict[str, Any]:
        """The curvature and how the damping was chosen, as :class:`~lightning_influence.results.SolveInfo` fields."""
        choice = self.damping_choice()
        found = choice.spectrum
        return {
            "curvature": self.curvature.name,
            "damping": choice.value,
            "damping_requested": choice.requested,
            "damping_rule": choice.rule,
            "warnings": choice.warnings,
            "eigenvalue_min": None if found is None else found.bottom,
            "eigenvalue_max": None if found is None else found.top,
        }

    def solve_info(self, solver: str, converged: bool, x: torch.Tensor, vectors: torch.Tensor, *,
                   use_residual: bool = True, compute_residual: bool = True, **fields: Any) -> SolveInfo:
        """The record of a solve of ``vectors`` by ``x``: its residual over the whole training set (``converged`` also
        requires it below the tolerance when ``use_residual``), the curvature and how the damping was chosen."""
        residual = float(self.residual(x, vectors).max()) if compute_residual else None
        if use_residual and residual is not None:
            converged = converged and residual <= RESIDUAL_TOL
        common = self.damping_fields()
        del common["damping"]
        common.update({k: v for k, v in fields.items() if k in ("eigenvalue_min", "eigenvalue_max")})
        rest = {k: v for k, v in fields.items() if k not in common}
        return SolveInfo(solver, self.damping, converged, 0.0, residual=residual,
                         residual_tol=RESIDUAL_TOL if residual is not None else None,
                         **{**common, **rest})

    # -- scoring ------------------------------------------------------------------------------------------
    def scores(self, s_vectors: torch.Tensor, batches: Iterable[Batch] | None = None, method: str = "auto",
               chunk_size: int = 256) -> Iterator[torch.Tensor]:
        """``[k, b]`` blocks of ``-s . grad L(z)`` over ``batches`` (default: the training loader), in order."""
        source = self.train_loader if batches is None else batches
        return iter_scores(self.loss, self.params, source, s_vectors, method, chunk_size, engine=self.per_example)
