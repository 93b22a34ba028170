"""InfluenceCallback: explain the worst validation predictions by training examples, in TensorBoard and on disk."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.analysis.explain import explain
from lightning_influence.callbacks._damping_check import SelfCheck, analysis_problem, checked_explanation, self_check_once
from lightning_influence.callbacks._leave_one_out import check_loo_arguments, leave_one_out_check
from lightning_influence.callbacks._legacy import legacy_candidates, legacy_mislabel, legacy_solver_options
from lightning_influence.callbacks._snapshots import SnapshotSchedule
from lightning_influence.callbacks._trainer import (
    collectives_for,
    import_loss_fn,
    resolve_loss_fn,
    shared_log_dir,
    train_data,
    val_data,
)
from lightning_influence.callbacks.base import AnalysisCallback, last_epoch, should_skip_analysis
from lightning_influence.callbacks.progress import progress_task
from lightning_influence.config import (
    CALLBACK_DAMPING,
    CALLBACK_SNAPSHOTS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CURVATURE,
    DEFAULT_KNN_BACKEND,
    DEFAULT_PRESELECT,
    DEFAULT_SCORING,
    DEFAULT_SOLVER,
    SELF_CHECK_DAMPING,
    ExplainConfig,
    ProblemConfig,
    SolverConfig,
    expect,
    resolve_problem,
)
from lightning_influence.core.candidates import check_knn_backend
from lightning_influence.core.per_example.features import FeatureFn
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.solvers import solver_type
from lightning_influence.core.tensors.batching import describe_batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.solve import CollectiveRanks
from lightning_influence.reporting.publish import publish_explanation, publish_mislabel, publish_score_shard
from lightning_influence.results import Explanation, MislabelReport


class InfluenceCallback(AnalysisCallback):
    r"""Explain the model's worst validation predictions by the training examples that caused them.

    At the end of fit (and optionally every N epochs, and on ``trainer.validate``) it computes
    ``s_test = (H + damping I)^-1 grad L(z_val)`` for the monitored validation points and the influence
    ``I(z, z_val) = -s_test . grad L(z)`` of every training example z. Positive influence = **harmful**
    (up-weighting z raises the validation loss), negative = **helpful**. Results go to TensorBoard under
    ``influence/`` and to ``<log_dir>/influence/epoch=N.json``.

    Args:
        loss_fn: ``(module, batch) -> Tensor[B]`` per-example losses (no L2 term), or its import path
            ``"package.module:function"`` (picklable, for YAML and ``ddp_spawn``). Default: the LightningModule's
            ``per_example_loss(batch)`` method.
        val_indices: validation dataset indices to explain. Default: the ``num_worst`` highest-loss examples.
        num_worst: how many highest-loss validation examples to explain when ``val_indices`` is not given.
        misclassified_only: pick the worst among misclassified validation examples only.
        top_k: harmful and helpful training examples reported per point.
        every_n_epochs: also analyse at the end of validation every N epochs (0 = only at the end of fit).
        analyse_on_train_end: analyse when training ends (in ``on_train_end``, while DDP is still up).
        analyse_on_validate: analyse on a standalone ``trainer.validate(...)``.
        solver: ``"lissa"``, ``"cg"``, ``"exact"`` or ``"lowrank"`` with its default settings, or a solver config
            such as ``LissaConfig(depth=500, repeats=4)`` (in YAML: ``class_path``/``init_args``).
        damping: lambda added to the curvature, ``"self_check"`` (the default: among the decades 1e-4 ... 1, the one
            whose influence best predicts ten short retrainings on random halves of the training set, run once per
            fit with the training's optimiser; docs/curvature.md) or ``"auto"`` (3% of the curvature's top
            eigenvalue: no retraining). The value used and how it was chosen are in every report.
        curvature: ``"gauss_newton"`` (the default; positive semi-definite, right before convergence) or
            ``"hessian"`` (its damping is raised above the most negative eigenvalue, with a warning).
        snapshots: average the influence over this many weight snapshots spread evenly over the fit, the final
            weights included, each with its own s_test (CPU copies of the weights; ``K - 1`` more solves and scoring
            passes): it predicts retraining better on models stopped before convergence (docs/retraining.md).
            1: the final weights alone.
        problem: all the problem's knobs in one :class:`~lightning_influence.ProblemConfig` (solver, curvature,
            damping, weight decay, ``parameters`` such as LoRA adapters ``["*lora_*"]``, dtype), e.g. from YAML as
            ``class_path``/``init_args``; then leave ``solver``, ``damping`` and ``curvature`` at their defaults.
            Its ``weight_decay`` None: read from the trainer's first optimizer at each analysis.
        scoring: ``"auto"``, ``"factored"``, ``"jvp"`` or ``"per_example_grad"``.
        chunk_size: training examples scored at once (bounds memory).
        train_dataset: the training data to score (default: the trainer's train dataloader's dataset).
        train_dataloader: a loader whose dataset and collate function to use instead.
        save_scores: also write the full ``[points, n_train]`` score matrix as a tensor file.
        mislabel_candidates: deprecated, as are ``mislabel_rank``, ``training_signals``, ``signal_checkpoints``
            and ``signals_outputs_fn`` (a ``FutureWarning``; they still run the mislabel analysis this release,
            and ``num_worst=0`` with them runs it alone): pass :class:`~lightning_influence.MislabelCallback`
            (``candidates``, ``rank`` and the same signal arguments) to the Trainer instead.
        num_candidates: score each monitored point only against its ``num_candidates`` nearest training examples
            in feature space (FastIF); the others get no score and are absent from every output. None: all.
        knn_backend: ``"torch"`` (exact, chunked ``cdist``) or ``"faiss"`` (needs ``faiss`` installed).
        feature_fn: how candidates are found. Default (``"last_layer_grad"``): the k training examples with the
            largest ``|<G_val, G_i>|`` of last-layer loss gradients (torch backend). ``"activations"`` (the
            default with FAISS): Euclidean neighbours of the input of the module's last ``nn.Linear`` layer. Or
            ``(module, batch) -> Tensor[B, D]`` features for a Euclidean neighbour search.
        preselect: with ``num_candidates``: ``"auto"`` uses the candidates only where a timed probe estimates
            that they save time, else scores every training example and says so (a warning and an ``info``
            note in the trust report); ``"always"`` preselects whatever the cost.
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
        example_formatter: ``example -> str`` shown beside each example in the tables, the JSON and the
            dashboard, e.g. ``lambda example: tokenizer.decode(example["input_ids"])`` for text; ``example`` is
            one example of a batch (every batched tensor indexed by its row).
        **solver_options: deprecated: the solver's keyword options (``depth``, ``repeats``, ``batch_size``,
            ``scale``, ``seed``, ``tol``, ``max_iter``); pass a solver config instead. ``candidates`` is the old
            name of ``num_candidates``.

    Example::

        trainer = Trainer(callbacks=[InfluenceCallback(num_worst=8, solver=LissaConfig(repeats=2))])
    """

    def __init__(  # long: one line per argument (LightningCLI reads the flat signature) and their checks
        self,
        loss_fn: Union[LossFn, str, None] = None,
        val_indices: Optional[list[int]] = None,
        num_worst: int = 8,
        misclassified_only: bool = False,
        top_k: int = 10,
        every_n_epochs: int = 0,
        analyse_on_train_end: bool = True,
        analyse_on_validate: bool = True,
        solver: Union[str, SolverConfig] = DEFAULT_SOLVER,
        damping: Union[float, str] = CALLBACK_DAMPING,
        curvature: str = DEFAULT_CURVATURE,
        snapshots: int = CALLBACK_SNAPSHOTS,
        scoring: str = DEFAULT_SCORING,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        train_dataset: Optional[Dataset] = None,
        train_dataloader: Optional[DataLoader] = None,
        save_scores: bool = False,
        mislabel_candidates: Union[int, str, None] = None,
        mislabel_rank: Optional[int] = None,
        training_signals: Optional[bool] = None,
        signal_checkpoints: Optional[int] = None,
        signals_outputs_fn: Optional[Callable[..., Any]] = None,
        num_candidates: Optional[int] = None,
        knn_backend: str = DEFAULT_KNN_BACKEND,
        feature_fn: FeatureFn | str | None = None,
        preselect: str = DEFAULT_PRESELECT,
        strict: bool = False,
        verbose: bool = True,
        diagnose: bool = True,
        verify_loo: int = 0,
        verify_loo_steps: int = 50,
        example_formatter: Optional[Callable[[Any], str]] = None,
        problem: Optional[ProblemConfig] = None,
        **solver_options: Any,
    ) -> None:
        super().__init__(strict)
        num_candidates = legacy_candidates(num_candidates, solver_options)
        try:
            expect(loss_fn is None or callable(loss_fn) or isinstance(loss_fn, str), "loss_fn",
                   "a callable (module, batch) -> Tensor[B] or an import path 'package.module:function'", loss_fn)
            expect(isinstance(every_n_epochs, int) and every_n_epochs >= 0, "every_n_epochs", "an int >= 0",
                   every_n_epochs)
            expect(isinstance(snapshots, int) and snapshots >= 1, "snapshots", "an int >= 1", snapshots)
            self.mislabel = legacy_mislabel({  # deprecated: MislabelCallback
                "mislabel_candidates": mislabel_candidates, "mislabel_rank": mislabel_rank,
                "training_signals": training_signals, "signal_checkpoints": signal_checkpoints,
                "signals_outputs_fn": signals_outputs_fn})
            self.explains = val_indices is not None or num_worst != 0
            expect(self.explains or self.mislabel.enabled, "num_worst", "a positive int", num_worst,
                   "For likely mislabelled training examples alone, pass MislabelCallback(...) to the Trainer instead.")
            check_loo_arguments(verify_loo, verify_loo_steps, top_k, self.explains)
            self.settings = ExplainConfig(
                top_k=top_k, num_worst=num_worst or 1, val_indices=None if val_indices is None else tuple(val_indices),
                misclassified_only=misclassified_only, scoring=scoring, chunk_size=chunk_size,
                keep_full_scores=save_scores, diagnose=diagnose, num_candidates=num_candidates,
                knn_backend=knn_backend, feature_fn=feature_fn, preselect=preselect,
            )
            check_knn_backend(knn_backend)
            self.problem = resolve_problem(problem, solver, damping, curvature, legacy_solver_options(solver_options),
                                           default_damping=CALLBACK_DAMPING)
        except (ImportError, TypeError, ValueError) as err:
            raise MisconfigurationException(str(err)) from err
        self.loss_fn = import_loss_fn(loss_fn) if isinstance(loss_fn, str) else loss_fn
        self.example_formatter = example_formatter
        self._describe = functools.partial(describe_batch, example_formatter=example_formatter)
        self.verify_loo = verify_loo
        self.verify_loo_steps = verify_loo_steps
        self.mislabel_candidates = 0 if mislabel_candidates is None else mislabel_candidates  # the state key's
        self.every_n_epochs = every_n_epochs
        self.snapshots = SnapshotSchedule(snapshots)
        self.analyse_on_train_end = analyse_on_train_end
        self.analyse_on_validate = analyse_on_validate
        self.train_dataset = train_dataset
        self.train_dataloader = train_dataloader
        self.verbose = verbose
        self.analysed: list[dict[str, Any]] = []  # {"epoch", "global_step", "stage", "val_indices"} per analysis
        self.last_explanation: Optional[Explanation] = None
        self.last_mislabel: Optional[MislabelReport] = None  # rank zero: the last mislabel report written
        self._fit_train_loader: Any = None
        self.damping_check: Optional[SelfCheck] = None  # the self-check of this fit (``damping="self_check"``)

    @property
    def solver_config(self) -> SolverConfig:
        """The solver config of :attr:`problem`."""
        return self.problem.solver_config

    @property
    def damping(self) -> Union[float, str]:
        """The requested damping of :attr:`problem` (a number or ``"auto"``)."""
        return self.problem.damping

    @property
    def curvature(self) -> str:
        """The curvature name of :attr:`problem`."""
        return self.problem.curvature

    @property
    @override
    def state_key(self) -> str:
        """Two callbacks in one Trainer keep their own checkpoint state when they explain different things."""
        return self._generate_state_key(num_worst=self.settings.num_worst if self.explains else 0,
                                        val_indices=self.settings.val_indices,
                                        solver=type(self.problem.solver).__name__,
                                        mislabel_candidates=self.mislabel_candidates)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_setup(trainer, pl_module, self._resolve_loss_fn(pl_module))  # fail before training starts
        self.mislabel.setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_train_loader = trainer.train_dataloader  # reused by a later `trainer.validate`
        self.damping_check = None  # a new fit chooses its damping anew
        self.snapshots.reset()
        self._check_data(pl_module, self._resolve_loss_fn(pl_module), self._train_data(trainer, pl_module),
                         self.settings.num_candidates)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_skip_analysis(trainer):
            return
        fn = trainer.state.fn
        if fn == TrainerFn.FITTING and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, "validation", trainer.current_epoch)
        elif fn == TrainerFn.VALIDATING and self.analyse_on_validate:
            self._run(trainer, pl_module, "validate", last_epoch(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots.on_train_epoch_end(trainer, pl_module)
        self.mislabel.on_train_epoch_end(trainer, pl_module, lambda: self._train_data(trainer, pl_module), self.strict)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mislabel.on_train_end(trainer, pl_module, lambda: self._train_data(trainer, pl_module), self.strict)
        if self.analyse_on_train_end and not should_skip_analysis(trainer):
            self._run(trainer, pl_module, "fit_end", last_epoch(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._writers.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"analysed": [dict(entry) for entry in self.analysed], "signals": self.mislabel.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.analysed = [dict(entry) for entry in state_dict.get("analysed", [])]
        self.mislabel.load_state_dict(state_dict.get("signals") or {})

    # -- the analysis --------------------------------------------------------------------------------------
    def _already_done(self, global_step: int) -> bool:
        """The weights at ``global_step`` were analysed already: by the last validation before fit end, or by the
        fit-end analysis before a ``trainer.validate`` on the same weights. The answer is the same on every rank."""
        return any(e["global_step"] == global_step for e in self.analysed)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int) -> None:
        if self._already_done(trainer.global_step):
            if stage == "validate" and self.verbose:
                done = next(e for e in self.analysed if e["global_step"] == trainer.global_step)
                rank_zero_info(f"Influence analysis skipped: these weights (step {trainer.global_step}) were analysed"
                               f" at epoch {done['epoch']} ({done['stage']}); the results are in the same files.")
            return
        try:
            with isolate_rng():
                self._check_damping(trainer, pl_module, stage, epoch)
                explanation = self._explain(trainer, pl_module) if self.explains else None
                mislabel = self._mislabel(trainer, pl_module, epoch) if self.mislabel.enabled else None
        except Exception as err:  # noqa: BLE001 - the user's training must survive a failed analysis
            if self.strict:
                raise
            rank_zero_warn(
                f"Influence analysis at epoch {epoch} (step {trainer.global_step}) failed and was skipped:"
                f" {type(err).__name__}: {err}\nTraining goes on. Pass `InfluenceCallback(strict=True)` to raise instead."
            )
            return
        self.last_explanation = explanation or self.last_explanation
        self.analysed.append({"epoch": epoch, "global_step": trainer.global_step, "stage": stage,
                              "val_indices": [p.val_index for p in explanation.points] if explanation else []})
        self._isolated(epoch, trainer, "writing its results",
                       lambda: self._write_all(trainer, pl_module, explanation, mislabel, stage, epoch))
        if trainer.world_size > 1:
            trainer.strategy.barrier("influence_written")  # no rank runs ahead into the next epoch

    def _write_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, explanation: Optional[Explanation],
                   mislabel: Optional[MislabelReport], stage: str, epoch: int) -> None:
        log_dir = shared_log_dir(trainer)  # a collective: every rank asks
        if explanation is not None:
            publish_score_shard(log_dir, explanation, epoch)  # every rank writes its own shard of the full scores
        if not trainer.is_global_zero:
            return
        if explanation is not None:
            self._write(trainer, explanation, stage, epoch, log_dir)
        if mislabel is not None:  # deprecated: MislabelCallback
            self.last_mislabel = mislabel
            publish_mislabel(self._writers.get(trainer, log_dir), log_dir, mislabel, verbose=self.verbose)
        if explanation is None:
            return
        if explanation.trust is not None:
            self._warn_once(explanation.trust.warnings)
        if self.verify_loo:  # leave-one-out spot check of the first explained point: scalars and loo_epoch=N.json
            self._isolated(epoch, trainer, "running the leave-one-out check", lambda: leave_one_out_check(
                trainer, pl_module, self._resolve_loss_fn(pl_module), explanation, epoch, log_dir,
                train=self._train_data(trainer, pl_module), val=self._val_data(trainer),
                writer=self._writers.get(trainer, log_dir), count=self.verify_loo, steps=self.verify_loo_steps,
                verbose=self.verbose))

    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Explanation:
        loss_fn = self._resolve_loss_fn(pl_module)
        train = self._train_data(trainer, pl_module)
        val = self._val_data(trainer)
        collectives = collectives_for(trainer)
        setup = self._problem(trainer)
        steps = solver_type(setup.solver).progress_steps(setup.solver, CollectiveRanks(collectives))
        # with candidates only their union is scored, which is known after the neighbour search: no end shown
        shard_size = (None if self.settings.num_candidates is not None
                      else len(range(collectives.rank, len(train), collectives.world_size)))
        with progress_task(trainer, "influence: s_test", steps, "validation losses, damping and scale") as on_step, \
                progress_task(trainer, "influence: scoring", shard_size) as on_scored:
            found = explain(pl_module, loss_fn, train, val, setup, self.settings, collectives,
                            on_lissa_step=lambda: on_step(1), on_scored=on_scored, describe=self._describe,
                            snapshots=self.snapshots.before(trainer.global_step))
        return checked_explanation(found, self.damping_check)

    def _problem(self, trainer: pl.Trainer) -> ProblemConfig:
        return analysis_problem(self.problem, trainer, self.damping_check)

    def _check_damping(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int) -> None:
        """``damping="self_check"``: chosen at a fit's first analysis; ``"auto"`` without validation data."""
        if self.problem.damping == SELF_CHECK_DAMPING and self.damping_check is None:
            self.damping_check = self_check_once(trainer, pl_module, self._resolve_loss_fn(pl_module), self._train_data(
                trainer, pl_module), self._problem(trainer), self.settings.chunk_size, stage, epoch,
                self._fit_train_loader, self.verbose, self.strict)

    def _mislabel(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> MislabelReport:
        return self.mislabel.report(trainer, pl_module, self._resolve_loss_fn(pl_module), self._train_data(
            trainer, pl_module), self._problem(trainer), self._describe, epoch, damping_check=self.damping_check)

    def _resolve_loss_fn(self, pl_module: pl.LightningModule) -> LossFn:
        return resolve_loss_fn(pl_module, self.loss_fn)

    def _train_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> IndexedData:
        return train_data(trainer, pl_module, self.settings.chunk_size, dataset=self.train_dataset,
                          loader=self.train_dataloader, fallback=self._fit_train_loader)

    def _val_data(self, trainer: pl.Trainer) -> IndexedData:
        found = val_data(trainer, self.settings.chunk_size)
        assert found is not None  # required=True raises instead
        return found

    # -- output (rank zero) --------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, explanation: Explanation, stage: str, epoch: int, log_dir: Path) -> None:
        path = publish_explanation(self._writers.get(trainer, log_dir), log_dir, explanation, epoch=epoch,
                                   global_step=trainer.global_step, stage=stage, verbose=self.verbose)
        if self.verbose:
            rank_zero_info(f"Influence results: {path} (TensorBoard: `tensorboard --logdir {log_dir}`)")

