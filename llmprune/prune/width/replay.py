"""Replaying a sublayer from its recorded last-linear input, so the layer walk re-runs only what changed.

In every supported family the attention module ends in o_proj and the FFN module in down_proj, and
pruning KV groups or FFN channels changes only which inputs of that last linear count (simulate masks
or refits them); everything before it — q/k/v, rotary, softmax, gate/up — computes the same numbers
on the same layer input. So once the dense layer has run on the walk's inputs (pass A), the pruned
attention's output per micro-batch is `o_proj'(x_o)`, with x_o recorded in pass A, and the pruned
FFN's output is `down_proj'(x_down)` with x_down recorded in pass B: pass B then costs the norms and
the FFN, and the pass that advances the walk (pass C) only norms and residual adds — or, where the FFN
is added last and straight to the residual (no post-norm), down_proj' and one add on the FFN entry's
residual r̂ recorded in pass B (`advance_by_residual`).

Not used where the premise fails: a sublayer the plan drops (simulate already silences it), and
whole-projection q/k norms (OLMo 2), whose statistic changes with the kept heads. Memory: the
recorded inputs of one layer for every calibration token, `n_tokens · (n_q·head_dim + ffn + d)` values
in the model dtype; above `MAX_BYTES` the walk recomputes instead (three full passes per layer).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ...calibrate import BlockWalker

MAX_BYTES = 4 * 2**30  # recorded inputs of one layer, above which the walk recomputes instead


class Replay:
    """The recorded inputs of one linear (one tensor per micro-batch, in walk order)."""

    def __init__(self, store: torch.device):
        self.store = store
        self.inputs: list[torch.Tensor] = []

    @contextlib.contextmanager
    def record(self, linear: nn.Module) -> Iterator[None]:
        """While active, every forward through `linear` appends its input ([b, T, in])."""
        self.inputs.clear()
        handle = linear.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].detach().to(self.store)))
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def stand_in(self, module: nn.Module, linear: nn.Module, returns_tuple: bool) -> Iterator[None]:
        """While active, `module` (the whole sublayer) returns `linear(recorded input)` for the next micro-batch
        instead of computing; `linear` keeps whatever simulate patched into it (refit, mask, compensation)."""
        calls = iter(range(len(self.inputs)))

        def forward(*args: Any, **kwargs: Any) -> Any:
            h = kwargs.get("hidden_states", args[0] if args else None)
            x = self.inputs[next(calls)]
            y = linear(x.to(h.device))
            return (y, None) if returns_tuple else y

        module.forward = forward
        try:
            yield
        finally:
            del module.forward


@torch.no_grad()
def advance_by_residual(walker: "BlockWalker", residual: list[torch.Tensor], linear: nn.Module,
                        inputs: list[torch.Tensor]) -> None:
    """The walk's next inputs as residual[j] + linear(inputs[j]) per micro-batch, replacing the current ones in
    place: the block's output when its last step adds a sublayer ending in `linear` straight to the residual
    stream (no post-norm) — Llama, Mistral, Qwen, Phi-3 add `residual + mlp(norm(residual))` last. With the
    FFN entry's residual recorded in pass B, advancing the walk costs down_proj alone (no norms, no o_proj)."""
    walker.hidden = list(walker.hidden)  # a caller may still hold the old list
    for j, (r, x) in enumerate(zip(residual, inputs)):
        walker.hidden[j] = (r.to(walker.device) + linear(x.to(walker.device))).to(walker.store)


def fits(n_tokens: int, widths: int, dtype: torch.dtype) -> bool:
    """Whether recording `widths` values per token for every calibration token stays under MAX_BYTES."""
    return n_tokens * widths * torch.empty((), dtype=dtype).element_size() <= MAX_BYTES


__all__ = ["MAX_BYTES", "Replay", "advance_by_residual", "fits"]
