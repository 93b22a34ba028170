"""The TensorBoard side of the Influence dashboard: a dynamic plugin (an "Influence" tab) and its HTTP routes.

TensorBoard finds :class:`InfluencePlugin` through the ``tensorboard_plugins`` entry point of this package, so
``tensorboard --logdir runs/`` shows the tab with no flag. Routes live under ``/data/plugin/influence/``; every
one answers JSON (the relabel download CSV when it succeeds): the data, or ``{"error", "hint"}`` with HTTP 400 for
a bad parameter, 422 for a report file that cannot be used (naming it and why) and 500 for anything else.
Non-finite numbers in a report are sent as ``null``.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any, Callable

from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_influence.dashboard.data import DEFAULT_PAGE, MAX_PAGE, BadRequest, InfluenceData
from lightning_influence.dashboard.files import clean

PLUGIN_NAME = "influence"
JS_MODULES = ("index", "common", "render", "points", "mislabel", "trust")
STATIC_FILES = {**{f"/{name}.js": "application/javascript" for name in JS_MODULES}, "/style.css": "text/css"}
POINT_FILTERS = ("label", "prediction", "wrong", "badge", "index")
CANDIDATE_FILTERS = ("label", "model_prediction", "suggested_label", "wrong", "index")
LOG = logging.getLogger(__name__)
MAX_TRACE_POINTS = 200

Handler = Callable[[wrappers.Request], Any]


class InfluencePlugin(base_plugin.TBPlugin):
    """The "Influence" tab: validation points, their influencers, mislabel candidates and trust, per analysis."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self.data = InfluenceData(context.logdir or "")
        self._provider = context.data_provider

    def get_plugin_apps(self) -> dict[str, Any]:
        routes: dict[str, Handler] = {
            "/runs": lambda r: self.data.runs(),
            "/points": lambda r: self.data.points(
                _run(r), _int(r, "epoch"), *_page(r), sort=r.args.get("sort") or "loss",
                filters=_filters(r, POINT_FILTERS), ensure=_optional_int(r, "ensure")),
            "/point": lambda r: self.data.point(_run(r), _int(r, "epoch"), _int(r, "val_index")),
            "/influencers": lambda r: self.data.influencers(
                _run(r), _int(r, "epoch"), *_page(r), sort=r.args.get("sort") or "harmful_count",
                filters=_filters(r, POINT_FILTERS), ensure=_optional_int(r, "ensure")),
            "/example": lambda r: self.data.example(_run(r), _int(r, "epoch"), _int(r, "train_index")),
            "/compare": lambda r: self.data.compare(_run(r), _int(r, "val_index")),
            "/classes": lambda r: self.data.classes(_run(r), _int(r, "epoch")),
            "/mislabel": lambda r: self.data.mislabel(_run(r), _int(r, "epoch"), *_page(r),
                                                      filters=_filters(r, CANDIDATE_FILTERS),
                                                      order=r.args.get("order") or None),
            "/select": lambda r: self.data.select(_run(r), _int(r, "epoch"), _filters(r, CANDIDATE_FILTERS)),
            "/trust": self._trust,
        }
        apps: dict[str, Any] = {path: _json_route(handler) for path, handler in routes.items()}
        apps["/relabel.csv"] = self._relabel_csv
        for path, mimetype in STATIC_FILES.items():
            apps[path] = _static_route(path.lstrip("/"), mimetype)
        return apps

    def is_active(self) -> bool:
        return bool(self.data.run_dirs())

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Influence", disable_reload=False)

    def _trust(self, request: wrappers.Request) -> dict[str, Any]:
        run, epoch = _run(request), _int(request, "epoch")
        result = self.data.trust(run, epoch)
        try:
            solver = result["solver"]  # the trace is the route's when a LiSSA solve went to CG (results.trace_name)
            name = (solver.get("settings") or {}).get("solved_by") or solver.get("solver")
            result["traces"] = self._traces(request, run, epoch, str(name))
            result["traces_error"] = None
        except Exception as err:  # TensorBoard's scalars are optional here: the rest of the view still shows
            LOG.warning("influence dashboard: no solver trace for %s epoch %s: %s", run, epoch, err)
            result["traces"], result["traces_error"] = {}, f"{type(err).__name__}: {err}"
        return result

    def _traces(self, request: wrappers.Request, run: str, epoch: int, solver: str) -> dict[str, list[list[float]]]:
        """The solver's convergence trace per repeat, ``[[step, value], ...]``, from TensorBoard's scalars."""
        if self._provider is None:
            return {}
        from tensorboard import context as tb_context
        from tensorboard.plugins.scalar import metadata as scalar_metadata

        ctx = tb_context.from_environ(request.environ)
        experiment = _experiment_id(request)
        prefix = f"influence/{solver}_trace/epoch_{epoch}/"
        listing = self._provider.list_scalars(ctx, experiment_id=experiment, plugin_name=scalar_metadata.PLUGIN_NAME,
                                              run_tag_filter=provider.RunTagFilter(runs=[run]))
        tags = [tag for tag in listing.get(run, {}) if tag.startswith(prefix)]
        if not tags:
            return {}
        series = self._provider.read_scalars(ctx, experiment_id=experiment, plugin_name=scalar_metadata.PLUGIN_NAME,
                                             downsample=MAX_TRACE_POINTS,
                                             run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags))
        return {tag[len(prefix):]: [[d.step, d.value] for d in data] for tag, data in sorted(series.get(run, {}).items())}

    @wrappers.Request.application  # type: ignore[arg-type]  # werkzeug's stubs expect a function, not a method
    def _relabel_csv(self, request: wrappers.Request) -> wrappers.Response:
        try:
            run, epoch = _run(request), _int(request, "epoch")
            indices = None if request.args.get("all") == "1" else _indices(request, "train_indices")
            text = self.data.relabel_csv(run, epoch, indices, _new_labels(request))
        except Exception as err:  # every failure answers JSON, as the other routes
            return _error(request, err)
        response = http_util.Respond(request, text, "text/csv")
        response.headers["Content-Disposition"] = f'attachment; filename="relabel_epoch={epoch}.csv"'
        return response


def _json_route(handler: Handler) -> Any:
    @wrappers.Request.application
    def route(request: wrappers.Request) -> wrappers.Response:
        try:
            body = json.dumps(clean(handler(request)), allow_nan=False)
        except Exception as err:  # a route never answers HTML: every error is {"error", "hint"} JSON
            return _error(request, err)
        return http_util.Respond(request, body, "application/json")

    return route


def _error(request: wrappers.Request, err: Exception) -> wrappers.Response:
    """``{"error", "hint"}`` JSON: 400 for a bad parameter, 422 for an unusable file, 500 for anything else."""
    if isinstance(err, BadRequest):
        code, message, hint = err.status, str(err), err.hint
    else:
        LOG.exception("influence dashboard: %s failed", request.path)
        code, message = 500, f"{type(err).__name__}: {err}"
        hint = ("An unexpected error in the Influence dashboard; the rest of the tab still works. The TensorBoard"
                " log has the traceback: please report it with the file named above if there is one.")
    body = {"error": message, "hint": hint, "status": code, "path": request.path}
    return http_util.Respond(request, json.dumps(body), "application/json", code=code)


def _static_route(name: str, mimetype: str) -> Any:
    @wrappers.Request.application
    def route(request: wrappers.Request) -> wrappers.Response:
        content = resources.files("lightning_influence.dashboard").joinpath("static", name).read_bytes()
        return http_util.Respond(request, content, mimetype)

    return route


def _experiment_id(request: wrappers.Request) -> str:
    from tensorboard import plugin_util

    return plugin_util.experiment_id(request.environ)


def _run(request: wrappers.Request) -> str:
    run = request.args.get("run")
    if not run:
        raise BadRequest("Expected a `run` parameter (a run name from /runs), but got none.")
    return run


def _int(request: wrappers.Request, name: str, default: int | None = None, minimum: int = 0,
         maximum: int | None = None) -> int:
    text = request.args.get(name)
    if text is None or text == "":
        if default is None:
            raise BadRequest(f"Expected an integer `{name}` parameter, but got none.")
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"Expected `{name}` to be an integer, but got {text!r}.") from None
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise BadRequest(f"Expected `{name}` to be an integer {allowed}, but got {value}.")
    return value


def _new_labels(request: wrappers.Request) -> dict[int, str]:
    """``new_labels=3:7,17:2`` (training index: the label to write as new_label) as a dict."""
    text = request.args.get("new_labels", "")
    result = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        index, _, label = part.partition(":")
        if not index.strip().isdigit() or not label.strip():
            raise BadRequest(f"Expected `new_labels` as index:label pairs, e.g. 3:7,17:2, but got {text!r}.")
        result[int(index)] = label.strip()
    return result


def _optional_int(request: wrappers.Request, name: str) -> int | None:
    return None if request.args.get(name) in (None, "") else _int(request, name)


def _filters(request: wrappers.Request, names: tuple[str, ...]) -> dict[str, str]:
    return {name: request.args[name] for name in names if request.args.get(name)}


def _page(request: wrappers.Request) -> tuple[int, int]:
    return _int(request, "offset", 0), _int(request, "limit", DEFAULT_PAGE, minimum=1, maximum=MAX_PAGE)


def _indices(request: wrappers.Request, name: str) -> list[int]:
    text = request.args.get(name, "")
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise BadRequest(f"Expected `{name}` to be comma-separated training indices, e.g. 3,17, but got {text!r}.")
    return [int(part) for part in parts]


__all__ = ["PLUGIN_NAME", "InfluencePlugin"]
