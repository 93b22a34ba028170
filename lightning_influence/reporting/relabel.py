"""Relabel lists and per-class counts of mislabel candidates: one implementation for the callback's
TensorBoard table, ``lightning-influence export --relabel`` and the dashboard's relabel download.

Everything reads the JSON dict of a mislabel report (``mislabel_epoch={epoch}.json``, or
``mislabel_to_dict(report)``) or plain label lists, so it works on files from any earlier run. The
*predicted label* of a candidate is the training signals' suggested label (the most likely class other than the
given one over the recorded checkpoints) when the report has it, else the model's prediction at the analysed
weights.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_influence.reporting.files import PathLike, _atomic_file, write_json_atomic

#: Columns of a relabel list, in order; ``new_label`` starts as the predicted label (edit it before applying);
#: ``flagged`` is true for the candidates within the report's estimated number of wrong labels (empty for a
#: report without training signals).
RELABEL_COLUMNS = ("rank", "train_index", "given_label", "predicted_label", "new_label", "score", "self_influence",
                   "loss", "loss_rank", "flagged")
RELABEL_SUFFIXES = (".csv", ".json")


def predicted_label(candidate: dict[str, Any]) -> Any:
    """The label to suggest for one candidate dict: ``suggested_label`` when present, else ``prediction``."""
    suggested = candidate.get("suggested_label")
    return candidate.get("prediction") if suggested is None else suggested


def relabel_rows(report: dict[str, Any], train_indices: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """One row per candidate (:data:`RELABEL_COLUMNS`), in the report's order.

    ``rank`` and ``loss_rank`` are 1-based, as the console and TensorBoard tables show them (1 = the strongest
    candidate; 1 = the highest training loss); the JSON report keeps ``loss_rank`` 0-based.

    Args:
        report: a mislabel report dict.
        train_indices: only these candidates, in this order (default: every candidate).

    Raises:
        ValueError: if ``report`` is not a mislabel report or an index is not one of its candidates.
    """
    if "candidates" not in report:
        raise ValueError("Expected a mislabel report (with `candidates`), but got an influence report.")
    ranked = {c["train_index"]: (rank, c) for rank, c in enumerate(report["candidates"])}
    order = list(ranked) if train_indices is None else [int(i) for i in train_indices]
    missing = [i for i in order if i not in ranked]
    if missing:
        raise ValueError(f"Training examples {missing} are not mislabel candidates of this report (epoch"
                         f" {report.get('epoch')}).")
    rows = []
    for index in order:
        rank, c = ranked[index]
        predicted = predicted_label(c)
        loss_rank = c.get("loss_rank")
        rows.append({"rank": rank + 1, "train_index": index, "given_label": c.get("label"), "predicted_label": predicted,
                     "new_label": predicted, "score": c.get("score"), "self_influence": c.get("self_influence"),
                     "loss": c.get("loss"), "loss_rank": None if loss_rank is None else int(loss_rank) + 1,
                     "flagged": c.get("flagged")})
    return rows


def relabel_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text with a header line: the :data:`RELABEL_COLUMNS` the rows have, in that order
    (lists, e.g. multi-label targets, as JSON text; None as an empty cell)."""
    columns = [c for c in RELABEL_COLUMNS if c in rows[0]] if rows else list(RELABEL_COLUMNS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def write_relabel(report: dict[str, Any], path: PathLike) -> Path:
    """Write :func:`relabel_rows` of ``report`` to ``path``: CSV (``.csv``) or a JSON list (``.json``), atomically."""
    path = Path(path)
    if path.suffix not in RELABEL_SUFFIXES:
        raise ValueError(f"Expected a relabel path ending in {' or '.join(RELABEL_SUFFIXES)}, but got `{path}`.")
    rows = relabel_rows(report)
    if path.suffix == ".json":
        return write_json_atomic(path, rows)
    with _atomic_file(path, mode="w") as handle:
        handle.write(relabel_csv(rows))
    return path


def confusion_records(given: Sequence[Any], predicted: Sequence[Any]) -> list[dict[str, Any]]:
    """How many candidates per ``(given_label, predicted_label)`` pair, most frequent first (ties by label).

    Pass the given and predicted labels of the candidates only; an asymmetric confusion (a class's labels
    flipped to one other class) shows up as one large cell.
    """
    keys = [(_key(g), _key(p)) for g, p in zip(given, predicted)]
    counts = Counter(keys)
    return [{"given_label": g, "predicted_label": p, "count": c}
            for (g, p), c in sorted(counts.items(), key=lambda item: (-item[1], _order(item[0])))]


def report_confusion(report: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`confusion_records` of a mislabel report dict's candidates (their :func:`predicted_label`)."""
    candidates = report["candidates"]
    return confusion_records([c.get("label") for c in candidates], [predicted_label(c) for c in candidates])


def _key(value: Any) -> Any:
    """A hashable label: ints stay ints, lists (multi-label) become JSON text."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _order(pair: tuple[Any, Any]) -> tuple[tuple[int, int, str], ...]:
    """Labels in order: integers numerically, then anything else by its text."""
    return tuple((0, v, "") if isinstance(v, int) and not isinstance(v, bool) else (1, 0, str(v)) for v in pair)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value
