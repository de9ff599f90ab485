"""Wanda-sp: structured Wanda (the baseline of the FLAP paper), GQA-correct.

Score of input channel j of o_proj / down_proj: `mean_i |W_ij| · ‖X_j‖₂`, the Wanda weight-times-
activation score averaged over the output rows; a KV group (or query head) scores the sum of its
channels. As in the original, layers are pruned one after another and each layer is scored on the
outputs of the already-pruned layers before it (`sequential: true`); the default allocation is
uniform (every layer loses the same share of its parameters). No bias compensation by default.

With a non-uniform allocation (global, coarse_to_fine, owl) the per-layer sizes come from a dense
pass first — an allocation has to see all layers at once — and the sequential pass then chooses
which units fill each layer's size (see width.py).
"""
from __future__ import annotations

import torch

from ...calibrate import Stats, site_name
from ..context import PruneContext
from ...families.base import BlockView, Geometry
from ...plan import Plan
from .engine import plan_width
from .options import DataWidthOptions


class WandaSpConfig(DataWidthOptions):
    sequential: bool = True


def wanda_channel_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """[in] mean over output rows of |W_ij| · ‖X_j‖₂ (weight [out, in], act_norm [in])."""
    return weight.detach().double().abs().mean(0).cpu() * act_norm.double().cpu()


def wanda_sp_scores(block: BlockView, g: Geometry, stats: Stats | None, i: int) \
        -> tuple[torch.Tensor | None, torch.Tensor | None]:
    attn = mlp = None
    if block.attn is not None:
        attn = wanda_channel_scores(block.attn.o.weight, stats[site_name(i, "attn.o_in")].l2())
    if block.mlp is not None:
        mlp = wanda_channel_scores(block.mlp.down.weight, stats[site_name(i, "mlp.down_in")].l2())
    return attn, mlp


def plan_wanda_sp(ctx: PruneContext, cfg: WandaSpConfig) -> Plan:
    return plan_width(ctx, cfg, wanda_sp_scores, score_sites=("attn.o_in", "mlp.down_in"), method="wanda-sp")
