"""`allocation: search`: evolutionary search of per-layer (attention, FFN) sizes under the exact
parameter budget, with the KL divergence to the dense model's next-token distribution as fitness
(EvoPress, arXiv 2410.14649; Týr-the-Pruner, arXiv 2503.09657).

1. Centre: the uniform allocation (every layer keeps the same share), exact to one FFN channel, or
   the allocation `search.start` names (coarse_to_fine, global, owl), from a dense statistics pass.
2. Ladder: per layer, attention keeps centre ± k KV groups and the FFN centre ± k·Δ channels
   (k ≤ `levels`, Δ = `ffn_step` of the width, a multiple of `round_to`), within [0, full].
3. Database: one walk over the layers on the calibration tokens, the centre level propagating
   (pruned-as-you-go); at every layer each level's units are chosen by the recipe's selector (its
   score, or OBS) and, with `reconstruct: ls`, refit — once. A candidate is then only a choice of
   one prebuilt variant per module, evaluated with surgery.simulate.
4. Search: a genome is one level per module. A mutation moves `min(U{1..f}, U{1..f})` steps from
   one module to another module of the same kind (attention ↔ attention, FFN ↔ FFN), so the
   attention:FFN split stays that of the centre; children whose parameter count differs from the
   centre's by even one parameter (biases gained or lost at the ends of a ladder) are rejected, so
   the budget is met exactly. Each generation: `offspring` distinct children scored on the first
   `first_stage_samples` sequences, the best `population` re-scored on all `samples`, the best of
   those and the parent becomes the next parent. Seeded; deterministic on a given machine.
Blocks are re-run only from the first layer where a child differs from its parent (the parent's
per-layer inputs are cached).
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ...calibrate import BlockWalker, Stats, record, site_modules
from ...families.base import Geometry
from ...plan import AttnPlan, MlpPlan, Plan
from ...surgery import simulate
from ..context import PruneContext
from .allocate import LayerKeep, shape_of, uniform
from .options import WidthOptions, blank_units
from .keeps import plan_from_keeps
from .reconstruct import Gram, attention_only, layer_tensors, record_grams, walk_sites
from .replay import Replay
from .targets import DenseStream, cross_moment, ffn_entry, sublayer_target, warn_if_few_tokens

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One prebuilt level of one module: its plan part, reconstructed tensors, and parameter cost."""

    size: int  # KV groups kept (attention) or FFN width
    part: AttnPlan | MlpPlan
    tensors: dict[str, torch.Tensor]
    params: int


@dataclass
class Ladder:
    layer: int
    kind: str  # "attn" | "mlp"
    variants: list[Variant] = field(default_factory=list)  # ascending size
    centre: int = 0  # index of the centre level


def attn_cost(g: Geometry, n_kv: int, bias_added: bool) -> int:
    if n_kv == g.n_kv_heads:
        return g.attn_params()
    return g.with_(n_kv_heads=n_kv, n_q_heads=n_kv * g.group_size, has_attn=n_kv > 0,
                   o_bias=g.o_bias or bias_added).attn_params()


def mlp_cost(g: Geometry, width: int, bias_added: bool) -> int:
    if width == g.intermediate:
        return g.mlp_params()
    return g.with_(intermediate=width, has_mlp=width > 0, down_bias=g.down_bias or bias_added).mlp_params()


def ladder_sizes(centre: int, full: int, step: int, levels: int) -> list[int]:
    """Sizes centre + k·step for |k| ≤ levels inside [0, full], ascending."""
    return [centre + k * step for k in range(-levels, levels + 1) if 0 <= centre + k * step <= full]


def ffn_step(g: Geometry, frac: float, round_to: int) -> int:
    step = max(1, round(frac * g.intermediate))
    return max(round_to, round(step / round_to) * round_to) if round_to > 1 else step


# ---- the database -----------------------------------------------------------------------------------
@torch.no_grad()
def build_ladders(ctx: PruneContext, opts: WidthOptions, selector: object, sites: set[str],
                  centre: list[LayerKeep]) -> list[Ladder]:
    """Every module's variants at every level, built in one walk with the centre level propagating."""
    s = opts.search
    rules = opts.rules()
    refit = opts.reconstruct == "ls"
    compensate = opts.compensate and not refit
    walker = BlockWalker(ctx.model, ctx.family, ctx.require_tokens(), batch_size=ctx.batch_size, device=ctx.device,
                         offload=ctx.offload)
    sites = walk_sites(sites, getattr(selector, "needs_gram", False), compensate)
    stats = Stats(n_tokens=walker.n_tokens)
    geo, n = ctx.geometry, len(ctx.geometry)
    ladders: list[Ladder] = []

    def one(i: int, keep: LayerKeep) -> Plan:
        return plan_from_keeps(geo, [keep if j == i else LayerKeep() for j in range(n)], "search", stats=stats,
                               compensate=compensate)

    paired = refit and opts.reconstruct_target != "module"
    dense = DenseStream(walker.hidden) if paired else None  # the dense stream (targets.py)
    if paired:
        warn_if_few_tokens(walker.n_tokens, max(max(g.intermediate, g.n_q_heads * g.head_dim) for g in geo),
                           opts.reconstruct_target)

    for i in tqdm(range(n), desc="building levels", unit="layer", disable=not ctx.progress):
        block, g = ctx.family.block(ctx.model, i), geo[i]
        a_shape, width = shape_of(centre[i], g)
        use_gram = refit or selector.needs_gram
        gram = {"o": Gram(getattr(torch, opts.hessian_dtype))} if a_shape is not None and use_gram else {}
        resid_o = paired and block.attn is not None and \
            sublayer_target(opts.reconstruct_target, block.attn.post_norm) == "residual"
        resid_d = paired and block.mlp is not None and \
            sublayer_target(opts.reconstruct_target, block.mlp.post_norm) == "residual"
        rec_o, rec_d = Replay(walker.store), Replay(walker.store)  # the pruned side's inputs, for the targets
        if dense is not None:  # pass D: the dense block on the dense stream
            dense.run(walker, i, block.attn.module if block.attn else None, block.mlp.module if block.mlp else None)
        with record(site_modules(block, sites), stats), record_grams({"o": block.attn.o} if gram else {}, gram), \
                rec_o.record(block.attn.o) if paired and block.attn is not None else contextlib.nullcontext():
            walker.run(i, keep=False, stop_before=attention_only(block, sites))
        h_o = gram["o"].matrix() if gram else None
        cross_o = cross_d = None
        if dense is not None and a_shape is not None:
            cross_o = cross_moment(rec_o.inputs, lambda j: dense.attn_target(j, walker.hidden[j] if resid_o else None))
        a_centre = LayerKeep()
        if a_shape is not None:
            lad = Ladder(i, "attn")
            for k in ladder_sizes(a_shape[0], g.n_kv_heads, 1, s.levels):
                keep = selector.attn(i, block, g, stats, h_o, (k, g.group_size if k else 0), cross_o)
                p = one(i, keep)
                t = layer_tensors(block, g, keep, p, i, h_o if refit else None, None, opts.damp, cross_o=cross_o)
                lad.variants.append(Variant(k, p.layers[i].attn, t, attn_cost(g, k, rules.compensate)))
                if k == a_shape[0]:
                    lad.centre, a_centre = len(lad.variants) - 1, keep
            ladders.append(lad)
        t_attn = ladders[-1].variants[ladders[-1].centre].tensors if a_shape is not None else {}
        h_d = None
        if width is not None and use_gram:
            gram = {"d": Gram(getattr(torch, opts.hessian_dtype))}
            p = one(i, a_centre)
            p.tensors = t_attn
            r_hat = Replay(walker.store)  # the pruned side's residual entering the FFN (residual target)
            with simulate(ctx.model, p, ctx.family), record_grams({"d": block.mlp.down}, gram), \
                    rec_d.record(block.mlp.down) if paired else contextlib.nullcontext(), \
                    r_hat.record(ffn_entry(block)) if resid_d else contextlib.nullcontext():
                walker.run(i, keep=False, stop_before=block.mlp.down)
            h_d = gram["d"].matrix()
            if dense is not None:
                cross_d = cross_moment(rec_d.inputs,
                                       lambda j: dense.mlp_target(j, r_hat.inputs[j] if resid_d else None))
                del r_hat
        m_centre = LayerKeep()
        if width is not None:
            lad = Ladder(i, "mlp")
            for w in ladder_sizes(width, g.intermediate, ffn_step(g, s.ffn_step, opts.round_to), s.levels):
                keep = selector.mlp(i, block, g, stats, h_d, w, cross_d)
                p = one(i, keep)
                t = layer_tensors(block, g, keep, p, i, None, h_d if refit else None, opts.damp, cross_down=cross_d)
                lad.variants.append(Variant(w, p.layers[i].mlp, t, mlp_cost(g, w, rules.compensate)))
                if w == width:
                    lad.centre, m_centre = len(lad.variants) - 1, keep
            ladders.append(lad)
        full = one(i, LayerKeep(kv_groups=a_centre.kv_groups, q_heads=a_centre.q_heads, channels=m_centre.channels))
        full.tensors = {k: v for lad in ladders if lad.layer == i for k, v in lad.variants[lad.centre].tensors.items()}
        with simulate(ctx.model, full, ctx.family):
            walker.advance_through(i)
        if dense is not None:
            dense.advance()
    return ladders


def genome_plan(geo: list[Geometry], ladders: list[Ladder], genome: list[int], method: str) -> Plan:
    plan = Plan.identity(geo, method=method)
    for lad, lv in zip(ladders, genome):
        v = lad.variants[lv]
        if lad.kind == "attn":
            plan.layers[lad.layer].attn = v.part
        else:
            plan.layers[lad.layer].mlp = v.part
        plan.tensors.update(v.tensors)
    for i, g in enumerate(geo):  # sublayers the model already lacks
        if not g.has_attn:
            plan.layers[i].attn = AttnPlan(drop=True)
        if not g.has_mlp:
            plan.layers[i].mlp = MlpPlan(drop=True)
    return plan


def params_of(ladders: list[Ladder], genome: list[int]) -> int:
    return sum(lad.variants[lv].params for lad, lv in zip(ladders, genome))


def mutate(genome: list[int], ladders: list[Ladder], budget: int, rng: random.Random, max_flips: int,
           tries: int = 200) -> list[int] | None:
    """A child: up to `max_flips` one-level moves between modules of the same kind, total params == budget."""
    kinds = {k: [j for j, lad in enumerate(ladders) if lad.kind == k] for k in ("attn", "mlp")}
    kinds = {k: v for k, v in kinds.items() if len(v) > 1}
    if not kinds:
        return None
    for _ in range(tries):
        child = list(genome)
        flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
        for _f in range(flips):
            mods = kinds[rng.choice(sorted(kinds))]
            down, up = rng.sample(mods, 2)
            if child[down] > 0 and child[up] < len(ladders[up].variants) - 1:
                child[down] -= 1
                child[up] += 1
        if child != genome and params_of(ladders, child) == budget:
            return child
    return None


# ---- fitness ------------------------------------------------------------------------------------------
class Fitness:
    """KL(dense ‖ candidate) of next-token distributions, mean over tokens, on fixed calibration sequences."""

    def __init__(self, ctx: PruneContext, ladders: list[Ladder], tokens: torch.Tensor, method: str):
        self.ctx, self.ladders, self.method = ctx, ladders, method
        self.walker = BlockWalker(ctx.model, ctx.family, tokens, batch_size=1, device=ctx.device, offload=ctx.offload)
        self.n = len(ctx.geometry)
        with torch.no_grad():
            h = self.walker.hidden
            for i in range(self.n):
                h = self.walker.run(i, h)
            self.dense = [torch.log_softmax(x.float(), -1) for x in self.walker.logits(h)]  # [1, T, V] each
        self.parent: list[int] | None = None
        self.cache: list[list[torch.Tensor]] = []  # inputs of every layer (and the last output) under the parent

    def _first_layer(self, genome: list[int]) -> int:
        if self.parent is None:
            return 0
        diff = [lad.layer for lad, a, b in zip(self.ladders, genome, self.parent) if a != b]
        return min(diff) if diff else self.n

    @torch.no_grad()
    def __call__(self, genome: list[int], n_seq: int, keep_inputs: bool = False) -> float:
        first = self._first_layer(genome)
        h = (self.walker.hidden if first == 0 else self.cache[first])[:n_seq]
        inputs = self.cache[:first] if keep_inputs else []
        plan = genome_plan(self.ctx.geometry, self.ladders, genome, self.method)
        with simulate(self.ctx.model, plan, self.ctx.family):
            for i in range(first, self.n):
                if keep_inputs:
                    inputs.append(h)
                h = self.walker.run(i, h)
        if keep_inputs:
            inputs.append(h)
        kl = 0.0
        for lp_dense, logits in zip(self.dense, self.walker.logits(h)):
            lq = torch.log_softmax(logits.float(), -1)
            kl += float((lp_dense.exp() * (lp_dense - lq)).sum(-1).mean())
        if keep_inputs:
            self.parent, self.cache = list(genome), inputs
        return kl / len(h)


# ---- the pruner ------------------------------------------------------------------------------------------
def plan_search(ctx: PruneContext, opts: WidthOptions, selector: object, sites: set[str], method: str,
                centre: list[LayerKeep] | None = None) -> Plan:
    """Search around `centre` (default: the uniform allocation; `search.start` names another)."""
    s = opts.search
    tokens = ctx.require_tokens()
    if s.samples > tokens.shape[0]:
        raise ValueError(f"search.samples is {s.samples} but only {tokens.shape[0]} calibration sequences were given; "
                         "lower search.samples or raise calibration.nsamples")
    centre = centre if centre is not None else uniform(blank_units(ctx, opts), ctx.sparsity, opts.rules())
    t0 = time.perf_counter()
    ladders = build_ladders(ctx, opts, selector, sites, centre)
    genome = [lad.centre for lad in ladders]
    budget = params_of(ladders, genome)
    fit = Fitness(ctx, ladders, tokens[: s.samples], method)
    best = fit(genome, s.samples, keep_inputs=True)
    history = [best]
    rng = random.Random(ctx.seed)
    seen = {tuple(genome)}
    n1 = min(s.first_stage_samples, s.samples)
    bar = tqdm(range(s.generations), desc="searching", unit="gen", disable=not ctx.progress)
    gens = 0
    for _ in bar:
        if s.time_limit_s is not None and time.perf_counter() - t0 > s.time_limit_s:
            log.info("search stopped at its time limit (%.0f s) after %d generations", s.time_limit_s, gens)
            break
        children = []
        for _c in range(s.offspring):
            child = mutate(genome, ladders, budget, rng, s.max_flips)
            if child is not None and tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        if not children:
            break
        if n1 < s.samples and len(children) > s.population:
            scored = sorted(((fit(c, n1), j) for j, c in enumerate(children)))[: s.population]
            children = [children[j] for _, j in scored]
        finals = sorted((fit(c, s.samples), j) for j, c in enumerate(children))
        if finals[0][0] < best:
            best, genome = finals[0][0], children[finals[0][1]]
            fit(genome, s.samples, keep_inputs=True)  # cache the new parent's layer inputs
        history.append(best)
        gens += 1
        bar.set_postfix(kl=f"{best:.4f}")
    plan = genome_plan(ctx.geometry, ladders, genome, method)
    plan.extras["search"] = {
        "fitness": "kl_dense_to_pruned", "start": opts.search.start, "kl_centre": history[0], "kl_best": best, "generations": gens,
        "history": [round(x, 6) for x in history], "samples": s.samples,
        "attn_kv_groups": {str(lad.layer): lad.variants[lv].size for lad, lv in zip(ladders, genome) if lad.kind == "attn"},
        "ffn_widths": {str(lad.layer): lad.variants[lv].size for lad, lv in zip(ladders, genome) if lad.kind == "mlp"},
        "levels": {f"L{lad.layer}.{lad.kind}": lv - lad.centre for lad, lv in zip(ladders, genome)},
    }
    log.info("search: KL %.4f (uniform) -> %.4f in %d generations", history[0], best, gens)
    plan.validate()
    return plan
