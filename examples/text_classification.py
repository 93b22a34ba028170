"""A tiny BERT classifier on generated token sequences, with InfluenceCallback (default arguments) explaining its
worst validation predictions and MislabelCallback finding its most suspicious training labels.

The model is ``transformers.BertForSequenceClassification`` built from a 2-layer ``BertConfig`` (random init, no
download). The data are generated: sequences of 6-16 random tokens, padded to 16; the label is 1 when the sequence
contains one of four keyword tokens, and 5 % of the training labels are flipped. Batches are dicts
(``input_ids``, ``attention_mask``, ``labels``), as Hugging Face models take them. ``vmap`` cannot trace this model
(it calls ``.item()`` and branches on data); the hook-based per-example engine handles it.

MislabelCallback records training signals at the end of every epoch (forward passes over the training set, with
``signals_outputs_fn`` reading the dict batches) and, when fit ends, ranks the 32 most suspicious training
sequences, shown decoded beside their labels in the Influence tab's mislabel view; the flipped labels are printed
at the end to compare.

Run ``python examples/text_classification.py`` (about a minute on one CPU core), then open TensorBoard on the
printed log directory.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_influence import InfluenceCallback, MislabelCallback

VOCAB, LENGTH, PAD, CLS = 64, 16, 0, 1
KEYWORDS = (2, 3, 4, 5)


class KeywordSequences(Dataset):
    """``n`` generated sequences; label 1 iff a keyword token occurs. ``flip`` of the labels are flipped."""

    def __init__(self, n: int, seed: int, flip: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(6, LENGTH + 1, (n,), generator=g)
        ids = torch.randint(len(KEYWORDS) + 2, VOCAB, (n, LENGTH), generator=g)
        labels = torch.rand(n, generator=g) < 0.5
        for i in labels.nonzero().flatten().tolist():  # put 1-2 keywords at random positions after [CLS]
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                position = int(torch.randint(1, int(lengths[i]), (1,), generator=g))
                ids[i, position] = KEYWORDS[int(torch.randint(0, len(KEYWORDS), (1,), generator=g))]
        ids[:, 0] = CLS
        mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        self.input_ids = ids.masked_fill(mask == 0, PAD)
        self.attention_mask = mask
        self.labels = labels.long()
        self.flipped = torch.rand(n, generator=g) < flip
        self.labels[self.flipped] = 1 - self.labels[self.flipped]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def decode(example: dict[str, torch.Tensor]) -> str:
    """An ``example_formatter``: the tokens of one example as text (keywords in capitals, padding dropped)."""
    words = {PAD: "", CLS: "[CLS]", **{k: f"KEY{k}" for k in KEYWORDS}}
    ids = example["input_ids"][example["attention_mask"].bool()].tolist()
    return " ".join(words.get(t, f"t{t}") for t in ids).strip()


def signal_outputs(module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a dict batch: what MislabelCallback's training-signal recording reads."""
    return module(batch), batch["labels"]


class TinyBert(pl.LightningModule):
    """``BertForSequenceClassification`` from a 2-layer config (hidden size 32): about 21k parameters."""

    def __init__(self, lr: float = 2e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2, pad_token_id=PAD)
        self.bert = BertForSequenceClassification(config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What InfluenceCallback differentiates: one loss per example, without the L2 term."""
        return F.cross_entropy(self(batch), batch["labels"], reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]))
        self.log("val/acc", (logits.argmax(1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def loaders(n_train: int = 512, n_val: int = 128, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(KeywordSequences(n_train, seed=0, flip=0.05), batch_size=batch_size, shuffle=True),
            DataLoader(KeywordSequences(n_val, seed=1), batch_size=128))


class KeywordDataModule(pl.LightningDataModule):
    """The loaders of :func:`loaders`, for ``Trainer.fit(model, datamodule=...)`` and the command line::

        lightning-influence influence CKPT --model examples.text_classification:TinyBert \\
            --datamodule examples.text_classification:KeywordDataModule \\
            --example-formatter examples.text_classification:decode
    """

    def __init__(self, n_train: int = 512, n_val: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        self.loaders = loaders(self.hparams.n_train, self.hparams.n_val, self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.loaders[0]

    def val_dataloader(self) -> DataLoader:
        return self.loaders[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--log-dir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0)
    torch.set_num_threads(1)
    train_loader, val_loader = loaders()
    logger = TensorBoardLogger(args.log_dir, name="text_classification")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
        callbacks=[InfluenceCallback(example_formatter=decode),  # defaults otherwise; decode: tokens as text
                   # when fit ends, the 32 most suspicious training labels, ranked by the training signals
                   MislabelCallback(candidates=32, rank=16, signals_outputs_fn=signal_outputs,
                                    example_formatter=decode)],
        log_every_n_steps=8, enable_model_summary=False,
    )
    trainer.fit(TinyBert(), train_loader, val_loader)
    flipped = train_loader.dataset.flipped.nonzero().flatten().tolist()
    print(f"\nFlipped training labels (compare them with the harmful lists and the mislabel candidates in the"
          f" Influence tab): {flipped}")
    print(f"Open the results with:\n  tensorboard --logdir {logger.log_dir}\n"
          f"JSON results are in {logger.log_dir}/influence/ (mislabel_epoch=N.json: the mislabel candidates)")


if __name__ == "__main__":
    main()
