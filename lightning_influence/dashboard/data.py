"""What the Influence dashboard shows, read from the files the callback writes (no TensorBoard here).

A *run* is a directory under the log directory that holds ``influence/epoch={N}.json`` reports, named by its
path relative to the log directory (the name TensorBoard gives the run whose event files sit beside it).
Every function returns JSON builtins and raises :class:`BadRequest` (HTTP 400) for a parameter that names
nothing, :class:`UnreadableFile` (HTTP 422) for a report that cannot be used. ``/runs`` never fails on a bad
file: it lists it under ``unreadable`` with its path and reason, and the other reports stay usable. Lists are
paged; of a full score table only one row's histogram or one column is ever returned, and a missing score
shard costs only those (the view falls back to the top lists and says why).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from lightning_influence.dashboard import views
from lightning_influence.dashboard.files import BadRequest, FileCache, UnreadableFile, check_mislabel, check_report

REPORT_NAME = re.compile(r"^epoch=(\d+)\.json$")
MISLABEL_NAME = re.compile(r"^mislabel_epoch=(\d+)\.json$")
MAX_PAGE = 500
DEFAULT_PAGE = 50
RUN_CACHE_SECONDS = 2.0
POINT_SORTS = ("loss", "index", "influence", "residual")
EXAMPLE_SORTS = ("harmful_count", "helpful_count", "total_influence", "index")

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "BadRequest", "InfluenceData", "UnreadableFile"]


class InfluenceData:
    """Reads runs, reports, example renderings, score shards and mislabel reports under ``logdir``."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = Path(logdir).expanduser() if str(logdir) else None
        self._runs: dict[str, Path] = {}
        self._runs_time = -1e9
        self._files = FileCache()
        self._summaries: dict[tuple[str, float], dict[str, Any]] = {}
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
        """Every run with its readable analyses and mislabel reports; unreadable files listed with the reason."""
        result, unreadable = [], []
        for name, directory in sorted(self.run_dirs().items()):
            analyses, mislabel, bad = [], [], []
            for epoch in self._epochs(directory, REPORT_NAME):
                try:
                    analyses.append(self._summary(directory, epoch))
                except UnreadableFile as err:
                    bad.append({"run": name, "path": str(err.path), "reason": err.reason, "hint": err.hint})
            for epoch in self._epochs(directory, MISLABEL_NAME):
                try:
                    self._files.json(directory / f"mislabel_epoch={epoch}.json", check_mislabel)
                    mislabel.append(epoch)
                except UnreadableFile as err:
                    bad.append({"run": name, "path": str(err.path), "reason": err.reason, "hint": err.hint})
            result.append({"run": name, "analyses": analyses, "mislabel": mislabel, "unreadable": bad})
            unreadable += bad
        return {"runs": result, "unreadable": unreadable}

    def _summary(self, directory: Path, epoch: int) -> dict[str, Any]:
        path = directory / f"epoch={epoch}.json"
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError as err:
            raise UnreadableFile(path, f"it is gone ({err.strerror})") from err
        if key not in self._summaries:  # small and kept for good: /runs is polled for live refresh
            report = self._files.json(path, check_report)
            solver = report.get("solver") if isinstance(report.get("solver"), dict) else {}
            self._summaries[key] = {
                "epoch": epoch, "global_step": report.get("global_step"), "stage": report.get("stage"),
                "points": len(report["points"]), "solver": solver.get("solver"), "converged": solver.get("converged"),
                "train_size": report.get("train_size"), "has_trust": "trust" in report,
                "has_examples": "examples" in report}
        return {**self._summaries[key], "has_scores": (directory / f"epoch={epoch}-scores.json").exists()}

    # -- influence reports --------------------------------------------------------------------------------
    def points(self, run: str, epoch: int, offset: int = 0, limit: int = DEFAULT_PAGE, sort: str = "loss",
               filters: dict[str, str] | None = None, ensure: int | None = None) -> dict[str, Any]:
        """One page of the analysis' validation points (sorted and filtered), with renderings and trust badges;
        ``ensure``: grow the page until it holds that point (a deep link to a point far down the list)."""
        _, report = self._report(run, epoch)
        examples = views.examples_of(report)
        trust = views.trust_by_point(report)
        rows = [views.point_summary(p, examples, trust) for p in report["points"]]
        labels = views.distinct(rows, "label")
        predictions = views.distinct(rows, "prediction")
        rows = views.filter_rows(rows, filters or {}, "val_index")
        rows = views.sort_points(rows, report, _choice(sort, POINT_SORTS, "sort"))
        limit = views.grow_to(rows, "val_index", ensure, offset, limit)
        return {
            "run": run, "epoch": epoch, "global_step": report.get("global_step"), "stage": report.get("stage"),
            "train_size": report.get("train_size"), "solver": report.get("solver", {}),
            "sign_convention": report.get("sign_convention"), "total": len(rows), "all": len(report["points"]),
            "offset": offset, "limit": limit, "sort": sort, "labels": labels, "predictions": predictions,
            "model_warnings": views.model_warnings(report), "points": rows[offset: offset + limit],
        }

    def point(self, run: str, epoch: int, val_index: int) -> dict[str, Any]:
        """A point's harmful and helpful training examples (with renderings) and, with full scores, a histogram."""
        directory, report = self._report(run, epoch)
        point = _find_point(report, val_index, run, epoch)
        examples = views.examples_of(report)
        n = report.get("train_size") or 1
        result = views.point_summary(point, examples, views.trust_by_point(report))
        for kind in ("harmful", "helpful"):
            result[kind] = [
                {"rank": rank, "train_index": index, "influence": influence,
                 "loss_change_if_removed": views.loss_change(influence, n),
                 **views.example_entry(examples["train"], index)}
                for rank, (index, influence) in enumerate(point[kind], start=1)
            ]
        try:
            result["histogram"], result["scores_error"] = self._histogram(directory, epoch, val_index), None
        except UnreadableFile as err:
            result["histogram"], result["scores_error"] = None, {"error": str(err), "hint": err.hint}
        result["sign_convention"] = report.get("sign_convention")
        return result

    def influencers(self, run: str, epoch: int, offset: int = 0, limit: int = DEFAULT_PAGE,
                    sort: str = "harmful_count", filters: dict[str, str] | None = None,
                    ensure: int | None = None) -> dict[str, Any]:
        """Training examples in any top list of the analysis, those harmful to the most points first."""
        _, report = self._report(run, epoch)
        examples = views.examples_of(report)
        rows = [{**row, **views.example_entry(examples["train"], row["train_index"])}
                for row in views.influencer_table(report)]
        labels, predictions = views.distinct(rows, "label"), views.distinct(rows, "prediction")
        rows = views.filter_rows(rows, filters or {}, "train_index")
        rows = views.sort_examples(rows, _choice(sort, EXAMPLE_SORTS, "sort"))
        limit = views.grow_to(rows, "train_index", ensure, offset, limit)
        return {"run": run, "epoch": epoch, "points": len(report["points"]), "total": len(rows), "offset": offset,
                "limit": limit, "sort": sort, "labels": labels, "predictions": predictions,
                "examples": rows[offset: offset + limit]}

    def example(self, run: str, epoch: int, train_index: int) -> dict[str, Any]:
        """Every monitored point a training example influences: its score on each point from the full score
        table when there is one (one column, never the table), else the top lists it appears in."""
        directory, report = self._report(run, epoch)
        size = report.get("train_size")
        if size is not None and not 0 <= train_index < size:
            raise BadRequest(f"Expected `train_index` in [0, {size}), but got {train_index}.")
        examples = views.examples_of(report)
        try:
            column, scores_error = self._score_column(directory, epoch, train_index), None
        except UnreadableFile as err:
            column, scores_error = None, {"error": str(err), "hint": err.hint}
        rows = views.example_rows(report, train_index, column, examples)
        return {"run": run, "epoch": epoch, "train_index": train_index,
                **views.example_entry(examples["train"], train_index),
                "source": "full scores" if column is not None else "top lists", "scores_error": scores_error,
                "points": rows, "harmful_count": sum(r["kind"] == "harmful" for r in rows)}

    def compare(self, run: str, val_index: int) -> dict[str, Any]:
        """How one point's top lists changed across the run's analyses (overlap with the previous analysis);
        unreadable analyses are skipped and named."""
        directory = self._run(run)
        entries: list[dict[str, Any]] = []
        skipped = []
        for epoch in self._epochs(directory, REPORT_NAME):
            try:
                report = self._files.json(directory / f"epoch={epoch}.json", check_report)
            except UnreadableFile as err:
                skipped.append({"epoch": epoch, "path": str(err.path), "reason": err.reason})
                continue
            point = next((p for p in report["points"] if p["val_index"] == val_index), None)
            if point is not None:
                entries.append(views.compare_entry(epoch, report, point, entries[-1] if entries else None))
        if not entries:
            raise BadRequest(f"Validation point {val_index} is in no analysis of run {run!r}.")
        return {"run": run, "val_index": val_index, "analyses": entries, "skipped": skipped}

    def classes(self, run: str, epoch: int) -> dict[str, Any]:
        """Which training classes harm (and help) which validation classes, summed over the top lists."""
        _, report = self._report(run, epoch)
        return {"run": run, "epoch": epoch, **views.class_summary(report)}

    # -- mislabel and trust -------------------------------------------------------------------------------
    def mislabel(self, run: str, epoch: int, offset: int = 0, limit: int = DEFAULT_PAGE,
                 filters: dict[str, str] | None = None, order: str | None = None) -> dict[str, Any]:
        """A page of mislabel candidates in the report's ranking (or another stored one), the ranking named and
        defined, and the label tables over all candidates (``views.mislabel_page``)."""
        _, report = self._mislabel_report(run, epoch)
        return {"run": run, "epoch": epoch, **views.mislabel_page(report, offset, limit, filters or {}, order)}

    def select(self, run: str, epoch: int, filters: dict[str, str]) -> dict[str, Any]:
        """The training indices of every candidate that matches ``filters`` (not one page): for selections."""
        _, report = self._mislabel_report(run, epoch)
        rows = views.filter_rows(views.candidate_rows(report), filters, "train_index")
        return {"run": run, "epoch": epoch, "train_indices": [r["train_index"] for r in rows]}

    def relabel_csv(self, run: str, epoch: int, train_indices: list[int] | None,
                    new_labels: dict[int, str] | None = None) -> str:
        """A CSV of the chosen candidates (every one when ``train_indices`` is None), as ``lightning-influence
        export --relabel`` writes it: ``rank,train_index,given_label,predicted_label,new_label,...``; ``new_labels``
        replaces ``new_label`` (the suggestion) where the user edited it."""
        from lightning_influence.reporting.relabel import relabel_csv, relabel_rows

        _, report = self._mislabel_report(run, epoch)
        try:
            rows = relabel_rows(report, train_indices)
        except ValueError as err:
            raise BadRequest(f"{err} (run {run!r})") from err
        edited = new_labels or {}
        unknown = sorted(set(edited) - {row["train_index"] for row in rows})
        if unknown:
            raise BadRequest(f"Expected `new_labels` for selected candidates only, but got {unknown}.")
        return relabel_csv([{**row, "new_label": edited.get(row["train_index"], row["new_label"])} for row in rows])

    def trust(self, run: str, epoch: int) -> dict[str, Any]:
        """The analysis' self-diagnosis: per-point residuals and repeat agreement, warnings, solver settings and
        the leave-one-out check when one was written (traces come from TensorBoard's scalars)."""
        directory, report = self._report(run, epoch)
        loo_path, loo, loo_error = directory / f"loo_epoch={epoch}.json", None, None
        if loo_path.exists():
            try:
                loo = self._files.json(loo_path)
            except UnreadableFile as err:
                loo_error = {"error": str(err), "hint": err.hint}
        return {"run": run, "epoch": epoch, **views.trust_view(report), "loo": loo, "loo_error": loo_error}

    # -- helpers ------------------------------------------------------------------------------------------
    def _run(self, run: str) -> Path:
        runs = self.run_dirs()
        if run not in runs:
            raise BadRequest(f"Unknown run {run!r}: expected one of {sorted(runs)}.",
                             "Pick a run from the Run menu; reload if it was just created.")
        return runs[run]

    def _report(self, run: str, epoch: int) -> tuple[Path, dict[str, Any]]:
        directory = self._read_path(run, f"epoch={epoch}.json", REPORT_NAME, f"analysis at epoch {epoch}")
        return directory, self._files.json(directory / f"epoch={epoch}.json", check_report)

    def _mislabel_report(self, run: str, epoch: int) -> tuple[Path, dict[str, Any]]:
        directory = self._read_path(run, f"mislabel_epoch={epoch}.json", MISLABEL_NAME, f"mislabel report at epoch {epoch}")
        return directory, self._files.json(directory / f"mislabel_epoch={epoch}.json", check_mislabel)

    def _read_path(self, run: str, name: str, pattern: re.Pattern[str], what: str) -> Path:
        """The run's directory when it holds ``name``; a 400 naming the epochs there when it does not."""
        directory = self._run(run)
        if not (directory / name).exists():
            raise BadRequest(f"Run {run!r} has no {what}: expected one of {self._epochs(directory, pattern)}.")
        return directory

    def _epochs(self, directory: Path, pattern: re.Pattern[str]) -> list[int]:
        try:
            names = os.listdir(directory)
        except OSError:
            return []
        return sorted(int(m.group(1)) for f in names if (m := pattern.match(f)))

    def _scores(self, directory: Path, epoch: int) -> tuple[list[int], Any] | None:
        index = directory / f"epoch={epoch}-scores.json"
        if not index.exists():
            return None
        from lightning_influence.reporting.files import load_full_scores  # torch: only when scores exist

        def load() -> tuple[list[int], Any]:
            try:
                return load_full_scores(index)
            except Exception as err:  # a missing, torn or foreign shard (torch.load raises many kinds): say which
                raise UnreadableFile(index, f"the full score table cannot be loaded: {err}",
                                     "Only the histogram and the full-score column are lost; the top lists still"
                                     " show. Under DDP every rank must write to a shared directory.") from err

        return self._files.cached(index, load)

    def _score_column(self, directory: Path, epoch: int, train_index: int) -> list[float | None] | None:
        scores = self._scores(directory, epoch)
        if scores is None or train_index >= scores[1].shape[1]:
            return None
        return scores[1][:, train_index].tolist()

    def _histogram(self, directory: Path, epoch: int, val_index: int) -> dict[str, Any] | None:
        scores = self._scores(directory, epoch)
        if scores is None or val_index not in scores[0]:
            return None
        return views.histogram(scores[1][scores[0].index(val_index)])


def _choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise BadRequest(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")
    return value


def _find_point(report: dict[str, Any], val_index: int, run: str, epoch: int) -> dict[str, Any]:
    for point in report["points"]:
        if point["val_index"] == val_index:
            return point
    raise BadRequest(f"Validation point {val_index} is not in run {run!r} at epoch {epoch}: expected one of"
                     f" {[p['val_index'] for p in report['points']]}.")
