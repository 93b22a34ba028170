"""The core on CUDA: everything stays on the module's device, results match the CPU to float tolerance, and bf16
weights are analysed in float32. Skipped cleanly when no GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence import influence
from lightning_influence.config import CGConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.Flatten(),
                         nn.Linear(6 * 36, 4)).eval()


def data(n: int = 24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_scores_and_gradients_on_cuda_match_the_cpu():
    x, y = data()
    model = cnn()
    s = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(2))
    cpu = InfluenceProblem(model, ce, [(x, y)], 0.1, CGConfig())
    with analysis_mode(model):
        expected_scores = torch.cat(list(cpu.scores(s)), dim=1)
        expected_grads = cpu.gradients((x[:4], y[:4]))
    gpu_model = copy.deepcopy(model).cuda()
    gpu = InfluenceProblem(gpu_model, ce, [(x, y)], 0.1, CGConfig())  # CPU batches are moved to the model
    with analysis_mode(gpu_model):
        scores = torch.cat(list(gpu.scores(s.cuda())), dim=1)
        grads = gpu.gradients((x[:4], y[:4]))
    assert scores.is_cuda and grads.is_cuda
    assert torch.allclose(scores.cpu(), expected_scores, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grads.cpu(), expected_grads, rtol=1e-4, atol=1e-5)


def test_functional_api_on_cuda_with_bf16_weights():
    x, y = data()
    model = cnn().cuda().to(torch.bfloat16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    scores = influence(model, ce, loader, (x[:2], y[:2]), solver="cg", damping=5.0)
    assert scores.shape == (2, 24) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert next(model.parameters()).dtype == torch.bfloat16  # the model itself is untouched


def test_transformer_engine_on_cuda():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=12, num_labels=2)
    model = transformers.BertForSequenceClassification(config).cuda().eval()

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    ids = torch.randint(1, 30, (6, 10), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (6,), device="cuda")}
    problem = InfluenceProblem(model, loss_fn, [batch], 0.1, CGConfig())
    with analysis_mode(model):
        grads = problem.gradients(batch)
        s = torch.randn(2, problem.num_params, device="cuda")
        scores = torch.cat(list(problem.scores(s)), dim=1)
    assert grads.is_cuda and scores.is_cuda
    assert torch.allclose(scores, -s @ grads.T, rtol=1e-3, atol=1e-4)
    assert not problem.per_example.plan.generic


def test_s_test_with_the_defaults_stays_on_cuda(monkeypatch):
    """LiSSA on Gauss-Newton curvature with damping "auto" (the defaults): the damping estimate, the recursion,
    the residual check and the scores never copy a tensor to the host (``.cpu()`` is counted)."""
    x, y = data(64)
    model = cnn().cuda()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # CPU batches: moved to the model's device
    copies: list[tuple[int, ...]] = []
    to_host = torch.Tensor.cpu

    def counted(tensor, *args, **kwargs):
        copies.append(tuple(tensor.shape))
        return to_host(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    result = li.s_test(model, ce, loader, (x[:2], y[:2]))
    assert result.vectors.is_cuda and result.vectors.dtype == torch.float32
    info = result.info
    assert info.curvature == "gauss_newton" and info.damping_requested == "auto" and info.damping > 0
    assert info.converged == (info.residual <= info.residual_tol)
    problem = InfluenceProblem(model, ce, loader, info.damping, CGConfig())
    with analysis_mode(model):
        scores = torch.cat(list(problem.scores(result.vectors)), dim=1)
    assert scores.is_cuda and scores.shape == (2, 64) and torch.isfinite(scores).all()
    assert copies == [], f"tensors copied to the host in the hot loops: {copies[:5]}"
