"""Budget allocation: which units every layer keeps, given unit scores and a parameter budget.

Pure functions on tensors and Geometry; no model access. A width pruner hands in one `LayerUnits`
per layer — a score per o_proj input channel (attention) and per FFN channel, higher = more
important — and gets back a `LayerKeep` per layer. Sparsity is always the fraction of
decoder-layer linear parameters removed; every strategy lands on that target within one unit
(one FFN channel, or one `round_to` block of them; one attention unit when only attention is
pruned), biases added by compensation included.

Strategies (the recipe key `pruner.allocation`):
- `uniform`: every layer keeps the same fraction of its prunable parameters;
- `global`: FLAP's AL-AM — channel scores z-scored per layer and module, averaged per unit, one
  threshold across the model weighted by each unit's real parameter cost;
- `coarse_to_fine`: CFSP — per-layer keep ratios from block importance (angular distance between a
  block's input and output) through a sigmoid, then units chosen inside each layer by score;
- `owl`: per-layer keep ratios from the layer's outlier ratio (OWL), within ±λ of the mean.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...families.base import Geometry
from .budget import (BudgetError, Level, Priority, attention_levels, by_deficit, by_score, check_reached, ffn_levels,
                     head_scores, keep_top, level_at_least, nearest_level, select_attention, settle)

__all__ = ["ALLOCATIONS", "BudgetError", "LayerKeep", "LayerUnits", "Rules", "cfsp_keep_ratios", "check_sparsity",
           "coarse_to_fine", "global_threshold", "keep_shape", "keep_top", "mean_keep", "outlier_ratio", "owl", "owl_keep_ratios",
           "per_layer", "shape_of", "standardize", "uniform"]

ALLOCATIONS = ("uniform", "global", "coarse_to_fine", "owl")


@dataclass
class LayerUnits:
    geometry: Geometry
    attn: torch.Tensor | None = None  # [n_q·head_dim] score per o_proj input channel; None: attention not pruned
    mlp: torch.Tensor | None = None  # [m] score per FFN channel; None: FFN not pruned

    @property
    def attn_prunable(self) -> bool:
        return self.attn is not None and self.geometry.has_attn

    @property
    def mlp_prunable(self) -> bool:
        return self.mlp is not None and self.geometry.has_mlp

    def prunable_params(self) -> int:
        g = self.geometry
        return g.attn_params() * self.attn_prunable + g.mlp_params() * self.mlp_prunable


@dataclass
class LayerKeep:
    kv_groups: list[int] | None = None  # kept KV groups (sorted); None: untouched; [] drop the sublayer
    q_heads: list[list[int]] | None = None  # per kept group, local query heads kept (same count); None: all
    channels: list[int] | None = None  # kept FFN channels (sorted); None: untouched; [] drop the sublayer


@dataclass(frozen=True)
class Rules:
    """How units may be removed and what that costs."""

    query_heads: bool = False  # attention may also keep fewer query heads per group (same count in every group)
    compensate: bool = False  # partly pruned o_proj / down_proj gain a bias (counted in the budget)
    round_to: int = 1  # kept FFN widths are multiples of this (or the full width)


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise BudgetError(f"sparsity must be in [0, 1) — the fraction of decoder-layer linear parameters to "
                          f"remove — got {sparsity}")
    return float(sparsity)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """z-score (unbiased std, as torch.std); a constant vector gives zeros."""
    x = x.double()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def _totals(units: Sequence[LayerUnits], sparsity: float) -> tuple[int, float]:
    check_sparsity(sparsity)
    if not any(u.attn_prunable or u.mlp_prunable for u in units):
        raise BudgetError("nothing is prunable: enable attention or FFN pruning")
    total = sum(u.geometry.linear_params() for u in units)
    return total, (1.0 - sparsity) * total


def mean_keep(units: Sequence[LayerUnits], sparsity: float) -> float:
    """Fraction of the *prunable* parameters that must stay for the whole model to reach `sparsity`."""
    total, _ = _totals(units, sparsity)
    prunable = sum(u.prunable_params() for u in units)
    keep = 1.0 - sparsity * total / prunable
    if keep < 0:
        raise BudgetError(f"sparsity {sparsity:.1%} is more than the prunable share of the model "
                          f"({prunable / total:.1%}); lower it or let the pruner remove more unit types")
    return keep


def _untouched_attn(g: Geometry) -> list[Level]:
    return [Level(g.attn_params(), 0.0, (g.n_kv_heads, g.group_size))]


def _untouched_mlp(g: Geometry) -> list[Level]:
    return [Level(g.mlp_params(), 0.0, (g.intermediate, 0))]


# ---- per-layer strategies --------------------------------------------------------------------------
def uniform(units: Sequence[LayerUnits], sparsity: float, rules: Rules = Rules(),
            attention_keep: float | None = None) -> list[LayerKeep]:
    """Every layer keeps the same fraction of its prunable parameters (FLAP's UL-MM with exact costs).

    Attention takes the smallest shape keeping at least that fraction (or `attention_keep`, FLAP's
    manual module ratio) — attention units are coarse, so removal rounds down as the released
    `int(p·heads)` does — and never vanishes; the FFN gives up what brings the layer to its budget.
    """
    k = mean_keep(units, sparsity)
    return per_layer(units, [k] * len(units), sparsity, rules, attention_keep=attention_keep)


def per_layer(units: Sequence[LayerUnits], keep: Sequence[float], sparsity: float, rules: Rules = Rules(),
              attention_keep: float | None = None) -> list[LayerKeep]:
    """Layer l keeps about `keep[l]` of its prunable parameters; FFN widths settle the exact total."""
    _, target = _totals(units, sparsity)
    if len(keep) != len(units):
        raise ValueError(f"{len(keep)} keep ratios for {len(units)} layers")
    att: list[list[Level]] = []
    ffn: list[list[Level]] = []
    a_idx: list[int] = []
    f_idx: list[int] = []
    ideal_a: list[float] = []
    ideal_f: list[float] = []
    for u, kl in zip(units, keep):
        g = u.geometry
        budget = kl * u.prunable_params()  # prunable parameters this layer should keep
        if u.attn_prunable:
            lv = attention_levels(g, head_scores(u.attn, g), rules.query_heads, rules.compensate, allow_drop=False)
            frac = kl if attention_keep is None else attention_keep
            if u.mlp_prunable:  # attention units are coarse: never remove more than attention's share
                ideal_a.append(frac * g.attn_params())  # (the released int(p·heads)); the FFN takes the rest
                a_idx.append(level_at_least(lv, ideal_a[-1]))
            else:
                ideal_a.append(budget)
                a_idx.append(nearest_level(lv, budget))
            budget -= lv[a_idx[-1]].params
        else:
            lv = _untouched_attn(g)
            ideal_a.append(g.attn_params())
            a_idx.append(0)
        att.append(lv)
        if u.mlp_prunable:
            lv = ffn_levels(g, u.mlp, rules.round_to, rules.compensate, allow_drop=False)
            ideal_f.append(budget)
            f_idx.append(nearest_level(lv, budget))
        else:
            lv = _untouched_mlp(g)
            ideal_f.append(g.mlp_params())
            f_idx.append(0)
        ffn.append(lv)
    return _settle_and_keep(units, att, a_idx, ffn, f_idx, target, sparsity, by_deficit(ideal_a), by_deficit(ideal_f))


def _settle_and_keep(units: Sequence[LayerUnits], att: list[list[Level]], a_idx: list[int], ffn: list[list[Level]],
                     f_idx: list[int], target: float, sparsity: float, pri_attn: Priority, pri_ffn: Priority,
                     attention_fixed: bool = False) -> list[LayerKeep]:
    """Let the finest prunable module (FFN widths, else attention shapes) absorb the rounding of all
    layers so the total lands on `target`; then pick each layer's units for its final size."""
    if any(u.mlp_prunable for u in units):
        fixed = sum(a[i].params for a, i in zip(att, a_idx))
        f_idx = settle(ffn, f_idx, fixed, target, pri_ffn)
        check_reached(fixed + sum(f[i].params for f, i in zip(ffn, f_idx)), target, ffn, sparsity)
    elif not attention_fixed:
        fixed = sum(f[i].params for f, i in zip(ffn, f_idx))
        a_idx = settle(att, a_idx, fixed, target, pri_attn)
        check_reached(fixed + sum(a[i].params for a, i in zip(att, a_idx)), target, att, sparsity)
    return [keep_shape(u, a[i].shape if u.attn_prunable else None, f[j].shape[0] if u.mlp_prunable else None)
            for u, a, i, f, j in zip(units, att, a_idx, ffn, f_idx)]


def keep_shape(u: LayerUnits, attn_shape: tuple[int, int] | None, width: int | None) -> LayerKeep:
    """The best units of `u` for a given size: attention (KV groups, heads per group), FFN width.

    None leaves that module untouched; 0 groups / width 0 drops the sublayer.
    """
    g = u.geometry
    keep = LayerKeep()
    if attn_shape is not None and u.attn_prunable:
        n_kv, per_group = attn_shape
        if n_kv == 0:
            keep.kv_groups = []
        else:
            keep.kv_groups, keep.q_heads, _ = select_attention(head_scores(u.attn, g), n_kv, per_group)
    if width is not None and u.mlp_prunable:
        keep.channels = keep_top(u.mlp, width)
    return keep


def shape_of(keep: LayerKeep, g: Geometry) -> tuple[tuple[int, int] | None, int | None]:
    """(attention shape, FFN width) a LayerKeep describes; None where it leaves the module untouched."""
    attn = None
    if keep.kv_groups is not None:
        per_group = g.group_size if keep.q_heads is None else len(keep.q_heads[0]) if keep.q_heads else 0
        attn = (len(keep.kv_groups), per_group if keep.kv_groups else 0)
    return attn, None if keep.channels is None else len(keep.channels)


# ---- global threshold (FLAP AL-AM / AL-MM) -----------------------------------------------------------
@dataclass
class _Module:
    """One prunable module in the global ranking: its units' standardized scores and their cost."""

    layer: int
    is_attn: bool
    scores: torch.Tensor  # [n_units] mean z-score per unit
    cost: float  # parameters per unit (query heads: the group's cost shared by its g heads)
    base: int  # bias parameters kept whenever the module survives
    overhead: int  # compensation bias gained when partly pruned

    def params(self, count: int) -> float:
        n = self.scores.numel()
        return 0.0 if count == 0 else count * self.cost + self.base + self.overhead * (count < n)


def _modules(units: Sequence[LayerUnits], rules: Rules) -> tuple[list[_Module], list[torch.Tensor | None],
                                                                  list[torch.Tensor | None]]:
    mods, z_heads, z_ffn = [], [], []
    for i, u in enumerate(units):
        g = u.geometry
        zh = zf = None
        if u.attn_prunable:
            za = standardize(u.attn)  # over all n_q·hd channels of the layer, as FLAP
            zh = head_scores(za, g)  # [n_kv, g] sums of z
            per_unit = g.head_dim if rules.query_heads else g.group_size * g.head_dim
            unit_z = za.view(-1, per_unit).mean(1)  # mean z per head / per KV group
            cost = g.kv_group_cost() / g.group_size if rules.query_heads else g.kv_group_cost()
            over = g.hidden if rules.compensate and not g.o_bias else 0
            mods.append(_Module(i, True, unit_z, cost, g.hidden * g.o_bias, over))
        if u.mlp_prunable:
            zf = standardize(u.mlp)
            over = g.hidden if rules.compensate and not g.down_bias else 0
            mods.append(_Module(i, False, zf, g.ffn_channel_cost(), g.hidden * g.down_bias, over))
        z_heads.append(zh)
        z_ffn.append(zf)
    return mods, z_heads, z_ffn


def _walk(mods: Sequence[_Module], fixed: float, target: float) -> list[int]:
    """Kept units per module for the best prefix of all units sorted by score (exact parameter count)."""
    if not mods:
        return []
    owner, order = _ranking(mods)
    counts = [0] * len(mods)
    kept = fixed
    best_n, best_gap = 0, abs(kept - target)
    for n, idx in enumerate(order, start=1):
        k = owner[idx]
        kept += mods[k].params(counts[k] + 1) - mods[k].params(counts[k])
        counts[k] += 1
        if abs(kept - target) < best_gap:
            best_n, best_gap = n, abs(kept - target)
    return _walk_count(mods, best_n)


def global_threshold(units: Sequence[LayerUnits], sparsity: float, rules: Rules = Rules(),
                     attention_removed: int | None = None) -> list[LayerKeep]:
    """FLAP's adaptive structure with exact parameter costs.

    Channel scores are z-scored within each layer and module, averaged per unit (KV group, or query
    head with `rules.query_heads`), and all units of the model are ranked together; the best prefix
    whose exact parameter count (real unit costs from the Geometry, biases included) is closest to
    the target survives. A module left without units loses its sublayer. With `attention_removed`
    (AL-MM) exactly that many attention units go first and the FFN ranking alone fills the budget.
    FFN widths then settle the remainder by score, so the total lands within one FFN channel.
    """
    _, target = _totals(units, sparsity)
    mods, z_heads, z_ffn = _modules(units, rules)
    fixed = float(sum(u.geometry.attn_params() * (not u.attn_prunable) + u.geometry.mlp_params() * (not u.mlp_prunable)
                      for u in units))
    attn_mods = [m for m in mods if m.is_attn]
    if attention_removed is not None:
        n_att = sum(m.scores.numel() for m in attn_mods)
        if not 0 <= attention_removed < n_att:
            raise BudgetError(f"cannot remove {attention_removed} of {n_att} attention units")
        att_counts = _walk_count(attn_mods, n_att - attention_removed)
        fixed += sum(m.params(c) for m, c in zip(attn_mods, att_counts))
        ffn_mods = [m for m in mods if not m.is_attn]
        counts = dict(zip(map(id, attn_mods), att_counts)) | dict(zip(map(id, ffn_mods), _walk(ffn_mods, fixed, target)))
    else:
        counts = dict(zip(map(id, mods), _walk(mods, fixed, target)))
    by_layer = {(m.layer, m.is_attn): m for m in mods}

    def start(m: _Module | None, levels: Callable[[], list[Level]], untouched: list[Level]) -> tuple[list[Level], int]:
        if m is None:
            return untouched, 0
        lv = levels()
        return lv, nearest_level(lv, m.params(counts[id(m)]))

    att, a_idx, ffn, f_idx = [], [], [], []
    for i, u in enumerate(units):
        g = u.geometry
        lv, k = start(by_layer.get((i, True)), lambda: attention_levels(g, z_heads[i], rules.query_heads,
                                                                        rules.compensate, allow_drop=True),
                      _untouched_attn(g))
        att.append(lv)
        a_idx.append(k)
        lv, k = start(by_layer.get((i, False)), lambda: ffn_levels(g, z_ffn[i], rules.round_to, rules.compensate,
                                                                   allow_drop=True), _untouched_mlp(g))
        ffn.append(lv)
        f_idx.append(k)
    return _settle_and_keep(units, att, a_idx, ffn, f_idx, target, sparsity, by_score, by_score,
                            attention_fixed=attention_removed is not None)


def _walk_count(mods: Sequence[_Module], n_keep: int) -> list[int]:
    """Kept units per module when the `n_keep` best units of `mods` (ranked together) survive."""
    if not mods:
        return []
    owner, order = _ranking(mods)
    counts = [0] * len(mods)
    for idx in order[:n_keep]:
        counts[owner[idx]] += 1
    return counts


def _ranking(mods: Sequence[_Module]) -> tuple[list[int], list[int]]:
    """(owning module of every unit, unit indices best first; ties keep layer order)."""
    scores = torch.cat([m.scores for m in mods])
    owner = torch.cat([torch.full((m.scores.numel(),), k) for k, m in enumerate(mods)]).tolist()
    return owner, torch.sort(-scores, stable=True).indices.tolist()


def coarse_to_fine(units: Sequence[LayerUnits], sparsity: float, importance: Sequence[float], sharpness: float,
                   rules: Rules = Rules()) -> list[LayerKeep]:
    """CFSP: keep ratios from block importance (see `cfsp_keep_ratios`), units chosen by score per layer."""
    weights = [u.prunable_params() for u in units]
    ratios = cfsp_keep_ratios(importance, mean_keep(units, sparsity), sharpness, weights)
    return per_layer(units, ratios, sparsity, rules)


def owl(units: Sequence[LayerUnits], sparsity: float, outlier_ratios: Sequence[float], lam: float,
        rules: Rules = Rules()) -> list[LayerKeep]:
    """OWL: layers with more outliers keep more (see `owl_keep_ratios`), units chosen by score per layer."""
    weights = [u.prunable_params() for u in units]
    ratios = owl_keep_ratios(outlier_ratios, mean_keep(units, sparsity), lam, weights)
    return per_layer(units, ratios, sparsity, rules)


def _weighted_mean(x: torch.Tensor, w: torch.Tensor) -> float:
    return float((x * w).sum() / w.sum())


def cfsp_keep_ratios(importance: Sequence[float], keep: float, sharpness: float,
                     weights: Sequence[float] | None = None) -> list[float]:
    """Per-layer keep ratios: `keep · s_l / mean(s)` with `s_l = sigmoid(sharpness · (I_l − mean I))`.

    `importance` is the mean angular distance per token, so the result does not depend on how many
    calibration tokens were used (CFSP sums over tokens and divides by a hard-coded 1e4 instead:
    its sharpness is `a · n_tokens / 1e4`). When the most important layer would keep more than
    everything, deviations from the mean are shrunk as CFSP does, leaving the top layer at
    `keep + (1 − keep)/1.05`. The mean (weighted by `weights`, the layers' prunable parameters) is `keep`.
    """
    imp = torch.tensor(list(importance), dtype=torch.float64)
    w = torch.ones_like(imp) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    if keep <= 0:
        return [0.0] * len(imp)
    if keep >= 1:
        return [1.0] * len(imp)
    s = torch.sigmoid(sharpness * (imp - imp.mean()))
    avg = _weighted_mean(s, w)
    top = float(s[w > 0].max())
    if top <= avg:  # all live layers equally important: nothing to spread
        return [keep] * len(imp)
    if top / avg * keep >= 1:
        f = avg * (1 / keep - 1) / (top - avg) / 1.05
        s = avg + (s - avg) * f
    return (keep * s / avg).clamp(0.0, 1.0).tolist()


def owl_keep_ratios(outlier_ratios: Sequence[float], keep: float, lam: float,
                    weights: Sequence[float] | None = None) -> list[float]:
    """OWL: keep ratios spread linearly over `[keep − λ, keep + λ]` by outlier ratio, weighted mean `keep`.

    Ratios that would leave [0, 1] shrink the spread around the mean until they fit.
    """
    d = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    w = torch.ones_like(d) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    span = float(d.max() - d.min())
    if span == 0 or lam == 0:
        return [keep] * len(d)
    r = 2 * lam * (d - d.min()) / span
    dev = r - _weighted_mean(r, w)
    live = w > 0
    hi, lo = float(dev[live].max()), float(dev[live].min())
    f = min(1.0, (1 - keep) / hi if hi > 0 else 1.0, keep / -lo if lo < 0 else 1.0)
    return (keep + f * dev).clamp(0.0, 1.0).tolist()


def outlier_ratio(metrics: Sequence[tuple[torch.Tensor, torch.Tensor]], m: float) -> float:
    """OWL's layer outlier ratio: the fraction of entries of |W|·‖X_j‖ over all the layer's matrices
    that exceed `m` times their common mean. `metrics`: (weight [out, in], activation norm [in]) pairs;
    computed module by module so no layer-sized buffer is built."""
    total, count = 0.0, 0
    for w, a in metrics:
        total += float((w.abs().float() * a.float()).double().sum())
        count += w.numel()
    thresh = m * total / count
    above = sum(int(((w.abs().float() * a.float()) > thresh).sum()) for w, a in metrics)
    return above / count
