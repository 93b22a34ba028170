"""Per-example scores and gradients from module hooks: no ``vmap``, so any model that runs forward/backward works.

One ordinary forward pass over a batch records, for every supported layer owning trainable parameters, what its
rule needs (:mod:`~lightning_influence.core.per_example.rules`); one backward pass of ``sum_i L_i`` gives every layer's
output gradients ``g_i = dL_i/dy_i`` (in ``eval()`` mode example i's loss depends on example i only, so the
gradient of the sum with respect to row i of an activation is example i's own). The parameters themselves are
detached: no weight gradient is ever formed. Scores ``s . grad L(z_i)`` then come out per layer in factored form.

Parameters of anything else (an unsupported module, a weight used outside its module's forward, a layer whose
output mixes examples) take the *generic* path: per-example autograd without ``vmap``, first by the double-backward
identity ``d/du_i [s . grad_theta sum_j u_j L_j] = s . grad L_i`` (one forward, one backward with graph, one more
per test vector), else, when the model is not twice differentiable, a loop over examples. :attr:`ScoringPlan.note`
says which parameters took which path. On the first batch the hook gradients are checked against plain autograd
on two examples and any parameter that disagrees is moved to the generic path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_influence.core.per_example.columns import column_backward
from lightning_influence.core.per_example.losses import FunctionalLoss, autocast_off, check_finite_losses
from lightning_influence.core.per_example.rules import LayerRule, rule_for
from lightning_influence.core.tensors.batching import Batch, batch_size_of, slice_batch
from lightning_influence.core.tensors.params import Params, unflatten

#: Relative disagreement between hook and autograd gradients on the first examples that demotes a parameter.
HOOK_CHECK_TOLERANCE = 1e-3


@dataclass
class ScoringPlan:
    """Which path each trainable parameter takes: ``hooks[name]`` is the layer rule's kind, ``generic[name]`` why
    it is not hooked. ``generic_method`` is ``"double_backward"`` or ``"loop"`` once the generic path ran."""

    hooks: dict[str, str] = field(default_factory=dict)
    generic: dict[str, str] = field(default_factory=dict)
    generic_method: Optional[str] = None

    def note(self) -> str:
        """One line for reports: counts per path and the generic parameters with their reason."""
        kinds: dict[str, int] = {}
        for kind in self.hooks.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        hooked = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        line = f"hooks: {len(self.hooks)} parameters ({hooked}); generic: {len(self.generic)}"
        if self.generic:
            shown = "; ".join(f"{name} ({why})" for name, why in list(self.generic.items())[:5])
            more = f"; +{len(self.generic) - 5} more" if len(self.generic) > 5 else ""
            line += f" [{self.generic_method or 'autograd'}]: {shown}{more}"
        return line

    def groups(self) -> dict[str, list[str]]:
        """``{path: [parameter names]}`` with path ``"hooks:<kind>"`` or ``"generic"``."""
        out: dict[str, list[str]] = {}
        for name, kind in self.hooks.items():
            out.setdefault(f"hooks:{kind}", []).append(name)
        if self.generic:
            out["generic"] = list(self.generic)
        return out


@dataclass(frozen=True)
class _Slot:
    """A hooked module and its trainable parameters: local name -> global name."""

    module: nn.Module
    rule: LayerRule
    names: dict[str, str]


class _Capture:
    """Forward hooks that record each call's feature and add a zero probe to its output.

    ``d(sum L)/d probe`` is ``dL_i/dy_i`` for every example. An output with batch dimension 1 while the batch has B
    examples (e.g. position embeddings broadcast over the batch) is expanded to B first so that its gradient stays
    per example; any other leading size marks the module as not per-example.
    """

    def __init__(self, slots: list[_Slot], batch_size: int) -> None:
        self.batch_size = batch_size
        self.calls: list[tuple[_Slot, torch.Tensor, torch.Tensor]] = []
        self.bad: set[int] = set()
        self._handles = [slot.module.register_forward_hook(self._hook(i, slot)) for i, slot in enumerate(slots)]

    def _hook(self, index: int, slot: _Slot):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.dim() == 0:
                self.bad.add(index)
                return output
            lead = output.shape[0]
            feature = slot.rule.feature(module, inputs, output)
            if lead == 1 and self.batch_size > 1:
                output = output.expand(self.batch_size, *output.shape[1:])
                feature = feature.expand(self.batch_size, *feature.shape[1:])
            elif lead != self.batch_size or feature.shape[0] != self.batch_size:
                self.bad.add(index)
                return output
            probe = torch.zeros_like(output, requires_grad=True)
            self.calls.append((slot, feature, probe))
            return output + probe

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class PerExampleEngine:
    """Per-example scores ``[s_j . grad L(z_i)]`` and gradients for ``params`` (a subset of ``loss.model``'s).

    Args:
        loss: the functional per-example loss (its model is hooked).
        params: the analysed parameters (trainable, possibly a selection), as in :class:`InfluenceProblem`.
        check: compare hook gradients with autograd on the first two examples of the first batch.
    """

    def __init__(self, loss: FunctionalLoss, params: Params, check: bool = True) -> None:
        self.loss = loss
        self.params = params
        self.plan = ScoringPlan()
        self._slots = self._build_slots(loss.model, params)
        self._checked = not check

    # -- plan ---------------------------------------------------------------------------------------------
    def _build_slots(self, model: nn.Module, params: Params) -> list[_Slot]:
        names = {id(p): n for n, p in model.named_parameters() if n in params}
        uses: dict[str, int] = {}
        slots: list[_Slot] = []
        reasons: dict[str, str] = {}
        parents = {id(child): module for module in model.modules() for child in module.children()}
        for module in model.modules():
            own = {local: names[id(p)] for local, p in module.named_parameters(recurse=False) if id(p) in names}
            if not own:
                continue
            for name in own.values():
                uses[name] = uses.get(name, 0) + 1
            rule, why = rule_for(module, parents.get(id(module)))
            if rule is None:
                reasons.update({name: why for name in own.values()})
            else:
                slots.append(_Slot(module, rule, own))
        for name in params:
            if name not in uses:
                reasons[name] = "not a module parameter"
        self.plan.generic = {n: reasons[n] for n in params if n in reasons}
        for slot in slots:  # a weight tied between layers (GPT-2's embedding and head) lists both kinds
            for n in slot.names.values():
                kinds = self.plan.hooks.get(n, "").split("+")
                self.plan.hooks[n] = "+".join(sorted({*kinds, slot.rule.kind} - {""}))
        self._slots = slots
        self._demote(set(self.plan.generic), "")
        return self._slots

    def _demote(self, names: set[str], why: str) -> None:
        """Move ``names``, and every parameter sharing a hooked layer with one of them, to the generic path."""
        while True:
            dropped = [s for s in self._slots if set(s.names.values()) & names]
            if not dropped:
                break
            self._slots = [s for s in self._slots if not (set(s.names.values()) & names)]
            names = names | {n for s in dropped for n in s.names.values()}
        for name in names:
            self.plan.hooks.pop(name, None)
            self.plan.generic.setdefault(name, why or "shares a layer with a parameter used elsewhere")

    @property
    def checked(self) -> bool:
        """Whether the hook gradients were compared with autograd (:meth:`check`; done on the first batch)."""
        return self._checked

    @property
    def hooked(self) -> list[str]:
        return [n for n in self.params if n in self.plan.hooks]

    @property
    def generic(self) -> list[str]:
        return [n for n in self.params if n in self.plan.generic]

    # -- hook pass ----------------------------------------------------------------------------------------
    def _capture(self, batch: Batch) -> list[tuple[_Slot, torch.Tensor, torch.Tensor]]:
        """Forward with probes and one backward: ``(slot, feature, output grad)`` per recorded call."""
        while True:
            capture = _Capture(self._slots, batch_size_of(batch))
            try:
                losses = self.loss(self.params, batch)
            finally:
                capture.remove()
            if capture.bad:
                bad = {n for i in capture.bad for n in self._slots[i].names.values()}
                self._demote(bad, "layer output is not per example (batch dimension not first)")
                continue
            check_finite_losses(losses.detach())
            if not capture.calls:
                return []
            probes = [probe for _, _, probe in capture.calls]
            grads = torch.autograd.grad(losses.sum(), probes, allow_unused=True)
            return [(slot, f, g) for (slot, f, _), g in zip(capture.calls, grads) if g is not None]

    def _hook_grads(self, batch: Batch) -> Params:
        out: Params = {}
        for slot, feature, g in self._capture(batch):
            for local, grad in slot.rule.grads(slot.module, feature, g, set(slot.names)).items():
                name = slot.names[local]
                out[name] = out[name] + grad if name in out else grad
        return out

    # -- generic path ---------------------------------------------------------------------------------------
    def _generic_loop(self, batch: Batch, names: list[str]) -> Params:
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for i in range(batch_size_of(batch)):
            leaves = {n: self.params[n].detach().requires_grad_(True) for n in names}
            loss = self.loss({**self.params, **leaves}, slice_batch(batch, i, i + 1))[0]
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for n, g in zip(names, grads):
                rows[n].append(torch.zeros_like(self.params[n]) if g is None else g)
        return {n: torch.stack(rows[n]) for n in names}

    def _generic_dot(self, batch: Batch, s: Params, k: int) -> torch.Tensor:
        names = self.generic
        if self.plan.generic_method != "loop":
            try:
                scores = self._double_backward_dot(batch, names, s, k)
                self.plan.generic_method = "double_backward"
                return scores
            except (RuntimeError, NotImplementedError) as err:
                if "out of memory" in str(err).lower():
                    raise
                self.plan.generic_method = "loop"
        grads = self._generic_loop(batch, names)
        return sum(s[n].reshape(k, -1) @ grads[n].reshape(grads[n].shape[0], -1).T for n in names)  # type: ignore[return-value]

    def _double_backward_dot(self, batch: Batch, names: list[str], s: Params, k: int) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            return self._double_backward_dot_impl(batch, names, s, k)

    def _double_backward_dot_impl(self, batch: Batch, names: list[str], s: Params, k: int) -> torch.Tensor:
        leaves = {n: self.params[n].detach().requires_grad_(True) for n in names}
        weights = torch.ones(batch_size_of(batch), dtype=next(iter(leaves.values())).dtype,
                             device=next(iter(leaves.values())).device, requires_grad=True)
        losses = self.loss({**self.params, **leaves}, batch)
        grads = torch.autograd.grad((weights * losses).sum(), list(leaves.values()), create_graph=True,
                                    allow_unused=True)
        pairs = [(n, g) for n, g in zip(names, grads) if g is not None and g.requires_grad]
        rows = []
        for j in range(k):
            directional = sum((s[n][j] * g).sum() for n, g in pairs)
            if not isinstance(directional, torch.Tensor):
                rows.append(weights.detach() * 0)
                continue
            (row,) = torch.autograd.grad(directional, weights, retain_graph=j < k - 1, allow_unused=True)
            rows.append(torch.zeros_like(weights) if row is None else row)
        return torch.stack(rows).detach()

    # -- public -----------------------------------------------------------------------------------------------
    def check(self, batch: Batch) -> None:
        """Compare hook gradients with autograd on (up to) the first two examples; demote what disagrees."""
        self._checked = True
        with torch.no_grad():  # a wrong loss shape is reported for the whole batch, not the slice checked below
            check_finite_losses(self.loss(self.params, batch))
        if not self.hooked:
            return
        few = slice_batch(batch, 0, min(2, batch_size_of(batch)))
        fast = self._hook_grads(few)
        reference = self._generic_loop(few, self.hooked)
        wrong = set()
        # a parameter whose gradient vanishes in exact arithmetic (an attention key bias) is compared with the
        # whole gradient's scale, not with its own rounding noise
        floor = 1e-3 * torch.stack([r.norm() for r in reference.values()]).norm()
        for name, ref in reference.items():
            got = fast.get(name, torch.zeros_like(ref))
            if (got - ref).norm() > HOOK_CHECK_TOLERANCE * torch.maximum(ref.norm(), floor) + 1e-12:
                wrong.add(name)
        if wrong:
            warnings.warn(
                f"Hook-based per-example gradients disagreed with autograd for {sorted(wrong)[:5]}"
                f"{' ...' if len(wrong) > 5 else ''} (a weight used outside its module's forward?); those take the"
                " generic per-example path.", stacklevel=3,
            )
            self._demote(wrong, "hook check disagreed with autograd")

    def grad_dict(self, batch: Batch) -> Params:
        """Per-example gradients ``{name: [B, *shape]}`` of every analysed parameter (meant for a few points)."""
        with autocast_off(self.params):
            return self._grad_dict(batch)

    def _grad_dict(self, batch: Batch) -> Params:
        if not self._checked:
            self.check(batch)
        grads = self._hook_grads(batch) if self._slots else {}
        if self.generic:
            grads.update(self._generic_loop(batch, self.generic))
        size = batch_size_of(batch)
        return {n: grads[n] if n in grads else self.params[n].new_zeros(size, *self.params[n].shape) for n in self.params}

    def grads(self, batch: Batch) -> torch.Tensor:
        """``[B, P]`` per-example gradients, flattened in the order of ``params``: each layer's block is written into
        the one ``[B, P]`` result as it comes (no dict of blocks beside a flattened copy: one ``B x P``, not two)."""
        with autocast_off(self.params):
            if not self._checked:
                self.check(batch)
            size = batch_size_of(batch)
            like = next(iter(self.params.values()))
            out = like.new_zeros(size, sum(p.numel() for p in self.params.values()))
            views, offset = {}, 0
            for name, p in self.params.items():  # [B, *shape] views into out (view: never a silent copy)
                views[name] = out[:, offset : offset + p.numel()].view(size, *p.shape)
                offset += p.numel()
            if self._slots:
                for slot, feature, g in self._capture(batch):
                    for local, grad in slot.rule.grads(slot.module, feature, g, set(slot.names)).items():
                        views[slot.names[local]].add_(grad)
                    del feature, g
            if self.generic:
                for name, grad in self._generic_loop(batch, self.generic).items():
                    views[name].copy_(grad)
            return out

    def output_grads(self, batch: Batch, cotangents: torch.Tensor, out: torch.Tensor) -> bool:
        """Per-example gradients of ``C`` weighted outputs from one forward pass: ``out[:, c]`` (``out [B, C, P]``)
        becomes the gradient of ``cotangents[i, :, c] . y_i`` for every example i, where ``y [B, M]`` is what the
        engine's loss function returns for ``batch`` here (per-example outputs, not losses).

        One forward with the hooks, then the C backward passes batched (``is_grads_batched``, in chunks whose
        layer-output gradients fit :data:`~lightning_influence.core.tensors.memory.PER_EXAMPLE_BYTES`; one at a
        time where a batched backward fails), and each layer's rule reads its feature once for every column. The
        numbers of :meth:`grads` of a loss returning ``(y * cotangents[:, :, c]).sum(dim=1)``, called once per
        column (bit for bit on the models of ``tests/unit/core/test_jacobian_build.py``). Returns False (``out``
        untouched) before :meth:`check` ran, or when a parameter takes the generic path or a layer's output is not
        per example: call :meth:`grads` per column then."""
        if self.generic or not self._slots or not self._checked:
            return False
        with autocast_off(self.params):
            size = batch_size_of(batch)
            capture = _Capture(self._slots, size)
            try:
                state, prepared = self.loss.functional_args(self.params, batch)
                outputs = functional_call(self.loss._module, state, (prepared,))
            finally:
                capture.remove()
            if capture.bad or not capture.calls or outputs.shape != cotangents.shape[:2]:
                return False
            check_finite_losses(outputs.detach().sum(dim=1))
            probes = [probe for _, _, probe in capture.calls]
            grads = column_backward(outputs, probes, cotangents)
            out.zero_()
            views = []
            for c in range(cotangents.shape[2]):  # [B, *shape] views into out[:, c] per parameter
                offset, found = 0, {}
                for name, p in self.params.items():
                    found[name] = out[:, c, offset : offset + p.numel()].view(size, *p.shape)
                    offset += p.numel()
                views.append(found)
            for (slot, feature, _), stacked in zip(capture.calls, grads):
                if stacked is None:
                    continue
                per_column = slot.rule.column_grads(slot.module, feature, stacked, set(slot.names))
                for c, found in enumerate(per_column):
                    for local, grad in found.items():
                        views[c][slot.names[local]].add_(grad)
            return True

    def dot(self, batch: Batch, s_vectors: torch.Tensor) -> torch.Tensor:
        """``[k, B]`` of ``s_j . grad L(z_i)`` for the rows ``s_j`` of ``s_vectors [k, P]``."""
        with autocast_off(self.params):
            return self._dot(batch, s_vectors)

    def _dot(self, batch: Batch, s_vectors: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            self.check(batch)
        k = s_vectors.shape[0]
        tangents = unflatten(s_vectors, self.params)
        total = s_vectors.new_zeros(k, batch_size_of(batch))
        if self._slots:
            for slot, feature, g in self._capture(batch):
                s = {local: tangents[name].reshape(k, *self.params[name].shape) for local, name in slot.names.items()}
                total += slot.rule.dot(slot.module, feature, g, s)
        if self.generic:
            total += self._generic_dot(batch, tangents, k)
        return total
