"""Turning width keep-decisions (kept KV groups, query heads, FFN channels per layer) into a Plan,
with FLAP-style bias compensation from calibration means."""
from __future__ import annotations

from ...calibrate.stats import Stats, site_name
from ...families.base import Geometry
from ...plan import AttnPlan, LayerPlan, MlpPlan, Plan, attn_kept_channels, removed_indices
from .allocate import LayerKeep


def plan_from_keeps(geometry: list[Geometry], keeps: list[LayerKeep], method: str,
                    stats: Stats | None = None, compensate: bool = False) -> Plan:
    """A Plan from per-layer kept units (KV groups, query heads within them, FFN channels).
    An empty keep list drops the whole sublayer.

    With `compensate`, removed o_proj / down_proj input channels are replaced by a bias made of
    their calibration means (FLAP): needs `stats` with `attn.o_in` / `mlp.down_in` moments. A fully
    removed sublayer then becomes bias-only (its constant mean output), as the released FLAP keeps it.
    """
    plan = Plan.identity(geometry, method=method)
    for i, (g, k) in enumerate(zip(geometry, keeps)):
        lp = LayerPlan()
        if k.kv_groups is not None and g.has_attn:
            if not k.kv_groups:
                lp.attn = AttnPlan(drop=True)
                if compensate:  # bias-only sublayer: its mean output W·μ (+ b) stays on the residual
                    lp.attn.compensate = _means(stats, site_name(i, "attn.o_in"), list(range(g.n_q_heads * g.head_dim)))
            elif len(k.kv_groups) < g.n_kv_heads or k.q_heads is not None:
                lp.attn = AttnPlan(keep_kv_groups=list(k.kv_groups) if len(k.kv_groups) < g.n_kv_heads else None,
                                   keep_q=[list(q) for q in k.q_heads] if k.q_heads is not None else None)
                if compensate:
                    removed = removed_indices(attn_kept_channels(g, lp.attn), g.n_q_heads * g.head_dim)
                    lp.attn.compensate = _means(stats, site_name(i, "attn.o_in"), removed)
        if k.channels is not None and g.has_mlp:
            if not k.channels:
                lp.mlp = MlpPlan(drop=True)
                if compensate:
                    lp.mlp.compensate = _means(stats, site_name(i, "mlp.down_in"), list(range(g.intermediate)))
            elif len(k.channels) < g.intermediate:
                lp.mlp = MlpPlan(keep_channels=list(k.channels))
                if compensate:
                    removed = removed_indices(k.channels, g.intermediate)
                    lp.mlp.compensate = _means(stats, site_name(i, "mlp.down_in"), removed)
        if not g.has_attn:
            lp.attn = AttnPlan(drop=True)
        if not g.has_mlp:
            lp.mlp = MlpPlan(drop=True)
        plan.layers[i] = lp
    plan.validate()
    return plan


def _means(stats: Stats | None, site: str, removed: list[int]) -> list[float]:
    if stats is None:
        raise ValueError("bias compensation needs calibration statistics")
    mean = stats[site].mean
    return [float(v) for v in mean[removed].tolist()]
