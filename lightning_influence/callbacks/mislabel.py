"""MislabelCallback: likely mislabelled training examples, from training signals recorded during the run."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.callbacks._mislabel import MislabelAnalysis, mislabel_count
from lightning_influence.callbacks._trainer import (
    check_picklable,
    import_loss_fn,
    resolve_loss_fn,
    shared_log_dir,
    train_data,
    weight_decay,
)
from lightning_influence.callbacks.base import AnalysisCallback, last_epoch, should_skip_analysis
from lightning_influence.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SIGNAL_CHECKPOINTS,
    MISLABEL_SHOWN,
    ProblemConfig,
    resolve_problem,
)
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.batching import describe_batch
from lightning_influence.reporting.publish import publish_mislabel
from lightning_influence.results import MislabelReport


class MislabelCallback(AnalysisCallback):
    r"""Find the training examples whose labels are most likely wrong, when fit ends (and every N epochs).

    During training it records per-example training signals (loss, margin, EL2N at a few checkpoints); at the
    end it ranks the training set by them, beside the self-influence ``I(z, z)`` of every example, and writes the
    ``candidates`` most suspicious ones under ``influence/mislabel/`` in TensorBoard and to
    ``<log_dir>/influence/mislabel_epoch=N.json`` (docs/mislabel.md). It replaces the deprecated mislabel
    arguments of ``InfluenceCallback`` (``mislabel_candidates=...``): the same analysis in a callback of its own.

    Args:
        candidates: how many candidates to report (``"all"``: rank the whole training set in the JSON).
        loss_fn: ``(module, batch) -> Tensor[B]`` per-example losses or its import path (default: the module's
            ``per_example_loss(batch)``).
        rank: eigenpairs of the curvature (Lanczos) behind the self-influence; the rest gets the damping alone.
        training_signals: record the signals during training (False: rank by self-influence alone).
        signal_checkpoints: how many epochs record the signals.
        signals_outputs_fn: ``(module, batch) -> (logits [B, C], labels [B])`` for the recording (default:
            ``module(batch[0]), batch[1]``).
        every_n_epochs: also report at the end of every N-th training epoch (0: only when fit ends).
        problem: the influence problem of the self-influence (curvature, damping, ``parameters``, ...) as a
            :class:`~lightning_influence.ProblemConfig`; its solver is this callback's low-rank inverse.
        train_dataset: the training data to rank (default: the trainer's train dataloader's dataset).
        train_dataloader: a loader whose dataset and collate function to use instead.
        strict: re-raise a failed analysis instead of warning and letting training go on.
        verbose: print the candidates table on rank zero.
        example_formatter: ``example -> str`` shown beside each candidate (e.g. decoded text).

    Example::

        trainer = Trainer(callbacks=[MislabelCallback(candidates=64)])
    """

    def __init__(  # long: one line per argument (LightningCLI reads the flat signature)
        self,
        candidates: Union[int, str] = MISLABEL_SHOWN,
        loss_fn: Union[LossFn, str, None] = None,
        rank: int = 64,
        training_signals: bool = True,
        signal_checkpoints: int = DEFAULT_SIGNAL_CHECKPOINTS,
        signals_outputs_fn: Optional[Callable[..., Any]] = None,
        every_n_epochs: int = 0,
        problem: Optional[ProblemConfig] = None,
        train_dataset: Optional[Dataset] = None,
        train_dataloader: Optional[DataLoader] = None,
        strict: bool = False,
        verbose: bool = True,
        example_formatter: Optional[Callable[[Any], str]] = None,
    ) -> None:
        super().__init__(strict)
        try:
            count = mislabel_count(candidates)
            if count == 0:
                raise ValueError("Expected `candidates` to be a positive int or 'all', but got 0.")
            if not (isinstance(every_n_epochs, int) and every_n_epochs >= 0):
                raise ValueError(f"Expected `every_n_epochs` to be an int >= 0, but got {every_n_epochs!r}.")
            self.analysis = MislabelAnalysis(count, rank, training_signals, signal_checkpoints, signals_outputs_fn)
            self.problem = resolve_problem(problem)
        except (ImportError, TypeError, ValueError) as err:
            raise MisconfigurationException(str(err)) from err
        self.candidates, self.every_n_epochs, self.verbose = candidates, every_n_epochs, verbose
        self.loss_fn = import_loss_fn(loss_fn) if isinstance(loss_fn, str) else loss_fn
        self.train_dataset, self.train_dataloader = train_dataset, train_dataloader
        self._describe = functools.partial(describe_batch, example_formatter=example_formatter)
        self.reported: list[dict[str, Any]] = []  # {"epoch", "global_step"} per report
        self.last_report: Optional[MislabelReport] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(candidates=self.candidates)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_picklable(resolve_loss_fn(pl_module, self.loss_fn), trainer)  # fail before training starts
        if trainer.is_global_zero:
            self._check_writable(trainer)
        self.analysis.setup(trainer, pl_module, stage)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.analysis.on_train_epoch_end(trainer, pl_module, lambda: self._train(trainer, pl_module), self.strict)
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0 and not should_skip_analysis(trainer):
            self._report(trainer, pl_module, epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.analysis.on_train_end(trainer, pl_module, lambda: self._train(trainer, pl_module), self.strict)
        done = any(r["global_step"] == trainer.global_step for r in self.reported)
        if not done and not should_skip_analysis(trainer):
            self._report(trainer, pl_module, last_epoch(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._writers.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reported": [dict(r) for r in self.reported], "signals": self.analysis.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = [dict(r) for r in state_dict.get("reported", [])]
        self.analysis.load_state_dict(state_dict.get("signals") or {})

    # -- the report ----------------------------------------------------------------------------------------
    def _train(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return train_data(trainer, pl_module, DEFAULT_CHUNK_SIZE, dataset=self.train_dataset,
                          loader=self.train_dataloader)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        setup = self.problem if self.problem.weight_decay is not None else replace(
            self.problem, weight_decay=weight_decay(trainer))

        def rank_training_set() -> MislabelReport:
            with isolate_rng():
                return self.analysis.report(trainer, pl_module, resolve_loss_fn(pl_module, self.loss_fn),
                                            self._train(trainer, pl_module), setup, self._describe, epoch)

        report = self._isolated(epoch, trainer, "ranking the training set", rank_training_set)
        if report is None:
            return
        self.reported.append({"epoch": epoch, "global_step": trainer.global_step})
        log_dir = shared_log_dir(trainer)  # a collective: every rank asks
        if trainer.is_global_zero:
            self.last_report = report
            self._isolated(epoch, trainer, "writing its results", lambda: publish_mislabel(
                self._writers.get(trainer, log_dir), log_dir, report, verbose=self.verbose))
        if trainer.world_size > 1:
            trainer.strategy.barrier("mislabel_written")

