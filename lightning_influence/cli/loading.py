"""Load what a post-hoc analysis needs: the model at a checkpoint, its data, and the callback's settings.

Two ways to name the code: import paths (``package.module:ClassName``) of the LightningModule and the
LightningDataModule, or the LightningCLI config file the model was trained with. Lightning is imported only
here (and only when a subcommand runs), so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


def import_object(path: str, what: str) -> Any:
    """``package.module:Name`` (or ``package.module.Name``) -> the object; the working directory is importable."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise UsageError(f"Expected {what} as an import path like `package.module:Name`, but got `{path}`.")
    working_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"Could not import module `{module_name}` for {what} `{path}`: {err}. Run from the"
                         " directory that contains it, or add it to PYTHONPATH.") from err
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"Module `{module_name}` has no `{attribute}` (asked for {what} `{path}`).")
        obj = getattr(obj, part)
    return obj


def working_directory_importable() -> None:
    """Put the working directory on ``sys.path`` (like ``python -m``): ``examples.digits:DigitsCNN`` and a config's
    ``class_path: examples.digits.DigitsCNN`` resolve from the repository root with the console script too."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def parse_json_object(text: Optional[str], option: str) -> dict[str, Any]:
    """A JSON object given on the command line (``{}`` when absent)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"Expected `{option}` to be a JSON object like '{{\"lr\": 0.1}}', but got {text!r}: {err}.") from err
    if not isinstance(value, dict):
        raise UsageError(f"Expected `{option}` to be a JSON object, but got {type(value).__name__}: {text!r}.")
    return value


@dataclass
class PosthocContext:
    """A model restored from a checkpoint, its loaders, and where (and when) to write the results."""

    model: Any
    train_loader: Any
    val_loader: Any
    checkpoint: Path
    epoch: int
    global_step: int
    output_dir: Path
    callback_args: dict[str, Any] = field(default_factory=dict)
    weight_decay: Optional[float] = None
    _writer: Any = None

    def settings(self, flags: dict[str, Any]) -> Any:
        """The analysis settings: the config's ``InfluenceCallback`` arguments overridden by ``flags``."""
        from lightning_influence.cli.settings import analysis_settings

        return analysis_settings(self.callback_args, flags)

    def loss_fn(self, given: Any = None) -> Any:
        """``given``, else the config's ``loss_fn``, else the model's ``per_example_loss`` (as the callback does)."""
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from lightning_influence.callbacks._trainer import resolve_loss_fn

        try:
            return resolve_loss_fn(self.model, given if given is not None else self.callback_args.get("loss_fn"))
        except MisconfigurationException as err:  # no per_example_loss and no --loss-fn
            raise UsageError(str(err)) from err

    def writer(self) -> Any:
        """A TensorBoard ``SummaryWriter`` on ``output_dir`` (created on first use; see :meth:`close`)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def load_context(args: argparse.Namespace) -> PosthocContext:
    """Restore the model and data named by ``--model``/``--datamodule`` or ``--config`` at ``args.checkpoint``."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f"Expected `checkpoint` to be a checkpoint file, but `{checkpoint}` does not exist.")
    if args.config is None and args.model is None:
        raise UsageError("Name the model: pass `--model package.module:ModelClass` or `--config config.yaml`.")
    import torch  # here, not at import: `--help` stays free of torch

    meta = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    if "state_dict" not in meta:
        raise UsageError(f"Expected a Lightning checkpoint (a dict with `state_dict`), but `{checkpoint}` has"
                         f" keys {sorted(meta)[:8]}.")
    if args.config is not None:
        model, datamodule, callback_args = _from_config(args, meta)
    else:
        model_class = import_object(args.model, "`--model`")
        model = model_class.load_from_checkpoint(checkpoint, map_location="cpu",
                                                 **parse_json_object(args.model_args, "--model-args"))
        datamodule = None
        if args.datamodule is not None:
            datamodule_class = import_object(args.datamodule, "`--datamodule`")
            datamodule = datamodule_class(**parse_json_object(args.datamodule_args, "--datamodule-args"))
        callback_args = {}
    model.to(torch.device(args.device))
    train_loader, val_loader = _loaders(model, datamodule)
    output_dir = Path(args.output_dir) if args.output_dir else checkpoint.parent / f"{checkpoint.stem}-influence"
    return PosthocContext(model, train_loader, val_loader, checkpoint, int(meta.get("epoch", 0)),
                          int(meta.get("global_step", 0)), output_dir, callback_args, checkpoint_weight_decay(meta))


def load_snapshots(model: Any, paths: list[str]) -> list[Any]:
    """Weight snapshots of ``model`` from earlier Lightning checkpoints of the same run (``--snapshot``)."""
    import torch

    from lightning_influence.core.trajectory import take_snapshot, using_weights

    own = take_snapshot(model)
    snapshots = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"Expected `--snapshot` to name a checkpoint file, but `{path}` does not exist.")
        meta = torch.load(path, map_location="cpu", weights_only=False)
        if "state_dict" not in meta:
            raise UsageError(f"Expected `--snapshot {path}` to be a Lightning checkpoint (a dict with `state_dict`).")
        with using_weights(model, own):  # load, copy, then the analysed weights are put back
            try:
                model.load_state_dict(meta["state_dict"])
            except RuntimeError as err:
                raise UsageError(f"`--snapshot {path}` does not fit the model: {err}") from err
            snapshots.append(take_snapshot(model))
    return snapshots


def checkpoint_weight_decay(meta: dict[str, Any]) -> Optional[float]:
    """The training weight decay saved in a Lightning checkpoint: the first optimiser's first parameter group, as
    the callback reads it from the trainer (it floors ``damping="auto"`` and informs the trust report)."""
    states = meta.get("optimizer_states") or []
    groups = states[0].get("param_groups") if states and isinstance(states[0], dict) else None
    value = groups[0].get("weight_decay") if groups else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _from_config(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Instantiate model and data with LightningCLI from the config, then load the checkpoint's weights."""
    from lightning.pytorch.cli import LightningCLI

    model_class = import_object(args.model, "`--model`") if args.model else None
    datamodule_class = import_object(args.datamodule, "`--datamodule`") if args.datamodule else None
    config = _read_config(Path(args.config))
    working_directory_importable()
    try:
        with warnings.catch_warnings():  # "args and command line arguments": the command line is this command's
            warnings.filterwarnings("ignore", ".*args parameter is intended.*")
            cli = LightningCLI(model_class, datamodule_class, args=config, run=False, save_config_callback=None,
                               trainer_defaults={"logger": False}, parser_kwargs={"exit_on_error": False})
    except (SystemExit, argparse.ArgumentError) as err:  # jsonargparse's reading of the config failed
        raise UsageError(_config_error(args, config, err)) from err
    model = cli.model
    model.on_load_checkpoint(meta)
    model.load_state_dict(meta["state_dict"])
    return model, cli.datamodule, _influence_callback_args(cli.config)


def _config_error(args: argparse.Namespace, config: dict[str, Any], err: BaseException) -> str:
    """What went wrong reading the config, and the hint that fits it."""
    text = " ".join(str(err).split()) or "see the message above"
    if "No module named" in text:
        hint = ("A `class_path` names a module that is not importable from here: run from the directory that"
                " contains it (the working directory is importable) or add that directory to PYTHONPATH.")
    elif (args.model is None and not _has_class_path(config, "model")) or (
            args.datamodule is None and "data" in config and not _has_class_path(config, "data")):
        hint = ("Pass `--model` (and `--datamodule`) when the config gives only their init arguments (the"
                " `config.yaml` of a `LightningCLI(MyModel, MyData)` run has no `class_path` for them).")
    else:
        hint = "Check the entry it names against the class's constructor arguments."
    return f"LightningCLI could not read `{args.config}`: {text[:600]}. {hint}"


def _has_class_path(config: dict[str, Any], key: str) -> bool:
    return isinstance(config.get(key), dict) and "class_path" in config[key]


#: Top-level keys of a config saved by a LightningCLI subcommand (fit, validate, ...) that are arguments of the
#: Trainer method, not of the model, data or trainer: the checkpoint is given on this command line instead.
_METHOD_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")


def _read_config(path: Path) -> dict[str, Any]:
    """The config as a dict, without the keys of the ``fit``/``validate`` subcommands that ``run=False`` lacks."""
    import yaml

    if not path.is_file():
        raise UsageError(f"Expected `--config` to be a LightningCLI YAML file, but `{path}` does not exist.")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise UsageError(f"Expected `{path}` to hold a mapping (trainer:, model:, data:), but got {type(config).__name__}.")
    for key in _METHOD_KEYS:  # written by LightningCLI's SaveConfigCallback beside a run
        config.pop(key, None)
    return config


#: ``MislabelCallback`` arguments under the names the post-hoc settings read (InfluenceCallback's deprecated ones).
_MISLABEL_NAMES = {"candidates": "mislabel_candidates", "rank": "mislabel_rank"}


def _influence_callback_args(config: Any) -> dict[str, Any]:
    """``init_args`` of the config's ``InfluenceCallback`` entry under ``trainer.callbacks`` (or ``{}``), with a
    ``MislabelCallback`` entry's ``candidates`` and ``rank`` as ``mislabel_candidates`` and ``mislabel_rank``."""
    callbacks = config.get("trainer", {}).get("callbacks") or []
    found: dict[str, Any] = {}
    mislabel: dict[str, Any] = {}
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = str(getattr(entry, "class_path", ""))
        init_args: Any = getattr(entry, "init_args", None) or {}
        init_args = dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)
        if class_path.endswith("InfluenceCallback") and not found:
            found = init_args
        elif class_path.endswith("MislabelCallback") and not mislabel:
            mislabel = {_MISLABEL_NAMES[k]: v for k, v in init_args.items() if k in _MISLABEL_NAMES}
    return {**found, **mislabel}


def _loaders(model: Any, datamodule: Any) -> tuple[Any, Any]:
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule.train_dataloader(), datamodule.val_dataloader()
    try:
        return model.train_dataloader(), model.val_dataloader()
    except Exception as err:
        raise UsageError("Found no data: pass `--datamodule package.module:DataModuleClass` (or a `data:` section in"
                         f" `--config`), or implement train_dataloader/val_dataloader on the model ({err}).") from err
