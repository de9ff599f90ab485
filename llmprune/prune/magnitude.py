"""Magnitude baseline: KV groups and FFN channels ranked by the norm of their weights, uniform per layer.

Needs no calibration data. A KV group's score is the L2 norm of every weight it owns (its query
rows, its k/v rows, its o_proj columns); an FFN channel's is the L2 norm of its gate/up rows and
down_proj column.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from ..families.base import BlockView, Geometry
from ..plan import Plan
from .allocate import LayerUnits, uniform
from .common import PruneContext, plan_from_keeps


class MagnitudeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attention: bool = True  # remove KV groups
    mlp: bool = True  # remove FFN channels


@torch.no_grad()
def kv_group_norms(block: BlockView, g: Geometry) -> torch.Tensor:
    """[n_kv] L2 norm of all weights of each KV group."""
    a = block.attn
    hd, grp = g.head_dim, g.group_size
    q = a.q.weight.double().pow(2).sum(1).view(g.n_kv_heads, grp * hd).sum(1)  # q rows of each group
    k = a.k.weight.double().pow(2).sum(1).view(g.n_kv_heads, hd).sum(1)
    v = a.v.weight.double().pow(2).sum(1).view(g.n_kv_heads, hd).sum(1)
    o = a.o.weight.double().pow(2).sum(0).view(g.n_kv_heads, grp * hd).sum(1)  # o columns of each group
    return (q + k + v + o).sqrt()


@torch.no_grad()
def ffn_channel_norms(block: BlockView) -> torch.Tensor:
    """[m] L2 norm of each FFN channel's weights."""
    m = block.mlp
    total = m.down.weight.double().pow(2).sum(0)
    for lin in m.inputs:
        total = total + lin.weight.double().pow(2).sum(1)
    return total.sqrt()


def plan_magnitude(ctx: PruneContext, cfg: MagnitudeConfig) -> Plan:
    units = []
    for i, g in enumerate(ctx.geometry):
        b = ctx.family.block(ctx.model, i)
        units.append(LayerUnits(
            geometry=g,
            attn=kv_group_norms(b, g) if cfg.attention and b.attn is not None else None,
            mlp=ffn_channel_norms(b) if cfg.mlp and b.mlp is not None else None,
        ))
    return plan_from_keeps(ctx.geometry, uniform(units, ctx.sparsity), method="magnitude")
