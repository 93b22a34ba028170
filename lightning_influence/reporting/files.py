"""Results on disk: a JSON file of the top lists per analysis and, optionally, the full score table.

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

from lightning_influence.reporting._format import SIGN_CONVENTION, to_builtin
from lightning_influence.reporting.records import (
    ExplainedPoint,
    Influencer,
    InfluenceReport,
    MislabelCandidate,
    MislabelReport,
    SolverSummary,
)

SCHEMA_VERSION = 1
SELF_INFLUENCE_DEFINITION = (
    "self_influence = I(z, z) = -g^T (H + damping I)^-1 g <= 0; larger |I(z, z)| = more likely mislabelled"
)
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
    }


def write_report_files(
    directory: PathLike, report: InfluenceReport, full_scores: torch.Tensor | None = None,
    train_indices: torch.Tensor | None = None,
) -> Path:
    """Write ``epoch={epoch}.json`` (and ``epoch={epoch}-scores.pt``) into ``directory``, overwriting.

    Args:
        directory: where to write; created if missing.
        report: the analysis results.
        full_scores: optional ``[n_points, n_scored]`` influence of every scored training example on each
            monitored point, rows in the order of ``report.points``.
        train_indices: with candidate preselection, ``[n_points, k]`` training indices of ``full_scores``'s
            entries (each point's own candidates); saved as ``train_indices``. None: columns are all examples.

    Returns:
        The path of the JSON file.

    Raises:
        ValueError: if ``full_scores`` is not a 2-D tensor with one row per point.
    """
    directory = Path(directory)
    json_path = write_json_atomic(directory / f"epoch={report.epoch}.json", report_to_dict(report))
    if full_scores is not None:
        _check_full_scores(full_scores, len(report.points))
        payload = {
            "val_indices": torch.tensor([point.val_index for point in report.points], dtype=torch.long),
            "scores": full_scores.detach().cpu().clone(),
        }
        if train_indices is not None:
            if tuple(train_indices.shape) != tuple(full_scores.shape):
                raise ValueError(
                    f"Expected `train_indices` shaped like `full_scores` {tuple(full_scores.shape)}, but got"
                    f" {tuple(train_indices.shape)}."
                )
            payload["train_indices"] = train_indices.detach().cpu().long().clone()
        save_tensor_atomic(directory / f"epoch={report.epoch}-scores.pt", payload)
    return json_path


def mislabel_to_dict(report: MislabelReport) -> dict[str, Any]:
    """Convert a mislabel report to JSON-serialisable builtins (schema version 1, see ``docs/mislabel.md``).

    Candidates keep the report's order (strongest ``|I(z, z)|`` first); ``loss_rank`` is 0-based
    (0 = highest training loss). ``report.scores`` is not included (it goes to the TensorBoard histogram).
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "epoch": int(report.epoch),
        "global_step": int(report.global_step),
        "train_size": int(report.train_size),
        "definition": SELF_INFLUENCE_DEFINITION,
        "solver": _solver_to_dict(report.solver),
        "seconds": to_builtin(float(report.seconds)),
        "candidates": [_candidate_to_dict(candidate) for candidate in report.candidates],
    }


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


def _solver_to_dict(solver: SolverSummary) -> dict[str, Any]:
    return {
        "solver": str(solver.solver),
        "damping": to_builtin(float(solver.damping)),
        "scale": to_builtin(None if solver.scale is None else float(solver.scale)),
        "converged": bool(solver.converged),
        "seconds": to_builtin(float(solver.seconds)),
        "settings": to_builtin(dict(solver.settings)),
    }


def _candidate_to_dict(candidate: MislabelCandidate) -> dict[str, Any]:
    return {
        "train_index": int(candidate.train_index),
        "self_influence": to_builtin(float(candidate.self_influence)),
        "loss": to_builtin(float(candidate.loss)),
        "loss_rank": int(candidate.loss_rank),
        "label": to_builtin(candidate.label),
        "prediction": to_builtin(candidate.prediction),
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
