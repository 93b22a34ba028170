"""Small real runs of InfluenceCallback for the dashboard tests and screenshots: image, text and tabular data.

Every run trains a tiny model for two epochs with an analysis after each (so an epoch comparison exists) and a
mislabel report; the image run also writes the full score table, the tabular run solves with LiSSA (2 repeats).
The callback is built in one place, :func:`make_callback`, so a change of its constructor touches one function.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.lightning_models import TinyDigitsData, TinyDigitsModel
from lightning_influence import CGConfig, InfluenceCallback, LissaConfig


def make_callback(**overrides: Any) -> InfluenceCallback:
    """The dashboard runs' callback: a CG solve, 3 points, 4 examples a side, a mislabel report of 6."""
    settings: dict[str, Any] = {"num_worst": 3, "top_k": 4, "solver": CGConfig(max_iter=50), "damping": 0.5,
                                "mislabel_candidates": 6, "mislabel_rank": 8, "every_n_epochs": 1, "verbose": False}
    settings.update(overrides)
    return InfluenceCallback(**settings)


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=1e-3)


class _MeanEmbedding(nn.Module):
    """Token ids ``[B, T]`` -> mean of their embeddings -> 3 classes (a bag-of-words text classifier)."""

    def __init__(self, vocab: int = 40, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids).mean(1)))


def text_data(n: int, seed: int) -> TensorDataset:
    """Sentences of 12 token ids from a vocabulary of 40; the label is which third of the vocabulary is most
    frequent (10% of labels flipped, so there is something to find)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 12), generator=generator)
    labels = torch.stack([((ids // 14) == c).sum(1) for c in range(3)], 1).argmax(1)
    flip = torch.rand(n, generator=generator) < 0.1
    labels[flip] = (labels[flip] + 1) % 3
    return TensorDataset(ids, labels)


def tabular_data(n: int, seed: int) -> TensorDataset:
    """Ten standard-normal features; three classes from a fixed linear rule (10% of labels flipped)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=generator)
    weights = torch.randn(10, 3, generator=torch.Generator().manual_seed(99))
    labels = (x @ weights).argmax(1)
    flip = torch.rand(n, generator=generator) < 0.1
    labels[flip] = (labels[flip] + 1) % 3
    return TensorDataset(x, labels)


def _fit(root: Path, name: str, module: pl.LightningModule, train: Any, val: Any, callback: InfluenceCallback,
         epochs: int) -> Path:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=TensorBoardLogger(root, name=name),
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0)
    if isinstance(train, pl.LightningDataModule):
        trainer.fit(module, datamodule=train)
    else:
        trainer.fit(module, DataLoader(train, batch_size=50, shuffle=True), DataLoader(val, batch_size=50))
    return Path(trainer.log_dir)


def fit_run(root: Path, kind: str, epochs: int = 2, **overrides: Any) -> Path:
    """Train one small run of ``kind`` (``"image"``, ``"text"`` or ``"tabular"``) for ``epochs`` epochs under
    ``root`` (``overrides`` go to :func:`make_callback`); return its log directory (``root/<kind>/version_0``)."""
    pl.seed_everything(0)
    if kind == "image":
        return _fit(root, kind, TinyDigitsModel(), TinyDigitsData(), None, make_callback(save_scores=True, **overrides),
                    epochs)
    if kind == "text":
        module = _Classifier(_MeanEmbedding(), lr=0.5)
        return _fit(root, kind, module, text_data(150, 1), text_data(30, 2), make_callback(**overrides), epochs)
    if kind == "tabular":  # LiSSA with two repeats: repeat agreement and one trace per repeat in the trust tab
        module = _Classifier(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)), lr=0.2)
        lissa = {"solver": LissaConfig(depth=100, repeats=2, batch_size=16, route="recursion"), **overrides}
        return _fit(root, kind, module, tabular_data(150, 3), tabular_data(30, 4), make_callback(**lissa), epochs)
    raise ValueError(f"Expected `kind` to be 'image', 'text' or 'tabular', but got {kind!r}.")


KINDS = ("image", "text", "tabular")
_ROOT: dict[str, Path] = {}


def _made_once(key: str, prefix: str, make: Callable[[Path], Any]) -> Path:
    """A temporary log directory filled by ``make(root)`` once per test process (removed at exit)."""
    if key not in _ROOT:
        root = Path(tempfile.mkdtemp(prefix=prefix))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        make(root)
        _ROOT[key] = root
    return _ROOT[key]


def fitted_runs() -> Path:
    """A log directory with one run of each kind (``image/version_0``, ``text/version_0``,
    ``tabular/version_0``), trained once per test process and shared by the dashboard test modules."""
    return _made_once("root", "dashboard-runs-", lambda root: [fit_run(root, kind) for kind in KINDS])


EXAMPLES = {"digits": ("examples.digits", ["--epochs", "1", "--every-n-epochs", "0"]),
            "text_classification": ("examples.text_classification", ["--epochs", "1"])}


def run_example(root: Path, name: str, arguments: list[str] | None = None) -> Path:
    """Run the shipped example ``name`` (its own ``main()``, in this process, with one epoch unless ``arguments``
    say otherwise) into ``root``; return
    its log directory (``root/<name>/version_0``). The text example trains on its real dict batches and writes
    the decoded sentences (its ``example_formatter``); the digits example writes a mislabel report."""
    import importlib
    import sys

    repository = str(Path(__file__).resolve().parents[2])
    if repository not in sys.path:
        sys.path.insert(0, repository)
    module_name, default = EXAMPLES[name]
    arguments = default if arguments is None else arguments
    module = importlib.import_module(module_name)
    saved = sys.argv
    sys.argv = [module_name, *arguments, "--log-dir", str(root)]
    try:
        module.main()
    finally:
        sys.argv = saved
    return root / name / "version_0"


def example_runs() -> Path:
    """A log directory with one-epoch runs of ``examples/digits.py`` and ``examples/text_classification.py``
    (``digits/version_0``, ``text_classification/version_0``), made once per test process."""
    return _made_once("examples", "dashboard-examples-", lambda root: [run_example(root, name) for name in EXAMPLES])
