"""CFSP: coarse-to-fine activation-information structured pruning (Wang et al., COLING 2025).

Coarse: each layer's keep ratio follows its block importance — the mean angular distance between
the block's input and output hidden states over the calibration tokens — through a sigmoid
(allocate.cfsp_keep_ratios). Fine: inside a layer, units are ranked by a relative-importance score.

The released default score normalizes every weight by the sum over its *own* channel and then
averages over that same channel, so each term equals 1/d and the score collapses to the activation
norm (research notes §4.4). Implemented here is the reading that keeps the weights in play: each
weight is normalized against the weights it competes with — the other channels — RIA-style:

    FFN channel j (down_proj column j, gate/up rows j; a_j = ‖X_j‖₂ at the down_proj input):
      s_j = [ mean_i |Wd_ij| a_j^b / Σ_k |Wd_ik| a_k^b          (share of row i of down_proj)
            + mean_i |Wu_ji| / Σ_k |Wu_ki|                        (share of column i of up_proj)
            + mean_i |Wg_ji| / Σ_k |Wg_ki| ] · a_j^c              (share of column i of gate_proj)
    attention channel j (o_proj column j, q row j, and its KV head's k/v rows shared by the group's g
    query heads): the same with o for down, q for up, (k + v)/g for gate.

`faithful: true` is the released behaviour: FFN channels only, ranked by a_j^c, and a sigmoid whose
slope grows with the number of calibration tokens (the hard-coded 1e4 divides a *sum* over tokens):
slope = sharpness · n_tokens / 131 072, equal to the default at CFSP's 128 × 1024 tokens.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ...calibrate import Stats, site_name
from ..context import PruneContext
from ...families.base import BlockView, Geometry
from ...plan import Plan
from .allocate import LayerKeep, LayerUnits
from .engine import allocate, plan_width
from .options import DataWidthOptions

CFSP_TOKENS = 128 * 1024  # the released calibration size, where its 1e4 equals the default sharpness


class CfspConfig(DataWidthOptions):
    allocation: Literal["uniform", "global", "coarse_to_fine", "owl", "search"] = "coarse_to_fine"
    b: float = Field(1.0, ge=0)  # exponent of the activation norm inside the o_proj / down_proj term
    c: float = Field(1.0, ge=0)  # exponent of the activation norm multiplying the score
    faithful: bool = False

    @model_validator(mode="after")
    def _faithful_scope(self) -> CfspConfig:
        if self.faithful:
            if "attention" in self.model_fields_set and self.attention:
                raise ValueError("faithful CFSP prunes FFN channels only; drop attention: true or set faithful: false")
            if self.allocation != "coarse_to_fine":
                raise ValueError("faithful CFSP is its coarse-to-fine allocation; drop allocation or faithful")
            self.attention = False
            if not self.mlp:
                raise ValueError("faithful CFSP prunes FFN channels: mlp must stay true")
        return self


def _row_share(w: torch.Tensor) -> torch.Tensor:
    """[in] mean over output rows of each entry's share of its row (w: [out, in], non-negative)."""
    return (w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)).mean(0)


def _col_share(w: torch.Tensor) -> torch.Tensor:
    """[out] mean over input columns of each entry's share of its column (w: [out, in], non-negative)."""
    return (w / w.sum(0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)).mean(1)


@torch.no_grad()
def ffn_relative_importance(down: torch.Tensor, producers: list[torch.Tensor], act: torch.Tensor, b: float,
                            c: float) -> torch.Tensor:
    """[m] CFSP score per FFN channel (down [d, m], producers gate/up [m, d], act [m] = ‖X_j‖₂)."""
    a = act.double().cpu()
    score = _row_share(down.detach().double().abs().cpu() * a.pow(b))
    for w in producers:
        score = score + _col_share(w.detach().double().abs().cpu())
    return score * a.pow(c)


@torch.no_grad()
def attention_relative_importance(block: BlockView, g: Geometry, act: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """[n_q·hd] CFSP score per o_proj input channel (act = ‖X_j‖₂ at the o_proj input)."""
    at = block.attn
    a = act.double().cpu()
    score = _row_share(at.o.weight.double().abs().cpu() * a.pow(b)) + _col_share(at.q.weight.double().abs().cpu())
    kv = _col_share(at.k.weight.double().abs().cpu()) + _col_share(at.v.weight.double().abs().cpu())  # [n_kv·hd]
    kv = kv.view(g.n_kv_heads, 1, g.head_dim).expand(g.n_kv_heads, g.group_size, g.head_dim) / g.group_size
    return (score + kv.reshape(-1)) * a.pow(c)


def cfsp_scorer(cfg: CfspConfig):  # noqa: ANN201
    def score(block: BlockView, g: Geometry, stats: Stats | None, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        attn = mlp = None
        if block.mlp is not None:
            act = stats[site_name(i, "mlp.down_in")].l2()
            mlp = act.double().cpu().pow(cfg.c) if cfg.faithful else \
                ffn_relative_importance(block.mlp.down.weight, [lin.weight for lin in block.mlp.inputs], act, cfg.b, cfg.c)
        if block.attn is not None and not cfg.faithful:
            attn = attention_relative_importance(block, g, stats[site_name(i, "attn.o_in")].l2(), cfg.b, cfg.c)
        return attn, mlp
    return score


def plan_cfsp(ctx: PruneContext, cfg: CfspConfig) -> Plan:
    def allocator(units: list[LayerUnits], stats: Stats | None) -> list[LayerKeep]:
        sharpness = None
        if cfg.faithful and stats is not None:
            sharpness = cfg.coarse_to_fine.sharpness * stats.n_tokens / CFSP_TOKENS
        return allocate(ctx, units, cfg, stats, sharpness=sharpness)

    sites = ("mlp.down_in",) if cfg.faithful else ("attn.o_in", "mlp.down_in")
    return plan_width(ctx, cfg, cfsp_scorer(cfg), score_sites=sites, method="cfsp", allocator=allocator)
