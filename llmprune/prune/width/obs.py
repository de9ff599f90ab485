"""Structured Optimal Brain Surgeon (ZipLM / SlimGPT family): KV groups and FFN channels removed
greedily by the error their removal leaves after the best update of the remaining weights.

For a linear y = W x (W: out × in, bias folded in as the column of a constant input 1, which is
never removed) with H = E[x̃ x̃ᵀ] + λI and H⁻¹ its inverse, removing the input columns S costs

    ε_S = tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)

after the update δW = −W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,: ; then H⁻¹ is downdated to the kept columns
(H⁻¹ ← H⁻¹ − (H⁻¹)_:,S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:). o_proj loses one KV group (its query heads'
columns) per step; down_proj loses `ffn_batch` channels per step, the lowest single-channel errors
w²/[H⁻¹]_jj at that step (batched: one downdate per batch). The final weights are the exact
least-squares refit on the kept columns (reconstruct.refit), which the accumulated updates equal.

Layers are pruned one after another on the outputs of the already pruned and reconstructed layers
(reconstruct.walk_layers). Any allocation supplies the per-layer sizes; for the non-uniform ones
the dense-pass unit score is OBS's diagonal error ‖W_:,j‖² E[x_j²].
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from ...calibrate import Stats, site_name
from ...families.base import BlockView, Geometry
from ...plan import Plan
from ..context import PruneContext
from .allocate import LayerKeep
from .engine import plan_width
from .options import DataWidthOptions
from .reconstruct import ReconstructionError, damp_scale, damped_cholesky


class ObsConfig(DataWidthOptions):
    sequential: bool = True
    reconstruct: str = "ls"  # type: ignore[assignment]  # OBS always updates the kept weights
    ffn_batch: int = Field(16, ge=1)  # FFN channels removed per OBS step (one downdate each)
    allocation_nsamples: int | None = Field(16, ge=1)  # the sizes' dense pass: 16 sequences suffice (options.py)
    # with a dense / residual reconstruct_target, rank removals against that target's optimum (the refit's own
    # objective) instead of the dense module's weights; off: measured better in 3 of 4 cells (docs/reconstruction.md)
    select_on_target: bool = False

    @model_validator(mode="after")
    def _obs_rules(self) -> ObsConfig:
        if not self.sequential:
            raise ValueError("obs prunes layer by layer on the pruned layers' outputs; sequential must stay true")
        if self.reconstruct != "ls":
            raise ValueError("obs always reconstructs the kept weights; reconstruct must stay 'ls'")
        if self.query_heads:
            raise ValueError("obs removes whole KV groups; set query_heads: false")
        return self


def obs_diag_scores(block: BlockView, g: Geometry, stats: Stats | None, i: int) \
        -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dense-pass unit scores for allocations: ‖W_:,j‖² E[x_j²] per o_proj / down_proj input channel."""
    def mean_sq(site: str) -> torch.Tensor:  # E[x_j²] per channel
        m = stats[site_name(i, site)]
        return (m.sumsq() / max(m.count, 1)).cpu()

    attn = mlp = None
    if block.attn is not None:
        attn = block.attn.o.weight.detach().double().pow(2).sum(0).cpu() * mean_sq("attn.o_in")
    if block.mlp is not None:
        mlp = block.mlp.down.weight.detach().double().pow(2).sum(0).cpu() * mean_sq("mlp.down_in")
    return attn, mlp


def _augmented(linear: torch.nn.Linear, device: torch.device) -> torch.Tensor:
    """[out, in+1] = [W, b] in float64."""
    w = linear.weight.detach().to(device, torch.float64)
    b = torch.zeros(w.shape[0], 1, dtype=torch.float64, device=device) if linear.bias is None else \
        linear.bias.detach().to(device, torch.float64)[:, None]
    return torch.cat([w, b], dim=1)


@torch.no_grad()
def obs_remove(w: torch.Tensor, h: torch.Tensor, groups: list[list[int]], n_remove: int, per_step: int = 1,
               damp: float = 0.01, what: str = "H",
               cross: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy structured OBS. w [out, n] (float64, updated copy returned), h [n, n] second moment,
    `groups`: the removable column groups (columns outside every group, e.g. the bias, stay; the last
    column is the constant input, excluded from the damping scale). `cross` [out, n] = E[T x̃ᵀ] for a
    target T other than w x̃ (targets.py): the greedy then starts from that target's own optimum
    W* = W + (P − W H)(H + λI)⁻¹, so each step's error is the exact increase of the refit's objective
    ‖T − W'x̃‖² + λ‖W' − W‖² (the refit, reconstruct.refit, minimises the same).
    Removes `n_remove` groups, `per_step` at a time (single-column groups ranked by their own error;
    larger groups one at a time by the exact group error). Returns (removed group indices, updated w
    with the removed columns exactly zero).

    Each step is two in-place rank-|S| updates (BLAS gemm with β = 1: one pass over H⁻¹ and one over W);
    the downdate leaves the removed rows and columns of H⁻¹ at zero, so they are simply never read again."""
    chol, _ = damped_cholesky(h, damp, what, scale=damp_scale(h))
    hinv = torch.cholesky_inverse(chol)  # [n, n]
    wk = w.clone() if cross is None else w + (cross.to(w) - w @ h) @ hinv  # [out, n]
    alive = list(range(len(groups)))
    removed: list[int] = []  # in removal order
    single = all(len(g) == 1 for g in groups)
    col_of = torch.tensor([g[0] for g in groups], device=w.device) if single else None
    while len(removed) < n_remove:
        if single:
            al = torch.tensor(alive, device=w.device)
            cols = col_of[al]
            err = wk[:, cols].pow(2).sum(0) / hinv.diagonal()[cols].clamp_min(1e-30)  # [n_alive]
            take = min(per_step, n_remove - len(removed))
            pick = al[torch.topk(-err, take).indices].tolist()
        else:
            errs = []
            for a in alive:
                sg = torch.tensor(groups[a], device=w.device)
                inv_ss = torch.linalg.inv(hinv[sg][:, sg])
                errs.append(float(torch.einsum("os,st,ot->", wk[:, sg], inv_ss, wk[:, sg])))
            pick = [alive[min(range(len(alive)), key=errs.__getitem__)]]
        sp = torch.tensor([c for a in pick for c in groups[a]], device=w.device)  # the columns S
        h_s = hinv[sp]  # [|S|, n]: (H⁻¹)_S,:
        hss = h_s[:, sp]
        chol_ss, info = torch.linalg.cholesky_ex(hss)
        solve = torch.cholesky_solve(h_s, chol_ss) if int(info) == 0 else torch.linalg.pinv(hss) @ h_s
        wk.addmm_(wk[:, sp], solve, alpha=-1)  # δW = −W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:  (zeroes W_S)
        hinv.addmm_(h_s.T, solve, alpha=-1)  # downdate: H⁻¹ − (H⁻¹)_:,S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:
        removed += pick
        gone = set(pick)
        alive = [a for a in alive if a not in gone]
    dead = torch.tensor([c for a in removed for c in groups[a]], dtype=torch.long, device=w.device)
    if dead.numel():
        wk[:, dead] = 0.0  # exactly zero, not round-off
    if not bool(torch.isfinite(wk).all()):
        raise ReconstructionError(f"{what}: the OBS update produced non-finite weights; raise pruner.damp")
    return removed, wk


class ObsSelector:
    """Chooses a layer's units by OBS on the module's second moment (see obs_remove).

    The greedy removal order is remembered per module and second moment, so the levels of
    `allocation: search` are nested: a smaller size continues the same removal sequence."""

    needs_gram = True

    def __init__(self, damp: float, ffn_batch: int, on_target: bool = False):
        self.damp, self.ffn_batch, self.on_target = damp, ffn_batch, on_target
        self._orders: dict[tuple[int, str], tuple[torch.Tensor, list[int]]] = {}

    def _removal(self, key: tuple[int, str], h: torch.Tensor, run: object, n_remove: int) -> list[int]:
        hit = self._orders.get(key)
        if hit is None or hit[0] is not h or len(hit[1]) < n_remove:
            self._orders[key] = (h, run())
        return self._orders[key][1][:n_remove]

    def attn(self, i: int, block: BlockView, g: Geometry, stats: Stats | None, h: torch.Tensor | None,
             shape: tuple[int, int] | None, cross: torch.Tensor | None = None) -> LayerKeep:
        if shape is None or block.attn is None:
            return LayerKeep()
        n_kv = shape[0]
        if n_kv == 0:
            return LayerKeep(kv_groups=[])
        width = g.group_size * g.head_dim
        groups = [list(range(k * width, (k + 1) * width)) for k in range(g.n_kv_heads)]
        gone = self._removal((i, "attn"), h, lambda: obs_remove(
            _augmented(block.attn.o, h.device), h, groups, g.n_kv_heads - 1, 1, self.damp,
            f"layer {i} o_proj input second moment", cross if self.on_target else None)[0], g.n_kv_heads - n_kv)
        return LayerKeep(kv_groups=[k for k in range(g.n_kv_heads) if k not in gone])

    def mlp(self, i: int, block: BlockView, g: Geometry, stats: Stats | None, h: torch.Tensor | None,
            width: int | None, cross: torch.Tensor | None = None) -> LayerKeep:
        if width is None or block.mlp is None:
            return LayerKeep()
        if width == 0:
            return LayerKeep(channels=[])
        groups = [[j] for j in range(g.intermediate)]
        n_remove = g.intermediate - width
        gone = self._removal((i, "mlp"), h, lambda: obs_remove(
            _augmented(block.mlp.down, h.device), h, groups, n_remove, self.ffn_batch, self.damp,
            f"layer {i} down_proj input second moment", cross if self.on_target else None)[0], n_remove)
        dead = set(gone)
        return LayerKeep(channels=[j for j in range(g.intermediate) if j not in dead])


def plan_obs(ctx: PruneContext, cfg: ObsConfig) -> Plan:
    return plan_width(ctx, cfg, obs_diag_scores, score_sites=("attn.o_in", "mlp.down_in"), method="obs",
                      selector=ObsSelector(cfg.damp, cfg.ffn_batch, cfg.select_on_target))
