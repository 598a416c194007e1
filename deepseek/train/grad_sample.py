"""Per-sequence gradients of nn.Linear weights from one batched forward and backward: DP-SGD's fast path.

Legend: B sequences in the batch, T padded length, I / O a layer's input / output features, P trainable numbers.

For a linear layer y = x W^T + b run on every token, sequence b's gradient of its own loss is

    dW[b] = sum_t g[b, t]^T x[b, t]        db[b] = sum_t g[b, t]

with x the layer's input and g the gradient at its output (of the summed per-sequence losses, so row b's g
is the gradient of loss_b alone: nothing else in the forward mixes sequences). A forward hook keeps x, a
tensor hook on the output keeps g. Inputs the model flattened to (B*T, I) - the MoE runs its shared experts
on flat tokens - are viewed back as (B, T, I): the rows are in (b, t) order. Right padding adds rows whose
g is exactly zero (the loss ignores them and causal attention never lets a real token see them).

This covers LoRA on attention, the dense MLP and the shared experts (PEFT's lora_A / lora_B are nn.Linear),
and full fine-tuning of those matrices. Anything else trainable - LoRA on the stacked routed experts (PEFT
`target_parameters`), embeddings, norms - is not a per-token linear map of its own input, so `LinearGrads.of`
returns None (or `works` finds the sums wrong) and DP-SGD uses the reference path: `privacy.per_sample_grads`, one forward + backward per
record, which tests/train/test_grad_sample.py compares this against.
"""

from __future__ import annotations

import torch
from torch import nn


class NotPerSample(RuntimeError):
    """The hooked per-sequence gradients do not add up to the batch gradient."""


class LinearGrads:
    """Hooks on the nn.Linear modules that own every trainable parameter; `grads(loss_fn)` runs one forward +
    backward and returns the (B, P) per-sequence gradients, columns in `params` order."""

    def __init__(self, modules: list[tuple[nn.Linear, bool, bool]], params: list[nn.Parameter]):
        self.modules = modules  # (module, weight trainable, bias trainable)
        self.params = params
        self._calls: dict[int, list[list]] = {}  # id(module) -> [input x, output gradient g or None] per call

    @classmethod
    def of(cls, model: nn.Module, params: list[nn.Parameter]) -> LinearGrads | None:
        """The hooks for `params`, or None when some trainable parameter is not an nn.Linear weight or bias.
        Owning the parameter is not enough (PEFT's routed-expert adapters are nn.Linear modules never called):
        `works` checks on a real batch, and every `grads` call checks its sums again."""
        want = {id(p) for p in params}
        modules, covered = [], set()
        for m in model.modules():
            if type(m) is not nn.Linear:
                continue
            w = id(m.weight) in want
            b = m.bias is not None and id(m.bias) in want
            if w or b:
                modules.append((m, w, b))
                covered |= {id(m.weight)} if w else set()
                covered |= {id(m.bias)} if b else set()
        if covered != want:
            return None
        return cls(modules, params)

    def grads(self, run, B: int, T: int) -> torch.Tensor:
        """run(): the batched forward returning the (B,) per-sequence losses; returns (B, P) gradients.
        Leaves the parameters' .grad untouched."""
        handles = [m.register_forward_hook(self._keep(m)) for m, _, _ in self.modules]
        try:
            losses_B = run()
            summed = torch.autograd.grad(losses_B.sum(), self.params, allow_unused=True)  # fills the hooks' g
        finally:
            for h in handles:
                h.remove()
        per_param: dict[int, torch.Tensor] = {}
        self.uncalled = [m for m, _, _ in self.modules if id(m) not in self._calls]
        for m, w, b in self.modules:
            dW = dB = None
            for x, g in self._calls.pop(id(m), []):
                if g is None:  # this call's output did not reach the loss
                    continue
                x_BTI, g_BTO = _per_sequence(x, B, T), _per_sequence(g, B, T)
                if w:
                    part = torch.einsum("bto,bti->boi", g_BTO, x_BTI)
                    dW = part if dW is None else dW + part
                if b:
                    part = g_BTO.sum(1)
                    dB = part if dB is None else dB + part
            if w:  # a layer whose output never reached the loss has zero gradients
                per_param[id(m.weight)] = dW if dW is not None else m.weight.new_zeros(B, *m.weight.shape)
            if b:
                per_param[id(m.bias)] = dB if dB is not None else m.bias.new_zeros(B, *m.bias.shape)
        self._losses = losses_B.detach()
        for p, ref in zip(self.params, summed):  # the batch gradient is the sum of the per-sequence ones
            ref = torch.zeros_like(p) if ref is None else ref
            if not torch.allclose(per_param[id(p)].sum(0), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-8):
                raise NotPerSample("a trainable linear weight is also used outside its module's forward "
                                   "(e.g. PEFT target_parameters); use the per-record loop")  # fmt: skip
        return torch.cat([per_param[id(p)].reshape(B, -1) for p in self.params], dim=1)

    def works(self, run, B: int, T: int) -> bool:
        """Whether `grads` is exact for this model: one probe batch, its per-sequence sums against autograd."""
        try:
            self.grads(run, B, T)
        except NotPerSample:
            return False
        return not self.uncalled  # a module never called holds weights the forward uses some other way

    @property
    def losses(self) -> torch.Tensor:
        """(B,) the per-sequence losses of the last `grads` call."""
        return self._losses

    def _keep(self, m: nn.Linear):
        def hook(module, inputs, output):
            call = [inputs[0].detach(), None]
            self._calls.setdefault(id(m), []).append(call)
            if output.requires_grad:
                output.register_hook(lambda g: call.__setitem__(1, g.detach()))

        return hook


def _per_sequence(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T, F) from a layer's (B, T, F) or flattened (B*T, F) activations."""
    if t.dim() == 3 and t.shape[:2] == (B, T):
        return t
    if t.dim() == 2 and t.shape[0] == B * T:
        return t.view(B, T, t.shape[1])
    raise ValueError(f"cannot split activations of shape {tuple(t.shape)} into {B} sequences of {T} tokens")
