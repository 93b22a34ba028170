"""Collectives behind a small protocol, so the analysis runs the same on one process or many."""

from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.distributed.torch_distributed import TorchDistributed

__all__ = ["Collectives", "SingleProcess", "TorchDistributed"]
