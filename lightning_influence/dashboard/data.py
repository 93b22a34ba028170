"""What the Influence dashboard shows, read from the files the callback writes (no TensorBoard here).

A *run* is a directory under the log directory that holds ``influence/epoch={N}.json`` reports, named by its
path relative to the log directory (the name TensorBoard gives the run whose event files sit beside it).
Every function returns JSON builtins and raises :class:`BadRequest` (an HTTP 400 with a message) for a
parameter that names nothing. Lists are paged; of a full score table only one row's histogram or one
column (a training example's influence on each point) is ever returned.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

REPORT_NAME = re.compile(r"^epoch=(\d+)\.json$")
MISLABEL_NAME = re.compile(r"^mislabel_epoch=(\d+)\.json$")
MAX_PAGE = 500
DEFAULT_PAGE = 50
HISTOGRAM_BINS = 30
RESIDUAL_LIMIT = 0.5  # as lightning_influence.trust: above it a solve is inaccurate
AGREEMENT_LIMIT = 0.5  # as lightning_influence.trust: repeat-half Spearman below it = repeats disagree
RUN_CACHE_SECONDS = 2.0
MAX_CACHED_FILES = 16


class BadRequest(ValueError):
    """A request parameter that is missing, malformed or names nothing (answered with HTTP 400)."""


class InfluenceData:
    """Reads runs, reports, example renderings, score shards and mislabel reports under ``logdir``."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = Path(logdir).expanduser() if str(logdir) else None
        self._runs: dict[str, Path] = {}
        self._runs_time = -1e9
        self._cache: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    # -- discovery ----------------------------------------------------------------------------------------
    def run_dirs(self) -> dict[str, Path]:
        """``{run name: influence directory}`` for every run with at least one report (cached briefly)."""
        with self._lock:
            if time.monotonic() - self._runs_time > RUN_CACHE_SECONDS:
                self._runs = self._scan()
                self._runs_time = time.monotonic()
            return dict(self._runs)

    def _scan(self) -> dict[str, Path]:
        if self.logdir is None or not self.logdir.is_dir():
            return {}
        found = {}
        for root, dirs, files in os.walk(self.logdir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if Path(root).name == "influence" and any(REPORT_NAME.match(f) or MISLABEL_NAME.match(f) for f in files):
                relative = Path(root).parent.relative_to(self.logdir).as_posix()
                found["." if relative in ("", ".") else relative] = Path(root)
        return found

    def runs(self) -> dict[str, Any]:
        """Every run with its analyses (epoch, step, stage, what they hold) and its mislabel reports."""
        result = []
        for name, directory in sorted(self.run_dirs().items()):
            analyses = []
            for epoch in self._epochs(directory, REPORT_NAME):
                report = self._json(directory / f"epoch={epoch}.json")
                analyses.append({
                    "epoch": epoch, "global_step": report.get("global_step"), "stage": report.get("stage"),
                    "points": len(report.get("points", [])), "solver": report.get("solver", {}).get("solver"),
                    "train_size": report.get("train_size"), "has_trust": "trust" in report,
                    "has_scores": (directory / f"epoch={epoch}-scores.json").exists(),
                    "has_examples": "examples" in report,
                })
            result.append({"run": name, "analyses": analyses, "mislabel": self._epochs(directory, MISLABEL_NAME)})
        return {"runs": result}

    # -- influence reports --------------------------------------------------------------------------------
    def points(self, run: str, epoch: int, offset: int = 0, limit: int = DEFAULT_PAGE) -> dict[str, Any]:
        """One page of the report's validation points, highest loss first, with renderings and trust badges."""
        _, report = self._report(run, epoch)
        examples = _examples(report)
        trust = _trust_by_point(report)
        ordered = sorted(report["points"], key=lambda p: -_number(p.get("loss"), float("-inf")))
        page = ordered[offset: offset + limit]
        return {
            "run": run, "epoch": epoch, "global_step": report["global_step"], "stage": report["stage"],
            "train_size": report["train_size"], "solver": report["solver"], "sign_convention": report["sign_convention"],
            "total": len(ordered), "offset": offset, "limit": limit,
            "points": [self._point_summary(p, examples, trust) for p in page],
        }

    def point(self, run: str, epoch: int, val_index: int) -> dict[str, Any]:
        """A point's harmful and helpful training examples (with renderings) and, with full scores, a histogram."""
        directory, report = self._report(run, epoch)
        point = _find_point(report, val_index, run, epoch)
        examples = _examples(report)
        n = report["train_size"] or 1
        result = self._point_summary(point, examples, _trust_by_point(report))
        for kind in ("harmful", "helpful"):
            result[kind] = [
                {"rank": rank, "train_index": index, "influence": influence,
                 "loss_change_if_removed": None if influence is None else -influence / n,
                 **_example(examples["train"], index)}
                for rank, (index, influence) in enumerate(point[kind])
            ]
        result["histogram"] = self._histogram(directory, epoch, val_index)
        result["sign_convention"] = report["sign_convention"]
        return result

    def influencers(self, run: str, epoch: int, offset: int = 0, limit: int = DEFAULT_PAGE) -> dict[str, Any]:
        """Training examples in any top list of the analysis, those harmful to the most points first."""
        _, report = self._report(run, epoch)
        examples = _examples(report)
        table: dict[int, dict[str, Any]] = {}
        for point in report["points"]:
            for kind in ("harmful", "helpful"):
                for index, influence in point[kind]:
                    row = table.setdefault(index, {"train_index": index, "harmful_count": 0, "helpful_count": 0,
                                                   "harmful_points": [], "helpful_points": [], "total_influence": 0.0})
                    row[f"{kind}_count"] += 1
                    row[f"{kind}_points"].append(point["val_index"])
                    row["total_influence"] += _number(influence, 0.0)
        ordered = sorted(table.values(), key=lambda r: (-r["harmful_count"], -r["total_influence"], r["train_index"]))
        page = ordered[offset: offset + limit]
        return {"run": run, "epoch": epoch, "points": len(report["points"]), "total": len(ordered), "offset": offset,
                "limit": limit, "examples": [{**row, **_example(examples["train"], row["train_index"])} for row in page]}

    def example(self, run: str, epoch: int, train_index: int) -> dict[str, Any]:
        """Every monitored point a training example influences: its score on each point from the full score
        table when there is one (one column, never the table), else the top lists it appears in."""
        directory, report = self._report(run, epoch)
        if not 0 <= train_index < report["train_size"]:
            raise BadRequest(f"Expected `train_index` in [0, {report['train_size']}), but got {train_index}.")
        examples = _examples(report)
        column = self._score_column(directory, epoch, train_index)
        rows = []
        for position, point in enumerate(report["points"]):
            listed = {kind: [i for i, _ in point[kind]] for kind in ("harmful", "helpful")}
            pairs = {i: v for kind in ("harmful", "helpful") for i, v in point[kind]}
            influence = column[position] if column is not None else pairs.get(train_index)
            if influence is None and train_index not in pairs:
                continue
            kind = next((k for k in ("harmful", "helpful") if train_index in listed[k]), "scored")
            rank = listed[kind].index(train_index) if kind != "scored" else None
            rows.append({"val_index": point["val_index"], "label": point.get("label"),
                         "prediction": point.get("prediction"), "loss": point.get("loss"),
                         "influence": influence, "kind": kind, "rank": rank})
        rows.sort(key=lambda r: -_number(r["influence"], float("-inf")))
        return {"run": run, "epoch": epoch, "train_index": train_index, **_example(examples["train"], train_index),
                "source": "full scores" if column is not None else "top lists", "points": rows,
                "harmful_count": sum(r["kind"] == "harmful" for r in rows)}

    def compare(self, run: str, val_index: int) -> dict[str, Any]:
        """How one point's top lists changed across the run's analyses (overlap with the previous analysis)."""
        directory = self._run(run)
        entries: list[dict[str, Any]] = []
        for epoch in self._epochs(directory, REPORT_NAME):
            report = self._json(directory / f"epoch={epoch}.json")
            point = next((p for p in report["points"] if p["val_index"] == val_index), None)
            if point is None:
                continue
            entry = {"epoch": epoch, "global_step": report["global_step"], "stage": report["stage"],
                     "label": point.get("label"), "prediction": point.get("prediction"), "loss": point.get("loss"),
                     "harmful": point["harmful"], "helpful": point["helpful"]}
            if entries:
                previous = entries[-1]
                for kind in ("harmful", "helpful"):
                    now, before = {i for i, _ in point[kind]}, {i for i, _ in previous[kind]}
                    entry[f"{kind}_kept"] = len(now & before)
                    entry[f"{kind}_new"] = sorted(now - before)
            entries.append(entry)
        if not entries:
            raise BadRequest(f"Validation point {val_index} is in no analysis of run {run!r}.")
        return {"run": run, "val_index": val_index, "analyses": entries}

    # -- mislabel and trust -------------------------------------------------------------------------------
    def mislabel(self, run: str, epoch: int, offset: int = 0, limit: int = DEFAULT_PAGE) -> dict[str, Any]:
        """A page of mislabel candidates (in the report's ranking order) and the confusion table of given vs
        predicted label over all candidates (predicted: the suggested label when training signals were recorded)."""
        _, report = self._mislabel_report(run, epoch)
        examples = _examples(report)
        candidates = report["candidates"]
        from lightning_influence.reporting.relabel import predicted_label

        # "prediction" is what the page shows as predicted: the suggested label when training signals were
        # recorded (as in the confusion table and the relabel CSV); the model's own is kept as "model_prediction"
        page = [{"rank": offset + k, **c, "prediction": predicted_label(c), "model_prediction": c.get("prediction"),
                 "input": examples["train"].get(str(c["train_index"]), {}).get("input")}
                for k, c in enumerate(candidates[offset: offset + limit])]
        return {"run": run, "epoch": epoch, "global_step": report["global_step"], "train_size": report["train_size"],
                "definition": report.get("definition"), "solver": report.get("solver"), "total": len(candidates),
                "offset": offset, "limit": limit, "candidates": page, "confusion": _confusion(candidates)}

    def relabel_csv(self, run: str, epoch: int, train_indices: list[int]) -> str:
        """A CSV of the chosen candidates (``lightning_influence.reporting.relabel``, as ``lightning-influence
        export --relabel`` writes it): ``rank,train_index,given_label,predicted_label,new_label,...`` where
        ``new_label`` starts as the predicted label (edit it before applying)."""
        from lightning_influence.reporting.relabel import relabel_csv, relabel_rows

        _, report = self._mislabel_report(run, epoch)
        try:
            rows = relabel_rows(report, train_indices)
        except ValueError as err:
            raise BadRequest(f"{err} (run {run!r})") from err
        return relabel_csv(rows)

    def trust(self, run: str, epoch: int) -> dict[str, Any]:
        """The analysis' self-diagnosis: per-point residuals and repeat agreement, warnings, solver settings and
        the leave-one-out check when one was written (traces come from TensorBoard's scalars)."""
        directory, report = self._report(run, epoch)
        trust = report.get("trust")
        badges = _trust_by_point(report)
        points = [{"val_index": p["val_index"], "loss": p.get("loss"), **badges.get(p["val_index"], {})}
                  for p in report["points"]]
        loo_path = directory / f"loo_epoch={epoch}.json"
        return {"run": run, "epoch": epoch, "solver": report["solver"], "timings": report.get("timings", {}),
                "diagnosed": trust is not None, "points": points,
                "warnings": [] if trust is None else trust.get("warnings", []),
                "model": None if trust is None else {k: trust.get(k) for k in (
                    "gradient_ratio", "gradient_examples", "top_eigenvalue", "residual_examples")},
                "loo": self._json(loo_path) if loo_path.exists() else None,
                "limits": {"residual": RESIDUAL_LIMIT, "repeat_spearman": AGREEMENT_LIMIT}}

    # -- helpers ------------------------------------------------------------------------------------------
    def _run(self, run: str) -> Path:
        runs = self.run_dirs()
        if run not in runs:
            raise BadRequest(f"Unknown run {run!r}: expected one of {sorted(runs)}.")
        return runs[run]

    def _report(self, run: str, epoch: int) -> tuple[Path, dict[str, Any]]:
        return self._read(run, f"epoch={epoch}.json", REPORT_NAME, f"analysis at epoch {epoch}")

    def _mislabel_report(self, run: str, epoch: int) -> tuple[Path, dict[str, Any]]:
        return self._read(run, f"mislabel_epoch={epoch}.json", MISLABEL_NAME, f"mislabel report at epoch {epoch}")

    def _read(self, run: str, name: str, pattern: re.Pattern[str], what: str) -> tuple[Path, dict[str, Any]]:
        """The run's directory and its report ``name``; a 400 naming the epochs there when it is missing."""
        directory = self._run(run)
        path = directory / name
        if not path.exists():
            raise BadRequest(f"Run {run!r} has no {what}: expected one of {self._epochs(directory, pattern)}.")
        return directory, self._json(path)

    def _point_summary(self, point: dict[str, Any], examples: dict[str, Any], trust: dict[int, Any]) -> dict[str, Any]:
        index = point["val_index"]
        return {"val_index": index, "label": point.get("label"), "prediction": point.get("prediction"),
                "loss": point.get("loss"), "input": examples["val"].get(str(index), {}).get("input"),
                "trust": trust.get(index, {"badge": "unknown"})}

    def _epochs(self, directory: Path, pattern: re.Pattern[str]) -> list[int]:
        return sorted(int(m.group(1)) for f in os.listdir(directory) if (m := pattern.match(f)))

    def _json(self, path: Path) -> Any:
        return self._cached(path, lambda: json.loads(path.read_text()))

    def _cached(self, path: Path, load: Any) -> Any:
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = load()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > MAX_CACHED_FILES:
                self._cache.popitem(last=False)
        return value

    def _scores(self, directory: Path, epoch: int) -> tuple[list[int], Any] | None:
        index = directory / f"epoch={epoch}-scores.json"
        if not index.exists():
            return None
        from lightning_influence.reporting.files import load_full_scores  # torch: only when scores exist

        return self._cached(index, lambda: load_full_scores(index))

    def _score_column(self, directory: Path, epoch: int, train_index: int) -> list[float | None] | None:
        scores = self._scores(directory, epoch)
        if scores is None:
            return None
        return [_finite(v) for v in scores[1][:, train_index].tolist()]

    def _histogram(self, directory: Path, epoch: int, val_index: int) -> dict[str, Any] | None:
        scores = self._scores(directory, epoch)
        if scores is None or val_index not in scores[0]:
            return None
        import torch

        row = scores[1][scores[0].index(val_index)]
        row = row[torch.isfinite(row)]
        if row.numel() == 0:
            return None
        low, high = float(row.min()), float(row.max())
        counts = torch.histc(row, bins=HISTOGRAM_BINS, min=low, max=high if high > low else low + 1.0)
        return {"min": low, "max": high, "counts": [int(c) for c in counts.tolist()], "scored": int(row.numel())}


def _trust_by_point(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{val_index: {residual, repeat_pearson, repeat_spearman, badge}}``; badge ``ok``, ``poor`` or ``unknown``."""
    trust = report.get("trust")
    if trust is None:
        return {}
    result = {}
    for p in trust.get("points", []):
        residual, spearman = p.get("residual"), p.get("repeat_spearman")
        reasons = []
        if residual is not None and residual > RESIDUAL_LIMIT:
            reasons.append(f"residual {residual:.3g} > {RESIDUAL_LIMIT}")
        if spearman is not None and spearman < AGREEMENT_LIMIT:
            reasons.append(f"repeat Spearman {spearman:.3g} < {AGREEMENT_LIMIT}")
        badge = "poor" if reasons else ("unknown" if residual is None else "ok")
        result[p["val_index"]] = {"residual": residual, "repeat_pearson": p.get("repeat_pearson"),
                                  "repeat_spearman": spearman, "badge": badge, "reasons": reasons}
    return result


def _examples(report: dict[str, Any]) -> dict[str, Any]:
    """The report's ``examples`` object (renderings); empty for reports written before it existed."""
    examples = report.get("examples") or {}
    return {"val": examples.get("val", {}), "train": examples.get("train", {})}


def _find_point(report: dict[str, Any], val_index: int, run: str, epoch: int) -> dict[str, Any]:
    for point in report["points"]:
        if point["val_index"] == val_index:
            return point
    raise BadRequest(f"Validation point {val_index} is not in run {run!r} at epoch {epoch}: expected one of"
                     f" {[p['val_index'] for p in report['points']]}.")


def _example(train: dict[str, Any], index: int) -> dict[str, Any]:
    entry = train.get(str(index), {})
    return {"label": entry.get("label"), "prediction": entry.get("prediction"), "loss": entry.get("loss"),
            "input": entry.get("input")}


def _confusion(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of (given label, predicted label) among the candidates, labels in sorted order."""
    from lightning_influence.reporting.relabel import predicted_label

    keys = [(_csv(c.get("label")), _csv(predicted_label(c))) for c in candidates]
    labels = sorted({k for pair in keys for k in pair}, key=lambda s: (len(s), s))
    position = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for given, predicted in keys:
        counts[position[given]][position[predicted]] += 1
    return {"labels": labels, "counts": counts, "rows": "given label", "columns": "predicted label"}


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _number(value: Any, default: float) -> float:
    return default if value is None else float(value)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
