"""FLAP: fluctuation-based adaptive structured pruning with bias compensation (An et al., AAAI 2024).

Score of input channel j of o_proj / down_proj, from float64 moments of the dense model's inputs:
    IFV   F_j = Var(X_j)                         (exact variance over all calibration tokens)
    WIFV  F_j · ‖W[:, j]‖²                        (default)
    WIFN  mean_i |W_ij| · ‖X_j‖₂
A KV group (GQA) or query head scores the sum of its channels; structures decide how many units
each layer keeps (allocate.py):
    AL-AM  z-scores per layer and module, one global threshold weighted by real unit costs (default)
    AL-MM  the same with a fixed number of attention units removed globally, FFN filling the budget
    UL-MM  the same fraction of parameters removed in every layer (attention fraction manual)
    UL-UM  the same fraction of attention units and of FFN channels in every layer
Removed channels are replaced by a bias W[:, removed] · mean(X_removed) (on by default).

`faithful: true` reproduces what the released code does differently: attention channel scores
squared once more; budgets that count an attention unit as an MHA head (4·head_dim·hidden
parameters), so AL-AM weighs it ⌊4·head_dim/3⌋ FFN channels — the official `512/3` written into an
integer tensor, i.e. 170 for head_dim 128 — with the threshold unit itself removed (`score > τ`);
UL-UM's floors; no parameter settling. The official streaming-variance approximation is not
reproduced (variance is always exact).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ...calibrate import Stats, site_name
from ..context import PruneContext
from ...families.base import BlockView, Geometry
from ...plan import Plan
from .allocate import LayerKeep, LayerUnits, Rules, check_sparsity, global_threshold, keep_shape, standardize, uniform
from .engine import allocate, plan_width
from .options import DataWidthOptions

STRUCTURE_ALLOCATION = {"AL-AM": "global", "AL-MM": "global", "UL-MM": "uniform", "UL-UM": "uniform"}


class FlapConfig(DataWidthOptions):
    metric: Literal["ifv", "wifv", "wifn"] = "wifv"
    structure: Literal["AL-AM", "AL-MM", "UL-MM", "UL-UM"] | None = None  # default AL-AM unless allocation says otherwise
    allocation: Literal["uniform", "global", "coarse_to_fine", "owl", "search"] | None = None  # type: ignore[assignment]
    attention_sparsity: float | None = Field(None, ge=0, lt=1)  # MM structures: share of attention units removed
    compensate: bool = True
    faithful: bool = False
    # Square attention channel scores once more, as the released code does. On by default: measured on a
    # GQA and an MHA model at 20 % and 50 % it gave lower perplexity in 3 of 4 cells (docs/benchmarks-flap.md).
    square_attention: bool = True

    @field_validator("metric", "structure", mode="before")
    @classmethod
    def _case(cls, v: object) -> object:
        if isinstance(v, str):
            return v.lower() if v.lower() in ("ifv", "wifv", "wifn") else v.upper()
        return v

    @model_validator(mode="after")
    def _resolve_structure(self) -> FlapConfig:
        if self.allocation in ("coarse_to_fine", "owl", "search"):
            self.structure = None  # per-layer budgets from block importance / outliers / search replace the structure
        elif self.structure is None:
            self.structure = {"global": "AL-AM", "uniform": "UL-MM", None: "AL-AM"}[self.allocation]
        elif self.allocation is not None and STRUCTURE_ALLOCATION[self.structure] != self.allocation:
            hint = "AL-AM or AL-MM" if self.allocation == "global" else "UL-MM or UL-UM"
            raise ValueError(f"structure {self.structure} is a {STRUCTURE_ALLOCATION[self.structure]} allocation "
                             f"but allocation is {self.allocation!r}; set structure to {hint}, or drop one of them")
        if self.structure is not None:
            self.allocation = STRUCTURE_ALLOCATION[self.structure]
        if self.attention_sparsity is not None and self.structure not in ("AL-MM", "UL-MM"):
            raise ValueError("attention_sparsity (manual module ratio) applies to structure AL-MM or UL-MM only")
        if self.faithful and (self.query_heads or self.round_to != 1):
            raise ValueError("faithful reproduces the released FLAP, which has neither query_heads nor round_to; "
                             "drop those options or set faithful: false")
        return self


# ---- scores ----------------------------------------------------------------------------------------
def channel_scores(metric: str, weight: torch.Tensor, moments: object) -> torch.Tensor:
    """[in] FLAP score of each input channel of a linear layer (weight [out, in]) from its input moments."""
    w = weight.detach().double().cpu()
    if metric == "ifv":
        return moments.var().cpu()
    if metric == "wifv":
        return moments.var().cpu() * w.pow(2).sum(0)
    return w.abs().mean(0) * moments.l2().cpu()


def flap_scorer(metric: str, square_attention: bool):  # noqa: ANN201
    def score(block: BlockView, g: Geometry, stats: Stats | None, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        attn = mlp = None
        if block.attn is not None:
            attn = channel_scores(metric, block.attn.o.weight, stats[site_name(i, "attn.o_in")])
            if square_attention:
                attn = attn.pow(2)  # the released code squares attention scores once more
        if block.mlp is not None:
            mlp = channel_scores(metric, block.mlp.down.weight, stats[site_name(i, "mlp.down_in")])
        return attn, mlp
    return score


# ---- the released code's budget arithmetic (faithful) ----------------------------------------------
def uniform_units(units: Sequence[LayerUnits], sparsity: float) -> list[LayerKeep]:
    """FLAP's UL-UM as released: every layer removes ⌊p·n_kv⌋ KV groups and ⌊p·m⌋ FFN channels."""
    check_sparsity(sparsity)
    out = []
    for u in units:
        g = u.geometry
        n_kv = g.n_kv_heads - min(math.floor(sparsity * g.n_kv_heads), g.n_kv_heads - 1)
        width = g.intermediate - min(math.floor(sparsity * g.intermediate), g.intermediate - 1)
        out.append(keep_shape(u, (n_kv, g.group_size) if u.attn_prunable else None, width if u.mlp_prunable else None))
    return out


def mha_unit_weight(g: Geometry) -> int:
    """AL-AM weight of one attention unit in FFN channels, as released: int(4·head_dim·hidden / (3·hidden))."""
    return int(4 * g.head_dim / 3)


def faithful_al_am(units: Sequence[LayerUnits], sparsity: float) -> list[LayerKeep]:
    """Released AL-AM: weights ⌊4·hd/3⌋ per unit and 1 per channel, τ = sorted[argmin |cumsum − (1−p)Σw|], keep > τ."""
    check_sparsity(sparsity)
    scores, weights, owner = [], [], []
    for i, u in enumerate(units):
        g = u.geometry
        if u.attn_prunable:
            unit_z = standardize(u.attn).view(g.n_kv_heads, -1).mean(1)
            scores.append(unit_z)
            weights.append(torch.full_like(unit_z, float(mha_unit_weight(g))))
            owner += [(i, True)] * unit_z.numel()
        if u.mlp_prunable:
            z = standardize(u.mlp)
            scores.append(z)
            weights.append(torch.ones_like(z))
            owner += [(i, False)] * z.numel()
    s, w = torch.cat(scores), torch.cat(weights)
    order = torch.sort(s, descending=True, stable=True).indices
    k = int(torch.argmin((w[order].cumsum(0) - w.sum() * (1 - sparsity)).abs()))
    tau = s[order[k]]
    counts: dict[tuple[int, bool], int] = {}
    for idx in (s > tau).nonzero().flatten().tolist():
        counts[owner[idx]] = counts.get(owner[idx], 0) + 1
    return [keep_shape(u, (counts.get((i, True), 0), u.geometry.group_size) if u.attn_prunable else None,
                       counts.get((i, False), 0) if u.mlp_prunable else None) for i, u in enumerate(units)]


def faithful_mm(units: Sequence[LayerUnits], sparsity: float, attention_sparsity: float,
                adaptive: bool) -> list[LayerKeep]:
    """Released UL-MM / AL-MM: attention units removed by the manual ratio; FFN channels removed
    `int((p·W − removed·4·hd·d) / (n_mats·d))` with W counting each attention unit as an MHA head."""
    check_sparsity(sparsity)
    att = [u for u in units if u.attn_prunable]
    n_units = sum(u.geometry.n_kv_heads for u in att)
    removed_total = round(attention_sparsity * n_units)
    per_layer_removed = [math.floor(removed_total / max(len(att), 1)) if u.attn_prunable else 0 for u in units]

    def ffn_removed(us: Sequence[LayerUnits], removed: int) -> int:
        weights = sum(u.geometry.n_mlp_mats * u.geometry.hidden * u.geometry.intermediate
                      + u.attn_prunable * u.geometry.n_kv_heads * 4 * u.geometry.head_dim * u.geometry.hidden for u in us)
        g = us[0].geometry
        return int((sparsity * weights - removed * 4 * g.head_dim * g.hidden) / (g.n_mlp_mats * g.hidden))

    if not adaptive:
        out = []
        for u, rm in zip(units, per_layer_removed):
            g = u.geometry
            n_ch = min(max(ffn_removed([u], rm), 0), g.intermediate - 1)
            out.append(keep_shape(u, (g.n_kv_heads - rm, g.group_size) if u.attn_prunable else None,
                                  g.intermediate - n_ch if u.mlp_prunable else None))
        return out
    # adaptive: both rankings global over z-scores, counts as released
    att_z = [(i, standardize(u.attn).view(u.geometry.n_kv_heads, -1).mean(1)) for i, u in enumerate(units) if u.attn_prunable]
    ffn_z = [(i, standardize(u.mlp)) for i, u in enumerate(units) if u.mlp_prunable]
    a_keep = _global_counts(att_z, removed_total)
    f_keep = _global_counts(ffn_z, ffn_removed(list(units), removed_total))
    return [keep_shape(u, (a_keep.get(i, 0), u.geometry.group_size) if u.attn_prunable else None,
                       f_keep.get(i, 0) if u.mlp_prunable else None) for i, u in enumerate(units)]


def _global_counts(per_layer: list[tuple[int, torch.Tensor]], n_remove: int) -> dict[int, int]:
    """Units kept per layer when the `n_remove` lowest of all layers' scores go."""
    if not per_layer:
        return {}
    s = torch.cat([z for _, z in per_layer])
    owner = torch.cat([torch.full((z.numel(),), i) for i, z in per_layer])
    kept = torch.sort(s, descending=True, stable=True).indices[: max(s.numel() - n_remove, 0)]
    counts = torch.bincount(owner[kept], minlength=max(i for i, _ in per_layer) + 1)
    return {i: int(counts[i]) for i, _ in per_layer}


# ---- the pruner ------------------------------------------------------------------------------------
def plan_flap(ctx: PruneContext, cfg: FlapConfig) -> Plan:
    p = ctx.sparsity
    rules: Rules = cfg.rules()
    manual = p if cfg.attention_sparsity is None else cfg.attention_sparsity

    def allocator(units: list[LayerUnits], stats: Stats | None) -> list[LayerKeep]:
        s = cfg.structure
        if s == "AL-AM":
            return faithful_al_am(units, p) if cfg.faithful else global_threshold(units, p, rules)
        if s in ("AL-MM", "UL-MM") and cfg.faithful:
            return faithful_mm(units, p, manual, adaptive=s == "AL-MM")
        if s == "AL-MM":
            n_att = sum(u.geometry.n_kv_heads * (u.geometry.group_size if cfg.query_heads else 1)
                        for u in units if u.attn_prunable)
            return global_threshold(units, p, rules, attention_removed=round(manual * n_att))
        if s == "UL-MM":
            return uniform(units, p, rules, attention_keep=1 - manual)
        if s == "UL-UM":
            return uniform_units(units, p) if cfg.faithful else uniform(units, p, rules, attention_keep=1 - p)
        return allocate(ctx, units, cfg, stats)  # coarse_to_fine / owl

    return plan_width(ctx, cfg, flap_scorer(cfg.metric, bool(cfg.square_attention)),
                      score_sites=("attn.o_in", "mlp.down_in"), method="flap", allocator=allocator)
