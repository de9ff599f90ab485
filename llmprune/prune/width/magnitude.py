"""Magnitude baseline: KV groups and FFN channels ranked by the norm of their weights.

Needs no calibration data (unless an allocation or compensation asks for it). A KV group's score
is the squared L2 norm of every weight it owns (its query rows, its k/v rows, its o_proj columns);
an FFN channel's is the squared norm of its gate/up rows and down_proj column. Per o_proj input
channel, a query head's own q row and o column count fully and its KV head's k/v rows are shared
equally among the group's channels, so channel scores sum to the group's squared norm.
"""
from __future__ import annotations

import torch

from ...calibrate import Stats
from ..context import PruneContext
from ...families.base import BlockView, Geometry
from ...plan import Plan
from .engine import plan_width
from .options import WidthOptions


class MagnitudeConfig(WidthOptions):
    """Weight-norm baseline; every option of the width pruners (allocation, rounding, query heads, ...)."""


@torch.no_grad()
def attention_channel_norms(block: BlockView, g: Geometry) -> torch.Tensor:
    """[n_q·hd] squared weight norm attributed to each o_proj input channel."""
    a = block.attn
    per_group = g.group_size * g.head_dim
    own = a.q.weight.double().pow(2).sum(1) + a.o.weight.double().pow(2).sum(0)  # q row j + o column j
    kv = (a.k.weight.double().pow(2).sum(1) + a.v.weight.double().pow(2).sum(1)).view(g.n_kv_heads, g.head_dim).sum(1)
    return own + (kv / per_group).repeat_interleave(per_group)


@torch.no_grad()
def ffn_channel_sq_norms(block: BlockView) -> torch.Tensor:
    """[m] squared L2 norm of each FFN channel's weights (gate/up rows and down_proj column)."""
    m = block.mlp
    total = m.down.weight.double().pow(2).sum(0)
    for lin in m.inputs:
        total = total + lin.weight.double().pow(2).sum(1)
    return total


def ffn_channel_norms(block: BlockView) -> torch.Tensor:
    """[m] L2 norm of each FFN channel's weights."""
    return ffn_channel_sq_norms(block).sqrt()


def magnitude_scores(block: BlockView, g: Geometry, _stats: Stats | None, _layer: int) \
        -> tuple[torch.Tensor | None, torch.Tensor | None]:
    attn = attention_channel_norms(block, g).cpu() if block.attn is not None else None
    mlp = ffn_channel_sq_norms(block).cpu() if block.mlp is not None else None
    return attn, mlp


def plan_magnitude(ctx: PruneContext, cfg: MagnitudeConfig) -> Plan:
    return plan_width(ctx, cfg, magnitude_scores, score_sites=(), method="magnitude")
