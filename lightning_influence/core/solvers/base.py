"""The solver protocol: one object per inverse-curvature solver, bound to one problem.

A solver answers ``(C + damping I) x = v`` for the rows ``v`` of a matrix. It owns everything that belongs to
its method (LiSSA: the scale, the divergence recovery and the retries; CG: the preconditioner; exact and low-rank:
the factorised inverse); the :class:`~lightning_influence.core.problem.InfluenceProblem` it is bound to owns the
model, the loss, the parameters, the curvature products, the damping and the residual check.

Work splits over ranks by the solver's ``split``: ``"whole"`` (every rank solves every point: deterministic and
cheap once factorised), ``"points"`` (rank r solves the points r, r + R, ...), ``"repeats"`` (rank r runs the
stochastic repeats r, r + R, ...). The ranks come in as a :class:`Ranks` (the distributed layer adapts its
collectives to it), so one solve serves one process and many and the core never imports ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch

from lightning_influence.core.curvature.preconditioner import (
    KroneckerPreconditioner,
    build_preconditioner,
    cached_preconditioner,
)
from lightning_influence.results import STest, TrustWarning

if TYPE_CHECKING:
    from lightning_influence.core.problem import InfluenceProblem

T = TypeVar("T")
OnStep = Callable[[], None]
SPLITS = ("whole", "points", "repeats")


class Ranks(Protocol):
    """The processes that share a solve: this one's ``rank`` of ``world_size``, a sum over all of them, and a
    gather that runs ``compute`` here and returns every rank's ``share`` of its result (raising on every rank
    when one failed, so no rank waits forever on a collective the failed one never reaches)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather(self, compute: Callable[[], T], share: Callable[[T], Any] = ...) -> tuple[T, list[Any]]: ...


class OneProcess:
    """:class:`Ranks` of a single process."""

    rank = 0
    world_size = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, compute: Callable[[], T], share: Callable[[T], Any] = lambda value: value) -> tuple[T, list[Any]]:
        result = compute()
        return result, [share(result)]


ONE_PROCESS = OneProcess()


class Solver:
    """Base class of the solvers; a subclass sets ``name`` and ``split`` and implements :meth:`solve`.

    Attributes:
        name: the name reports and ``solver=`` use (``"lissa"``, ``"cg"``, ...).
        split: how the work splits over ranks (one of :data:`SPLITS`).
        stores_jacobian: the solver takes many curvature products over the same data, so the stored output
            Jacobian (:mod:`~lightning_influence.core.curvature.jacobian`) pays for itself.
        factorised: the solver holds a factorised inverse, so :meth:`quadratic_forms` answers without a solve.
    """

    name: ClassVar[str] = ""
    split: ClassVar[str] = "whole"
    stores_jacobian: ClassVar[bool] = False
    factorised: ClassVar[bool] = False

    def __init__(self, config: Any, problem: InfluenceProblem) -> None:
        self.config, self.problem = config, problem

    @property
    def hvp_method(self) -> str:
        """How Hessian-vector products are taken (``"double_backward"`` unless the config says otherwise)."""
        return "double_backward"

    @property
    def check_batch_size(self) -> int:
        """Least batch size of the check subset's batches (LiSSA: its own minibatch size; else no least)."""
        return 0

    def kronecker(self, kind: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  shard: tuple[int, int] = (0, 1)) -> KroneckerPreconditioner:
        """The K-FAC/EK-FAC approximation ``kind`` of the Gauss-Newton curvature from the check subset, cached per
        model while its weights do not change. Under DDP ``reduce`` (a sum over ranks) and ``shard=(rank, world)``:
        each rank reads its share of the subset and one reduce per data pass combines the statistics."""
        problem = self.problem
        key = (kind, tuple(problem.params), problem.loss.dtype, id(problem.train_loader), problem.subset_examples)
        with torch.inference_mode(False), torch.enable_grad():
            return cached_preconditioner(problem.model, key, lambda: build_preconditioner(
                kind, problem.loss, problem.params, problem.check_batches(), product=problem.products.autograd,
                reduce=reduce, shard=shard))

    def prepare(self, ranks: Ranks = ONE_PROCESS) -> None:
        """Build what every later solve reuses (a preconditioner, a scale), its work split over ``ranks``."""

    def solve(self, vectors: torch.Tensor, on_step: OnStep | None = None, ranks: Ranks = ONE_PROCESS) -> STest:
        """``(C + damping I)^-1 v`` for each row of ``vectors`` (the same answer on every rank)."""
        raise NotImplementedError

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor | None:
        """``g^T (C + damping I)^-1 g`` per row when the solver holds a factorised inverse (self-influence without a
        solve per example), else None."""
        return None

    def exact_spectrum(self) -> tuple[float, float] | None:
        """``(lambda_min, lambda_max)`` of the curvature when the solver computes it exactly anyway, else None."""
        return None

    def top_eigenvalue(self) -> float | None:
        """The top eigenvalue the method must stay below (LiSSA's minibatch curvature plus damping), else None."""
        return None

    def trust_warnings(self, top: float | None) -> list[TrustWarning]:
        """Settings of this solver that make its answers fragile (``top``: :meth:`top_eigenvalue`)."""
        return []

    @classmethod
    def progress_steps(cls, config: Any, ranks: Ranks = ONE_PROCESS) -> int:
        """Steps this rank's part of a solve with ``config`` reports through ``on_step`` (0: no step-wise progress),
        known before the solve (for a progress bar's total)."""
        return 0
