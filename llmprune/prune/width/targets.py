"""What the least-squares refit aims at: `reconstruct_target` (module | dense | residual).

The refit chooses W' on the pruned model's inputs x̂ (x̃ = [x; 1]) to minimise E‖T − W' x̂̃_K‖², which
needs only H = E[x̂̃ x̂̃ᵀ] and the cross moment P = E[T x̂̃ᵀ] ([out, in+1]):

- module:   T = W̃ x̂̃, the dense module on the pruned inputs; P = W̃ H (no extra pass).
- dense:    T = W̃ x̃, the dense module on the *dense model's* inputs, which also undoes the error the
            earlier pruned layers left in this module's input; P = W̃ E[x̃ x̂̃ᵀ].
- residual: T = W̃ x̃ + (r − r̂), where r / r̂ are the residual stream entering the sublayer in the
            dense / pruned model: the sublayer's output is fitted so that the residual stream after it
            matches the dense one as well as the kept inputs allow — the accumulated drift is corrected
            where it can be. Only for sublayers added straight to the residual (no post-norm); others
            fall back to `dense`.

The paired pass runs the dense block on the dense stream and the (partly pruned) block on the pruned
stream micro-batch by micro-batch, so the two inputs of every token meet in one accumulator. Memory:
a second copy of the block activations (the dense stream) plus one [out, in+1] float64 matrix.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch
from torch import nn

from ...calibrate import BlockWalker

TARGETS = ("module", "dense", "residual")


class CrossMoment:
    """Running Σ T x̂̃ᵀ ([out, in+1], float64) over tokens."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, target: torch.Tensor, x_hat: torch.Tensor) -> None:
        t = target.detach().reshape(-1, target.shape[-1]).double()  # [N, out]
        x = x_hat.detach().reshape(-1, x_hat.shape[-1]).double()  # [N, in]
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [N, in+1]
        if self.sum is None:
            self.sum = torch.zeros(t.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.sum.addmm_(t.T, x)
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.sum is None or self.count == 0:
            raise ValueError("no calibration inputs reached this module")
        return self.sum / self.count


class _Tap:
    """Records a module's input (pre-hook) and, optionally, another module's output (forward hook)."""

    def __init__(self, linear: nn.Module, sublayer: nn.Module | None):
        self.x: torch.Tensor | None = None
        self.sub_out: torch.Tensor | None = None
        self.handles = [linear.register_forward_pre_hook(self._pre)]
        if sublayer is not None:
            self.handles.append(sublayer.register_forward_hook(self._post))

    def _pre(self, _m: nn.Module, args: tuple) -> None:
        self.x = args[0]

    def _post(self, _m: nn.Module, _args: tuple, out: object) -> None:
        self.sub_out = out[0] if isinstance(out, tuple) else out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def paired_cross(walker: BlockWalker, i: int, dense_in: list[torch.Tensor], linear: nn.Linear,
                 sublayer: nn.Module | None, kind: str, target: str,
                 pruned_ctx: Callable[[], ContextManager[object]],
                 dense_out: list[torch.Tensor] | None = None) -> torch.Tensor:
    """P = E[T x̂̃ᵀ] for `linear` (o_proj or down_proj) of block i; see the module docstring.

    dense_in: the dense stream's inputs of block i (one [b, T, d] per micro-batch); `pruned_ctx` makes
    the block behave as pruned so far (surgery.simulate). `sublayer` is the attention / FFN module whose
    output is added to the residual (needed for kind == "mlp" with the residual target: the residual
    entering the FFN is the block output minus the FFN output). With `dense_out` a list, the dense
    block outputs are appended to it (the dense stream's next inputs).
    """
    layer = walker.layers[i]
    cross = CrossMoment()
    w = linear.weight.detach().double()
    b = None if linear.bias is None else linear.bias.detach().double()
    want_resid = target == "residual"
    for j, (h_dense, (args, kwargs)) in enumerate(zip(dense_in, walker.layer_args[i])):
        tap = _Tap(linear, sublayer if want_resid and kind == "mlp" else None)
        try:
            out_d = layer(h_dense.to(walker.device), *args, **kwargs)
            out_d = out_d[0] if isinstance(out_d, tuple) else out_d
            x, sub_d = tap.x, tap.sub_out
            with pruned_ctx():
                out_p = layer(walker.hidden[j].to(walker.device), *args, **kwargs)
                out_p = out_p[0] if isinstance(out_p, tuple) else out_p
            x_hat, sub_p = tap.x, tap.sub_out
        finally:
            tap.remove()
        t = x.double() @ w.T  # [b, T, out]: the dense module on dense inputs
        if b is not None:
            t = t + b
        if want_resid:
            if kind == "attn":
                r, r_hat = h_dense.to(walker.device), walker.hidden[j].to(walker.device)
            else:
                r, r_hat = out_d - sub_d, out_p - sub_p
            t = t + (r.double() - r_hat.double())
        cross.update(t, x_hat)
        if dense_out is not None:
            dense_out.append(out_d.to(walker.store))
    return cross.matrix()


def no_context() -> ContextManager[object]:
    return contextlib.nullcontext()
