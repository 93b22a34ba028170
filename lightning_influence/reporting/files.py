"""Results on disk: a JSON file of the top lists per analysis and, optionally, the full score table
(one shard file per rank plus an index written by rank 0).

Every file is written atomically (a temporary file in the same directory, fsync, ``os.replace``), so a
reader never sees a half-written file, even if training is killed mid-write. See
``docs/output-format.md`` for the layout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Union

import torch

from lightning_influence.config import NO_SIGNALS_NOTE
from lightning_influence.reporting._format import SIGN_CONVENTION, to_builtin
from lightning_influence.reporting.examples import mislabel_examples, report_examples
from lightning_influence.results import (
    DampingCheck,
    ExplainedPoint,
    Influencer,
    InfluenceReport,
    MislabelCandidate,
    MislabelReport,
    SolveInfo,
    TrustReport,
)

SCHEMA_VERSION = 1
SELF_INFLUENCE_DEFINITION = (
    "self_influence = I(z, z) = -g^T (H + damping I)^-1 g <= 0; larger |I(z, z)| = more likely mislabelled"
)
#: What each ``ranking`` orders by (the JSON's ``ranking_definition``; larger score = more suspicious).
RANKING_DEFINITIONS = {
    "self_influence": "largest |I(z, z)| first (self-influence at the analysed weights)",
    "el2n_weighted": ("el2n_weighted: mean of ||softmax(z) - e_y||_2 over the recorded checkpoints, each weighted by"
                      " how much EL2N varies across the training examples there; larger = more likely mislabelled"
                      " (docs/mislabel.md)"),
    "el2n_fitted": ("el2n_fitted: mean of ||softmax(z) - e_y||_2 over the recorded checkpoints, each weighted by"
                    " how much EL2N varies across the training examples there times the fraction of them predicted"
                    " as labelled; larger = more likely mislabelled (docs/mislabel.md)"),
    "el2n_separated": ("el2n_separated: mean of ||softmax(z) - e_y||_2 over the recorded checkpoints, weighted"
                       " towards those where it splits most cleanly into two groups within each class (fitted and"
                       " not yet fitted examples), times the fraction predicted as labelled; larger = more likely"
                       " mislabelled (docs/mislabel.md)"),
    "el2n_window": ("el2n_window: mean over the recorded checkpoints up to the EL2N-separation window of"
                    " ||softmax(z) - e_y||_2; larger = more likely mislabelled (docs/mislabel.md)"),
}
FILE_MODE = 0o644
PathLike = Union[str, "os.PathLike[str]"]


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically, creating parent directories.

    Args:
        path: the destination file.
        obj: anything ``json.dumps`` accepts (strict JSON: no NaN or infinity).

    Returns:
        The destination path.
    """
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with _atomic_file(Path(path), mode="w") as handle:
        handle.write(text)
    return Path(path)


def save_tensor_atomic(path: PathLike, obj: torch.Tensor | dict[str, Any]) -> Path:
    """``torch.save`` a tensor (or a dict of tensors) to ``path`` atomically, creating parent directories.

    Args:
        path: the destination file.
        obj: a tensor or a dict of tensors (load with ``torch.load(path, weights_only=True)``).

    Returns:
        The destination path.
    """
    with _atomic_file(Path(path), mode="wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def report_to_dict(report: InfluenceReport) -> dict[str, Any]:
    """Convert a report to JSON-serialisable builtins (schema version 1, see ``docs/output-format.md``).

    Tensor labels and predictions become numbers or lists, non-finite floats become None, unknown
    objects become strings.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "epoch": int(report.epoch),
        "global_step": int(report.global_step),
        "stage": str(report.stage),
        "train_size": int(report.train_size),
        "sign_convention": SIGN_CONVENTION,
        "solver": _solver_to_dict(report.solver),
        "timings": {str(key): to_builtin(float(value)) for key, value in report.timings.items()},
        "points": [_point_to_dict(point) for point in report.points],
        **({} if report.trust is None else {"trust": trust_to_dict(report.trust)}),
        "examples": report_examples(report),  # labels, predictions, losses, small renderings (the dashboard's)
    }


def trust_to_dict(trust: TrustReport) -> dict[str, Any]:
    """The self-diagnosis as JSON builtins (the ``trust`` object of ``docs/output-format.md``)."""
    return {
        "residual_examples": int(trust.residual_examples),
        "gradient_ratio": to_builtin(trust.gradient_ratio),
        "gradient_examples": int(trust.gradient_examples),
        "top_eigenvalue": to_builtin(trust.top_eigenvalue),
        "points": [
            {"val_index": int(p.val_index), "residual": to_builtin(p.residual),
             "repeat_pearson": to_builtin(p.repeat_pearson), "repeat_spearman": to_builtin(p.repeat_spearman)}
            for p in trust.points
        ],
        "warnings": [{"code": w.code, "severity": w.severity, "message": w.message} for w in trust.warnings],
    }


def write_report_files(
    directory: PathLike, report: InfluenceReport, full_scores: torch.Tensor | None = None
) -> Path:
    """Write ``epoch={epoch}.json`` (and, with ``full_scores``, a one-shard score table) into ``directory``.

    Args:
        directory: where to write; created if missing.
        report: the analysis results.
        full_scores: optional ``[n_points, n_train]`` influence of every training example (column = training
            index) on each monitored point, rows in the order of ``report.points``. Written as
            ``epoch={epoch}-scores-rank0.pt`` plus the index ``epoch={epoch}-scores.json``
            (see :func:`write_score_shard`; read back with :func:`load_full_scores`).

    Returns:
        The path of the JSON file.

    Raises:
        ValueError: if ``full_scores`` is not a 2-D tensor with one row per point.
    """
    directory = Path(directory)
    json_path = write_json_atomic(directory / f"epoch={report.epoch}.json", report_to_dict(report))
    if full_scores is not None:
        _check_full_scores(full_scores, len(report.points))
        val_indices = [point.val_index for point in report.points]
        train_indices = torch.arange(full_scores.shape[1])
        write_score_shard(directory, report.epoch, val_indices, train_indices, full_scores, rank=0, world_size=1)
        write_score_index(directory, report.epoch, val_indices, full_scores.shape[1], world_size=1)
    return json_path


def score_shard_name(epoch: int, rank: int) -> str:
    return f"epoch={epoch}-scores-rank{rank}.pt"


def write_score_shard(
    directory: PathLike, epoch: int, val_indices: list[int], train_indices: torch.Tensor, scores: torch.Tensor,
    rank: int, world_size: int,
) -> Path:
    """Write one rank's full scores to ``epoch={epoch}-scores-rank{rank}.pt`` (every rank writes its own).

    A dict of tensors: ``val_indices [n_points]``, ``train_indices [n_local]``, ``scores [n_points, n_local]``
    (column j is training example ``train_indices[j]``), ``rank`` and ``world_size``.
    """
    _check_full_scores(scores, len(val_indices))
    if train_indices.shape != (scores.shape[1],):
        raise ValueError(f"Expected one training index per score column ({scores.shape[1]}), but got shape"
                         f" {tuple(train_indices.shape)}.")
    payload = {
        "val_indices": torch.tensor(val_indices, dtype=torch.long),
        "train_indices": train_indices.detach().cpu().long().clone(),
        "scores": scores.detach().cpu().clone(),
        "rank": torch.tensor(rank),
        "world_size": torch.tensor(world_size),
    }
    return save_tensor_atomic(Path(directory) / score_shard_name(epoch, rank), payload)


def write_score_index(directory: PathLike, epoch: int, val_indices: list[int], train_size: int, world_size: int) -> Path:
    """Write ``epoch={epoch}-scores.json`` (rank 0): the shard files that together hold the full score table."""
    index = {
        "schema_version": SCHEMA_VERSION,
        "epoch": epoch,
        "val_indices": [int(i) for i in val_indices],
        "train_size": int(train_size),
        "world_size": int(world_size),
        "shards": [score_shard_name(epoch, rank) for rank in range(world_size)],
        "sign_convention": SIGN_CONVENTION,
    }
    return write_json_atomic(Path(directory) / f"epoch={epoch}-scores.json", index)


def load_full_scores(index_path: PathLike) -> tuple[list[int], torch.Tensor]:
    """Reassemble ``(val_indices, scores [n_points, train_size])`` from a score index and its shard files.

    Training examples that no shard scored (e.g. outside a candidate subset) are NaN. Raises if a shard is
    missing or two shards score the same example.
    """
    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    val_indices = index["val_indices"]
    table = torch.full((len(val_indices), index["train_size"]), float("nan"), dtype=torch.float64)
    seen = torch.zeros(index["train_size"], dtype=torch.bool)
    for name in index["shards"]:
        path = index_path.parent / name
        if not path.exists():
            raise FileNotFoundError(f"Score shard {path} listed in {index_path} is missing: was every rank's"
                                    " output directory the same (a shared filesystem)?")
        shard = torch.load(path, weights_only=True)
        if shard["val_indices"].tolist() != val_indices:
            raise ValueError(f"Score shard {path} is for validation points {shard['val_indices'].tolist()},"
                             f" not {val_indices} as the index says: it is from another analysis.")
        columns = shard["train_indices"]
        if seen[columns].any():
            raise ValueError(f"Score shard {path} repeats training examples already in another shard.")
        seen[columns] = True
        table[:, columns] = shard["scores"].to(table.dtype)
    return val_indices, table


def mislabel_to_dict(report: MislabelReport) -> dict[str, Any]:
    """Convert a mislabel report to JSON-serialisable builtins (schema version 1, see ``docs/mislabel.md``).

    Candidates keep the report's order (its ``ranking``: strongest ``|I(z, z)|`` first without training signals);
    ``loss_rank`` is 0-based (0 = highest training loss). ``rankings`` lists every named ranking as training
    indices (as many as there are candidates); ``training_signals`` says whether the run recorded them and,
    when not, what that costs. ``estimated_flips`` is the estimated number of wrong labels with its interval and
    how many candidates are ``flagged`` (None without training signals). ``report.scores`` is not included (it
    goes to the TensorBoard histogram).
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "epoch": int(report.epoch),
        "global_step": int(report.global_step),
        "train_size": int(report.train_size),
        "definition": SELF_INFLUENCE_DEFINITION,
        "solver": _solver_to_dict(report.solver),
        "seconds": to_builtin(float(report.seconds)),
        "ranking": report.ranking,
        "ranking_definition": RANKING_DEFINITIONS.get(report.ranking, report.ranking),
        "training_signals": _signals_to_dict(report.signals),
        "estimated_flips": None if report.flip_count is None else to_builtin(report.flip_count),
        "candidates": [_candidate_to_dict(candidate) for candidate in report.candidates],
        "rankings": _rankings_to_dict(report),
        "examples": mislabel_examples(report),  # the candidates' renderings (the dashboard's)
    }


def _signals_to_dict(signals: dict[str, Any] | None) -> dict[str, Any]:
    """``{"recorded": true, "epochs", "seconds", "default"}``, or ``{"recorded": false, "note"}`` (what it costs)."""
    if signals is None:
        return {"recorded": False, "note": NO_SIGNALS_NOTE}
    return {"recorded": True, **to_builtin(signals)}


def _rankings_to_dict(report: MislabelReport) -> dict[str, list[int]]:
    """Every named ranking as training indices, most suspicious first, as long as the candidate list."""
    count = len(report.candidates)
    return {name: [int(i) for i in torch.argsort(torch.nan_to_num(score.double(), nan=float("-inf")),
                                                 descending=True, stable=True)[:count].tolist()]
            for name, score in report.rankings.items()}


def write_mislabel_files(directory: PathLike, report: MislabelReport) -> Path:
    """Write ``mislabel_epoch={epoch}.json`` into ``directory`` atomically, overwriting.

    Args:
        directory: where to write; created if missing.
        report: the mislabel analysis.

    Returns:
        The path of the JSON file.
    """
    path = Path(directory) / f"mislabel_epoch={report.epoch}.json"
    return write_json_atomic(path, mislabel_to_dict(report))


def _solver_to_dict(solver: SolveInfo) -> dict[str, Any]:
    return {
        "solver": str(solver.solver),
        "damping": to_builtin(float(solver.damping)),
        "scale": to_builtin(None if solver.scale is None else float(solver.scale)),
        "converged": bool(solver.converged),
        "seconds": to_builtin(float(solver.seconds)),
        "settings": to_builtin(dict(solver.settings)),
        "curvature": solver.curvature,
        "damping_requested": to_builtin(solver.damping_requested),
        "damping_rule": solver.damping_rule,
        "eigenvalue_min": to_builtin(solver.eigenvalue_min),
        "eigenvalue_max": to_builtin(solver.eigenvalue_max),
        "residual": to_builtin(solver.residual),
        "residual_tol": to_builtin(solver.residual_tol),
        "retries": to_builtin([dict(r) for r in solver.retries]),
        "warnings": list(solver.warnings),
        **({} if solver.damping_check is None else {"damping_check": damping_check_to_dict(solver.damping_check)}),
    }


def damping_check_to_dict(check: DampingCheck) -> dict[str, Any]:
    """How ``damping="self_check"`` chose the damping (the ``solver.damping_check`` object of the reports)."""
    return {"chosen": float(check.chosen), "candidates": [float(d) for d in check.candidates],
            "lds": [to_builtin(float(v)) for v in check.lds], "points": int(check.points),
            "retrainings": int(check.retrainings), "epochs": int(check.epochs), "epoch": check.epoch,
            "seconds": to_builtin(float(check.seconds)), "retraining_seconds": to_builtin(float(check.retraining_seconds))}


def _candidate_to_dict(candidate: MislabelCandidate) -> dict[str, Any]:
    return {
        "train_index": int(candidate.train_index),
        "self_influence": to_builtin(float(candidate.self_influence)),
        "loss": to_builtin(float(candidate.loss)),
        "loss_rank": int(candidate.loss_rank),
        "label": to_builtin(candidate.label),
        "prediction": to_builtin(candidate.prediction),
        "score": None if candidate.score is None else to_builtin(float(candidate.score)),
        "suggested_label": to_builtin(candidate.suggested_label),
        "flagged": candidate.flagged,
    }


def _point_to_dict(point: ExplainedPoint) -> dict[str, Any]:
    return {
        "val_index": int(point.val_index),
        "label": to_builtin(point.label),
        "prediction": to_builtin(point.prediction),
        "loss": to_builtin(float(point.loss)),
        "harmful": [_pair(influencer) for influencer in point.harmful],
        "helpful": [_pair(influencer) for influencer in point.helpful],
    }


def _pair(influencer: Influencer) -> list[Any]:
    return [int(influencer.train_index), to_builtin(float(influencer.influence))]


def _check_full_scores(full_scores: Any, n_points: int) -> None:
    if not isinstance(full_scores, torch.Tensor) or full_scores.ndim != 2 or full_scores.shape[0] != n_points:
        got = (
            f"shape {tuple(full_scores.shape)}"
            if isinstance(full_scores, torch.Tensor)
            else type(full_scores)
        )
        raise ValueError(
            f"Expected `full_scores` to be a tensor shaped [n_points={n_points}, n_scored] "
            f"(one row per report point), but got {got}."
        )


@contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Yield a temporary file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, FILE_MODE)  # mkstemp creates 0o600; results should be readable like any file
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself where the platform allows it (POSIX); best effort elsewhere."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
