"""One influence problem: a model, its per-example loss, the training data, damping and a solver.

Holds what several calls share (the trainable parameters, the cached exact inverse, the LiSSA scale) and
exposes each step of the data flow once: test gradients -> s_test -> scores.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.config import (
    DEFAULT_CURVATURE,
    RESIDUAL_TOL,
    SPECTRUM_STEPS,
    SUBSET_EXAMPLES,
    SUBSET_SEED,
    TOP_EIGENVALUE_STEPS,
    CGConfig,
    ExactConfig,
    LissaConfig,
    LowRankConfig,
    SolverConfig,
)
from lightning_influence.core.curvature.damping import (
    Damping,
    DampingChoice,
    Spectrum,
    check_damping_request,
    choose_damping,
    estimate_spectrum,
)
from lightning_influence.core.curvature.preconditioner import (
    KroneckerPreconditioner,
    Reduce,
    build_preconditioner,
    cached_preconditioner,
)
from lightning_influence.core.curvature.products import check_curvature, curvature_matrix, dataset_product
from lightning_influence.core.curvature.training import TrainingCurvature
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.losses import FunctionalLoss, LossFn
from lightning_influence.core.scoring import iter_scores
from lightning_influence.core.solvers.inverse import ExactInverse, LowRankInverse, conjugate_gradient
from lightning_influence.core.solvers.neumann import (
    LissaDivergenceError,
    estimate_scale,
    lissa_info,
    lissa_repeats,
    minibatch_stream,
    repeat_seed,
)
from lightning_influence.core.solvers.recovery import divergence_error, recover_from_divergence
from lightning_influence.core.tensors.batching import Batch, batch_size_of, prepare_batch
from lightning_influence.core.tensors.data import subset_batches
from lightning_influence.core.tensors.eigen import lanczos
from lightning_influence.core.tensors.params import (
    ParameterSelector,
    model_device,
    num_parameters,
    trainable_parameters,
)
from lightning_influence.core.tensors.residual import ResidualMemo, relative_residual
from lightning_influence.results import SolveInfo, STest


class InfluenceProblem:
    """Influence of the training data of ``train_loader`` on test points, for ``model`` as it is now.

    Call inside :func:`~lightning_influence.core.tensors.params.analysis_mode` (the public functions do).

    Args:
        model: the trained module; only its trainable parameters count.
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses, without the L2 term. For
            ``curvature="gauss_newton"`` it must call ``model(...)`` once (or be a
            :class:`~lightning_influence.core.curvature.products.SplitLoss`).
        train_loader: the training data; iterated in its own order for scoring, its dataset sampled by LiSSA.
        damping: lambda added to the curvature: a number (used as given) or ``"auto"`` (see
            :mod:`~lightning_influence.core.curvature.damping`). ``problem.damping`` is the resolved number.
        config: the solver configuration.
        curvature: ``"gauss_newton"`` (default, positive semi-definite) or ``"hessian"``.
        weight_decay: the optimizer's weight decay, the floor of ``damping="auto"``.
        allow_negative_curvature: with ``"hessian"``, keep a damping below ``|lambda_min|`` (warned) instead of
            raising it.
        subset_examples: training examples (fixed seeded subset) for the spectrum and the residual check
            (None: all).
        parameters: analyse only these trainable parameters (module-name prefixes or globs, or a predicate
            ``(name, param) -> bool``; see :func:`~lightning_influence.core.tensors.params.select_parameters`).
        dtype: the analysis dtype (default float32, float64 for a float64 model); low-precision weights are upcast.
        store_jacobian: Gauss-Newton products from the stored output Jacobian when it fits (the same matrix;
            :mod:`~lightning_influence.core.curvature.jacobian`); False always differentiates through the model.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, train_loader: Iterable[Batch], damping: Damping, config: SolverConfig,
        *, curvature: str = DEFAULT_CURVATURE, weight_decay: float | None = None,
        allow_negative_curvature: bool = False, subset_examples: int | None = SUBSET_EXAMPLES,
        parameters: ParameterSelector = None, dtype: Optional[torch.dtype] = None, store_jacobian: bool = True,
    ) -> None:
        self.model = model
        self.loss = FunctionalLoss(model, loss_fn, dtype)
        self.params = trainable_parameters(model, parameters, self.loss.dtype)
        self._engine: PerExampleEngine | None = None
        self.num_params = num_parameters(self.params)
        self.device = model_device(model)
        self.train_loader = train_loader
        self.config = config
        self.curvature = check_curvature(curvature)
        self.weight_decay = weight_decay
        self.allow_negative_curvature = allow_negative_curvature
        self.subset_examples = subset_examples
        self.damping_requested = check_damping_request(damping)
        self._choice: DampingChoice | None = None
        self._spectrum: Spectrum | None = None
        self._subset: list[Batch] | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._exact: ExactInverse | None = None
        self._low_rank: LowRankInverse | None = None
        self._scale: float | None = None
        self._residuals = ResidualMemo()
        method = config.hvp_method if isinstance(config, LissaConfig) else "double_backward"
        store = store_jacobian and isinstance(config, (LissaConfig, CGConfig))
        self.products = TrainingCurvature(self.loss, self.params, self.curvature, method, train_loader, self.device,
                                          store)
        self._product = self.products.autograd

    # -- damping --------------------------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        """The damping the solvers use (resolved from ``"auto"`` and checked on first use)."""
        return self.damping_choice().value

    def damping_choice(self) -> DampingChoice:
        """The damping, how it was chosen and the eigenvalue estimates behind it (computed once)."""
        if self._choice is None:
            with torch.inference_mode(False), torch.enable_grad():
                self._choice = choose_damping(self.damping_requested, self.curvature, self.spectrum,
                                              self.weight_decay, self.allow_negative_curvature)
        return self._choice

    def spectrum(self) -> Spectrum:
        """Extreme eigenvalues of the curvature: exact for solver='exact', else Lanczos on the check subset
        (``SPECTRUM_STEPS`` for the Hessian, ``TOP_EIGENVALUE_STEPS`` for Gauss-Newton: only its top is used)."""
        if self._spectrum is None:
            if isinstance(self.config, ExactConfig):
                w, _ = self.curvature_eigh()
                n = sum(batch_size_of(b) for b in self.train_batches())
                self._spectrum = Spectrum(float(w[-1]), float(w[0]), self.num_params, n)
            else:
                batches = self.check_units()
                like = next(iter(self.params.values()))
                self._spectrum = estimate_spectrum(
                    lambda v: dataset_product(self.products, batches, v), self.num_params,
                    sum(batch_size_of(b) for b in batches), like=like, seed=SUBSET_SEED,
                    steps=SPECTRUM_STEPS if self.curvature == "hessian" else TOP_EIGENVALUE_STEPS,
                )
        return self._spectrum

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
        """``C_b V`` for the curvature ``C_b`` (Gauss-Newton or Hessian) of the mean loss over ``batch`` (a
        :class:`~lightning_influence.core.curvature.jacobian.RowBatch` of training indices when the Jacobian is stored)."""
        return self.products(batch, vectors)

    def damped_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + damping I) V`` over the whole training set."""
        batches = self.products.units([], self.products.indices(None, 0)) or self.train_batches()
        return dataset_product(self.products, batches, vectors) + self.damping * vectors

    def check_batches(self) -> list[Batch]:
        """The fixed seeded training subset of the spectrum estimate and the residual check (kept in memory)."""
        if self._subset is None:
            self._subset = list(self._hvp_subset(self.subset_examples, SUBSET_SEED))
        return self._subset

    def check_units(self) -> list[Batch]:
        """The check subset as the products see it: its batches, or index chunks of the stored Jacobian."""
        return self.products.units(self.check_batches(), self.products.indices(self.subset_examples, SUBSET_SEED))

    def check_product(self, x: torch.Tensor, part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, int]:
        """``(sum_b |b| C_b x, sum_b |b|)`` over check batches ``r, r + R, ...`` for ``part=(r, R)``: summed over
        the R parts (e.g. by an all-reduce) and divided, it is ``C x`` over the whole check subset."""
        with torch.inference_mode(False), torch.enable_grad():
            total, count = torch.zeros_like(x), 0
            for batch in self.check_units()[part[0]::part[1]]:
                size = batch_size_of(batch)
                total.add_(self.products(batch, x), alpha=size)  # in place: no [k, P] temporaries per batch
                count += size
        return total, count

    def residual(self, x: torch.Tensor, vectors: torch.Tensor,
                 product: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """``||(C + damping I) x - v|| / ||v||`` per row, with C over the check subset (``product``: the
        :meth:`check_product` of ``x``, when already computed, e.g. combined over ranks)."""
        rows = self.known_residual(x, vectors)
        if rows is None:
            total, count = self.check_product(x) if product is None else product
            rows = relative_residual(total / count + self.damping * x, vectors)
            self._residuals.add(x, vectors, self.damping, rows)
        return rows

    def known_residual(self, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor | None:
        """The rows of an earlier :meth:`residual` of equal ``x`` and ``vectors`` at the current damping, or None."""
        return self._residuals.find(x, vectors, self.damping)

    # -- solvers ------------------------------------------------------------------------------------------
    def curvature_eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, Q)`` of the dense curvature over the whole training set (float64, ascending; small models)."""
        if self._eigh is None:
            limit = self.config.max_parameters if isinstance(self.config, ExactConfig) else ExactConfig().max_parameters
            if self.num_params > limit:
                raise ValueError(f"Expected at most {limit} trainable parameters for solver='exact' (it builds the"
                                 f" {self.num_params} x {self.num_params} curvature matrix), but got"
                                 f" {self.num_params}. Use solver='lissa' or 'cg'.")
            matrix = curvature_matrix(self.loss, self.params, self.train_batches(), self.curvature)
            self._eigh = torch.linalg.eigh(matrix.double())
        return self._eigh

    def exact_inverse(self) -> ExactInverse:
        if self._exact is None:
            w, q = self.curvature_eigh()
            self._exact = ExactInverse(w, q, self.damping)
        return self._exact

    def low_rank_inverse(self) -> LowRankInverse:
        """Top ``rank`` eigenpairs of C by Lanczos (products over a fixed subset of the training data), cached."""
        if self._low_rank is None:
            assert isinstance(self.config, LowRankConfig)
            config = self.config
            batches = list(self._hvp_subset(config.hvp_examples, config.seed))
            like = next(iter(self.params.values()))
            generator = torch.Generator().manual_seed(config.seed)
            values, vectors = lanczos(
                lambda v: dataset_product(self.minibatch_hvp, batches, v), self.num_params, config.steps,
                generator=generator, like=like,
            )
            keep = values.argsort(descending=True)[: config.rank]
            self._low_rank = LowRankInverse(values[keep], vectors[:, keep], self.damping, config.residual)
        return self._low_rank

    def preconditioner(self, reduce: Reduce | None = None, shard: tuple[int, int] = (0, 1)) -> KroneckerPreconditioner:
        """The K-FAC/EK-FAC preconditioner of ``config.preconditioner`` from the check subset, cached per model
        while its weights do not change. Under DDP pass ``reduce`` (an all-reduce sum) and ``shard=(rank, world)``:
        each rank reads its share of the subset and one reduce per data pass combines the statistics."""
        assert isinstance(self.config, CGConfig) and self.config.preconditioner is not None
        kind = self.config.preconditioner
        key = (kind, tuple(self.params), self.loss.dtype, id(self.train_loader), self.subset_examples)
        with torch.inference_mode(False), torch.enable_grad():
            return cached_preconditioner(self.model, key, lambda: build_preconditioner(
                kind, self.loss, self.params, self.check_batches(), product=self._product, reduce=reduce,
                shard=shard))

    def _hvp_subset(self, examples: int | None, seed: int) -> Iterator[Batch]:
        """A fixed seeded subset of the training data in batches of at least LiSSA's ``batch_size``."""
        least = self.config.batch_size if isinstance(self.config, LissaConfig) else 0
        for batch in subset_batches(self.train_loader, examples, seed, least):
            yield prepare_batch(batch, self.device)

    def inverse_operator(self) -> ExactInverse | LowRankInverse | None:
        """The factorised inverse for solvers that have one (exact, lowrank), else None."""
        if isinstance(self.config, ExactConfig):
            return self.exact_inverse()
        if isinstance(self.config, LowRankConfig):
            return self.low_rank_inverse()
        return None

    def _stream(self, seed: int) -> Iterator[Batch]:
        loader = self.train_loader
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"Expected `train_loader` to be a torch DataLoader for solver='lissa' (it samples minibatches from"
                f" its dataset), but got {type(loader).__name__}. Wrap the data in a DataLoader."
            )
        assert isinstance(self.config, LissaConfig)
        rows = self.products.rows_stream(self.config.batch_size, seed)
        if rows is not None:
            return rows
        return minibatch_stream(loader.dataset, self.config.batch_size, loader.collate_fn, seed, self.device)

    def lissa_scale(self) -> float:
        """The recursion's ``scale``: the configured number, or estimated once on minibatches of size B."""
        assert isinstance(self.config, LissaConfig)
        if self._scale is None:
            self._scale = self.estimate_lissa_scale() if self.config.scale == "auto" else float(self.config.scale)
        return self._scale

    def estimate_lissa_scale(self, rank: int = 0, world_size: int = 1) -> float:
        """The ``scale="auto"`` estimate (not cached), or with ``world_size`` R this rank's share of it: the
        maximum over ranks equals the single-process estimate (see ``estimate_scale``)."""
        assert isinstance(self.config, LissaConfig)
        like = next(iter(self.params.values()))
        stream = self._stream(repeat_seed(self.config.seed, -1))
        return estimate_scale(self.minibatch_hvp, stream, self.damping, self.num_params, like, (rank, world_size))

    def set_lissa_scale(self, scale: float) -> None:
        """Use ``scale`` from now on (e.g. the estimate combined over ranks)."""
        self._scale = float(scale)

    @property
    def has_lissa_scale(self) -> bool:
        return self._scale is not None

    def lissa_partial(
        self, vectors: torch.Tensor, repeat_ids: Sequence[int], on_step: Callable[[], None] | None = None,
        *, early_stop: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sum over LiSSA repeats ``repeat_ids`` of ``h_J / scale``, and their traces (for splitting repeats).

        With ``early_stop`` a repeat ends once its own estimate meets ``config.residual_tol`` (checked every
        ``config.check_every`` steps); the repeats still depend only on ``(seed, repeat)``.
        """
        assert isinstance(self.config, LissaConfig)
        config = self.config

        def stop(estimate: torch.Tensor) -> float:
            return float(self.residual(estimate, vectors).max())

        return lissa_repeats(
            self.minibatch_hvp,
            lambda r: self._stream(repeat_seed(config.seed, r)),
            vectors,
            self.damping,
            self.lissa_scale(),
            config,
            repeat_ids,
            on_step,
            stop if early_stop else None,
        )

    def apply_recovery(self, record: dict[str, Any]) -> None:
        """Set ``scale`` and damping to a recovery record's (the same record on every rank: same state)."""
        if record["damping_after"] != self.damping:
            choice = self.damping_choice()
            self._choice = dataclasses.replace(
                choice, value=record["damping_after"], rule=f"{choice.rule}; raised after a LiSSA divergence",
                warnings=(*choice.warnings, record["note"]))
            self._exact = self._low_rank = None
        self._scale = record["scale_after"]

    def lissa_solve_info(self, traces: list[torch.Tensor], x: torch.Tensor, vectors: torch.Tensor,
                         retries: Sequence[dict[str, Any]], residual: float | None = None) -> SolveInfo:
        """The record of a LiSSA solve: traces, the residual of the averaged ``x`` (``converged`` means it met
        ``residual_tol``; computed here unless given), how the damping was chosen, and the retries."""
        assert isinstance(self.config, LissaConfig)
        residual = float(self.residual(x, vectors).max()) if residual is None else residual
        info = lissa_info(self.damping, self.lissa_scale(), traces, self.config, residual=residual)
        return dataclasses.replace(info, **self._common_info(), retries=tuple(retries))

    def solve(self, vectors: torch.Tensor, on_step: Callable[[], None] | None = None) -> STest:
        """``(C + damping I)^-1 v`` for every row of ``vectors`` with the configured solver."""
        start = time.perf_counter()
        config = self.config
        if isinstance(config, ExactConfig):
            inverse = self.exact_inverse()
            w = inverse.eigenvalues
            x = inverse.solve(vectors)
            info = self.solve_info("exact", float(w[0]) + self.damping > 0, x, vectors, use_residual=False,
                              eigenvalue_min=float(w[0]), eigenvalue_max=float(w[-1]))
        elif isinstance(config, LowRankConfig):
            low_rank = self.low_rank_inverse()
            x = low_rank.solve(vectors)
            info = self.solve_info("lowrank", True, x, vectors, iterations=config.steps,
                              eigenvalue_min=float(low_rank.eigenvalues.min()),
                              eigenvalue_max=float(low_rank.eigenvalues.max()))
        elif isinstance(config, CGConfig):
            precondition = None
            if config.preconditioner is not None:
                kronecker, damping = self.preconditioner(), self.damping
                precondition = lambda r: kronecker.apply(r, damping)  # noqa: E731
            x, trace, converged, iterations = conjugate_gradient(self.damped_hvp, vectors, config, precondition)
            info = self.solve_info("cg", converged or float(trace[-1]) <= RESIDUAL_TOL, x, vectors, trace=trace[None],
                                   iterations=iterations, settings={"preconditioner": config.preconditioner})
        else:
            x, traces, retries = self._lissa_with_retries(vectors, config, on_step)
            info = self.lissa_solve_info(traces, x, vectors, retries)
        seconds = time.perf_counter() - start
        return STest(x, dataclasses.replace(info, seconds=seconds))

    def _lissa_with_retries(
        self, vectors: torch.Tensor, config: LissaConfig, on_step: Callable[[], None] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, Any]]]:
        retries: list[dict[str, Any]] = []
        while True:
            try:
                total, traces = self.lissa_partial(vectors, range(config.repeats), on_step)
                return total / config.repeats, traces, retries
            except LissaDivergenceError as error:
                if len(retries) >= config.max_retries:
                    raise divergence_error(self, error, retries) from error
                retries.append(recover_from_divergence(self, error))

    def _common_info(self) -> dict[str, Any]:
        choice = self.damping_choice()
        found = choice.spectrum
        return {
            "curvature": self.curvature,
            "damping": choice.value,
            "damping_requested": choice.requested,
            "damping_rule": choice.rule,
            "warnings": choice.warnings,
            "eigenvalue_min": None if found is None else found.bottom,
            "eigenvalue_max": None if found is None else found.top,
        }

    def solve_info(self, solver: str, converged: bool, x: torch.Tensor, vectors: torch.Tensor, *,
                   use_residual: bool = True, compute_residual: bool = True, **fields: Any) -> SolveInfo:
        """The record of a solve of ``vectors`` by ``x``: its residual on the check subset (``converged`` also
        requires it below the tolerance when ``use_residual``), the curvature and how the damping was chosen."""
        residual = float(self.residual(x, vectors).max()) if compute_residual else None
        if use_residual and residual is not None:
            converged = converged and residual <= RESIDUAL_TOL
        common = self._common_info()
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

