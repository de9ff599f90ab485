"""What the width pruners (magnitude, FLAP, Wanda-sp, CFSP) share: options, calibration, layer
signals, the allocation switch, and sequential (pruned-as-you-go) selection.

A width pruner only supplies a score function: per layer, a score per o_proj input channel and per
FFN channel from the block's weights and its calibration statistics. Everything else — which
statistics to collect, how many units each layer keeps, and which ones — is decided here and in
`allocate.py`, the same way for every pruner, so every pruner × allocation combination works.

Sequential mode (Wanda-sp's default): layers are scored one at a time on inputs that already went
through the pruned earlier layers. The allocation still needs all layers at once, so it is decided
first — on dense statistics (for global / coarse_to_fine / owl) or from the geometry alone
(uniform) — and fixes each layer's size; the sequential pass then picks *which* units fill that
size from the propagated statistics.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from ...calibrate import BlockWalker, Stats, calibrate, record, site_modules, site_name
from ..context import PruneContext
from ...families.base import BlockView, Geometry
from ...plan import Plan
from ...surgery import simulate
from .allocate import (LayerKeep, LayerUnits, Rules, coarse_to_fine, global_threshold, keep_shape, outlier_ratio, owl,
                       shape_of, uniform)
from .keeps import plan_from_keeps

log = logging.getLogger(__name__)

# (block, geometry, stats or None, layer) -> (score per o_proj input channel [n_q·hd], per FFN channel [m])
ScoreFn = Callable[[BlockView, Geometry, "Stats | None", int], "tuple[torch.Tensor | None, torch.Tensor | None]"]
Allocator = Callable[[list[LayerUnits], "Stats | None"], list[LayerKeep]]
MEAN_SITES = ("attn.o_in", "mlp.down_in")  # where compensation means (and most scores) come from


class CoarseToFineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Slope of the sigmoid on each layer's mean block importance minus the mean over layers.
    # 13.1072 = 131 072 / 1e4 reproduces CFSP's hard-coded 1e4 at its calibration size (128 × 1024 tokens).
    sharpness: float = Field(13.1072, ge=0)
    metric: Literal["angular", "cosine"] = "angular"  # block importance: arccos(cos)/π, or 1 − cos (ShortGPT BI)


class OwlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(0.08, ge=0, le=0.5)  # keep ratios spread over [mean − λ, mean + λ]
    m: float = Field(5.0, gt=0)  # an outlier is |W_ij|·‖X_j‖ above m × the layer's mean


class WidthOptions(BaseModel):
    """Options every width pruner accepts (recipe section `pruner:`)."""

    model_config = ConfigDict(extra="forbid")
    attention: bool = True  # remove KV groups (a KV head and its query heads)
    mlp: bool = True  # remove FFN channels
    query_heads: bool = False  # also remove query heads inside KV groups (the same number in every group)
    allocation: Literal["uniform", "global", "coarse_to_fine", "owl"] = "uniform"
    round_to: int = Field(1, ge=1)  # kept FFN widths multiples of this (8 / 64 / 128 / 256 suit GPU kernels)
    compensate: bool = False  # replace removed o_proj / down_proj inputs by a bias of their calibration means
    coarse_to_fine: CoarseToFineOptions = Field(default_factory=CoarseToFineOptions)
    owl: OwlOptions = Field(default_factory=OwlOptions)

    @model_validator(mode="after")
    def _something_to_prune(self) -> WidthOptions:
        if not (self.attention or self.mlp):
            raise ValueError("attention and mlp are both false: nothing would be pruned; enable at least one")
        return self

    def rules(self) -> Rules:
        return Rules(query_heads=self.query_heads, compensate=self.compensate, round_to=self.round_to)

    def needs_data(self) -> bool:
        """Whether calibration text is needed beyond what the score itself uses."""
        return self.compensate or self.allocation in ("coarse_to_fine", "owl")


class DataWidthOptions(WidthOptions):
    """Options of width pruners whose scores come from calibration statistics."""

    sequential: bool = False  # score layer by layer on the outputs of the already-pruned layers


# ---- statistics and signals ------------------------------------------------------------------------
def signal_sites(opts: WidthOptions) -> set[str]:
    if opts.allocation == "coarse_to_fine":
        return {"block"}
    if opts.allocation == "owl":
        return {"attn.in", "attn.o_in", "mlp.in", "mlp.down_in"}
    return set()


def collect(ctx: PruneContext, sites: set[str]) -> Stats:
    """Dense statistics of the model at `sites` of every layer (one block-by-block pass)."""
    return calibrate(ctx.model, ctx.require_tokens(), sites=sorted(sites), family=ctx.family,
                     batch_size=ctx.batch_size, device=ctx.device, offload=ctx.offload, progress=ctx.progress,
                     loader=ctx.loader)


def block_importance(stats: Stats, n_layers: int, metric: str = "angular") -> list[float]:
    """Per-layer mean (over calibration tokens) distance between a block's input and output."""
    sims = [stats.block(i) for i in range(n_layers)]
    return [s.angular_mean if metric == "angular" else s.block_influence for s in sims]


@torch.no_grad()
def layer_outlier_ratios(ctx: PruneContext, stats: Stats, m: float) -> list[float]:
    """OWL's outlier ratio of every layer, over all its linear weights times their input norms."""
    out = []
    for i in range(len(ctx.geometry)):
        with ctx.on_device(i):
            out.append(_outlier_ratio(ctx.family.block(ctx.model, i), stats, m))
    return out


def _outlier_ratio(b: BlockView, stats: Stats, m: float) -> float:
    i, pairs = b.index, []
    if b.attn is not None:
        a_in, o_in = stats[site_name(i, "attn.in")].l2(), stats[site_name(i, "attn.o_in")].l2()
        pairs += [(b.attn.q.weight, a_in), (b.attn.k.weight, a_in), (b.attn.v.weight, a_in), (b.attn.o.weight, o_in)]
    if b.mlp is not None:
        m_in, d_in = stats[site_name(i, "mlp.in")].l2(), stats[site_name(i, "mlp.down_in")].l2()
        pairs += [(lin.weight, m_in) for lin in b.mlp.inputs] + [(b.mlp.down.weight, d_in)]
    return outlier_ratio([(w, a.to(w.device)) for w, a in pairs], m) if pairs else 0.0


def allocate(ctx: PruneContext, units: list[LayerUnits], opts: WidthOptions, stats: Stats | None,
             sharpness: float | None = None) -> list[LayerKeep]:
    """Run the allocation the options name. `sharpness` overrides coarse_to_fine's (CFSP faithful)."""
    rules = opts.rules()
    if opts.allocation == "uniform":
        return uniform(units, ctx.sparsity, rules)
    if opts.allocation == "global":
        return global_threshold(units, ctx.sparsity, rules)
    if stats is None:
        raise ValueError(f"allocation {opts.allocation!r} needs calibration statistics")
    if opts.allocation == "coarse_to_fine":
        c2f = opts.coarse_to_fine
        imp = block_importance(stats, len(units), c2f.metric)
        log.info("block importance (%s): %s", c2f.metric, " ".join(f"{x:.3f}" for x in imp))
        return coarse_to_fine(units, ctx.sparsity, imp, c2f.sharpness if sharpness is None else sharpness, rules)
    ratios = layer_outlier_ratios(ctx, stats, opts.owl.m)
    log.info("layer outlier ratios: %s", " ".join(f"{x:.4f}" for x in ratios))
    return owl(units, ctx.sparsity, ratios, opts.owl.lam, rules)


# ---- the pipeline ----------------------------------------------------------------------------------
def _units(ctx: PruneContext, opts: WidthOptions, score: ScoreFn, stats: Stats | None, i: int) -> LayerUnits:
    g = ctx.geometry[i]
    with ctx.on_device(i):
        attn, mlp = score(ctx.family.block(ctx.model, i), g, stats, i)
    return LayerUnits(g, attn=attn if opts.attention else None, mlp=mlp if opts.mlp else None)


@torch.no_grad()
def _dense_units(ctx: PruneContext, opts: WidthOptions, score: ScoreFn, sites: set[str]) \
        -> tuple[Stats | None, list[LayerUnits]]:
    """Dense statistics at `sites` and every layer's unit scores, in one block-by-block pass: layer i is
    scored as soon as its statistics are complete, while its weights are still on the device (a
    streamed model is read from disk once for both)."""
    n = len(ctx.geometry)
    if not sites:
        return None, [_units(ctx, opts, score, None, i) for i in range(n)]
    walker = BlockWalker(ctx.model, ctx.family, ctx.require_tokens(), batch_size=ctx.batch_size, device=ctx.device,
                         offload=ctx.offload, loader=ctx.loader)
    stats = Stats(n_tokens=walker.n_tokens)
    units = []
    for i in tqdm(range(n), desc="calibrating", unit="layer", disable=not ctx.progress):
        with ctx.on_device(i):
            with record(site_modules(ctx.family.block(ctx.model, i), sorted(sites)), stats):
                walker.advance_through(i)
            units.append(_units(ctx, opts, score, stats, i))
    return stats, units


def plan_width(ctx: PruneContext, opts: WidthOptions, score: ScoreFn, score_sites: tuple[str, ...], method: str,
               allocator: Allocator | None = None) -> Plan:
    """Score, allocate and select; return the Plan. `allocator` replaces the options' allocation (FLAP structures)."""
    def run_allocation(units: list[LayerUnits], stats: Stats | None) -> list[LayerKeep]:
        return allocator(units, stats) if allocator is not None else allocate(ctx, units, opts, stats)

    own = set(score_sites) | (set(MEAN_SITES) if opts.compensate else set())
    sites = own | signal_sites(opts)
    sequential = bool(getattr(opts, "sequential", False))
    if not sequential:
        stats, units = _dense_units(ctx, opts, score, sites)
        keeps = run_allocation(units, stats)
        return plan_from_keeps(ctx.geometry, keeps, method, stats=stats, compensate=opts.compensate)
    if allocator is None and opts.allocation == "uniform":  # sizes follow from the geometry alone
        blank = [LayerUnits(g, attn=torch.zeros(g.n_q_heads * g.head_dim) if opts.attention and g.has_attn else None,
                            mlp=torch.zeros(g.intermediate) if opts.mlp and g.has_mlp else None)
                 for g in ctx.geometry]
        sizes = run_allocation(blank, None)
    else:  # sizes from a dense pass, as the non-sequential pruner would choose them
        dense, units = _dense_units(ctx, opts, score, sites)
        sizes = run_allocation(units, dense)
    return _sequential(ctx, opts, score, own, sizes, method)


@torch.no_grad()
def _sequential(ctx: PruneContext, opts: WidthOptions, score: ScoreFn, sites: set[str], sizes: list[LayerKeep],
                method: str) -> Plan:
    """Choose each layer's units on inputs propagated through the already-pruned layers.

    Per layer: one pass of the (still dense) layer records its statistics; the layer's units are
    chosen at the size the allocation gave it; a second pass through the layer with that choice
    simulated (masking, no weight edits) produces the next layer's inputs.
    """
    walker = BlockWalker(ctx.model, ctx.family, ctx.require_tokens(), batch_size=ctx.batch_size, device=ctx.device,
                         offload=ctx.offload, loader=ctx.loader)
    stats = Stats(n_tokens=walker.n_tokens)
    n = len(ctx.geometry)
    keeps = [LayerKeep() for _ in range(n)]
    for i in tqdm(range(n), desc="pruning layers", unit="layer", disable=not ctx.progress):
        with ctx.on_device(i):  # one read of a streamed block serves all four steps
            with record(site_modules(ctx.family.block(ctx.model, i), sites), stats):
                walker.run(i, keep=False)  # statistics only
            keeps[i] = keep_shape(_units(ctx, opts, score, stats, i), *shape_of(sizes[i], ctx.geometry[i]))
            only_this = [keeps[i] if j == i else LayerKeep() for j in range(n)]
            layer_plan = plan_from_keeps(ctx.geometry, only_this, method, stats=stats, compensate=opts.compensate)
            with simulate(ctx.model, layer_plan, ctx.family):
                walker.advance_through(i)
    return plan_from_keeps(ctx.geometry, keeps, method, stats=stats, compensate=opts.compensate)
