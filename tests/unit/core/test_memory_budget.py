"""The memory budget of optional caches (the stored output Jacobian): a share of the device's free memory."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example, digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.config import LissaConfig
from lightning_influence.core.curvature import jacobian
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors import memory
from lightning_influence.core.tensors.modes import analysis_mode


def test_budget_is_the_share_of_free_memory_in_elements(monkeypatch):
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 8_000_000)
    assert memory.memory_budget("cpu", 0.25) == 500_000  # 2 MB of float32
    assert memory.memory_budget("cpu", 0.25, element_size=8) == 250_000
    assert memory.memory_budget("cpu", 0.0) == 0
    with pytest.raises(ValueError, match="`fraction`"):
        memory.memory_budget("cpu", 1.5)


def test_cpu_free_memory_is_positive_and_within_the_machine():
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory.free_memory_bytes("cpu") <= total


def test_a_container_limit_lowers_the_host_figure(monkeypatch, tmp_path):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("3000000\n")
    usage.write_text("1000000\n")
    monkeypatch.setattr(memory, "CGROUP_LIMIT", limit)
    monkeypatch.setattr(memory, "CGROUP_USAGE", usage)
    monkeypatch.setattr(memory, "_host_available", lambda: 10**12)
    assert memory.free_memory_bytes("cpu") == 2_000_000
    limit.write_text("max\n")  # no limit: the host's figure
    assert memory.free_memory_bytes("cpu") == 10**12


def test_cuda_reads_mem_get_info(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123_456_789, 10**10))
    assert memory.free_memory_bytes(torch.device("cuda", 0)) == 123_456_789


def _problem():
    x, y = digits(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    loader = DataLoader(TensorDataset(x[:200], y[:200]), batch_size=50)
    return model, InfluenceProblem(model, cross_entropy_per_example, loader, 0.1, LissaConfig(depth=5))


@pytest.mark.parametrize(("free_bytes", "stored"), [(10**9, True), (10**6, False)])
def test_the_store_follows_free_memory(monkeypatch, free_bytes, stored):
    monkeypatch.setattr(jacobian, "TIMED", False)  # the budget alone decides here, not the speed
    # 200 examples x 10 outputs x 1,210 parameters = 2.42M numbers (9.7 MB): within a quarter of 1 GB, not of 1 MB
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: free_bytes)
    assert jacobian.jacobian_budget(torch.device("cpu"), torch.float32) == free_bytes // 16
    model, problem = _problem()
    with analysis_mode(model):
        assert (problem.products.stored() is not None) is stored
