"""Lightning glue shared by the callback, ``correct_errors`` and the command line.

Where the per-example loss, the training and validation data, the log directory, the TensorBoard writer,
the collectives and the weight decay come from, given a ``Trainer`` and a module. One definition each, so
the three shells find them the same way.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.collectives import Collectives, SingleProcess

#: What every "no loss function" message shows.
LOSS_FN_HINT = (
    "Either add `def per_example_loss(self, batch): ...` returning a Tensor[B] to your module (it works under every"
    " strategy), or pass `loss_fn=` a top-level function `(module, batch) -> Tensor[B]` or its import path"
    " ('my_package.losses:per_example_loss'). A lambda or a local function cannot be pickled, which"
    " `strategy='ddp_spawn'` needs."
)


def call_per_example_loss(module: Any, batch: Any) -> Any:
    """The default loss: the module's own ``per_example_loss(batch)`` (picklable: a top-level function)."""
    return module.per_example_loss(batch)


def import_loss_fn(path: str) -> LossFn:
    """``"package.module:function"`` (or ``"package.module.function"``) imported as a callable."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise MisconfigurationException(
            f"Expected `loss_fn` to be an import path 'package.module:function', but {path!r} could not be imported"
            f" ({type(err).__name__}: {err})."
        ) from err
    if not callable(target):
        raise MisconfigurationException(f"Expected `loss_fn` {path!r} to name a callable, but got {target!r}.")
    return target


def resolve_loss_fn(module: nn.Module, loss_fn: Union[LossFn, str, None], who: str = "InfluenceCallback") -> LossFn:
    """``loss_fn`` (a callable or an import path), else the module's ``per_example_loss``, else a clear error."""
    if isinstance(loss_fn, str):
        return import_loss_fn(loss_fn)
    if loss_fn is not None:
        if not callable(loss_fn):
            raise MisconfigurationException(
                f"Expected `loss_fn` to be a callable (module, batch) -> Tensor[B] or an import path, but got {loss_fn!r}."
            )
        return loss_fn
    if callable(getattr(module, "per_example_loss", None)):
        return call_per_example_loss
    raise MisconfigurationException(
        f"{who} needs per-example losses, but got no `loss_fn` and {type(module).__name__} has no"
        f" `per_example_loss(batch)` method. {LOSS_FN_HINT}"
    )


def check_picklable(loss_fn: LossFn, trainer: pl.Trainer) -> None:
    """Under a spawn-based strategy the callback is pickled into new processes: say so before it fails there."""
    if "spawn" not in type(trainer.strategy).__name__.lower() and "spawn" not in str(
            getattr(trainer.strategy, "_start_method", "")):
        return
    try:
        pickle.dumps(loss_fn)
    except Exception as err:  # noqa: BLE001 - any pickling failure means the same fix
        raise MisconfigurationException(
            f"Expected a picklable `loss_fn` under {type(trainer.strategy).__name__}(start_method='spawn') (it starts new"
            f" processes), but {loss_fn!r} cannot be pickled ({type(err).__name__}: {err}). {LOSS_FN_HINT}"
        ) from err


def check_loss_on_examples(module: nn.Module, loss_fn: LossFn, train: IndexedData, count: int = 2) -> None:
    """Run ``loss_fn`` on the first ``count`` training examples (eval mode, no gradients): a loss of the wrong
    shape is reported before training, not after it."""
    from lightning_influence.core.per_example.losses import call_loss_fn, check_per_example_losses
    from lightning_influence.core.tensors.batching import prepare_batch
    from lightning_influence.core.tensors.modes import analysis_mode
    from lightning_influence.core.tensors.params import model_device

    count = min(count, len(train))
    if count == 0:
        return
    batch = prepare_batch(train.fetch(range(count)), model_device(module))
    with analysis_mode(module), torch.no_grad():
        check_per_example_losses(call_loss_fn(loss_fn, module, batch), count)


def indexed(data: Any, name: str, chunk_size: int) -> IndexedData:
    """A map-style dataset or a DataLoader over one, read in index order."""
    if isinstance(data, DataLoader):
        return IndexedData.from_loader(data, chunk_size)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return IndexedData(data, None, chunk_size)
    raise TypeError(f"Expected `{name}` to be a map-style Dataset or a DataLoader over one, but got {type(data).__name__}.")


def train_data(trainer: pl.Trainer, module: Optional[nn.Module], chunk_size: int, *, dataset: Optional[Dataset] = None,
               loader: Any = None, fallback: Any = None) -> IndexedData:
    """The training data to score: ``dataset``/``loader`` when given, else the trainer's, the datamodule's,
    ``fallback`` (e.g. the last fit's loader) or the module's ``train_dataloader()``."""
    if dataset is not None:
        return IndexedData(dataset, loader.collate_fn if isinstance(loader, DataLoader) else None, chunk_size)
    candidates: list[Callable[[], Any]] = [
        lambda: loader, lambda: trainer.train_dataloader, lambda: _datamodule_loader(trainer), lambda: fallback,
        lambda: _module_loader(module)]
    found = None
    for source in candidates:
        try:
            found = source()
        except Exception:  # noqa: BLE001 - LightningModule/DataModule raise when the hook is not implemented
            found = None
        if found is not None:
            break
    if not isinstance(found, DataLoader):
        raise MisconfigurationException(
            f"Could not find a single training DataLoader (got {type(found).__name__}). Pass the training data"
            " explicitly (`InfluenceCallback(train_dataset=...)` or `train_dataloader=...`; `train_dataloaders=` for"
            " `correct_errors`)."
        )
    return indexed(found, "train_dataloader", chunk_size)


def _module_loader(module: Optional[nn.Module]) -> Any:
    hook = getattr(module, "train_dataloader", None)
    return hook() if callable(hook) else None


def _datamodule_loader(trainer: pl.Trainer) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    return None if datamodule is None else datamodule.train_dataloader()


def val_data(trainer: pl.Trainer, chunk_size: int, *, loader: Any = None, datamodule: Any = None,
             required: bool = True) -> Optional[IndexedData]:
    """The first validation DataLoader: ``loader``, the datamodule's, or the trainer's."""
    source = datamodule or getattr(trainer, "datamodule", None)
    if loader is None and source is not None:
        try:
            loader = source.val_dataloader()
        except Exception:  # noqa: BLE001 - LightningDataModule raises when val_dataloader is not defined
            loader = None
    if loader is None:
        loader = trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None and not required:
        return None
    if not isinstance(loader, DataLoader):
        raise MisconfigurationException(
            f"Expected a validation DataLoader to explain, but found {type(loader).__name__}. Pass `val_dataloaders`"
            " to `trainer.fit` or define `val_dataloader()`."
        )
    return indexed(loader, "val_dataloaders", chunk_size)


def collectives_for(trainer: pl.Trainer) -> Collectives:
    """The trainer's collectives: :class:`SingleProcess` for one process, else through its strategy."""
    if trainer.world_size == 1:
        return SingleProcess()
    from lightning_influence.distributed.lightning import StrategyCollectives

    return StrategyCollectives(trainer.strategy)


def shared_log_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory as rank zero sees it, on every rank (a broadcast under DDP: call it on all)."""
    path = str(log_dir_of(trainer)) if trainer.is_global_zero else None
    return Path(str(trainer.strategy.broadcast(path, src=0))) if trainer.world_size > 1 else Path(str(path))


def log_dir_of(trainer: pl.Trainer) -> Path:
    """This process's view of the log directory, like ``trainer.log_dir`` but without its broadcast (a
    collective that would hang when called on one rank only)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return Path(logger.log_dir)
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


class Writers:
    """The TensorBoard writer of a run (rank zero only): the trainer's ``TensorBoardLogger``, else a
    ``SummaryWriter`` of our own in the log directory, closed by :meth:`close`."""

    def __init__(self) -> None:
        self._own: dict[str, Any] = {}

    def get(self, trainer: pl.Trainer, log_dir: Path) -> Any:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        key = str(log_dir)
        if key not in self._own:
            from torch.utils.tensorboard import SummaryWriter

            self._own[key] = SummaryWriter(key)
        return self._own[key]

    def close(self) -> None:
        for writer in self._own.values():
            writer.close()
        self._own.clear()


def weight_decay(trainer: pl.Trainer) -> Optional[float]:
    """The first optimiser's weight decay (the training L2 strength), when there is one."""
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers or not optimizers[0].param_groups:
        return None
    value = optimizers[0].param_groups[0].get("weight_decay")
    return float(value) if isinstance(value, (int, float)) else None
