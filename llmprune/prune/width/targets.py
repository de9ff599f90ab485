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
import logging
from collections.abc import Callable, Iterator
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ...calibrate import BlockWalker
from ...families.base import BlockView
from ...surgery import take_last
from .accumulate import ProductSum

log = logging.getLogger(__name__)


def sublayer_target(target: str, post_norm: object) -> str:
    """The target one sublayer uses: a post-norm sits between it and the residual stream, so there the
    residual target falls back to dense."""
    return "dense" if target == "residual" and post_norm is not None else target


def module_target(linear: nn.Linear, x: torch.Tensor, r: torch.Tensor | None = None,
                  r_hat: torch.Tensor | None = None) -> torch.Tensor:
    """T = W x + b, plus the residual drift r − r̂ when given ([b, T, out], float32 like the products)."""
    t = F.linear(x.to(linear.weight.device).float(), linear.weight.detach().float(),
                 None if linear.bias is None else linear.bias.detach().float())
    if r is not None and r_hat is not None:
        t = t + (r.to(t.device).float() - r_hat.to(t.device).float())
    return t


def ffn_entry(block: BlockView) -> nn.Module:
    """The module whose input is the residual stream entering the FFN: its pre-norm (or the FFN itself)."""
    return block.mlp.norm if block.mlp.norm is not None else block.mlp.module


class SublayerOutputs:
    """A sublayer's output per micro-batch while `record` is active (nothing when the module is None)."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    @contextlib.contextmanager
    def record(self, module: nn.Module | None) -> Iterator[None]:
        self.outputs.clear()
        handle = None if module is None else module.register_forward_hook(
            lambda _m, _a, out: self.outputs.append((out[0] if isinstance(out, tuple) else out).detach()))
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()


class CrossMoment:
    """Running Σ T x̂̃ᵀ ([out, in+1], float64) over tokens; the products as in Gram (accumulate.ProductSum)."""

    def __init__(self) -> None:
        self.products = ProductSum(torch.float64)  # Σ T x̂ᵀ [out, in]
        self.col: torch.Tensor | None = None  # Σ T [out]: the constant input 1
        self.count = 0

    def update(self, target: torch.Tensor, x_hat: torch.Tensor) -> None:
        t = target.detach().reshape(-1, target.shape[-1]).float()  # [N, out]
        x = x_hat.detach().reshape(-1, x_hat.shape[-1]).float()  # [N, in]
        self.products.add(t, x)
        col = t.sum(0).double()
        self.col = col if self.col is None else self.col + col
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.col is None or self.count == 0:
            raise ValueError("no calibration inputs reached this module")
        return torch.cat([self.products.result(), self.col[:, None]], dim=1) / self.count


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
        r = r_hat = None
        if want_resid:
            r, r_hat = (h_dense, walker.hidden[j]) if kind == "attn" else (out_d - sub_d, out_p - sub_p)
        cross.update(module_target(linear, x, r, r_hat), x_hat)  # the dense module on dense inputs (+ drift)
        if dense_out is not None:
            dense_out.append(out_d.to(walker.store))
    return cross.matrix()


class DenseStream:
    """The dense model's stream beside the layer walk, for the `dense` / `residual` targets when the walk
    records the pruned side's inputs anyway (replay.py): per layer one pass of the dense block on the
    dense stream (pass D) records the sublayers' outputs, and the cross moments are then formed batch by
    batch against the pruned side's recorded inputs — no pass is run twice (`paired_cross` is the
    fallback that re-runs both sides when the recordings would not fit).

    The targets come from sublayer outputs, not from re-applying the linear: in every supported family
    the attention ends in o_proj and the FFN in down_proj (replay.py), so W x + b is the sublayer's
    output, and for a sublayer added straight to the residual stream the residual target
    W x + b + (r − r̂) is the dense stream after the sublayer minus the pruned stream before it."""

    def __init__(self, hidden: list[torch.Tensor]):
        self.hidden = list(hidden)  # [b, T, d] per micro-batch: the dense inputs of the next block
        self.attn_out: list[torch.Tensor] = []  # [b, T, d] the attention's output (o_proj's), dense
        self.mlp_out: list[torch.Tensor] = []  # [b, T, d] the FFN's output (down_proj's), dense
        self.next: list[torch.Tensor] = []  # [b, T, d] the block's output, dense

    @torch.no_grad()
    def run(self, walker: BlockWalker, i: int, attn: nn.Module | None, mlp: nn.Module | None) -> None:
        """Pass D: the dense block i on the dense stream, recording the outputs of the sublayers given."""
        a, m = SublayerOutputs(), SublayerOutputs()
        with a.record(attn), m.record(mlp):
            self.next = walker.run(i, self.hidden)
        self.attn_out, self.mlp_out = list(a.outputs), list(m.outputs)

    def attn_target(self, j: int, h_hat: torch.Tensor | None) -> torch.Tensor:
        """Micro-batch j's target for o_proj: its dense output, plus the drift h − ĥ of the stream entering the
        block when `h_hat` (the pruned stream) is given (residual target). [b, T, d] float32."""
        t = self.attn_out[j].float()
        return t if h_hat is None else t + (self.hidden[j].to(t.device).float() - h_hat.to(t.device).float())

    def mlp_target(self, j: int, r_hat: torch.Tensor | None) -> torch.Tensor:
        """Micro-batch j's target for down_proj: its dense output or, given the pruned residual r̂ entering the
        FFN (residual target), the dense block output − r̂ (= W x + b + r − r̂). [b, T, d] float32."""
        if r_hat is None:
            return self.mlp_out[j].float()
        return self.next[j].float() - r_hat.to(self.next[j].device).float()

    def advance(self) -> None:
        self.hidden, self.next = self.next, []
        self.attn_out, self.mlp_out = [], []


@torch.no_grad()
def cross_moment(x_hat: list[torch.Tensor], target: Callable[[int], torch.Tensor],
                 columns: list[int] | None = None) -> torch.Tensor:
    """P = E[T x̂̃ᵀ] ([out, in+1], float64), micro-batch by micro-batch: `target(j)` is T of micro-batch j.
    `columns`: only these inputs (and the constant) are summed, the other columns are left zero — the refit
    of a chosen selection reads the kept columns alone (at 50 % sparsity half the products)."""
    cross = CrossMoment()
    idx = None if columns is None else torch.tensor(columns, dtype=torch.long)
    for j, xh in enumerate(x_hat):
        t = target(j)
        xh = xh.to(t.device)
        if idx is not None:
            xh = take_last(xh, idx.to(t.device))
        cross.update(t, xh)
    part = cross.matrix()  # [out, |columns| + 1]
    if idx is None:
        return part
    n_in = x_hat[0].shape[-1]
    full = torch.zeros(part.shape[0], n_in + 1, dtype=part.dtype, device=part.device)
    full[:, idx.to(part.device)] = part[:, :-1]
    full[:, n_in] = part[:, -1]
    return full


TOKENS_PER_INPUT = 8  # below this many calibration tokens per refit input, dense/residual targets overfit


def warn_if_few_tokens(n_tokens: int, widest_input: int, target: str) -> None:
    """The dense / residual targets carry what the kept inputs cannot explain (noise, for the fit), so they
    need more tokens than `module`: on SmolLM2-135M at 50 % `residual` lost to `module` with 4 096
    calibration tokens (2.7 per FFN channel) and won clearly with 16 384 (10.7) (docs/reconstruction.md)."""
    if target != "module" and n_tokens < TOKENS_PER_INPUT * widest_input:
        log.warning("reconstruct_target: %s with %d calibration tokens for refit inputs up to %d wide (%.1f tokens "
                    "per input, fewer than %d): the fit may overfit the calibration text; raise --nsamples/--seqlen "
                    "or use reconstruct_target: module", target, n_tokens, widest_input, n_tokens / widest_input,
                    TOKENS_PER_INPUT)
