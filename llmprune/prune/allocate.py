"""Budget allocation: how many units each layer keeps, given unit scores and a parameter budget.

Pure functions on tensors and Geometry; no model access. Every width pruner hands in per-layer
`LayerUnits` (scores of KV groups and FFN channels, higher = more important) and gets back a
`LayerKeep` per layer. Sparsity is always the fraction of decoder-layer linear parameters removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families.base import Geometry


class BudgetError(ValueError):
    """The requested sparsity cannot be reached with the units this pruner may remove."""


@dataclass
class LayerUnits:
    geometry: Geometry
    attn: torch.Tensor | None = None  # [n_kv] score per KV group; None: attention is not pruned here
    mlp: torch.Tensor | None = None  # [m] score per FFN channel; None: FFN is not pruned here


@dataclass
class LayerKeep:
    kv_groups: list[int] | None = None  # kept KV groups (sorted); None: untouched; [] drop the sublayer
    channels: list[int] | None = None  # kept FFN channels (sorted); None: untouched; [] drop the sublayer


def keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the `n_keep` highest scores, sorted; ties go to the lower index (deterministic)."""
    n_keep = max(0, min(int(n_keep), scores.numel()))
    if n_keep == scores.numel():
        return list(range(n_keep))
    s = scores.detach().to(torch.float64).cpu()
    order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))
    return sorted(order[:n_keep])


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise BudgetError(f"sparsity must be in [0, 1) — the fraction of decoder-layer linear parameters to "
                          f"remove — got {sparsity}")
    return float(sparsity)


def round_width(width: int, multiple: int, maximum: int) -> int:
    """Round an FFN width to the nearest multiple (kernel-friendly), within [multiple, maximum]."""
    if multiple <= 1 or width <= 0:
        return width
    rounded = int(round(width / multiple)) * multiple
    return max(min(rounded, maximum), min(multiple, maximum))


def uniform(units: list[LayerUnits], sparsity: float) -> list[LayerKeep]:
    """Same budget in every layer: each layer removes `sparsity` of its own linear parameters.

    Attention loses round(sparsity · n_kv) KV groups (never all of them); the FFN gives up the
    channels that bring the layer to its budget (FLAP's UL-MM rule with parameter-exact costs).
    When only one module type is prunable, it carries the whole budget.
    """
    check_sparsity(sparsity)
    if all(u.attn is None and u.mlp is None for u in units):
        raise BudgetError("nothing is prunable: enable attention or FFN pruning")
    out = []
    for i, u in enumerate(units):
        g = u.geometry
        budget = sparsity * g.linear_params()
        gc, cc = g.kv_group_cost(), g.ffn_channel_cost()
        k = c = 0  # KV groups / FFN channels removed
        if u.attn is not None and g.has_attn:
            k = round(sparsity * g.n_kv_heads) if u.mlp is not None else round(budget / gc)
            k = min(k, g.n_kv_heads - 1)
        if u.mlp is not None and g.has_mlp:
            c = min(max(0, round((budget - k * gc) / cc)), g.intermediate - 1)
        granularity = max(gc if u.attn is not None else 0, cc if u.mlp is not None else 0)
        if budget - (k * gc + c * cc) > granularity:
            what = " and ".join(n for n, x in (("KV groups", u.attn), ("FFN channels", u.mlp)) if x is not None)
            raise BudgetError(f"layer {i}: sparsity {sparsity:.0%} cannot be reached by removing {what} alone; "
                              f"lower the sparsity or let the pruner remove more unit types")
        out.append(LayerKeep(
            kv_groups=None if u.attn is None or not g.has_attn else keep_top(u.attn, g.n_kv_heads - k),
            channels=None if u.mlp is None or not g.has_mlp else keep_top(u.mlp, g.intermediate - c),
        ))
    return out
