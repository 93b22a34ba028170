"""Results in other layouts: long tables (CSV/Parquet via pandas) and the pytorch-influence-functions layout.

Everything here reads the JSON dicts written by :func:`~lightning_influence.reporting.write_report_files`
and :func:`~lightning_influence.reporting.write_mislabel_files` (or built with ``report_to_dict`` /
``mislabel_to_dict``), so it works on files from any earlier run. Sign convention as everywhere in this
package: ``I(z, z_test) = -s_test . grad L(z)``, positive = harmful, negative = helpful, not divided by n.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_influence.reporting._format import SIGN_CONVENTION
from lightning_influence.reporting.files import PathLike, _atomic_file, write_json_atomic

TABLE_SUFFIXES = (".csv", ".parquet")
PANDAS_MISSING = (
    "Expected pandas to be installed for a table export, but it is not. Install it with `pip install pandas`"
    " (and `pyarrow` for Parquet), or read the JSON report directly."
)


def load_report(path: PathLike) -> dict[str, Any]:
    """Read an ``epoch={epoch}.json`` or ``mislabel_epoch={epoch}.json`` file written by this package."""
    with open(path, encoding="utf-8") as handle:
        report = json.load(handle)
    if not isinstance(report, dict) or ("points" not in report and "candidates" not in report):
        raise ValueError(
            f"Expected `{path}` to be an influence report (with `points`) or a mislabel report (with `candidates`)"
            " written by lightning-influence, but it has neither key."
        )
    return report


def influence_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (validation point, listed training example): the long layout of an influence report.

    ``loss_change_if_removed = -influence / train_size`` is the estimated change of the point's loss when the
    training example is removed (negative for harmful examples: removing them lowers the loss).
    """
    rows = []
    n = report["train_size"]
    for point in report["points"]:
        for kind in ("harmful", "helpful"):
            for rank, (train_index, influence) in enumerate(point[kind], start=1):  # 1-based, as the tables show
                rows.append({
                    "epoch": report["epoch"], "global_step": report["global_step"], "stage": report["stage"],
                    "val_index": point["val_index"], "val_label": point["label"],
                    "val_prediction": point["prediction"], "val_loss": point["loss"], "kind": kind, "rank": rank,
                    "train_index": train_index, "influence": influence,
                    "loss_change_if_removed": None if influence is None or not n else -influence / n,
                })
    return rows


def mislabel_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per mislabel candidate, strongest first; ``rank`` and ``loss_rank`` 1-based, as the console and
    TensorBoard tables show them (the JSON report keeps ``loss_rank`` 0-based)."""
    return [
        {"epoch": report["epoch"], "global_step": report["global_step"], "rank": rank, **candidate,
         **({"loss_rank": candidate["loss_rank"] + 1} if isinstance(candidate.get("loss_rank"), int) else {})}
        for rank, candidate in enumerate(report["candidates"], start=1)
    ]


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`influence_rows` or :func:`mislabel_rows`, whichever kind ``report`` is."""
    return influence_rows(report) if "points" in report else mislabel_rows(report)


def to_dataframe(report: dict[str, Any]) -> Any:
    """The rows of ``report`` as a ``pandas.DataFrame`` (needs pandas).

    Raises:
        ImportError: if pandas is not installed.
    """
    if importlib.util.find_spec("pandas") is None:
        raise ImportError(PANDAS_MISSING)
    import pandas as pd

    rows = report_rows(report)
    for row in rows:  # lists (multi-label targets) do not fit a flat table cell: keep them as JSON text
        for key, value in row.items():
            if isinstance(value, (list, dict)):
                row[key] = json.dumps(value)
    return pd.DataFrame(rows)


def check_table_path(path: PathLike) -> Path:
    """``path`` if a table can be written there: a ``.csv``/``.parquet`` suffix and the libraries it needs.

    Raises:
        ValueError: if the suffix is neither ``.csv`` nor ``.parquet``.
        ImportError: if pandas (or, for Parquet, pyarrow/fastparquet) is missing.
    """
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"Expected a table path ending in {' or '.join(TABLE_SUFFIXES)}, but got `{path}`.")
    if importlib.util.find_spec("pandas") is None:
        raise ImportError(PANDAS_MISSING)
    if path.suffix == ".parquet" and not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
        raise ImportError(
            "Expected pyarrow (or fastparquet) to be installed for a Parquet export, but neither is. Install it"
            f" with `pip install pyarrow`, or export to `{path.with_suffix('.csv')}` instead."
        )
    return path


def export_table(report: dict[str, Any], path: PathLike) -> Path:
    """Write the rows of ``report`` to ``path`` (``.csv`` or ``.parquet``) atomically.

    Raises:
        ValueError: if the suffix is neither ``.csv`` nor ``.parquet``.
        ImportError: if pandas (or, for Parquet, pyarrow/fastparquet) is missing.
    """
    path = check_table_path(path)
    frame = to_dataframe(report)
    with _atomic_file(path, mode="wb") as handle:
        if path.suffix == ".csv":
            handle.write(frame.to_csv(index=False).encode("utf-8"))
        else:
            frame.to_parquet(handle, index=False)
    return path


def pytorch_influence_functions_layout(
    report: dict[str, Any], full_scores: Optional[torch.Tensor] = None
) -> dict[str, dict[str, Any]]:
    """The top lists keyed by test id, the layout of ``pytorch-influence-functions``' ``calc_img_wise`` results.

    ``{"<val_index>": {"label", "num_in_dataset", "harmful": [train ids], "helpful": [train ids], ...}}``,
    lists strongest first. The meaning of ``harmful``/``helpful`` follows **this** package's convention
    (``harmful`` = largest positive ``I(z, z_test) = -s_test . grad L(z)``: up-weighting them raises the test
    loss). pytorch-influence-functions computes the same quantity divided by n but lists its ``harmful``
    by *ascending* influence, which by this definition are the most helpful examples: compare the two
    packages by influence values, not by list names. Each entry also carries ``harmful_influence`` and
    ``helpful_influence`` (not divided by n), ``sign_convention``, and ``influence`` (every training example's
    score, index = training index; null where not scored) when ``full_scores`` is given: the
    ``[points, n_train]`` table, e.g. from :func:`~lightning_influence.reporting.load_full_scores` on the score
    index ``epoch={epoch}-scores.json``.
    """
    if "points" not in report:
        raise ValueError("Expected an influence report (with `points`), but got a mislabel report.")
    rows = _full_score_rows(report, full_scores)
    layout = {}
    for position, point in enumerate(report["points"]):
        entry: dict[str, Any] = {
            "label": point["label"],
            "num_in_dataset": position,
            "harmful": [int(index) for index, _ in point["harmful"]],
            "helpful": [int(index) for index, _ in point["helpful"]],
            "harmful_influence": [score for _, score in point["harmful"]],
            "helpful_influence": [score for _, score in point["helpful"]],
            "sign_convention": SIGN_CONVENTION,
        }
        if rows is not None:
            entry["influence"] = rows[position]
        layout[str(point["val_index"])] = entry
    return layout


def write_pytorch_influence_functions_json(
    report: dict[str, Any], path: PathLike, full_scores: Optional[torch.Tensor] = None
) -> Path:
    """Write :func:`pytorch_influence_functions_layout` to ``path`` as JSON, atomically."""
    return write_json_atomic(path, pytorch_influence_functions_layout(report, full_scores))


def _full_score_rows(report: dict[str, Any], full_scores: Any) -> Optional[list[list[Optional[float]]]]:
    if full_scores is None:
        return None
    scores = full_scores
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != len(report["points"]):
        raise ValueError(
            f"Expected `full_scores` shaped [n_points={len(report['points'])}, n_train] (rows in report order),"
            f" but got {getattr(scores, 'shape', type(scores))}."
        )
    return [[value if math.isfinite(value) else None for value in row] for row in scores.double().tolist()]


def report_schema(kind: str = "influence") -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``epoch={epoch}.json`` (``"influence"``) or ``mislabel_epoch={epoch}.json``
    (``"mislabel"``), shipped with the package; validate with e.g. ``jsonschema.validate(report, schema)``."""
    if kind not in ("influence", "mislabel"):
        raise ValueError(f"Expected `kind` to be 'influence' or 'mislabel', but got {kind!r}.")
    text = importlib.resources.files("lightning_influence.reporting").joinpath(
        f"schemas/{kind}_report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
