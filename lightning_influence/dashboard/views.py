"""The dashboard's views of one report dict: pure functions, no files (``data.py`` reads them).

Ranks a user reads are 1-based everywhere (top lists, mislabel rank, loss rank), as in the console and the
relabel CSV; the report JSON keeps its documented 0-based ``loss_rank``.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_influence.config import RESIDUAL_TOL
from lightning_influence.dashboard.files import BadRequest

HISTOGRAM_BINS = 30
AGREEMENT_LIMIT = 0.5  # as lightning_influence.trust: repeat-half Spearman below it = repeats disagree
SELF_INFLUENCE = "self_influence"


def examples_of(report: dict[str, Any]) -> dict[str, Any]:
    """The report's ``examples`` object (renderings); empty for reports written before it existed."""
    examples = report.get("examples") or {}
    return {"val": examples.get("val") or {}, "train": examples.get("train") or {}}


def example_entry(table: dict[str, Any], index: int) -> dict[str, Any]:
    """What the dashboard shows of one example: label, prediction, loss, rendered input and formatted text."""
    entry = table.get(str(index)) or {}
    return {"label": entry.get("label"), "prediction": entry.get("prediction"), "loss": entry.get("loss"),
            "input": entry.get("input"), "text": entry.get("text")}


def residual_limit(report: dict[str, Any]) -> float:
    """The residual tolerance the analysis itself was judged by (its solver's ``residual_tol``)."""
    solver = report.get("solver") or {}
    for value in (solver.get("residual_tol"), (solver.get("settings") or {}).get("residual_tol")):
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return RESIDUAL_TOL


def model_warnings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The model-level trust warnings of severity ``warning`` (they qualify every point's badge)."""
    trust = report.get("trust") or {}
    return [w for w in trust.get("warnings", []) if isinstance(w, dict) and w.get("severity") == "warning"]


def trust_by_point(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{val_index: {residual, repeat_pearson, repeat_spearman, badge, reasons}}``. The badge is ``poor`` when
    the point's residual is above the analysis' own tolerance or its repeats disagree, ``caution`` when the point
    is fine but the model-level diagnosis warns (e.g. not converged), ``ok`` otherwise, ``unknown`` untested."""
    trust = report.get("trust")
    if not isinstance(trust, dict):
        return {}
    limit = residual_limit(report)
    caution = [f"{w.get('code')}: {w.get('message', '')}" for w in model_warnings(report)]
    result = {}
    for p in trust.get("points", []):
        residual, spearman = p.get("residual"), p.get("repeat_spearman")
        reasons = []
        if residual is not None and residual > limit:
            reasons.append(f"residual {residual:.3g} > tolerance {limit:g} (the solve did not converge for it)")
        if spearman is not None and spearman < AGREEMENT_LIMIT:
            reasons.append(f"repeat Spearman {spearman:.3g} < {AGREEMENT_LIMIT}")
        if reasons:
            badge = "poor"
        elif residual is None:
            badge = "unknown"
        else:
            badge = "caution" if caution else "ok"
        result[p.get("val_index")] = {"residual": residual, "repeat_pearson": p.get("repeat_pearson"),
                                      "repeat_spearman": spearman, "badge": badge, "reasons": reasons,
                                      "cautions": caution, "limit": limit}
    return result


def point_summary(point: dict[str, Any], examples: dict[str, Any], trust: dict[int, Any]) -> dict[str, Any]:
    index = point["val_index"]
    shown = example_entry(examples["val"], index)
    return {"val_index": index, "label": point.get("label"), "prediction": point.get("prediction"),
            "loss": point.get("loss"), "input": shown["input"], "text": shown["text"],
            "top_influence": max((abs(_num(v, 0.0)) for _, v in point["harmful"]), default=None),
            "trust": trust.get(index, {"badge": "unknown"})}


def loss_change(influence: Any, n: int) -> float | None:
    """``-I / n``: the estimated change of the point's loss if the example were removed (None if I is not a number)."""
    return -influence / n if isinstance(influence, (int, float)) and not isinstance(influence, bool) else None


def distinct(rows: list[dict[str, Any]], key: str) -> list[str]:
    """The distinct values of ``key`` as text, in natural order (for the filter menus)."""
    return sorted({_text(r.get(key)) for r in rows if r.get(key) is not None}, key=lambda s: (len(s), s))


def filter_rows(rows: list[dict[str, Any]], filters: dict[str, str], index_key: str) -> list[dict[str, Any]]:
    """Rows whose fields equal the filters (as text): ``label``, ``prediction``, ``model_prediction``,
    ``suggested_label``, ``badge``; ``index`` = one index; ``wrong=1``: label != prediction."""
    kept = rows
    for key, wanted in filters.items():
        if wanted in ("", None):
            continue
        if key == "index":
            kept = [r for r in kept if str(r[index_key]) == wanted.strip().lstrip("#")]
        elif key == "wrong":
            field = "model_prediction" if any("model_prediction" in r for r in kept) else "prediction"
            kept = [r for r in kept if (_text(r.get("label")) != _text(r.get(field))) == (wanted == "1")]
        elif key == "badge":
            kept = [r for r in kept if (r.get("trust") or {}).get("badge") == wanted]
        else:
            kept = [r for r in kept if _text(r.get(key)) == wanted]
    return kept


def sort_points(rows: list[dict[str, Any]], report: dict[str, Any], sort: str) -> list[dict[str, Any]]:
    if sort == "index":
        return sorted(rows, key=lambda r: r["val_index"])
    if sort == "influence":
        return sorted(rows, key=lambda r: -_num(r["top_influence"], -math.inf))
    if sort == "residual":
        return sorted(rows, key=lambda r: -_num(r["trust"].get("residual"), -math.inf))
    return sorted(rows, key=lambda r: -_num(r.get("loss"), -math.inf))


def sort_examples(rows: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    if sort == "index":
        return sorted(rows, key=lambda r: r["train_index"])
    if sort == "helpful_count":
        return sorted(rows, key=lambda r: (-r["helpful_count"], _num(r["total_influence"], 0.0), r["train_index"]))
    if sort == "total_influence":
        return sorted(rows, key=lambda r: (-_num(r["total_influence"], 0.0), r["train_index"]))
    return sorted(rows, key=lambda r: (-r["harmful_count"], -_num(r["total_influence"], 0.0), r["train_index"]))


def grow_to(rows: list[dict[str, Any]], key: str, wanted: int | None, offset: int, limit: int) -> int:
    """``limit``, grown so that the page starting at ``offset`` holds the row whose ``key`` is ``wanted``."""
    if wanted is None:
        return limit
    position = next((i for i, r in enumerate(rows) if r[key] == wanted), None)
    return limit if position is None or position < offset + limit else position - offset + 1


def influencer_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per training example in any top list: how many points it harms and helps, and which."""
    table: dict[int, dict[str, Any]] = {}
    for point in report["points"]:
        for kind in ("harmful", "helpful"):
            for index, influence in point[kind]:
                row = table.setdefault(index, {"train_index": index, "harmful_count": 0, "helpful_count": 0,
                                               "harmful_points": [], "helpful_points": [], "total_influence": 0.0})
                row[f"{kind}_count"] += 1
                row[f"{kind}_points"].append(point["val_index"])
                row["total_influence"] += _num(influence, 0.0)
    return list(table.values())


def example_rows(report: dict[str, Any], train_index: int, column: list[Any] | None,
                 examples: dict[str, Any]) -> list[dict[str, Any]]:
    """The points one training example influences (every point with a score column, else its top lists)."""
    rows = []
    for position, point in enumerate(report["points"]):
        listed = {kind: [i for i, _ in point[kind]] for kind in ("harmful", "helpful")}
        pairs = {i: v for kind in ("harmful", "helpful") for i, v in point[kind]}
        influence = column[position] if column is not None else pairs.get(train_index)
        if influence is None and train_index not in pairs:
            continue
        kind = next((k for k in ("harmful", "helpful") if train_index in listed[k]), "scored")
        shown = example_entry(examples["val"], point["val_index"])
        rows.append({"val_index": point["val_index"], "label": point.get("label"),
                     "prediction": point.get("prediction"), "loss": point.get("loss"), "influence": influence,
                     "kind": kind, "rank": listed[kind].index(train_index) + 1 if kind != "scored" else None,
                     "input": shown["input"], "text": shown["text"]})
    rows.sort(key=lambda r: -_num(r["influence"], -math.inf))
    return rows


def compare_entry(epoch: int, report: dict[str, Any], point: dict[str, Any],
                  previous: dict[str, Any] | None) -> dict[str, Any]:
    entry = {"epoch": epoch, "global_step": report.get("global_step"), "stage": report.get("stage"),
             "label": point.get("label"), "prediction": point.get("prediction"), "loss": point.get("loss"),
             "harmful": point["harmful"], "helpful": point["helpful"]}
    if previous is not None:
        for kind in ("harmful", "helpful"):
            now, before = {i for i, _ in point[kind]}, {i for i, _ in previous[kind]}
            entry[f"{kind}_kept"] = len(now & before)
            entry[f"{kind}_new"] = sorted(now - before)
    return entry


def class_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Training label (rows) x validation label (columns): how often and how strongly examples of one class
    are in the harmful (and helpful) top lists of points of another, over the report's top lists."""
    train = examples_of(report)["train"]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for point in report["points"]:
        val_label = _text(point.get("label"))
        for kind in ("harmful", "helpful"):
            for index, influence in point[kind]:
                train_label = _text((train.get(str(index)) or {}).get("label"))
                cell = cells.setdefault((train_label, val_label), {"harmful": 0, "helpful": 0, "harmful_sum": 0.0})
                cell[kind] += 1
                if kind == "harmful":
                    cell["harmful_sum"] += _num(influence, 0.0)
    rows = sorted({k[0] for k in cells}, key=lambda s: (len(s), s))
    columns = sorted({k[1] for k in cells}, key=lambda s: (len(s), s))
    empty = {"harmful": 0, "helpful": 0, "harmful_sum": 0.0}
    return {"rows": rows, "columns": columns, "source": "top lists",
            "cells": [[cells.get((r, c), empty) for c in columns] for r in rows],
            "worst": [{"train_label": r, "val_label": c, **v} for (r, c), v in
                      sorted(cells.items(), key=lambda item: -item[1]["harmful_sum"]) if v["harmful"]][:10]}


def histogram(row: Any) -> dict[str, Any] | None:
    """A 30-bin histogram of one row of the full score table (finite values only)."""
    import torch

    row = row[torch.isfinite(row)]
    if row.numel() == 0:
        return None
    low, high = float(row.min()), float(row.max())
    counts = torch.histc(row, bins=HISTOGRAM_BINS, min=low, max=high if high > low else low + 1.0)
    return {"min": low, "max": high, "counts": [int(c) for c in counts.tolist()], "scored": int(row.numel())}


# -- mislabel -----------------------------------------------------------------------------------------------
def candidate_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every candidate in the report's order with 1-based ``rank`` and ``loss_rank``, the model's own
    prediction and the suggested label kept apart, and its rendering when the report has one."""
    train = examples_of(report)["train"]
    rows = []
    for rank, c in enumerate(report["candidates"], start=1):
        shown = example_entry(train, c["train_index"])
        suggested = c.get("suggested_label")
        loss_rank = c.get("loss_rank")
        rows.append({"rank": rank, "train_index": c["train_index"], "label": c.get("label"),
                     "model_prediction": c.get("prediction"), "suggested_label": suggested,
                     "predicted": c.get("prediction") if suggested is None else suggested,
                     "score": c.get("score"), "self_influence": c.get("self_influence"), "loss": c.get("loss"),
                     "loss_rank": None if loss_rank is None else loss_rank + 1, "flagged": c.get("flagged"),
                     "input": shown["input"], "text": shown["text"], "rendered": str(c["train_index"]) in train})
    return rows


def mislabel_page(report: dict[str, Any], offset: int, limit: int, filters: dict[str, str],
                  order: str | None) -> dict[str, Any]:
    """The mislabel view: the ranking the report used (name, definition, its score shown per row), a page of
    candidates (filtered, or reordered by another stored ranking), the model's prediction vs the given label
    over all candidates, and with training signals the given -> suggested label pairs."""
    rows = candidate_rows(report)
    ranking = report.get("ranking") or SELF_INFLUENCE
    rankings = report.get("rankings") or {}
    signals = report.get("training_signals") or {}
    outside = 0
    if order and order != ranking:
        if order not in rankings:
            raise BadRequest(f"Expected `order` to be one of the report's rankings {sorted(rankings)}, but got {order!r}.")
        position = {index: k for k, index in enumerate(rankings[order])}
        outside = sum(index not in {r["train_index"] for r in rows} for index in rankings[order])
        rows = sorted(rows, key=lambda r: position.get(r["train_index"], len(position)))
    has_suggested = any(r["suggested_label"] is not None for r in rows)
    shown = filter_rows(rows, filters, "train_index")
    return {
        "global_step": report.get("global_step"), "train_size": report.get("train_size"),
        "ranking": ranking, "ranking_definition": report.get("ranking_definition") or report.get("definition"),
        "score_name": "|I(z, z)|" if ranking == SELF_INFLUENCE else ranking, "order": order or ranking,
        "rankings": sorted(rankings), "outside": outside, "definition": report.get("definition"),
        "signals": signals.get("recorded", False), "signals_note": signals.get("note"),
        "has_suggested": has_suggested, "solver": report.get("solver"), "total": len(shown), "all": len(rows),
        "estimated_flips": report.get("estimated_flips"), "has_flags": any(r["flagged"] is not None for r in rows),
        "rendered": sum(r["rendered"] for r in rows), "offset": offset, "limit": limit,
        "candidates": shown[offset: offset + limit],
        "confusion": label_table(rows, "model_prediction", "model prediction"),
        "suggestions": label_table(rows, "suggested_label", "suggested label") if has_suggested else None,
    }


def label_table(rows: list[dict[str, Any]], column: str, title: str) -> dict[str, Any]:
    """Counts of (given label, ``column``) among the rows, labels in natural order."""
    keys = [(_text(r.get("label")), _text(r.get(column))) for r in rows]
    labels = sorted({k for pair in keys for k in pair}, key=lambda s: (len(s), s))
    position = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for given, other in keys:
        counts[position[given]][position[other]] += 1
    return {"labels": labels, "counts": counts, "rows": "given label", "columns": title, "field": column}


# -- trust --------------------------------------------------------------------------------------------------
def trust_view(report: dict[str, Any]) -> dict[str, Any]:
    trust = report.get("trust") if isinstance(report.get("trust"), dict) else None
    badges = trust_by_point(report)
    points = [{"val_index": p["val_index"], "loss": p.get("loss"), **badges.get(p["val_index"], {"badge": "unknown"})}
              for p in report["points"]]
    return {"solver": report.get("solver") or {}, "timings": report.get("timings", {}), "diagnosed": trust is not None,
            "points": points, "warnings": [] if trust is None else trust.get("warnings", []),
            "model": None if trust is None else {k: trust.get(k) for k in (
                "gradient_ratio", "gradient_examples", "top_eigenvalue", "residual_examples")},
            "limits": {"residual": residual_limit(report), "repeat_spearman": AGREEMENT_LIMIT}}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    return str(value)


def _num(value: Any, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default
