"""InfluenceCallback: explain the worst validation predictions by training examples, in TensorBoard and on disk."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.callbacks.progress import progress_task
from lightning_influence.core.candidates import (
    FEATURE_NAMES,
    KNN_BACKENDS,
    FeatureFn,
    check_feature_fn,
    check_knn_backend,
)
from lightning_influence.core.config import (
    SCORING_METHODS,
    LowRankConfig,
    SolverConfig,
    check_damping,
    make_solver_config,
)
from lightning_influence.core.data import IndexedData
from lightning_influence.core.losses import LossFn
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.explain import Explanation, ExplainSettings, explain
from lightning_influence.mislabel import find_mislabel_candidates
from lightning_influence.outputs import publish_explanation, publish_mislabel, publish_score_shard
from lightning_influence.reporting.records import MislabelReport

_SOLVER_OPTIONS = {"lissa": ("depth", "repeats", "batch_size", "scale", "seed", "tol"), "cg": ("max_iter", "tol"), "exact": ()}


class InfluenceCallback(pl.Callback):
    r"""Explain the model's worst validation predictions by the training examples that caused them.

    At the end of fit (and optionally every N epochs, and on ``trainer.validate``) it computes
    ``s_test = (H + damping I)^-1 grad L(z_val)`` for the monitored validation points and the influence
    ``I(z, z_val) = -s_test . grad L(z)`` of every training example z. Positive influence = **harmful**
    (up-weighting z raises the validation loss), negative = **helpful**. Results go to TensorBoard under
    ``influence/`` and to ``<log_dir>/influence/epoch=N.json``.

    Args:
        loss_fn: ``(module, batch) -> Tensor[B]`` per-example losses (no L2 term). Default: the
            LightningModule's ``per_example_loss(batch)`` method.
        val_indices: validation dataset indices to explain. Default: the ``num_worst`` highest-loss examples.
        num_worst: how many highest-loss validation examples to explain when ``val_indices`` is not given.
        misclassified_only: pick the worst among misclassified validation examples only.
        top_k: harmful and helpful training examples reported per point.
        every_n_epochs: also analyse at the end of validation every N epochs (0 = only at the end of fit).
        analyse_on_train_end: analyse when training ends (in ``on_train_end``, while DDP is still up).
        analyse_on_validate: analyse on a standalone ``trainer.validate(...)``.
        solver: ``"lissa"``, ``"cg"`` or ``"exact"``.
        damping: lambda added to the Hessian; use at least the training weight decay.
        depth: LiSSA recursion steps per repeat (see :class:`~lightning_influence.LissaConfig`).
        repeats: LiSSA independent repeats, averaged.
        batch_size: LiSSA minibatch size of each Hessian-vector product.
        scale: LiSSA scale (above the top minibatch-Hessian eigenvalue), or ``"auto"`` to estimate it.
        seed: LiSSA sampling seed.
        tol: LiSSA early-stop or CG tolerance (None: the solver's default).
        max_iter: CG iterations.
        scoring: ``"auto"``, ``"jvp"`` or ``"per_example_grad"``.
        chunk_size: training examples scored at once (bounds memory).
        train_dataset: the training data to score (default: the trainer's train dataloader's dataset).
        train_dataloader: a loader whose dataset and collate function to use instead.
        save_scores: also write the full ``[points, n_train]`` score matrix as a tensor file.
        mislabel_candidates: also report this many training examples with the largest self-influence
            ``|I(z, z)|`` (likely mislabelled) under ``influence/mislabel/`` (0 = off).
        mislabel_rank: eigenpairs of H (Lanczos) used for self-influence; the rest gets ``damping`` alone.
        candidates: score each monitored point only against its ``candidates`` nearest training examples in
            feature space (FastIF); the others get no score and are absent from every output. None: all.
        knn_backend: ``"torch"`` (exact, chunked ``cdist``) or ``"faiss"`` (needs ``faiss`` installed).
        feature_fn: how candidates are found. Default (``"last_layer_grad"``): the k training examples with the
            largest ``|<G_val, G_i>|`` of last-layer loss gradients (torch backend). ``"activations"`` (the
            default with FAISS): Euclidean neighbours of the input of the module's last ``nn.Linear`` layer. Or
            ``(module, batch) -> Tensor[B, D]`` features for a Euclidean neighbour search.
        strict: re-raise errors of the analysis (and of writing its results) instead of warning and letting
            training go on.
        diagnose: self-diagnosis of every analysis (s_test residuals, agreement of repeat halves, warnings
            grounded in the literature) under ``influence/trust/`` and in the JSON ``trust`` object.
        verify_loo: after each analysis, retrain without each of this many training examples (the largest
            ``|I|`` for the first explained point, at most ``2 * top_k``) and log the Pearson/Spearman of
            predicted vs actual validation-loss change (``influence/trust/loo_*``; rank zero; 0 = off).
        verify_loo_steps: full-batch steps of each leave-one-out retraining (same optimiser class and
            hyperparameters as the trainer's first optimiser, warm-started from the analysed weights).
        verbose: print a summary table on rank zero after each analysis.

    Example::

        trainer = Trainer(callbacks=[InfluenceCallback(num_worst=8, damping=1e-2)])
    """

    def __init__(
        self,
        loss_fn: Optional[LossFn] = None,
        val_indices: Optional[list[int]] = None,
        num_worst: int = 8,
        misclassified_only: bool = False,
        top_k: int = 10,
        every_n_epochs: int = 0,
        analyse_on_train_end: bool = True,
        analyse_on_validate: bool = True,
        solver: str = "lissa",
        damping: float = 0.01,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int = 128,
        scale: Union[float, str] = "auto",
        seed: int = 0,
        tol: Optional[float] = None,
        max_iter: int = 200,
        scoring: str = "auto",
        chunk_size: int = 256,
        train_dataset: Optional[Dataset] = None,
        train_dataloader: Optional[DataLoader] = None,
        save_scores: bool = False,
        mislabel_candidates: int = 0,
        mislabel_rank: int = 64,
        candidates: Optional[int] = None,
        knn_backend: str = "torch",
        feature_fn: FeatureFn | str | None = None,
        strict: bool = False,
        verbose: bool = True,
        diagnose: bool = True,
        verify_loo: int = 0,
        verify_loo_steps: int = 50,
    ) -> None:
        super().__init__()
        _check(loss_fn is None or callable(loss_fn), "loss_fn", "a callable (module, batch) -> Tensor[B]", loss_fn)
        _check(isinstance(num_worst, int) and num_worst >= 1, "num_worst", "a positive int", num_worst)
        _check(isinstance(top_k, int) and top_k >= 1, "top_k", "a positive int", top_k)
        _check(isinstance(every_n_epochs, int) and every_n_epochs >= 0, "every_n_epochs", "an int >= 0", every_n_epochs)
        _check(isinstance(chunk_size, int) and chunk_size >= 1, "chunk_size", "a positive int", chunk_size)
        _check(scoring in SCORING_METHODS, "scoring", " or ".join(repr(m) for m in SCORING_METHODS), scoring)
        _check(isinstance(mislabel_candidates, int) and mislabel_candidates >= 0, "mislabel_candidates",
               "an int >= 0", mislabel_candidates)
        _check(isinstance(verify_loo, int) and 0 <= verify_loo <= 2 * top_k, "verify_loo",
               f"an int in [0, 2 * top_k = {2 * top_k}] (examples taken from the harmful and helpful lists)", verify_loo)
        _check(isinstance(verify_loo_steps, int) and verify_loo_steps >= 1, "verify_loo_steps", "a positive int",
               verify_loo_steps)
        _check(candidates is None or (isinstance(candidates, int) and not isinstance(candidates, bool)
                                      and candidates >= 1), "candidates", "None or a positive int", candidates)
        _check(knn_backend in KNN_BACKENDS, "knn_backend", f"one of {KNN_BACKENDS}", knn_backend)
        _check(feature_fn is None or callable(feature_fn) or feature_fn in FEATURE_NAMES, "feature_fn",
               f"None, one of {FEATURE_NAMES} or a callable (module, batch) -> Tensor[B, D]", feature_fn)
        try:
            check_feature_fn(feature_fn, knn_backend)
            check_knn_backend(knn_backend)
        except (ImportError, ValueError) as err:
            raise MisconfigurationException(str(err)) from err
        if val_indices is not None:
            ok = all(isinstance(i, int) and i >= 0 for i in val_indices) and len(val_indices) > 0
            _check(ok, "val_indices", "a non-empty list of validation dataset indices (ints >= 0)", val_indices)
            _check(len(set(val_indices)) == len(val_indices), "val_indices", "free of duplicates", val_indices)
        options = {"depth": depth, "repeats": repeats, "batch_size": batch_size, "scale": scale, "seed": seed,
                   "max_iter": max_iter, "tol": tol}
        try:
            self.damping = check_damping(damping)
            self.solver_config: SolverConfig = make_solver_config(
                solver, {k: options[k] for k in _SOLVER_OPTIONS.get(solver, ()) if options[k] is not None}
            )
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(str(err)) from err
        self.loss_fn = loss_fn
        self.settings = ExplainSettings(
            top_k=top_k, num_worst=num_worst, val_indices=None if val_indices is None else tuple(val_indices),
            misclassified_only=misclassified_only, scoring=scoring, chunk_size=chunk_size, keep_full_scores=save_scores,
            diagnose=diagnose, candidates=candidates, knn_backend=knn_backend, feature_fn=feature_fn,
        )
        self.verify_loo = verify_loo
        self.verify_loo_steps = verify_loo_steps
        self._warned: set[str] = set()  # trust warnings already shown (each code once per callback)
        try:
            self.mislabel_config = LowRankConfig(rank=mislabel_rank)
        except ValueError as err:
            raise MisconfigurationException(str(err).replace("`rank`", "`mislabel_rank`")) from err
        self.mislabel_candidates = mislabel_candidates
        self.every_n_epochs = every_n_epochs
        self.analyse_on_train_end = analyse_on_train_end
        self.analyse_on_validate = analyse_on_validate
        self.train_dataset = train_dataset
        self.train_dataloader = train_dataloader
        self.strict = strict
        self.verbose = verbose
        self.analysed: list[dict[str, Any]] = []  # {"epoch", "global_step", "stage", "val_indices"} per analysis
        self.last_explanation: Optional[Explanation] = None
        self._own_writer: Any = None
        self._tensorboard: Optional[TensorBoardLogger] = None
        self._fit_train_loader: Any = None

    # -- Lightning hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._resolve_loss_fn(pl_module)  # fail before training starts, not after it
        if trainer.is_global_zero:
            self._check_writable(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_train_loader = trainer.train_dataloader  # reused by a later `trainer.validate`
        if self.settings.candidates is not None:  # fail before training, not at the first analysis
            n_train = len(self._train_data(trainer, pl_module))
            _check(self.settings.candidates <= n_train, "candidates",
                   f"at most the training-set size {n_train} (or None to score every example)", self.settings.candidates)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fn = trainer.state.fn
        if fn == TrainerFn.FITTING and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, "validation", trainer.current_epoch)
        elif fn == TrainerFn.VALIDATING and self.analyse_on_validate:
            self._run(trainer, pl_module, "validate", trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.analyse_on_train_end:
            self._run(trainer, pl_module, "fit_end", max(trainer.current_epoch - 1, 0))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"analysed": [dict(entry) for entry in self.analysed]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.analysed = [dict(entry) for entry in state_dict.get("analysed", [])]

    # -- the analysis --------------------------------------------------------------------------------------
    def _already_done(self, global_step: int, stage: str) -> bool:
        """The weights at ``global_step`` were analysed already (e.g. the last validation before fit end)."""
        return stage != "validate" and any(e["global_step"] == global_step and e["stage"] != "validate"
                                           for e in self.analysed)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int) -> None:
        if self._already_done(trainer.global_step, stage):
            return
        try:
            with isolate_rng():
                explanation = self._explain(trainer, pl_module)
                mislabel = self._mislabel(trainer, pl_module, epoch) if self.mislabel_candidates else None
        except Exception as err:  # noqa: BLE001 - the user's training must survive a failed analysis
            if self.strict:
                raise
            rank_zero_warn(
                f"Influence analysis at epoch {epoch} (step {trainer.global_step}) failed and was skipped:"
                f" {type(err).__name__}: {err}\nTraining goes on. Pass `InfluenceCallback(strict=True)` to raise instead."
            )
            return
        self.last_explanation = explanation
        self.analysed.append({"epoch": epoch, "global_step": trainer.global_step, "stage": stage,
                              "val_indices": [p.val_index for p in explanation.points]})
        self._isolated(epoch, trainer, "writing its results",
                       lambda: self._write_all(trainer, pl_module, explanation, mislabel, stage, epoch))
        if trainer.world_size > 1:
            trainer.strategy.barrier("influence_written")  # no rank runs ahead into the next epoch

    def _write_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, explanation: Explanation,
                   mislabel: Optional[MislabelReport], stage: str, epoch: int) -> None:
        log_dir = self._log_dir(trainer)  # a collective: every rank asks
        publish_score_shard(log_dir, explanation, epoch)  # every rank writes its own shard of the full scores
        if not trainer.is_global_zero:
            return
        self._write(trainer, explanation, stage, epoch, log_dir)
        if mislabel is not None:
            self._write_mislabel(trainer, mislabel, log_dir)
        if explanation.trust is not None:
            self._warn_once(explanation.trust.warnings)
        if self.verify_loo:
            self._isolated(epoch, trainer, "running the leave-one-out check",
                           lambda: self._verify_loo(trainer, pl_module, explanation, epoch, log_dir))

    def _isolated(self, epoch: int, trainer: pl.Trainer, what: str, action: Any) -> None:
        """Run ``action``; a failure warns and training goes on (``strict=True`` re-raises)."""
        try:
            action()
        except Exception as err:  # noqa: BLE001 - the user's training must survive a failed write
            if self.strict:
                raise
            rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
            warnings.warn(
                f"Influence analysis at epoch {epoch} (step {trainer.global_step}) failed{rank} while {what}:"
                f" {type(err).__name__}: {err}\nTraining goes on. Pass `InfluenceCallback(strict=True)` to raise instead.",
                stacklevel=2,
            )

    def _warn_once(self, warnings: Any) -> None:
        for warning in warnings:
            if warning.code in self._warned:
                continue
            self._warned.add(warning.code)
            text = f"Influence trust [{warning.code}]: {warning.message}"
            rank_zero_warn(text) if warning.severity == "warning" else rank_zero_info(text)

    def _check_writable(self, trainer: pl.Trainer) -> None:
        """Warn before training when the results directory cannot be written (a fixable setup problem)."""
        log_dir = _log_dir_of(trainer)  # rank zero only: no collective here
        target = log_dir / "influence"
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            message = (
                f"InfluenceCallback cannot write its results to {target} ({type(err).__name__}: {err}). Give the"
                " logger a writable directory, e.g. `Trainer(logger=TensorBoardLogger(save_dir=...))` or"
                " `Trainer(default_root_dir=...)`."
            )
            if self.strict:
                raise MisconfigurationException(message) from err
            rank_zero_warn(message + " Training goes on; the analyses will be skipped when writing fails.")

    def _weight_decay(self, trainer: pl.Trainer) -> Optional[float]:
        """The first optimiser's weight decay (the training L2 strength), when there is one."""
        optimizers = getattr(trainer, "optimizers", None) or []
        if not optimizers or not optimizers[0].param_groups:
            return None
        value = optimizers[0].param_groups[0].get("weight_decay")
        return float(value) if isinstance(value, (int, float)) else None

    def _verify_loo(self, trainer: pl.Trainer, pl_module: pl.LightningModule, explanation: Explanation,
                    epoch: int, log_dir: Path) -> None:
        """Leave-one-out spot check of the first explained point (rank zero): scalars and ``loo_epoch=N.json``."""
        from lightning_influence.loo import verify_leave_one_out
        from lightning_influence.reporting import write_json_atomic

        optimizers = getattr(trainer, "optimizers", None) or []
        if not explanation.points or not optimizers:
            return
        point = explanation.points[0]
        pairs = {i.train_index: i.influence for i in (*point.harmful, *point.helpful)}
        chosen = sorted(pairs, key=lambda index: -abs(pairs[index]))[: self.verify_loo]
        template = optimizers[0]
        hyper = {key: template.param_groups[0][key] for key in template.defaults if key in template.param_groups[0]}
        val = self._val_data(trainer)
        with isolate_rng():
            check = verify_leave_one_out(
                pl_module, self._resolve_loss_fn(pl_module), self._train_data(trainer, pl_module).loader(),
                val.fetch([point.val_index]), train_indices=chosen, influences=[pairs[i] for i in chosen],
                steps=self.verify_loo_steps, optimizer=lambda params: type(template)(params, **hyper), l2=0.0,
            )
        writer = self._writer(log_dir)
        for name in ("pearson", "spearman"):
            value = getattr(check, name)
            if value is not None:
                writer.add_scalar(f"influence/trust/loo_{name}", value, global_step=trainer.global_step)
        writer.flush()
        write_json_atomic(log_dir / "influence" / f"loo_epoch={epoch}.json", {
            "val_index": point.val_index, "train_indices": list(check.train_indices),
            "influence": check.influence.tolist(), "predicted_loss_change": check.predicted.tolist(),
            "actual_loss_change": check.actual.tolist(), "pearson": check.pearson, "spearman": check.spearman,
            "steps": check.steps, "optimizer": type(template).__name__, "train_size": check.train_size,
        })
        if self.verbose:
            rank_zero_info(f"Leave-one-out check (val {point.val_index}, {len(chosen)} removals):"
                           f" Pearson {check.pearson}, Spearman {check.spearman}")

    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Explanation:
        loss_fn = self._resolve_loss_fn(pl_module)
        train = self._train_data(trainer, pl_module)
        val = self._val_data(trainer)
        collectives = self._collectives(trainer)
        config = self.solver_config
        steps = getattr(config, "depth", 0) * len(range(collectives.rank, getattr(config, "repeats", 0),
                                                        collectives.world_size))
        # with candidates only their union is scored, which is known after the neighbour search: no end shown
        shard_size = (None if self.settings.candidates is not None
                      else len(range(collectives.rank, len(train), collectives.world_size)))
        with progress_task(trainer, "influence: s_test", steps) as on_step, \
                progress_task(trainer, "influence: scoring", shard_size) as on_scored:
            return explain(pl_module, loss_fn, train, val, config, self.damping, self.settings, collectives,
                           on_lissa_step=lambda: on_step(1), on_scored=on_scored,
                           weight_decay=self._weight_decay(trainer))

    def _mislabel(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> MislabelReport:
        train = self._train_data(trainer, pl_module)
        collectives = self._collectives(trainer)
        shard_size = len(range(collectives.rank, len(train), collectives.world_size))
        with progress_task(trainer, "influence: self-influence", shard_size) as on_scored:
            return find_mislabel_candidates(
                pl_module, self._resolve_loss_fn(pl_module), train, self.mislabel_config, self.damping,
                self.mislabel_candidates, epoch=epoch, global_step=trainer.global_step, collectives=collectives,
                on_scored=on_scored,
            )

    def _collectives(self, trainer: pl.Trainer) -> Collectives:
        if trainer.world_size == 1:
            return SingleProcess()
        from lightning_influence.distributed.lightning import StrategyCollectives

        return StrategyCollectives(trainer.strategy)

    def _resolve_loss_fn(self, pl_module: pl.LightningModule) -> LossFn:
        if self.loss_fn is not None:
            return self.loss_fn
        if callable(getattr(pl_module, "per_example_loss", None)):
            return _call_per_example_loss
        raise MisconfigurationException(
            "InfluenceCallback needs per-example losses, but got no `loss_fn` and the LightningModule"
            f" {type(pl_module).__name__} has no `per_example_loss(batch)` method. Either pass"
            " `InfluenceCallback(loss_fn=lambda module, batch: F.cross_entropy(module(batch[0]), batch[1],"
            " reduction='none'))` or add `def per_example_loss(self, batch): ...` returning a Tensor[B] to your module."
        )

    def _train_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> IndexedData:
        chunk = self.settings.chunk_size
        if self.train_dataset is not None:
            collate = self.train_dataloader.collate_fn if self.train_dataloader is not None else None
            return IndexedData(self.train_dataset, collate, chunk)
        loader = self.train_dataloader or trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            loader = self._fit_train_loader
        if loader is None:
            try:
                loader = pl_module.train_dataloader()
            except Exception:  # noqa: BLE001 - LightningModule raises when the hook is not implemented
                loader = None
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                f"InfluenceCallback could not find a single training DataLoader (got {type(loader).__name__})."
                " Pass `InfluenceCallback(train_dataset=...)` or `train_dataloader=...`."
            )
        return IndexedData.from_loader(loader, chunk)

    def _val_data(self, trainer: pl.Trainer) -> IndexedData:
        loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.val_dataloader()
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                f"InfluenceCallback explains validation examples but found no validation DataLoader (got"
                f" {type(loader).__name__}). Pass `val_dataloaders` to `trainer.fit` or define `val_dataloader()`."
            )
        return IndexedData.from_loader(loader, self.settings.chunk_size)

    # -- output (rank zero) --------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, explanation: Explanation, stage: str, epoch: int, log_dir: Path) -> None:
        path = publish_explanation(self._writer(log_dir), log_dir, explanation, epoch=epoch,
                                   global_step=trainer.global_step, stage=stage, verbose=self.verbose)
        if self.verbose:
            rank_zero_info(f"Influence results: {path} (TensorBoard: `tensorboard --logdir {log_dir}`)")

    def _write_mislabel(self, trainer: pl.Trainer, report: MislabelReport, log_dir: Path) -> None:
        publish_mislabel(self._writer(log_dir), log_dir, report, verbose=self.verbose)

    def _log_dir(self, trainer: pl.Trainer) -> Path:
        """The run's log directory, the same on every rank (call it on all ranks: it broadcasts under DDP)."""
        self._tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        return shared_log_dir(trainer)

    def _writer(self, log_dir: Path) -> Any:
        """The TensorBoard writer (rank zero only): the logger's, else one of our own in ``log_dir``."""
        if self._tensorboard is not None:
            return self._tensorboard.experiment
        if self._own_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._own_writer = SummaryWriter(str(log_dir))
        return self._own_writer


def shared_log_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory as rank zero sees it, on every rank (a broadcast under DDP: call it on all)."""
    path = str(_log_dir_of(trainer)) if trainer.is_global_zero else None
    return Path(trainer.strategy.broadcast(path, src=0)) if trainer.world_size > 1 else Path(path)


def _log_dir_of(trainer: pl.Trainer) -> Path:
    """This process's view of the log directory, like ``trainer.log_dir`` but without its broadcast (a
    collective that would hang when called on one rank only)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return Path(logger.log_dir)
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _call_per_example_loss(module: Any, batch: Any) -> Any:
    return module.per_example_loss(batch)


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise MisconfigurationException(f"Expected `{name}` to be {allowed}, but got {value!r}.")


