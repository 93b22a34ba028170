"""Influence averaged over weight snapshots (core/trajectory.py) and its functional entry points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.core.trajectory import check_snapshot, using_weights


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def trained_run(batchnorm: bool = False):
    """A small tanh net after a few full-batch SGD steps, with snapshots after steps 2 and 4."""
    torch.manual_seed(0)
    x = torch.randn(48, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 2)]
    model = nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = []
    for step in range(6):
        model.train()
        optimizer.zero_grad()
        loss_fn(model, (x, y)).mean().backward()
        optimizer.step()
        if step in (1, 3):
            snapshots.append(li.take_snapshot(model))
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    test = (torch.randn(3, 5), torch.tensor([0, 1, 1]))
    return model, loader, test, snapshots


def test_averaged_influence_is_the_mean_of_each_snapshots_own_influence():
    model, loader, test, snapshots = trained_run()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = li.influence(model, loss_fn, loader, test, solver="exact", damping=0.1, snapshots=snapshots)
    for key, value in model.state_dict().items():  # the model's own weights are back
        assert torch.equal(value, before[key])
    each = [li.influence(model, loss_fn, loader, test, solver="exact", damping=0.1)]
    for snapshot in snapshots:
        with using_weights(model, snapshot):
            each.append(li.influence(model, loss_fn, loader, test, solver="exact", damping=0.1))
    torch.testing.assert_close(averaged, torch.stack(each).mean(0), rtol=1e-4, atol=1e-6)
    # the snapshots answer differently: the average is not the current weights' influence
    assert (averaged - each[0]).abs().max() > 1e-3 * each[0].abs().max()


def test_top_influences_with_snapshots_ranks_the_averaged_scores():
    model, loader, test, snapshots = trained_run()
    scores = li.influence(model, loss_fn, loader, test, solver="exact", damping=0.1, snapshots=snapshots)
    top = li.top_influences(model, loss_fn, loader, test, top_k=5, solver="exact", damping=0.1, snapshots=snapshots)
    assert torch.equal(top.harmful_indices, scores.topk(5, dim=1).indices)
    assert torch.equal(top.helpful_indices, (-scores).topk(5, dim=1).indices)


def test_snapshots_use_the_damping_the_current_weights_resolved():
    model, loader, test, snapshots = trained_run()
    auto = li.influence(model, loss_fn, loader, test, solver="exact", snapshots=snapshots)
    damping = li.s_test(model, loss_fn, loader, test, solver="exact").info.damping
    fixed = li.influence(model, loss_fn, loader, test, solver="exact", damping=damping, snapshots=snapshots)
    torch.testing.assert_close(auto, fixed)


def test_using_weights_swaps_buffers_and_restores_after_an_error():
    model, _, _, snapshots = trained_run(batchnorm=True)
    own_mean = model[1].running_mean.clone()
    own_weight = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="inside"):
        with using_weights(model, snapshots[0]):
            assert torch.equal(model[1].running_mean, snapshots[0]["buffer 1.running_mean"])
            assert torch.equal(model[0].weight, snapshots[0]["parameter 0.weight"])
            raise RuntimeError("inside")
    assert torch.equal(model[1].running_mean, own_mean) and torch.equal(model[0].weight, own_weight)
    assert not torch.equal(own_mean, snapshots[0]["buffer 1.running_mean"])


def test_a_snapshot_of_another_model_is_refused_with_what_to_do():
    model, loader, test, _ = trained_run()
    other = li.take_snapshot(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="take_snapshot"):
        check_snapshot(model, other)
    with pytest.raises(ValueError, match="differ in name or shape"):
        li.influence(model, loss_fn, loader, test, solver="exact", damping=0.1, snapshots=[other])
