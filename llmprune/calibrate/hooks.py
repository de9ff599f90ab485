"""Hooks that feed Stats at canonical sites. Hooks are always removed, even on error."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

from ..families.base import BlockView
from .stats import BlockSimilarity, RunningMoments, Stats, site_name

# site -> which input it records. All record the *input* of a module (what a pruner scores).
SITES = {
    "attn.in": "input of the attention projections (after the pre-attention norm)",
    "attn.o_in": "input of the attention output projection: concatenated per-head outputs",
    "mlp.in": "input of the FFN input projections (after the pre-FFN norm)",
    "mlp.down_in": "input of the FFN down projection: act(gate(x)) * up(x)",
    "block": "similarity of the whole block's input and output hidden states",
}


def site_modules(block: BlockView, sites: Iterable[str]) -> dict[str, nn.Module]:
    """Map canonical site names of one block to the module whose input is recorded."""
    out: dict[str, nn.Module] = {}
    for s in sites:
        if s not in SITES:
            raise ValueError(f"unknown calibration site {s!r}; known: {sorted(SITES)}")
        mod = None
        if s == "attn.in" and block.attn is not None:
            mod = block.attn.q
        elif s == "attn.o_in" and block.attn is not None:
            mod = block.attn.o
        elif s == "mlp.in" and block.mlp is not None:
            mod = block.mlp.inputs[0]
        elif s == "mlp.down_in" and block.mlp is not None:
            mod = block.mlp.down
        elif s == "block":
            mod = block.module
        if mod is not None:
            out[site_name(block.index, s)] = mod
    return out


@contextlib.contextmanager
def record(sites: dict[str, nn.Module], stats: Stats) -> Iterator[Stats]:
    """While active, every forward through a site module updates `stats` (float64)."""
    handles = []
    try:
        for name, mod in sites.items():
            if name.endswith(".block"):
                acc = stats.blocks.setdefault(name, BlockSimilarity())
                handles.append(mod.register_forward_hook(_block_hook(acc), with_kwargs=True))
            else:
                acc = stats.moments.setdefault(name, RunningMoments())
                handles.append(mod.register_forward_pre_hook(_input_hook(acc)))
        yield stats
    finally:
        for h in handles:
            h.remove()


def _input_hook(acc: RunningMoments):  # noqa: ANN202
    def hook(_mod: nn.Module, args: tuple) -> None:
        acc.update(args[0])

    return hook


def _block_hook(acc: BlockSimilarity):  # noqa: ANN202
    def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        acc.update(x_in, x_out)

    return hook
