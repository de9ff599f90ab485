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

Reconstruction (`reconstruct: ls`, reconstruct.py) refits each partly pruned o_proj / down_proj by
least squares after its units are chosen, on inputs that went through the already pruned and
reconstructed layers; `allocation: search` (search.py) replaces the allocation by an evolutionary
search over per-layer levels.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ...calibrate import BlockWalker, Stats, record, site_modules, site_name
from ..context import PruneContext
from ...families.base import BlockView, Geometry
from ...plan import Plan
from .allocate import (LayerKeep, LayerUnits, coarse_to_fine, global_threshold, keep_shape, outlier_ratio, owl,
                       shape_of, uniform)
from .keeps import plan_from_keeps
from .options import WidthOptions, blank_units
from .reconstruct import walk_layers

log = logging.getLogger(__name__)

# (block, geometry, stats or None, layer) -> (score per o_proj input channel [n_q·hd], per FFN channel [m])
ScoreFn = Callable[[BlockView, Geometry, "Stats | None", int], "tuple[torch.Tensor | None, torch.Tensor | None]"]
Allocator = Callable[[list[LayerUnits], "Stats | None"], list[LayerKeep]]
MEAN_SITES = ("attn.o_in", "mlp.down_in")  # where compensation means (and most scores) come from


def signal_sites(opts: WidthOptions) -> set[str]:
    if opts.allocation == "coarse_to_fine":
        return {"block"}
    if opts.allocation == "owl":
        return {"attn.in", "attn.o_in", "mlp.in", "mlp.down_in"}
    return set()


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
def _dense_units(ctx: PruneContext, opts: WidthOptions, score: ScoreFn, sites: set[str],
                 nsamples: int | None = None) -> tuple[Stats | None, list[LayerUnits]]:
    """Dense statistics at `sites` and every layer's unit scores, in one block-by-block pass: layer i is
    scored as soon as its statistics are complete, while its weights are still on the device (a
    streamed model is read from disk once for both). `nsamples`: only the first calibration sequences
    (an allocation that sets sizes alone)."""
    n = len(ctx.geometry)
    if not sites:
        return None, [_units(ctx, opts, score, None, i) for i in range(n)]
    tokens = ctx.require_tokens()
    walker = BlockWalker(ctx.model, ctx.family, tokens[:nsamples] if nsamples else tokens, batch_size=ctx.batch_size,
                         device=ctx.device, offload=ctx.offload, loader=ctx.loader)
    stats = Stats(n_tokens=walker.n_tokens)
    units = []
    for i in tqdm(range(n), desc="calibrating", unit="layer", disable=not ctx.progress):
        with ctx.on_device(i):
            with record(site_modules(ctx.family.block(ctx.model, i), sorted(sites)), stats):
                walker.advance_through(i)
            units.append(_units(ctx, opts, score, stats, i))
    return stats, units


class ScoreSelector:
    """Picks a layer's best-scoring units for a given size (the selection every scorer shares)."""

    needs_gram = False  # chooses from score statistics, not from second moments

    def __init__(self, ctx: PruneContext, opts: WidthOptions, score: ScoreFn):
        self.ctx, self.opts, self.score = ctx, opts, score

    def attn(self, i: int, block: BlockView, g: Geometry, stats: Stats | None, h: torch.Tensor | None,
             shape: tuple[int, int] | None, cross: torch.Tensor | None = None) -> LayerKeep:
        return keep_shape(_units(self.ctx, self.opts, self.score, stats, i), shape, None)

    def mlp(self, i: int, block: BlockView, g: Geometry, stats: Stats | None, h: torch.Tensor | None,
            width: int | None, cross: torch.Tensor | None = None) -> LayerKeep:
        return keep_shape(_units(self.ctx, self.opts, self.score, stats, i), None, width)


def plan_width(ctx: PruneContext, opts: WidthOptions, score: ScoreFn, score_sites: tuple[str, ...], method: str,
               allocator: Allocator | None = None, selector: object | None = None) -> Plan:
    """Score, allocate and select; return the Plan. `allocator` replaces the options' allocation (FLAP
    structures); `selector` replaces the choice of units inside a layer (OBS; forces the layer walk)."""
    def run_allocation(units: list[LayerUnits], stats: Stats | None) -> list[LayerKeep]:
        return allocator(units, stats) if allocator is not None else allocate(ctx, units, opts, stats)

    selector = selector or ScoreSelector(ctx, opts, score)
    own = set(score_sites) | (set(MEAN_SITES) if opts.compensate else set())
    if opts.allocation == "search":
        from .search import plan_search

        centre = None
        if opts.search.start != "uniform":  # the centre from another allocation's dense pass
            start = opts.model_copy(update={"allocation": opts.search.start})
            dense, units = _dense_units(ctx, start, score, own | signal_sites(start), _subset(opts))
            centre = allocate(ctx, units, start, dense)
        return plan_search(ctx, opts, selector, own, method, centre)
    sites = own | signal_sites(opts)
    sequential = bool(getattr(opts, "sequential", False)) or selector.needs_gram
    if not sequential:
        stats, units = _dense_units(ctx, opts, score, sites)
        keeps = run_allocation(units, stats)
        if opts.reconstruct == "none":
            return plan_from_keeps(ctx.geometry, keeps, method, stats=stats, compensate=opts.compensate)
        # the selection stands; the refit walks the layers on the pruned-so-far model
        return walk_layers(ctx, lambda i, *_: keeps[i], lambda i, *_: keeps[i], set(), opts.walk_options(), method,
                           desc="reconstructing")
    if allocator is None and opts.allocation == "uniform":  # sizes follow from the geometry alone
        sizes = run_allocation(blank_units(ctx, opts), None)
    else:  # sizes from a dense pass, as the non-sequential pruner would choose them
        dense, units = _dense_units(ctx, opts, score, sites, _subset(opts))
        sizes = run_allocation(units, dense)
    return _sequential(ctx, opts, selector, own, sizes, method)


def _subset(opts: WidthOptions) -> int | None:
    """Calibration sequences for a dense pass that sets sizes alone (`allocation_nsamples`; None = all)."""
    n = getattr(opts, "allocation_nsamples", None)
    if n is not None:
        log.info("allocation statistics from the first %d calibration sequences (allocation_nsamples)", n)
    return n


def _sequential(ctx: PruneContext, opts: WidthOptions, selector: ScoreSelector, sites: set[str],
                sizes: list[LayerKeep], method: str) -> Plan:
    """Choose each layer's units on inputs propagated through the already-pruned (and, with
    `reconstruct: ls`, refit) layers, at the size the allocation gave it (reconstruct.walk_layers)."""
    def attn(i: int, block: BlockView, g: Geometry, stats: Stats, h: torch.Tensor | None,
             cross: torch.Tensor | None) -> LayerKeep:
        return selector.attn(i, block, g, stats, h, shape_of(sizes[i], g)[0], cross)

    def mlp(i: int, block: BlockView, g: Geometry, stats: Stats, h: torch.Tensor | None,
            cross: torch.Tensor | None) -> LayerKeep:
        return selector.mlp(i, block, g, stats, h, shape_of(sizes[i], g)[1], cross)

    wopts = opts.walk_options()
    wopts.attn_needs_gram = wopts.mlp_needs_gram = selector.needs_gram
    wopts.select_on_target = bool(getattr(selector, "on_target", False))
    return walk_layers(ctx, attn, mlp, sites, wopts, method)
