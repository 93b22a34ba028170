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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


def import_object(path: str, what: str) -> Any:
    """``package.module:Name`` (or ``package.module.Name``) -> the object; the working directory is importable."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise UsageError(f"Expected {what} as an import path like `package.module:Name`, but got `{path}`.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: `examples.digits:DigitsCNN` works from the repository
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
    try:
        cli = LightningCLI(model_class, datamodule_class, args=config, run=False, save_config_callback=None,
                           trainer_defaults={"logger": False})
    except SystemExit as err:  # jsonargparse reports bad configs by exiting
        raise UsageError(f"LightningCLI could not read `{args.config}` (see the message above). Pass `--model`"
                         " (and `--datamodule`) when the config has no `class_path` for them.") from err
    model = cli.model
    model.on_load_checkpoint(meta)
    model.load_state_dict(meta["state_dict"])
    return model, cli.datamodule, _influence_callback_args(cli.config)


def _read_config(path: Path) -> dict[str, Any]:
    """The config as a dict, without the keys of the ``fit``/``validate`` subcommands that ``run=False`` lacks."""
    import yaml

    if not path.is_file():
        raise UsageError(f"Expected `--config` to be a LightningCLI YAML file, but `{path}` does not exist.")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise UsageError(f"Expected `{path}` to hold a mapping (trainer:, model:, data:), but got {type(config).__name__}.")
    config.pop("ckpt_path", None)  # written by LightningCLI's SaveConfigCallback; the checkpoint is given here
    return config


def _influence_callback_args(config: Any) -> dict[str, Any]:
    """``init_args`` of the config's ``InfluenceCallback`` entry under ``trainer.callbacks`` (or ``{}``)."""
    callbacks = config.get("trainer", {}).get("callbacks") or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = str(getattr(entry, "class_path", ""))
        if class_path.endswith("InfluenceCallback"):
            init_args: Any = getattr(entry, "init_args", None) or {}
            return dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)
    return {}


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
