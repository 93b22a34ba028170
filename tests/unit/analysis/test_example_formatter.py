"""``describe_batch(..., example_formatter=...)``: one string per example for text and tabular reports."""

from __future__ import annotations

import functools

import torch
from torch import nn

from lightning_influence.core.tensors.batching import describe_batch


def test_formatter_sees_each_example_of_a_dict_batch():
    vocab = ["[PAD]", "[CLS]", "good", "bad", "movie"]
    batch = {"input_ids": torch.tensor([[1, 2, 4, 0], [1, 3, 4, 4]]), "attention_mask": torch.tensor([[1, 1, 1, 0],
                                                                                                      [1, 1, 1, 1]]),
             "labels": torch.tensor([1, 0])}

    def decode(example):
        return " ".join(vocab[t] for t, m in zip(example["input_ids"].tolist(), example["attention_mask"].tolist()) if m)

    info = describe_batch(nn.Identity(), batch, example_formatter=decode)
    assert info.texts == ["[CLS] good movie", "[CLS] bad movie movie"]
    assert info.labels.tolist() == [1, 0] and info.predictions is None
    assert describe_batch(nn.Identity(), batch).texts is None  # unchanged without a formatter


def test_formatter_on_tabular_tuples_through_partial():
    describe = functools.partial(describe_batch, example_formatter=lambda ex: ", ".join(f"{v:.1f}" for v in ex[0].tolist()))
    x, y = torch.tensor([[1.0, 2.5], [0.0, -1.0]]), torch.tensor([0, 1])
    info = describe(nn.Linear(2, 2), (x, y))
    assert info.texts == ["1.0, 2.5", "0.0, -1.0"] and info.predictions.shape == (2,)


class _DictForward(nn.Module):
    """A LightningModule-style model: ``forward`` takes the whole dict batch."""

    def forward(self, batch):
        return torch.nn.functional.one_hot(batch["input_ids"][:, 1], 5).float()


class _KeywordForward(nn.Module):
    """A Hugging Face-style model: keyword tensors in, an output object with ``.logits`` out."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        return type("Output", (), {"logits": torch.nn.functional.one_hot(input_ids[:, 2], 5).float()})()


def test_dict_batches_get_predictions_from_either_calling_convention():
    batch = {"input_ids": torch.tensor([[1, 2, 4], [1, 3, 0]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([1, 0])}
    assert describe_batch(_DictForward(), batch).predictions.tolist() == [2, 3]
    assert describe_batch(_KeywordForward(), batch).predictions.tolist() == [4, 0]
    assert describe_batch(nn.Linear(3, 2), batch).predictions is None  # takes neither form: no prediction, no error
