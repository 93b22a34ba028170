"""Batched backward passes of several weighted sums of a batch's outputs: the columns of the output Jacobian's
per-example gradients (:meth:`~lightning_influence.core.per_example.engine.PerExampleEngine.output_grads`)."""

from __future__ import annotations

import torch

from lightning_influence.core.tensors.memory import PER_EXAMPLE_BYTES, free_memory_bytes


def column_backward(outputs: torch.Tensor, probes: list[torch.Tensor], cotangents: torch.Tensor
                    ) -> list[torch.Tensor | None]:
    """Per probe, ``[C, *probe shape]``: for each column c the probe's gradient of
    ``sum_i cotangents[i, :, c] . outputs_i`` (None where a probe does not reach the outputs)."""
    columns = cotangents.shape[2]
    per_column = sum(p.numel() for p in probes) * outputs.element_size()
    chunk = max(1, min(columns, min(PER_EXAMPLE_BYTES, free_memory_bytes(outputs.device) // 16) // per_column))
    parts: list[tuple[torch.Tensor | None, ...]] = []
    start = 0
    while start < columns:
        stop = min(columns, start + chunk)
        if chunk > 1:
            try:
                parts.append(torch.autograd.grad(outputs, probes, grad_outputs=cotangents[:, :, start:stop].permute(
                    2, 0, 1), is_grads_batched=True, retain_graph=True, allow_unused=True))
            except (RuntimeError, NotImplementedError) as err:  # no batching rule for some operation
                if "out of memory" in str(err).lower():
                    raise
                chunk = 1
                continue
        else:
            found = torch.autograd.grad((outputs * cotangents[:, :, start]).sum(dim=1).sum(), probes,
                                        retain_graph=True, allow_unused=True)
            parts.append(tuple(None if g is None else g[None] for g in found))
        start = stop
    return [None if part[0] is None else part[0] if len(part) == 1 else torch.cat(part)  # type: ignore[misc]
            for part in zip(*parts)]
