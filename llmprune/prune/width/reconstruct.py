"""Least-squares reconstruction of the kept o_proj / down_proj input columns, and the layer-by-layer
walk (pruned-as-you-go) that every width pruner uses for sequential selection, reconstruction and OBS.

For a linear y = W x + b (W: out × in) and calibration inputs x, with x̃ = [x; 1] and the second
moment H = E[x̃ x̃ᵀ] (float64, (in+1) × (in+1)), keeping the input columns K (the constant column is
always kept, so the bias is refit too) and removing R:

    W'_K̃ = W_K̃ + W_R H_RK̃ (H_K̃K̃ + λI)⁻¹,     λ = damp · mean(diag H_xx)

For λ = 0 this is the least-squares fit W H[:,K̃] H_K̃K̃⁻¹ of the dense output on the kept inputs
(FLAP's bias compensation, b + W_R μ_R, is the special case of uncorrelated channels). With λ > 0
it shrinks towards the selected weights rather than towards zero, so nothing removed is exactly the
identity. It is also what Optimal Brain Surgeon's update converges to for the removed set R (obs.py).
An H that is not positive definite after damping gets 10× more damping (with a warning) up to
`MAX_DAMP`; a non-finite result is an error, never NaN weights.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ...calibrate import BlockWalker, Stats, record, site_modules
from ...families.base import BlockView, Geometry
from ...plan import AttnPlan, MlpPlan, Plan, attn_kept_channels
from ...surgery import simulate
from ..context import PruneContext
from .accumulate import ProductSum
from .allocate import LayerKeep
from .keeps import plan_from_keeps
from .replay import Replay, advance_by_residual, fits
from .targets import (DenseStream, cross_moment, ffn_entry, paired_cross, sublayer_target,
                      warn_if_few_tokens)

log = logging.getLogger(__name__)
MAX_DAMP = 1e3  # relative to mean(diag H): beyond this the fit is no longer a reconstruction


class ReconstructionError(RuntimeError):
    """The least-squares system could not be solved to finite weights."""


# ---- second moments --------------------------------------------------------------------------------
class Gram:
    """Running Σ x̃ x̃ᵀ over tokens, x̃ = [x; 1], accumulated in `dtype` (float64 default; float32 halves the
    memory of large FFNs). The products are float32 GEMMs folded into the total every few thousand
    tokens (accumulate.ProductSum); the constant column (Σx and the count) is summed directly."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.products = ProductSum(dtype, symmetric=True)  # Σ x xᵀ [in, in]
        self.col: torch.Tensor | None = None  # Σ x [in]
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])  # [N, in]
        x = x.float() if x.dtype != torch.float64 else x
        self.products.add(x, x)
        col = x.sum(0).to(self.dtype)
        self.col = col if self.col is None else self.col + col
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """E[x̃ x̃ᵀ] in float64: [(in+1), (in+1)], the last row/column belongs to the constant 1."""
        if self.col is None or self.count == 0:
            raise ValueError("no calibration inputs reached this module")
        n_in = self.col.shape[0]
        h = torch.empty(n_in + 1, n_in + 1, dtype=torch.float64, device=self.col.device)
        h[:n_in, :n_in] = self.products.result()
        h[:n_in, n_in] = h[n_in, :n_in] = self.col.double()
        h[n_in, n_in] = self.count
        return h / self.count


@contextlib.contextmanager
def record_grams(modules: dict[str, nn.Module], grams: dict[str, Gram]) -> Iterator[dict[str, Gram]]:
    """While active, every forward through a module adds its input to `grams[name]`. Hooks always removed."""
    handles = []
    try:
        for name, mod in modules.items():
            g = grams[name]
            handles.append(mod.register_forward_pre_hook(lambda _m, args, g=g: g.update(args[0])))
        yield grams
    finally:
        for h in handles:
            h.remove()


# ---- the refit -------------------------------------------------------------------------------------
def damp_scale(h: torch.Tensor) -> float:
    """mean(diag H) over the real inputs (the augmented H's last entry, the constant 1, excluded)."""
    return float(h.diagonal()[:-1].mean()) if h.shape[0] > 1 else 1.0


def damped_cholesky(h: torch.Tensor, damp: float, what: str = "H", scale: float | None = None) \
        -> tuple[torch.Tensor, float]:
    """(Cholesky factor of h + λI, λ) with λ = damp·scale (default mean(diag h)), escalating damp ×10
    until h + λI is positive definite (warning each time); raises ReconstructionError past MAX_DAMP."""
    scale = (float(h.diagonal().mean()) if h.numel() else 1.0) if scale is None else scale
    scale = scale if scale > 0 and scale == scale else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    d = damp
    while True:
        lam = d * scale
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            return chol, lam
        if d >= MAX_DAMP or not bool(torch.isfinite(h).all()):
            raise ReconstructionError(f"{what} is not positive definite even with damping {d:g}·mean(diag) "
                                      "(non-finite activations, or no calibration tokens?); check the calibration "
                                      "data, or use reconstruct: none")
        d = max(d * 10, 1e-8)
        log.warning("%s is singular or ill-conditioned: damping raised to %g·mean(diag H)", what, d)


@torch.no_grad()
def refit(weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, kept: list[int], damp: float = 0.01,
          what: str = "H", cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refit of the kept input columns (see the module docstring).

    weight [out, in], bias [out] or None, h [(in+1), (in+1)] = E[x̃ x̃ᵀ]; `kept` input columns in the
    order the result should have. `cross` [out, in+1] = E[T x̃ᵀ] for another target T than the dense
    module on these inputs (targets.py): then W'_K̃ = W_K̃ + (P_K̃ − W_K̃ H_K̃K̃)(H_K̃K̃ + λI)⁻¹, which
    for P = W̃H is the formula above. Returns (W'_K [out, |K|], b' [out]) in float64.
    """
    n_in = weight.shape[1]
    if h.shape != (n_in + 1, n_in + 1):
        raise ValueError(f"{what}: second moment is {tuple(h.shape)}, expected {(n_in + 1, n_in + 1)}")
    w = weight.detach().to(h.device, torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=h.device) if bias is None else \
        bias.detach().to(h.device, torch.float64)
    wt = torch.cat([w, b[:, None]], dim=1)  # [out, in+1]: W̃ = [W, b]
    k = torch.tensor(list(kept) + [n_in], dtype=torch.long, device=h.device)  # K̃ = K ∪ {constant}
    mask = torch.ones(n_in + 1, dtype=torch.bool, device=h.device)
    mask[k] = False
    r = mask.nonzero().flatten()
    out = wt.index_select(1, k)  # W_K̃
    if cross is not None:
        if cross.shape != (w.shape[0], n_in + 1):
            raise ValueError(f"{what}: cross moment is {tuple(cross.shape)}, expected {(w.shape[0], n_in + 1)}")
        hkk = h.index_select(0, k).index_select(1, k)
        chol, _ = damped_cholesky(hkk, damp, what, scale=damp_scale(h))
        rhs = (cross.to(h.device, torch.float64).index_select(1, k) - out @ hkk).T  # [|K̃|, out]
        out = out + torch.cholesky_solve(rhs, chol).T
    elif r.numel():
        hkk = h.index_select(0, k).index_select(1, k)
        hrk = h.index_select(0, r).index_select(1, k)  # [|R|, |K̃|]
        chol, _ = damped_cholesky(hkk, damp, what, scale=damp_scale(h))
        rhs = (wt.index_select(1, r) @ hrk).T  # [|K̃|, out]: (W_R H_RK̃)ᵀ
        out = out + torch.cholesky_solve(rhs, chol).T
    if not bool(torch.isfinite(out).all()):
        raise ReconstructionError(f"{what}: the refit produced non-finite weights; use reconstruct: none or more "
                                  "calibration data")
    return out[:, :-1].contiguous(), out[:, -1].contiguous()


def output_error(weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, new_w: torch.Tensor,
                 new_b: torch.Tensor | None, kept: list[int]) -> float:
    """E‖(W x + b) − (W' x_K + b')‖² from the second moment alone (float64)."""
    n_in = weight.shape[1]
    full = torch.zeros(weight.shape[0], n_in + 1, dtype=torch.float64, device=h.device)
    full[:, :n_in] = weight.detach().double().to(h.device)
    if bias is not None:
        full[:, n_in] = bias.detach().double().to(h.device)
    full[:, torch.tensor(kept, dtype=torch.long, device=h.device)] -= new_w.detach().double().to(h.device)
    if new_b is not None:
        full[:, n_in] -= new_b.detach().double().to(h.device)
    return float(torch.einsum("oi,ij,oj->", full, h, full))


# ---- the layer walk --------------------------------------------------------------------------------
# (layer, block, geometry, statistics, H = E[x̃ x̃ᵀ] of the last linear's inputs or None,
#  P = E[T x̃ᵀ] toward a dense / residual target or None) -> the units kept
Choose = Callable[[int, BlockView, Geometry, Stats, "torch.Tensor | None", "torch.Tensor | None"], LayerKeep]


@dataclass
class WalkOptions:
    refit: bool = False  # least-squares refit of o_proj / down_proj after selection
    damp: float = 0.01
    hessian_dtype: torch.dtype = torch.float64
    compensate: bool = False  # FLAP bias compensation (ignored where a refit replaces it)
    target: str = "module"  # what the refit aims at (targets.py): module | dense | residual
    attn_needs_gram: bool = False  # the attention chooser uses H (OBS)
    select_on_target: bool = False  # the choosers read the cross moment P (else it is formed after the choice)
    mlp_needs_gram: bool = False
    extras: dict = field(default_factory=dict)


def refits(decision: AttnPlan | MlpPlan, sublayer: object | None) -> bool:
    """Whether layer_tensors refits this sublayer: it exists, is kept, and lost some of its inputs."""
    return sublayer is not None and not decision.drop and not decision.is_identity()


def layer_tensors(block: BlockView, g: Geometry, keep: LayerKeep, plan: Plan, i: int, h_o: torch.Tensor | None,
                  h_down: torch.Tensor | None, damp: float, cross_o: torch.Tensor | None = None,
                  cross_down: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Refit the partly pruned o_proj / down_proj of layer i (plan: at least this layer's decisions)."""
    out: dict[str, torch.Tensor] = {}
    lp = plan.layers[i]
    if h_o is not None and refits(lp.attn, block.attn):
        w, b = refit(block.attn.o.weight, block.attn.o.bias, h_o, attn_kept_channels(g, lp.attn), damp,
                     f"layer {i} o_proj input second moment", cross_o)
        out[f"L{i}.attn.o.weight"], out[f"L{i}.attn.o.bias"] = w.float().cpu(), b.float().cpu()
    if h_down is not None and refits(lp.mlp, block.mlp):
        w, b = refit(block.mlp.down.weight, block.mlp.down.bias, h_down, lp.mlp.keep_channels, damp,
                     f"layer {i} down_proj input second moment", cross_down)
        out[f"L{i}.mlp.down.weight"], out[f"L{i}.mlp.down.bias"] = w.float().cpu(), b.float().cpu()
    return out


ATTENTION_SITES = frozenset({"attn.in", "attn.o_in"})


def walk_sites(sites: set[str], needs_gram: bool, compensate: bool) -> set[str]:
    """The score statistics a walk records: none when the units are chosen from second moments (OBS) and no
    FLAP compensation needs calibration means."""
    return set() if needs_gram and not compensate else set(sites)


def attention_only(block: BlockView, sites: set[str]) -> nn.Module | None:
    """o_proj when pass A records nothing past its input (no FFN or whole-block statistics): the pass stops at
    o_proj's input, as the FFN's second moment comes from pass B anyway (the FFN is ~2/3 of a block's work, and
    o_proj's dense output on the pruned stream is never used). Use as `walker.run(stop_before=...)`."""
    if block.attn is None or block.mlp is None or not set(sites) <= ATTENTION_SITES:
        return None
    return block.attn.o


def _merge(a: LayerKeep, m: LayerKeep) -> LayerKeep:
    return LayerKeep(kv_groups=a.kv_groups, q_heads=a.q_heads, channels=m.channels)


@torch.no_grad()
def walk_layers(ctx: PruneContext, choose_attn: Choose, choose_mlp: Choose, sites: set[str], opts: WalkOptions,
                method: str, desc: str = "pruning layers") -> Plan:
    """Decide (and optionally refit) one layer at a time on inputs that went through the pruned,
    reconstructed earlier layers. Per layer: (A) a pass of the dense layer records the score
    statistics `sites` and, when needed, o_proj's input second moment; the attention is chosen (and
    refit); (B) with refit or an H-based FFN chooser, a pass with that attention simulated records
    down_proj's second moment; the FFN is chosen (and refit); (C) a pass with the whole layer
    simulated produces the next layer's inputs. Peak memory: one layer's second moments.
    """
    walker = BlockWalker(ctx.model, ctx.family, ctx.require_tokens(), batch_size=ctx.batch_size, device=ctx.device,
                         offload=ctx.offload, loader=ctx.loader)
    stats = Stats(n_tokens=walker.n_tokens)
    geo = ctx.geometry
    n = len(geo)
    keeps = [LayerKeep() for _ in range(n)]
    tensors: dict[str, torch.Tensor] = {}
    compensate = opts.compensate and not opts.refit
    sites = walk_sites(sites, opts.attn_needs_gram and opts.mlp_needs_gram, compensate)
    paired = opts.refit and opts.target != "module"
    dense = DenseStream(walker.hidden) if paired else None  # the dense model's stream (targets.py)
    if paired:
        warn_if_few_tokens(walker.n_tokens, max(max(g.intermediate, g.n_q_heads * g.head_dim) for g in geo),
                           opts.target)
    act_dtype = walker.hidden[0].dtype if walker.hidden else torch.float32

    def layer_plan(i: int, keep: LayerKeep, extra: dict[str, torch.Tensor]) -> Plan:
        only = [keep if j == i else LayerKeep() for j in range(n)]
        p = plan_from_keeps(geo, only, method, stats=stats, compensate=compensate)
        p.tensors = extra
        return p

    for i in tqdm(range(n), desc=desc, unit="layer", disable=not ctx.progress):
        with ctx.on_device(i):  # a streamed block is read once for all its passes
            block, g = ctx.family.block(ctx.model, i), geo[i]
            resid_o = paired and block.attn is not None and \
                sublayer_target(opts.target, block.attn.post_norm) == "residual"
            resid_d = paired and block.mlp is not None and \
                sublayer_target(opts.target, block.mlp.post_norm) == "residual"
            # replay.py: the pruned sublayers' outputs from their recorded last-linear inputs; with a dense /
            # residual target the dense side's inputs (and residuals) are recorded too
            width = (g.n_q_heads * g.head_dim if block.attn else 0) + (g.intermediate if block.mlp else 0)
            replay_ok = fits(walker.n_tokens, width + (5 if paired else 1) * g.hidden, act_dtype)
            rec_o = Replay(walker.store) if replay_ok and block.attn is not None else None
            stand_in_o = rec_o is not None and block.attn.qk_norm_per_head
            rec_d = Replay(walker.store) if replay_ok and block.mlp is not None else None
            # the FFN is the block's last step, added straight to the residual: pass C is r̂ + down'(x_down)
            ffn_last = rec_d is not None and block.mlp.post_norm is None and not walker.offload
            r_hat: Replay | None = None  # the pruned residual entering the FFN (its pre-norm's input), from pass B
            if dense is not None and replay_ok:  # pass D: the dense block on the dense stream
                dense.run(walker, i, block.attn.module if block.attn else None, block.mlp.module if block.mlp else None)
            want_o = block.attn is not None and (opts.refit or opts.attn_needs_gram)
            gram_o = {f"L{i}.o": Gram(opts.hessian_dtype)} if want_o else {}
            mods_o = {f"L{i}.o": block.attn.o} if gram_o else {}
            with record(site_modules(block, sites), stats), record_grams(mods_o, gram_o), \
                    rec_o.record(block.attn.o) if rec_o else contextlib.nullcontext():
                walker.run(i, keep=False, stop_before=attention_only(block, sites))  # statistics only
            h_o = gram_o[f"L{i}.o"].matrix() if gram_o else None
            cross_o = cross_d = None
            # with the inputs recorded and a chooser that ignores P, P is formed after the choice over kept inputs only
            late = replay_ok and not opts.select_on_target
            if dense is not None and block.attn is not None and not late:
                if replay_ok:
                    cross_o = cross_moment(rec_o.inputs,
                                           lambda j: dense.attn_target(j, walker.hidden[j] if resid_o else None))
                else:
                    cross_o = paired_cross(walker, i, dense.hidden, block.attn.o, block.attn.module, "attn",
                                           sublayer_target(opts.target, block.attn.post_norm), contextlib.nullcontext,
                                           dense.next)
            a_keep = choose_attn(i, block, g, stats, h_o, cross_o)
            a_keep = LayerKeep(kv_groups=a_keep.kv_groups, q_heads=a_keep.q_heads)  # the FFN is decided after pass B
            attn_plan = layer_plan(i, a_keep, {})
            if dense is not None and late and refits(attn_plan.layers[i].attn, block.attn):
                cross_o = cross_moment(rec_o.inputs,
                                       lambda j: dense.attn_target(j, walker.hidden[j] if resid_o else None),
                                       attn_kept_channels(g, attn_plan.layers[i].attn))
            t_attn = layer_tensors(block, g, a_keep, attn_plan, i, h_o if opts.refit else None, None, opts.damp,
                                   cross_o=cross_o)
            attn_plan.tensors = t_attn  # the attention decided and refit: the plan pass B runs with

            def attn_stand_in(p: Plan) -> contextlib.AbstractContextManager[None]:
                if not stand_in_o or p.layers[i].attn.drop:  # a dropped sublayer is silenced by simulate
                    return contextlib.nullcontext()
                return rec_o.stand_in(block.attn.module, block.attn.o, returns_tuple=True)

            h_down = None
            if block.mlp is not None and (opts.refit or opts.mlp_needs_gram):
                gram_d = {f"L{i}.down": Gram(opts.hessian_dtype)}
                r_hat = Replay(walker.store) if (resid_d and replay_ok) or ffn_last else None
                with simulate(ctx.model, attn_plan, ctx.family), attn_stand_in(attn_plan), \
                        record_grams({f"L{i}.down": block.mlp.down}, gram_d), \
                        rec_d.record(block.mlp.down) if rec_d else contextlib.nullcontext(), \
                        r_hat.record(ffn_entry(block)) if r_hat else contextlib.nullcontext():
                    walker.run(i, keep=False, stop_before=block.mlp.down)  # down_proj's output is not needed
                h_down = gram_d[f"L{i}.down"].matrix()
                if dense is not None and replay_ok and not late:
                    cross_d = cross_moment(rec_d.inputs,
                                           lambda j: dense.mlp_target(j, r_hat.inputs[j] if resid_d else None))
                elif dense is not None and not replay_ok:
                    cross_d = paired_cross(walker, i, dense.hidden, block.mlp.down, block.mlp.module, "mlp",
                                           sublayer_target(opts.target, block.mlp.post_norm),
                                           lambda: simulate(ctx.model, attn_plan, ctx.family),
                                           None if dense.next else dense.next)
            else:
                rec_d = None  # no pass B: nothing recorded
            keeps[i] = _merge(a_keep, choose_mlp(i, block, g, stats, h_down, cross_d))
            full = layer_plan(i, keeps[i], {})
            if dense is not None and late and h_down is not None and refits(full.layers[i].mlp, block.mlp):
                cross_d = cross_moment(rec_d.inputs,
                                       lambda j: dense.mlp_target(j, r_hat.inputs[j] if resid_d else None),
                                       full.layers[i].mlp.keep_channels)
            t_layer = t_attn | layer_tensors(block, g, keeps[i], full, i, None, h_down if opts.refit else None, opts.damp,
                                             cross_down=cross_d)
            tensors.update(t_layer)
            full.tensors = t_layer
            mlp_stand_in = rec_d.stand_in(block.mlp.module, block.mlp.down, returns_tuple=False) \
                if rec_d is not None and not full.layers[i].mlp.drop else contextlib.nullcontext()
            if ffn_last and r_hat is not None and not full.layers[i].mlp.drop:  # pass C: one linear and an add
                with simulate(ctx.model, full, ctx.family):
                    advance_by_residual(walker, r_hat.inputs, block.mlp.down, rec_d.inputs)
            else:
                with simulate(ctx.model, full, ctx.family), attn_stand_in(full), mlp_stand_in:
                    walker.advance_through(i)
            if dense is not None:
                if not dense.next:  # nothing ran the dense block on the dense stream yet
                    dense.next = walker.run(i, dense.hidden)
                dense.advance()
            del h_o, h_down, rec_o, rec_d, r_hat
    plan = plan_from_keeps(geo, keeps, method, stats=stats, compensate=compensate)
    plan.tensors = tensors
    plan.validate()
    return plan
