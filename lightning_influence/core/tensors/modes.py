"""The state an analysis runs in: eval mode with the RNG saved and restored, and checks that it changes nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lightning_influence.core.tensors.params import model_device


@contextlib.contextmanager
def analysis_mode(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Run analysis in ``eval()`` mode with the RNG state saved, then restore both.

    BatchNorm uses its running statistics and dropout is off, so the analysed function is deterministic;
    training continues afterwards exactly as it would have without the analysis. Autocast is off and attention
    uses the twice-differentiable math kernel.
    """
    modes = {module: module.training for module in model.modules()}
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    cuda_devices = sorted({d.index or 0 for d in devices})
    with torch.random.fork_rng(devices=cuda_devices):
        if seed is not None:
            torch.manual_seed(seed)
        model.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad(), _analysis_kernels(model):
                yield
        finally:
            for module, mode in modes.items():
                module.train(mode)


@contextlib.contextmanager
def _analysis_kernels(model: nn.Module) -> Iterator[None]:
    """Autocast off (analysis in full precision whatever the training precision) and the math attention kernel
    for ``scaled_dot_product_attention`` (the fused kernels have no double backward, which HVPs need)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = model_device(model).type
    with contextlib.ExitStack() as stack:
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by ``"parameter <name>"`` / ``"buffer <name>"`` (not copies)."""
    found: dict[str, torch.Tensor] = {f"parameter {n}": p for n, p in model.named_parameters()}
    found.update({f"buffer {n}": b for n, b in model.named_buffers()})
    return found


def state_snapshot(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (on ``device``, default: where each lives), e.g. to check that a
    forward pass in eval mode changes nothing."""
    return {name: value.detach().to(device, copy=True) for name, value in model_tensors(model).items()}


def check_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise when the model's forward (in eval mode) changed a parameter or buffer.

    Influence differentiates one fixed function of the parameters; a forward that updates state (a call
    counter, BatchNorm kept in training mode, an EMA updated in ``forward``) makes every pass a different one.
    """
    after = state_snapshot(model)
    changed = [name for name, value in before.items()
               if name not in after or after[name].shape != value.shape or not torch.equal(after[name], value)]
    if changed:
        raise ValueError(
            f"Expected the model's forward to leave its state unchanged in eval mode, but it changed {changed[:5]}."
            " Influence needs a fixed function of the parameters: update such state only under `if self.training:`"
            " (and keep BatchNorm layers in eval mode: do not call `.train()` inside `forward`)."
        )
