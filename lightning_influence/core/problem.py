"""One influence problem: a model, its per-example loss, the training data, damping and a solver.

Holds what several calls share (the trainable parameters, the cached exact inverse, the LiSSA scale) and
exposes each step of the data flow once: test gradients -> s_test -> scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_influence.config import CGConfig, ExactConfig, LissaConfig, LowRankConfig, SolverConfig
from lightning_influence.core.batching import Batch, prepare_batch
from lightning_influence.core.eigen import lanczos
from lightning_influence.core.hvp import batch_hvp, dataset_hvp, hessian
from lightning_influence.core.inverse import ExactInverse, LowRankInverse, conjugate_gradient
from lightning_influence.core.lissa import estimate_scale, lissa_repeats, minibatch_stream, repeat_seed
from lightning_influence.core.losses import FunctionalLoss, LossFn
from lightning_influence.core.params import (
    ParameterSelector,
    model_device,
    num_parameters,
    trainable_parameters,
)
from lightning_influence.core.per_example import PerExampleEngine
from lightning_influence.core.scoring import iter_scores
from lightning_influence.results import SolveInfo, STest


class InfluenceProblem:
    """Influence of the training data of ``train_loader`` on test points, for ``model`` as it is now.

    Call inside :func:`~lightning_influence.core.params.analysis_mode` (the public functions do).

    Args:
        model: the trained module; only its trainable parameters count.
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses, without the L2 term.
        train_loader: the training data; iterated in its own order for scoring, its dataset sampled by LiSSA.
        damping: lambda added to H (the training L2 strength / weight decay is a natural choice).
        config: the solver configuration.
        parameters: analyse only these trainable parameters (module-name prefixes or globs, or a predicate
            ``(name, param) -> bool``; see :func:`~lightning_influence.core.params.select_parameters`).
        dtype: the analysis dtype (default float32, float64 for a float64 model); low-precision weights are upcast.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, train_loader: Iterable[Batch], damping: float, config: SolverConfig,
        *, parameters: ParameterSelector = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.model = model
        self.loss = FunctionalLoss(model, loss_fn, dtype)
        self.params = trainable_parameters(model, parameters, self.loss.dtype)
        self._engine: PerExampleEngine | None = None
        self.num_params = num_parameters(self.params)
        self.device = model_device(model)
        self.train_loader = train_loader
        self.damping = damping
        self.config = config
        self._exact: ExactInverse | None = None
        self._low_rank: LowRankInverse | None = None
        self._scale: float | None = None

    # -- gradients and HVPs -------------------------------------------------------------------------------
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
        method = self.config.hvp_method if isinstance(self.config, LissaConfig) else "double_backward"
        return batch_hvp(self.loss, self.params, batch, vectors, method)

    def damped_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + damping I) V`` over the whole training set."""
        return dataset_hvp(self.loss, self.params, self.train_batches(), vectors) + self.damping * vectors

    # -- solvers ------------------------------------------------------------------------------------------
    def exact_inverse(self) -> ExactInverse:
        if self._exact is None:
            limit = self.config.max_parameters if isinstance(self.config, ExactConfig) else ExactConfig().max_parameters
            if self.num_params > limit:
                raise ValueError(
                    f"Expected at most {limit} trainable parameters for solver='exact' (it builds the"
                    f" {self.num_params} x {self.num_params} Hessian), but got {self.num_params}. Use solver='lissa'"
                    " or 'cg'."
                )
            matrix = hessian(self.loss, self.params, self.train_batches())
            self._exact = ExactInverse.from_hessian(matrix, self.damping)
        return self._exact

    def low_rank_inverse(self) -> LowRankInverse:
        """Top ``rank`` eigenpairs of H by Lanczos (HVPs over a fixed subset of the training data), cached."""
        if self._low_rank is None:
            assert isinstance(self.config, LowRankConfig)
            config = self.config
            batches = list(self._hvp_subset(config.hvp_examples, config.seed))
            like = next(iter(self.params.values()))
            generator = torch.Generator().manual_seed(config.seed)
            values, vectors = lanczos(
                lambda v: dataset_hvp(self.loss, self.params, batches, v), self.num_params, config.steps,
                generator=generator, like=like,
            )
            keep = values.argsort(descending=True)[: config.rank]
            self._low_rank = LowRankInverse(values[keep], vectors[:, keep], self.damping, config.residual)
        return self._low_rank

    def _hvp_subset(self, examples: int | None, seed: int) -> Iterator[Batch]:
        loader = self.train_loader
        if examples is None or not isinstance(loader, DataLoader) or examples >= len(loader.dataset):  # type: ignore[arg-type]
            yield from self.train_batches()
            return
        chosen = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(seed))[:examples]  # type: ignore[arg-type]
        subset = DataLoader(Subset(loader.dataset, chosen.tolist()), batch_size=loader.batch_size or 256,
                            collate_fn=loader.collate_fn)
        for batch in subset:
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
        return minibatch_stream(loader.dataset, self.config.batch_size, loader.collate_fn, seed, self.device)

    def lissa_scale(self) -> float:
        """The recursion's ``scale``: the configured number, or estimated once on minibatches of size B."""
        assert isinstance(self.config, LissaConfig)
        if self._scale is None:
            if self.config.scale == "auto":
                like = next(iter(self.params.values()))
                stream = self._stream(repeat_seed(self.config.seed, -1))
                self._scale = estimate_scale(self.minibatch_hvp, stream, self.damping, self.num_params, like)
            else:
                self._scale = float(self.config.scale)
        return self._scale

    def lissa_partial(
        self, vectors: torch.Tensor, repeat_ids: Sequence[int], on_step: Callable[[], None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sum over LiSSA repeats ``repeat_ids`` of ``h_J / scale``, and their traces (for splitting repeats)."""
        assert isinstance(self.config, LissaConfig)
        seed = self.config.seed
        return lissa_repeats(
            self.minibatch_hvp,
            lambda r: self._stream(repeat_seed(seed, r)),
            vectors,
            self.damping,
            self.lissa_scale(),
            self.config,
            repeat_ids,
            on_step,
        )

    def solve(self, vectors: torch.Tensor, on_step: Callable[[], None] | None = None) -> STest:
        """``(H + damping I)^-1 v`` for every row of ``vectors`` with the configured solver."""
        start = time.perf_counter()
        config = self.config
        if isinstance(config, ExactConfig):
            inverse = self.exact_inverse()
            w = inverse.eigenvalues
            x = inverse.solve(vectors)
            info = SolveInfo(
                "exact", self.damping, converged=float(w[0]) + self.damping > 0, seconds=0.0,
                eigenvalue_min=float(w[0]), eigenvalue_max=float(w[-1]),
            )
        elif isinstance(config, LowRankConfig):
            low_rank = self.low_rank_inverse()
            x = low_rank.solve(vectors)
            info = SolveInfo(
                "lowrank", self.damping, converged=True, seconds=0.0, eigenvalue_min=float(low_rank.eigenvalues.min()),
                eigenvalue_max=float(low_rank.eigenvalues.max()), iterations=config.steps,
            )
        elif isinstance(config, CGConfig):
            x, trace, converged, iterations = conjugate_gradient(self.damped_hvp, vectors, config)
            info = SolveInfo("cg", self.damping, converged=converged, seconds=0.0, trace=trace[None], iterations=iterations)
        else:
            total, traces = self.lissa_partial(vectors, range(config.repeats), on_step)
            x = total / config.repeats
            info = lissa_info(self.damping, self.lissa_scale(), traces, config)
        seconds = time.perf_counter() - start
        return STest(x, replace(info, seconds=seconds))

    # -- scoring ------------------------------------------------------------------------------------------
    def scores(self, s_vectors: torch.Tensor, batches: Iterable[Batch] | None = None, method: str = "auto",
               chunk_size: int = 256) -> Iterator[torch.Tensor]:
        """``[k, b]`` blocks of ``-s . grad L(z)`` over ``batches`` (default: the training loader), in order."""
        source = self.train_loader if batches is None else batches
        return iter_scores(self.loss, self.params, source, s_vectors, method, chunk_size, engine=self.per_example)


def lissa_info(damping: float, scale: float, traces: list[torch.Tensor], config: LissaConfig) -> SolveInfo:
    """Summarise LiSSA repeats: padded trace matrix ``[repeats, steps]`` and a convergence verdict."""
    steps = max(len(t) for t in traces)
    trace = torch.full((len(traces), steps), float("nan"))
    for row, t in zip(trace, traces):
        row[: len(t)] = t
    final = torch.stack([t[-1] for t in traces])
    converged = bool((final < max(config.tol, 0.05)).all())
    return SolveInfo("lissa", damping, converged=converged, seconds=0.0, scale=scale, trace=trace, iterations=steps)
