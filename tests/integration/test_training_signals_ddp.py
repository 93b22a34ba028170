"""TrainingSignalRecorder on a real gloo process group: 2 ranks assemble on rank 0 what one process records.

Plain ``torch.multiprocessing`` workers (spawn, no Lightning), each rank recording its own shard; the pieces go
to rank 0 through ``torch.distributed.gather_object`` (the path taken with ``TorchDistributed`` and the
Lightning DDP strategy), never to rank 1.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

N = 77  # shards of 39 and 38
EPOCHS = 5


def _setup() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Data and the weights after each of ``EPOCHS`` full-batch Adam steps (identical on every rank)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    states = []
    for _ in range(EPOCHS):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return x, y, states


def _record(collectives=None):
    from lightning_influence.analysis.training_signals import TrainingSignalRecorder
    from lightning_influence.core.tensors.data import IndexedData

    x, y, states = _setup()
    data = IndexedData(TensorDataset(x, y), batch_size=10)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    recorder = TrainingSignalRecorder(N, every_n_epochs=2)
    for epoch, state in enumerate(states):
        model.load_state_dict(state)
        recorder.record(model, data, epoch, collectives)
    return recorder


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        from lightning_influence.distributed import TorchDistributed

        recorder = _record(TorchDistributed())
        torch.save(recorder.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_gloo_two_ranks_gather_to_rank_zero_and_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    root, other = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = _record().state_dict()
    assert root["epochs_recorded"] == other["epochs_recorded"] == single["epochs_recorded"] == [0, 2, 4]
    for name, table in single["signals"].items():
        assert torch.allclose(root["signals"][name], table, atol=1e-6)
    assert torch.equal(root["labels"], single["labels"])
    assert other["signals"] == {} and other["probability_sum"] is None
