"""``correct_errors``: influence-guided fine-tuning through the user's Lightning ``Trainer``.

The optimizer steps run inside ``trainer.fit`` on a thin wrapper module around the user's model, so the
trainer's devices, strategy (DDP included) and precision apply. The choice of examples, the evaluation and
the report are Lightning-free (:mod:`lightning_influence.analysis.correction`); this module only wires them in.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.loops import _TrainingEpochLoop
from lightning.pytorch.loops.fit_loop import _FitLoop
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_influence.analysis.correction import CorrectionRun, allowed_indices, fetch, round_generator, sample_anchors
from lightning_influence.analysis.correction_lr import search_lr
from lightning_influence.analysis.correction_report import in_dataset_terms
from lightning_influence.callbacks._legacy import legacy_correction_candidates
from lightning_influence.callbacks._trainer import (
    Writers,
    collectives_for,
    indexed,
    resolve_loss_fn,
    shared_log_dir,
    train_data,
    val_data,
)
from lightning_influence.callbacks.progress import bar_kind, kind_task
from lightning_influence.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CURVATURE,
    DEFAULT_DAMPING,
    DEFAULT_SCORING,
    DEFAULT_SOLVER,
    CorrectionConfig,
    ProblemConfig,
    SolverConfig,
    check_num_candidates,
    resolve_problem,
    solver_name,
)
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.params import model_device
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.reporting.correction import (
    correction_markdown,
    write_correction_scalars,
    write_correction_summary,
)
from lightning_influence.reporting.files import write_json_atomic
from lightning_influence.results import CorrectionReport

DataLike = Union[Dataset, DataLoader]
OptimizerLike = Union[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], torch.optim.Optimizer]


def correct_errors(  # long: 28 keyword arguments and their 40-line docstring; the body is ~40 lines
    trainer: pl.Trainer,
    model: nn.Module,
    anchors: DataLike,
    *,
    train_dataloaders: Optional[DataLike] = None,
    datamodule: Optional[pl.LightningDataModule] = None,
    heldout: Optional[DataLike] = None,
    val_dataloaders: Optional[DataLike] = None,
    iterations: int = CorrectionConfig.iterations,
    anchors_per_iteration: int = CorrectionConfig.anchors_per_iteration,
    examples_per_iteration: int = CorrectionConfig.examples_per_iteration,
    steps_per_iteration: int = CorrectionConfig.steps_per_iteration,
    lr: Union[float, str] = CorrectionConfig.lr,
    selection: str = CorrectionConfig.selection,
    optimizer: OptimizerLike = CorrectionConfig.optimizer,
    num_candidates: Optional[int] = None,
    train_indices: Optional[Sequence[int]] = None,
    loss_fn: Union[LossFn, str, None] = None,
    solver: Union[str, SolverConfig] = DEFAULT_SOLVER,
    damping: Union[float, str] = DEFAULT_DAMPING,
    curvature: str = DEFAULT_CURVATURE,
    solver_options: Optional[Mapping[str, Any]] = None,
    scoring: str = DEFAULT_SCORING,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    name: Optional[str] = None,
    verbose: bool = True,
    candidates: Optional[Union[int, Sequence[int]]] = None,
    problem: Optional[ProblemConfig] = None,
    guard: Optional[DataLike] = None,
    guard_per_iteration: int = CorrectionConfig.guard_per_iteration,
    reuse_s_test: bool = CorrectionConfig.reuse_s_test,
    project_replay: bool = CorrectionConfig.project_replay,
    protect_per_step: int = CorrectionConfig.protect_per_step,
) -> CorrectionReport:
    r"""Fine-tune ``model`` on the training examples most helpful to a slice it gets wrong (FastIF Sec. 6.3).

    Each of ``iterations`` rounds samples ``anchors_per_iteration`` anchors ``A`` from ``anchors``, solves
    ``s = (H + damping I)^-1 grad L_A`` for their mean loss, scores every candidate training example by
    ``I(z, A) = -s . grad L(z)`` (negative = **helpful**, positive = harmful) and makes
    ``steps_per_iteration`` optimizer steps. By default (``selection="anchors+helpful"``) each step's loss is
    the anchors' mean loss plus the mean loss of the ``examples_per_iteration`` most helpful training examples,
    among those not raising the loss of a guard (validation examples outside the slice); ``"helpful"`` steps on
    the helpful examples alone (FastIF, with ``guard_per_iteration=0``), ``"weighted"`` weights their losses by
    their influence, ``"anchors+protect"`` adds the examples most helpful to the guard among those not harmful
    to the anchors. ``selection="anchors" | "anchors+random" | "random" | "harmful"`` runs the baselines through
    the same code and budget (``"anchors"`` fine-tunes on the round's sampled anchors, ``"anchors+random"`` on
    them plus random training examples). The steps run in
    ``trainer.fit`` (the trainer's devices and strategy apply; its own fit state, callbacks and optimizers are
    restored afterwards, and its callbacks other than the progress bar are off during the run).

    Args:
        trainer: the Trainer whose devices, strategy, precision and logger to use (e.g. the one that trained
            ``model``).
        model: the model to correct, changed in place (a LightningModule or any ``nn.Module``).
        anchors: the slice to fix (a map-style dataset or a DataLoader over one), e.g. misclassified
            validation examples of the slice.
        train_dataloaders, datamodule: the training data to choose from (default: the trainer's last
            training DataLoader). Only the dataset and collate function are used; indices refer to the dataset.
        heldout: data evaluated before and after every round as ``"heldout"`` (e.g. the held-out part of the
            slice); ``val_dataloaders`` (default: the datamodule's or the trainer's) is evaluated as ``"val"``,
            ``anchors`` as ``"anchors"``.
        iterations, anchors_per_iteration, examples_per_iteration, steps_per_iteration: the budget.
        lr: learning rate of the fresh optimizer, or ``"auto"``: the largest lr whose one step on the anchors'
            mean loss passes Armijo's sufficient-decrease test (a line search from the trained weights; the report's
            settings keep the trials). With an ``Optimizer`` or a factory, ``"auto"`` keeps its own lr.
        selection: ``"anchors+helpful"``, ``"helpful"``, ``"weighted"``, ``"anchors+protect"``, ``"influence"``
            (the anchors, stepped along ``(H + damping I)^-1 grad L_A`` scaled to their gradient step's first-order
            decrease), ``"constrained"`` (their gradient step, made to raise no protect example's loss to first
            order and scaled back to that decrease), ``"anchors"``, ``"anchors+random"``, ``"random"``, ``"harmful"``.
        optimizer: ``"sgd"`` or ``"adam"`` (fresh, with ``lr``), a factory ``params -> Optimizer``, or an existing
            ``Optimizer`` over ``model``'s parameters to continue (its state is then updated).
        num_candidates: FastIF's candidate preselection: each round scores only the union of the
            ``num_candidates`` training examples nearest to each sampled anchor (the largest ``|<G_anchor, G_i>|``
            of last-layer loss gradients); ``"random"`` still draws from all allowed examples.
        train_indices: training indices to choose from (default: all).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses or its import path (default:
            ``model.per_example_loss(batch)``).
        solver, damping, curvature, solver_options: the s_test solve (see :func:`lightning_influence.s_test`);
            ``solver`` may be a config object such as ``LissaConfig(depth=200)``; ``damping="auto"`` (default) is
            chosen from the curvature's spectrum at every round.
        scoring, chunk_size: how candidates are scored.
        seed: seeds anchor sampling and random selection.
        name: TensorBoard tags go under ``influence/correct/{name}/`` (default: ``selection``).
        verbose: print the before/after table on rank zero.
        candidates: deprecated: an int is ``num_candidates``, a sequence ``train_indices``.
        problem: the s_test problem as one :class:`~lightning_influence.ProblemConfig` (solver, curvature, damping,
            ``parameters``, ...) instead of ``solver``, ``damping``, ``curvature`` and ``solver_options``.
        guard, guard_per_iteration: examples outside the slice to protect (default: the validation data); each
            round samples ``guard_per_iteration`` of those the model got right before the run, and the helpful
            selections skip training examples whose influence would raise their mean loss (0: no guard).
        reuse_s_test: solve s_test in the first round only and reuse it in later rounds (the scores stay fresh).
        project_replay: for the ``"anchors+..."`` selections, weight the anchors' loss in each step so that the
            chosen examples' gradient cannot slow the anchors (its part opposing the anchors' gradient is
            cancelled); the weights are in each round's ``anchor_weights``.
        protect_per_step: for the influence selections with a guard, before each step, the ``protect_per_step``
            guard examples (right before the run and still right) with the largest loss form a protect sample, and
            the step loses its component that would raise their mean loss to first order (``"constrained"``: any of
            their losses); ``protect_cosines`` keeps the cosine before it (``"constrained"``: the smallest) (0: off).

    Returns:
        A :class:`~lightning_influence.CorrectionReport`: metrics before, and per round the anchors,
        the chosen indices (with their influence), the anchors' loss before/after and the metrics.
    """
    num_candidates, train_indices = legacy_correction_candidates(candidates, num_candidates, train_indices)
    setup = resolve_problem(problem, solver, damping, curvature, dict(solver_options or {}))
    settings = CorrectionConfig(
        iterations=iterations, anchors_per_iteration=anchors_per_iteration,
        examples_per_iteration=examples_per_iteration, steps_per_iteration=steps_per_iteration, selection=selection,
        seed=seed, scoring=scoring, chunk_size=chunk_size, num_candidates=num_candidates, curvature=setup.curvature,
        lr=lr, optimizer=optimizer if isinstance(optimizer, str) else "sgd", guard_per_iteration=guard_per_iteration,
        reuse_s_test=reuse_s_test, project_replay=project_replay, protect_per_step=protect_per_step)
    loss = resolve_loss_fn(model, loss_fn, who="correct_errors")
    train = train_data(trainer, None, chunk_size, loader=train_dataloaders if train_dataloaders is not None
                       else datamodule.train_dataloader() if datamodule is not None else None)
    check_num_candidates(num_candidates, len(train))
    anchor_data = indexed(anchors, "anchors", chunk_size)
    eval_sets = {"anchors": anchor_data}
    if heldout is not None:
        eval_sets["heldout"] = indexed(heldout, "heldout", chunk_size)
    val = val_data(trainer, chunk_size, loader=val_dataloaders, datamodule=datamodule, required=False)
    if val is not None:
        eval_sets["val"] = val
    guard_data = (indexed(guard, "guard", chunk_size) if guard is not None else val) if guard_per_iteration else None
    chosen_lr, lr_search = _resolve_lr(model, loss, anchor_data, settings, optimizer)
    as_user_reads = functools.partial(in_dataset_terms, anchors=_subset_indices(anchors),
                                         heldout=_subset_indices(heldout))
    description = {"iterations": iterations, "anchors_per_iteration": anchors_per_iteration,
                   "examples_per_iteration": examples_per_iteration, "steps_per_iteration": steps_per_iteration,
                   "lr": chosen_lr, "lr_requested": lr, "lr_search": lr_search,
                   "guard_per_iteration": guard_per_iteration if guard_data is not None else 0,
                   "guard": ("given" if guard is not None else "validation data") if guard_data is not None else None,
                   "reuse_s_test": reuse_s_test, "project_replay": project_replay,
                   "protect_per_step": protect_per_step if guard_data is not None else 0,
                   "optimizer": optimizer if isinstance(optimizer, str) else type(optimizer).__name__,
                   "solver": solver_name(setup.solver_config), "damping": setup.damping,
                   "damping_requested": setup.damping, "curvature": setup.curvature,
                   "solver_options": dict(solver_options or {}), "seed": seed, "train_size": len(train)}
    run = CorrectionRun(loss, train, anchor_data, eval_sets, allowed_indices(train_indices, len(train)), settings,
                        setup, description, guard_data)
    tag = f"influence/correct/{name or selection}"
    log_dir = shared_log_dir(trainer)  # every rank calls it: a broadcast under DDP
    report_path = _report_path(log_dir, tag)
    if iterations == 0:
        run.start(model, model_device(model), SingleProcess())
        report = as_user_reads(run.report())
        if trainer.is_global_zero:
            _write_outputs(trainer, log_dir, tag, report, report_path, verbose)
        return report
    module = _CorrectionModule(model, run, _make_optimizer(optimizer, chosen_lr), tag, log_dir, verbose, as_user_reads,
                               bar_kind(trainer))
    with _isolated_fit(trainer, iterations * steps_per_iteration):
        trainer.fit(module, train_dataloaders=DataLoader(_StepIds(iterations * steps_per_iteration), batch_size=None))
    if run.rounds:
        return as_user_reads(run.report())
    return CorrectionReport.from_dict(_read_json(report_path))  # the run happened in spawned processes


class _StepIds(IterableDataset):
    """0, 1, ..., n-1: one item per optimizer step (the steps' examples come from the run, not the loader)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


class _CorrectionModule(pl.LightningModule):
    """Wraps the user's model for one correction run: loss of the chosen examples, rounds in the batch hooks."""

    def __init__(self, model: nn.Module, run: CorrectionRun, make_optimizer: Callable[[Iterable[nn.Parameter]], Any],
                 tag: str, log_dir: Path, verbose: bool,
                 finish: Optional[Callable[[CorrectionReport], CorrectionReport]] = None,
                 progress: Optional[str] = None) -> None:
        super().__init__()
        self.model = model
        self.run = run
        self.finish = finish
        self.progress = progress  # how the trainer shows progress (callbacks.progress.bar_kind), or None
        self._rounds: Optional[contextlib.ExitStack] = None
        self._advance: Callable[[int], None] = _no_progress  # picklable (spawn-based strategies)
        self.make_optimizer = make_optimizer
        self.tag, self.log_dir, self.verbose = tag, log_dir, verbose  # log_dir resolved once, on every rank

    @property
    def report_path(self) -> Path:
        return _report_path(self.log_dir, self.tag)

    def _collectives(self) -> Collectives:
        return collectives_for(self.trainer)

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self.model.parameters())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.run.step_loss(self.model)

    def on_train_start(self) -> None:
        self._rounds = contextlib.ExitStack()
        if self.trainer.is_global_zero:  # each round: s_test, scoring, its steps and the evaluation
            self._advance = self._rounds.enter_context(kind_task(
                self.progress, "correct: rounds", self.run.settings.iterations, from_open=True))
        self.run.start(self.model, self.device, self._collectives())
        if self.trainer.is_global_zero:
            write_correction_scalars(_WRITERS.get(self.trainer, self.log_dir), self.tag, 0, self.run.before, None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.run.settings.steps_per_iteration == 0:
            self.run.begin_round(self.model, self.device, self._collectives())
        self.run.prepare_step(self.model)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.run.protect_step(self.model, self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.run.settings.steps_per_iteration == 0:
            record = self.run.end_round(self.model, self.device, self._collectives())
            self._advance(1)
            if self.trainer.is_global_zero:
                write_correction_scalars(_WRITERS.get(self.trainer, self.log_dir), self.tag, record.iteration, record.metrics,
                                         record)

    def on_train_end(self) -> None:
        if self._rounds is not None:
            self._rounds.close()
            self._rounds, self._advance = None, _no_progress
        if self.trainer.is_global_zero:
            report = self.run.report()
            _write_outputs(self.trainer, self.log_dir, self.tag, self.finish(report) if self.finish else report,
                           self.report_path, self.verbose)


# Why private Lightning API here (Lightning 2.6): `correct_errors` runs on the user's Trainer, so that the rounds use
# its strategy (DDP process group, devices, precision) and logger, after that Trainer has already fit. Lightning
# has no public way to run a bounded second fit on such a Trainer: `max_steps`/`max_epochs` are read-only
# properties of the Trainer, and its `fit_loop` remembers the finished fit (a second `fit` stops at once). A
# fresh Trainer would need a second process group under DDP. So a fresh `_FitLoop`/`_TrainingEpochLoop` pair
# (the loops `Trainer.__init__` builds) replaces the fit loop for one fit, and everything is put back after it.
@contextlib.contextmanager
def _isolated_fit(trainer: pl.Trainer, steps: int) -> Iterator[None]:
    """Run a fit of ``steps`` steps on ``trainer`` and put its loops, callbacks, optimizers and module back."""
    strategy = trainer.strategy
    saved = (trainer.fit_loop, trainer.callbacks, strategy.optimizers,  # type: ignore[attr-defined]
             strategy.lr_scheduler_configs,
             strategy.lightning_module, trainer.should_stop)
    fit_loop = _FitLoop(trainer, min_epochs=0, max_epochs=1)  # one epoch of `steps` items
    fit_loop.epoch_loop = _TrainingEpochLoop(trainer, min_steps=None, max_steps=steps)
    trainer.fit_loop = fit_loop
    # Trainer.callbacks is set by Lightning's connector: invisible to type checkers
    # no callbacks: the run shows its rounds itself (an epoch bar of slow steps read "Epoch 0/-2 ... 0.00it/s")
    trainer.callbacks = []  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
            yield
    finally:
        trainer.fit_loop, trainer.callbacks = saved[0], saved[1]  # type: ignore[attr-defined]
        strategy.optimizers, strategy.lr_scheduler_configs = saved[2], saved[3]
        if saved[4] is not None:
            strategy.connect(saved[4])
        trainer.should_stop = saved[5]


def _resolve_lr(model: nn.Module, loss: LossFn, anchors: IndexedData, settings: CorrectionConfig,
                optimizer: OptimizerLike) -> tuple[Optional[float], Optional[list[list[float]]]]:
    """The run's lr and, for ``lr="auto"``, the line search's trials ``[lr, anchor loss after one step]``: on the
    first round's anchors (the same on every rank), from the trained weights, with the run's fresh optimizer."""
    if settings.lr != "auto":
        return float(settings.lr), None
    if isinstance(optimizer, torch.optim.Optimizer):  # its own lr (the model's optimizer state)
        return float(optimizer.param_groups[0]["lr"]), None
    if not isinstance(optimizer, str):  # a factory brings its own lr
        return None, None
    ids = sample_anchors(len(anchors), settings.anchors_per_iteration, round_generator(settings.seed, 1))
    lr, trials = search_lr(model, loss, fetch(anchors, ids, model_device(model)), len(ids), settings.optimizer)
    return lr, [[a, b] for a, b in trials]


def _make_optimizer(optimizer: OptimizerLike, lr: Optional[float]) -> Callable[[Iterable[nn.Parameter]], Any]:
    """A picklable ``params -> Optimizer`` factory (spawn-based strategies send it to new processes)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return functools.partial(_existing_optimizer, optimizer)
    if optimizer in ("sgd", "adam") and lr is not None:
        return functools.partial(torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam, lr=lr)
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer
    raise ValueError(
        f"Expected `optimizer` to be 'sgd', 'adam', a callable params -> Optimizer or an Optimizer, but got {optimizer!r}."
    )


def _no_progress(n: int = 1) -> None:
    """Progress sink of the ranks (and runs) that show none."""


def _subset_indices(data: Optional[DataLike]) -> Optional[list[int]]:
    """The dataset indices of a ``Subset`` (or a DataLoader over one), else None."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return [int(i) for i in dataset.indices] if isinstance(dataset, Subset) else None


def _existing_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return optimizer


def _report_path(log_dir: Path, tag: str) -> Path:
    return log_dir / "influence" / f"correct_{tag.rsplit('/', 1)[-1]}.json"


#: Writers of runs without a TensorBoardLogger (closed after each run's outputs are written).
_WRITERS = Writers()


def _write_outputs(trainer: pl.Trainer, log_dir: Path, tag: str, report: CorrectionReport, path: Path,
                   verbose: bool) -> None:
    writer = _WRITERS.get(trainer, log_dir)
    write_correction_summary(writer, tag, report)
    writer.flush()
    _WRITERS.close()
    write_json_atomic(path, report.to_dict())
    if verbose:
        print(correction_markdown(report))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    with open(path) as handle:
        return json.load(handle)

