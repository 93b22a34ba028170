"""Hook-based per-example engine (core/per_example/engine.py): scores and gradients equal explicit per-example autograd
for every supported layer type, transformers built from configs included; the generic path covers the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.config import CGConfig
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import iter_scores
from lightning_influence.core.tensors.batching import batch_size_of, slice_batch
from lightning_influence.core.tensors.params import trainable_parameters

TOLERANCE = 1e-5


def explicit_grads(model: nn.Module, loss_fn, batch, names: list[str]) -> torch.Tensor:
    """``[B, P]`` per-example gradients by one autograd call per example (the reference)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch_size_of(batch)):
        loss = loss_fn(model, slice_batch(batch, i, i + 1))[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for n, g in zip(names, grads)]))
    return torch.stack(rows)


def check_engine(model: nn.Module, loss_fn, batch, expect_generic: int = 0, k: int = 3) -> PerExampleEngine:
    model.eval()
    loss = FunctionalLoss(model, loss_fn)
    params = trainable_parameters(model)
    engine = PerExampleEngine(loss, params)
    reference = explicit_grads(model, loss_fn, batch, list(params))
    s = torch.randn(k, reference.shape[1], dtype=reference.dtype)
    expected = s @ reference.T
    got = engine.dot(batch, s)
    assert ((got - expected).norm() / expected.norm()).item() <= TOLERANCE, engine.plan.note()
    grads = engine.grads(batch)
    assert ((grads - reference).norm() / reference.norm()).item() <= TOLERANCE, engine.plan.note()
    assert len(engine.plan.generic) == expect_generic, engine.plan.note()
    return engine


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class TokenLinear(nn.Module):
    """Linear layers on [B, T, D] and [B, T, U, D] inputs, pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 7), nn.Linear(7, 4, bias=False), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))).mean(dim=(1, 2)))


def test_linear_with_token_dimensions():
    torch.manual_seed(0)
    check_engine(TokenLinear().double(), ce, (torch.randn(6, 4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (6,))))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=2, stride=2, dilation=1, bias=False),
    dict(kernel_size=3, padding=2, padding_mode="circular", groups=2),
])
def test_conv1d(kwargs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(4, 6, **kwargs), nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3))
    check_engine(model.double(), ce, (torch.randn(5, 4, 9, dtype=torch.float64), torch.randint(0, 3, (5,))))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(3, 2), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2),
    dict(kernel_size=3, padding="same", bias=False),
])
def test_conv2d(kwargs):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, **kwargs), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    check_engine(model.double(), ce, (torch.randn(5, 2, 7, 7, dtype=torch.float64), torch.randint(0, 3, (5,))))


class Bag(nn.Module):
    def __init__(self, padding_idx=None) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).sum(dim=1))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_with_repeated_tokens_and_padding(padding_idx):
    torch.manual_seed(3)
    ids = torch.randint(0, 11, (6, 8))
    ids[0] = 5  # one token repeated over the whole row
    ids[1, :4] = 0  # padding
    engine = check_engine(Bag(padding_idx).double(), ce, (ids, torch.randint(0, 3, (6,))))
    assert engine.plan.hooks["emb.weight"] == "embedding"
    if padding_idx is not None:  # the padding row gets no gradient
        assert engine.grad_dict((ids, torch.randint(0, 3, (6,))))["emb.weight"][:, 0].abs().max() == 0


@pytest.mark.parametrize("norm", ["layer", "batch1d", "batch2d", "group"])
def test_norm_affine_parameters(norm):
    torch.manual_seed(4)
    if norm == "layer":
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(5, 3, 5)
    elif norm == "batch1d":
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(5, 5)
    else:
        layer = nn.BatchNorm2d(4) if norm == "batch2d" else nn.GroupNorm(2, 4)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), layer, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 3))
        x = torch.randn(5, 2, 5, 5)
    model = model.double()
    for module in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    engine = check_engine(model, ce, (x.double(), torch.randint(0, 3, (5,))))
    assert set(engine.plan.hooks.values()) == {"linear", "norm"} | ({"conv"} if x.dim() == 4 else set())


def test_batchnorm_in_training_mode_takes_the_generic_path():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    params = trainable_parameters(model)
    engine = PerExampleEngine(FunctionalLoss(model.train(), ce), params)
    assert set(engine.plan.generic) == {"1.weight", "1.bias"}
    assert "training mode" in engine.plan.note()


def test_generic_fallback_for_unsupported_parameters_and_multihead_attention():
    torch.manual_seed(5)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))  # used directly, no module
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.inp, self.head = nn.Linear(3, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.inp(x * self.scale)
            h, _ = self.attn(h, h, h, need_weights=False)
            return self.head(h.mean(dim=1))

    model = Odd().double()
    batch = (torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    engine = check_engine(model, ce, batch, expect_generic=5)  # scale, in_proj w/b, out_proj w/b
    assert set(engine.plan.generic) == {"scale", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                        "attn.out_proj.bias"}
    assert engine.plan.generic_method == "double_backward"
    assert "generic: 5" in engine.plan.note()


def test_weight_used_outside_its_module_is_caught_and_demoted():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) + x @ self.a.weight.T)  # a.weight also used outside a's forward

    torch.manual_seed(6)
    model = Tied().double()
    with pytest.warns(UserWarning, match="disagreed with autograd"):
        engine = check_engine(model, ce, (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))),
                              expect_generic=2)
    assert set(engine.plan.generic) == {"a.weight", "a.bias"}


class Untraceable(nn.Module):
    """Data-dependent control flow and ``.item()``: ``vmap`` cannot trace this model."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.abs().max().item() > 10.0:  # never true here, but vmap refuses .item()
            h = h / 2
        return self.b(h)


def test_untraceable_model_gradients_and_scores_without_vmap():
    torch.manual_seed(7)
    model = Untraceable().double().eval()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    loss = FunctionalLoss(model, ce)
    params = trainable_parameters(model)
    with pytest.raises(RuntimeError):  # the old path
        torch.func.vmap(lambda x: model(x[None]).sum())(batch[0])
    reference = explicit_grads(model, ce, batch, list(params))
    problem = InfluenceProblem(model, ce, [batch], 0.1, CGConfig())
    assert torch.allclose(problem.gradients(batch), reference, atol=1e-12)
    assert torch.allclose(loss.per_example_grads(params, batch), reference, atol=1e-12)  # vmap falls back
    s = torch.randn(2, reference.shape[1], dtype=torch.float64)
    for method in ("auto", "hooks", "jvp", "per_example_grad"):
        got = torch.cat(list(iter_scores(loss, params, [batch], s, method)), dim=1)
        assert torch.allclose(got, -s @ reference.T, atol=1e-10), method


def test_hf_conv1d():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(8)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]).mean(dim=1), batch[1], reduction="none")

    engine = check_engine(model, loss_fn, (torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5,))))
    assert set(engine.plan.hooks.values()) == {"hf_conv1d"}
    assert transformers is not None


def tiny_bert(num_labels: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config)


def bert_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def bert_batch(n: int = 5, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 40, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,))}


def test_bert_classifier_from_config_with_attention_mask():
    torch.manual_seed(9)
    model = tiny_bert().double()
    engine = check_engine(model, bert_loss, bert_batch())
    assert set(engine.plan.hooks.values()) == {"embedding", "linear", "norm"}


def test_gpt2_from_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    config = transformers.GPT2Config(vocab_size=30, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()  # lm_head is tied to the token embedding

    def lm_loss(m, ids):
        logits = m(input_ids=ids).logits[:, :-1]
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return per_token.view(ids.shape[0], -1).mean(dim=1)

    engine = check_engine(model, lm_loss, torch.randint(0, 30, (4, 10)))
    assert engine.plan.hooks["transformer.h.0.attn.c_attn.weight"] == "hf_conv1d"


def test_knn_last_layer_gradient_features_on_bert():
    from lightning_influence.core.per_example.features import last_layer_gradients

    torch.manual_seed(11)
    model = tiny_bert().double().eval()
    batch = bert_batch()
    factors = last_layer_gradients(model, batch, bert_loss)  # a hook on the classifier, no vmap
    reference = explicit_grads(model, bert_loss, batch, ["classifier.weight", "classifier.bias"])
    flat = factors.flat()  # [B, out * (in + 1)]: weight columns then the bias column, row by row
    out_f, in_f = model.classifier.weight.shape
    per_row = flat.view(-1, out_f, in_f + 1)
    got = torch.cat([per_row[:, :, :in_f].reshape(len(flat), -1), per_row[:, :, in_f]], dim=1)
    assert torch.allclose(got, reference, rtol=1e-8, atol=1e-10)
