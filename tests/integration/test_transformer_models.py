"""Models a Lightning user trains, through the callback: a BatchNorm CNN trained with ``precision="bf16-mixed"``
and a BERT classifier from a config with dict batches (``vmap`` cannot trace it)."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import digits
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence import InfluenceCallback


def _trainer(tmp_path, callback, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
                      callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=1, **kwargs)


class BatchNormCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_bf16_mixed_training_then_analysis(tmp_path):
    pl.seed_everything(0)
    x, y = digits(torch.float32)
    train, val = TensorDataset(x[:200], y[:200]), TensorDataset(x[1500:1540], y[1500:1540])
    callback = InfluenceCallback(num_worst=2, top_k=3, solver="exact", damping=10.0, diagnose=False, verbose=False,
                                 strict=True)  # a damping above the Hessian's negative curvature
    trainer = _trainer(tmp_path, callback, epochs=1, precision="bf16-mixed")
    trainer.fit(BatchNormCNN(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=40))
    assert callback.analysed
    points = callback.last_explanation.points
    assert len(points) == 2
    scores = [i.influence for p in points for i in p.harmful + p.helpful]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)


class TinyBertClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=12, num_labels=2)
        self.bert = transformers.BertForSequenceClassification(config)

    def per_example_loss(self, batch):
        logits = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class DictData(torch.utils.data.Dataset):
    """Label 1 iff token 2 occurs; padded rows with attention masks."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 30, (n, 10), generator=g)
        self.labels = (torch.rand(n, generator=g) < 0.5).long()
        self.ids[self.labels == 1, 4] = 2
        lengths = torch.randint(6, 11, (n,), generator=g)
        self.mask = (torch.arange(10)[None] < lengths[:, None]).long()
        self.ids = self.ids.masked_fill(self.mask == 0, 0)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_bert_classifier_end_to_end_through_the_callback(tmp_path):
    # Gauss-Newton curvature and damping "self_check" (the defaults: retrainings through dict batches); CG keeps
    # the test short (LiSSA takes minutes here)
    pl.seed_everything(0)
    callback = InfluenceCallback(num_worst=2, top_k=3, solver=li.CGConfig(max_iter=50), verbose=False, strict=True,
                                 diagnose=False, example_formatter=lambda example: str(example["input_ids"].tolist()))
    trainer = _trainer(tmp_path, callback, epochs=2)
    trainer.fit(TinyBertClassifier(), DataLoader(DictData(64, 0), batch_size=16, shuffle=True),
                DataLoader(DictData(16, 1), batch_size=16))
    with open(f"{trainer.logger.log_dir}/influence/epoch=1.json") as handle:
        record = json.load(handle)
    assert record["train_size"] == 64 and len(record["points"]) == 2
    for point in record["points"]:
        assert len(point["harmful"]) == 3 and len(point["helpful"]) == 3
        assert point["harmful"][0][1] > 0 > point["helpful"][0][1]  # [train index, influence] pairs
        assert record["examples"]["val"][str(point["val_index"])]["text"].startswith("[")  # the formatter's text
    assert record["solver"]["curvature"] == "gauss_newton" and record["solver"]["damping_requested"] == "self_check"
    check = record["solver"]["damping_check"]
    assert record["solver"]["damping"] == check["chosen"] and len(check["lds"]) == len(check["candidates"])
