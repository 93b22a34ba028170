"""InfluenceCallback: explain the worst validation predictions by training examples, in TensorBoard and on disk."""

from __future__ import annotations


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
from lightning_influence.core.candidates import KNN_BACKENDS, FeatureFn, check_knn_backend
from lightning_influence.core.config import LowRankConfig, SolverConfig, check_damping, make_solver_config
from lightning_influence.core.data import IndexedData
from lightning_influence.core.losses import LossFn
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.explain import Explanation, ExplainSettings, explain
from lightning_influence.mislabel import find_mislabel_candidates
from lightning_influence.reporting import InfluenceReport, print_summary, write_report, write_report_files
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
        depth, repeats, batch_size, scale, seed: LiSSA settings (see :class:`~lightning_influence.LissaConfig`).
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
        feature_fn: ``(module, batch) -> Tensor[B, D]`` features for the neighbour search. Default: the input of
            the module's last ``nn.Linear`` layer.
        strict: re-raise errors of the analysis instead of warning and letting training go on.
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
        feature_fn: Optional[FeatureFn] = None,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _check(loss_fn is None or callable(loss_fn), "loss_fn", "a callable (module, batch) -> Tensor[B]", loss_fn)
        _check(isinstance(num_worst, int) and num_worst >= 1, "num_worst", "a positive int", num_worst)
        _check(isinstance(top_k, int) and top_k >= 1, "top_k", "a positive int", top_k)
        _check(isinstance(every_n_epochs, int) and every_n_epochs >= 0, "every_n_epochs", "an int >= 0", every_n_epochs)
        _check(isinstance(chunk_size, int) and chunk_size >= 1, "chunk_size", "a positive int", chunk_size)
        _check(scoring in ("auto", "jvp", "per_example_grad"), "scoring", "'auto', 'jvp' or 'per_example_grad'", scoring)
        _check(isinstance(mislabel_candidates, int) and mislabel_candidates >= 0, "mislabel_candidates",
               "an int >= 0", mislabel_candidates)
        _check(candidates is None or (isinstance(candidates, int) and not isinstance(candidates, bool)
                                      and candidates >= 1), "candidates", "None or a positive int", candidates)
        _check(knn_backend in KNN_BACKENDS, "knn_backend", f"one of {KNN_BACKENDS}", knn_backend)
        _check(feature_fn is None or callable(feature_fn), "feature_fn", "a callable (module, batch) -> Tensor[B, D]",
               feature_fn)
        try:
            check_knn_backend(knn_backend)
        except ImportError as err:
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
            candidates=candidates, knn_backend=knn_backend, feature_fn=feature_fn,
        )
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
        self._fit_train_loader: Any = None

    # -- Lightning hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._resolve_loss_fn(pl_module)  # fail before training starts, not after it

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
        if trainer.is_global_zero:
            self._write(trainer, explanation, stage, epoch)
            if mislabel is not None:
                self._write_mislabel(trainer, mislabel)
        if trainer.world_size > 1:
            trainer.strategy.barrier("influence_written")  # no rank runs ahead into the next epoch

    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Explanation:
        loss_fn = self._resolve_loss_fn(pl_module)
        train = self._train_data(trainer, pl_module)
        val = self._val_data(trainer)
        collectives = self._collectives(trainer)
        config = self.solver_config
        steps = getattr(config, "depth", 0) * len(range(collectives.rank, getattr(config, "repeats", 0),
                                                        collectives.world_size))
        shard_size = len(range(collectives.rank, len(train), collectives.world_size))
        with progress_task(trainer, "influence: s_test", steps) as on_step, \
                progress_task(trainer, "influence: scoring", shard_size) as on_scored:
            return explain(pl_module, loss_fn, train, val, config, self.damping, self.settings, collectives,
                           on_lissa_step=lambda: on_step(1), on_scored=on_scored)

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
    def _write(self, trainer: pl.Trainer, explanation: Explanation, stage: str, epoch: int) -> None:
        report = InfluenceReport(
            epoch=epoch, global_step=trainer.global_step, stage=stage, train_size=explanation.train_size,
            points=explanation.points, solver=explanation.solver, timings=explanation.timings,
        )
        writer, log_dir = self._writer(trainer)
        write_report(writer, report)
        path = write_report_files(log_dir / "influence", report, explanation.full_scores,
                                  explanation.full_score_indices)
        if self.verbose:
            print_summary(report)
            rank_zero_info(f"Influence results: {path} (TensorBoard: `tensorboard --logdir {log_dir}`)")

    def _write_mislabel(self, trainer: pl.Trainer, report: MislabelReport) -> None:
        from lightning_influence.reporting import print_mislabel_summary, write_mislabel_files, write_mislabel_report

        writer, log_dir = self._writer(trainer)
        write_mislabel_report(writer, report)
        write_mislabel_files(log_dir / "influence", report)
        if self.verbose:
            print_mislabel_summary(report)

    def _writer(self, trainer: pl.Trainer) -> tuple[Any, Path]:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment, Path(logger.log_dir)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self._own_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._own_writer = SummaryWriter(str(log_dir))
        return self._own_writer, log_dir


def _call_per_example_loss(module: Any, batch: Any) -> Any:
    return module.per_example_loss(batch)


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise MisconfigurationException(f"Expected `{name}` to be {allowed}, but got {value!r}.")


