"""FinerCut: greedy removal of attention / FFN sublayers by output divergence (arXiv 2405.18218).

Each step removes the candidate whose removal (on top of everything removed so far) changes the
model's next-token distributions least on the calibration set, measured against the dense model.
The removal order is nested: the first k entries are the result for every smaller target.

Modes (all pick candidates the same way; only the cost differs):
- `exact` (default): the same order as the straightforward algorithm, much faster:
  * prefix caching — the current model's residual at every sublayer boundary is kept, so a
    candidate runs only the sublayers after it; after a removal only later boundaries are redone;
  * candidate batching — a pool of candidates (and micro-batches) runs as one stacked batch
    through the shared suffix;
  * early abandoning — every distance is a mean of non-negative per-token values, so once a
    candidate's partial sum over the micro-batches seen exceeds the best complete sum it cannot
    win and is dropped (candidates are tried most-promising first: last step's scores);
  * a vocabulary bound — a certified lower bound of each token's value from the dense model's
    top-k tokens (`bound_topk`; prune/vocab_bound.py) replaces the full LM head while a candidate
    is being ruled out; only candidates that survive it are scored over the whole vocabulary;
  * float32 distances on bounded blocks of tokens, and the search stops at the target.
- `fast` (opt-in, may differ slightly): between periodic full scans only the best
  `fast.rescore_top` candidates of the previous step are re-scored; all of them are scored on a
  `fast.probe_fraction` of the tokens first and only the best `fast.finalists` on all tokens;
  optionally the distance is taken over the union of the dense model's top-k tokens
  (`fast.topk_vocab`). The exact full-vocabulary distance of the result is recorded.
- `reference`: the straightforward algorithm — a full forward under `surgery.simulate` per
  candidate per step. Slow; kept to validate the other two (tests, scripts/bench_finercut.py).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..families.base import Geometry
from ..plan import Plan
from .allocate import BudgetError, check_sparsity
from .common import PruneContext
from .divergence import finalize
from .residual_stream import Candidate, ResidualStream
from .sublayer_reference import ReferenceSearch, removed_set, sublayer_plan
from .sublayer_search import Search, exact_step, fast_step

log = logging.getLogger(__name__)

CANDIDATE_MODES = ("sublayers", "attention", "mlp", "blocks")


class FastOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rescore_top: int = Field(8, ge=1)  # candidates re-scored between full scans (the best of the last step)
    full_scan_every: int = Field(4, ge=1)  # every this many steps, score every candidate again
    probe_fraction: float = Field(0.25, gt=0.0, le=1.0)  # share of tokens every re-scored candidate sees first
    finalists: int = Field(4, ge=1)  # best candidates after the probe, scored on all tokens (exactly among them)
    topk_vocab: int = Field(0, ge=0)  # >0: distance over the union of the dense top-k tokens (not perplexity)


class FinerCutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    distance: Literal["js", "js_official", "kl", "angular", "perplexity"] = "js"
    candidates: Literal["sublayers", "attention", "mlp", "blocks"] = "sublayers"
    # Target in FinerCut's own unit: remove floor(F · #candidates) candidates. None: the recipe's
    # `sparsity` (fraction of decoder linear parameters), stopping at the first step that reaches it.
    target_sublayers: float | None = None
    # Official front-layer exclusion (`-x`): the first int(C·x/2)+1 layers are no candidates until
    # int(C·x)+1 removals have been made (C = number of candidates). None: no exclusion.
    exclude_front: float | None = None
    mode: Literal["exact", "fast", "reference"] = "exact"
    # (candidate, micro-batch) pairs stacked into one forward: the size of the search's candidate pool.
    # Bigger stacks run the GEMMs more efficiently (CPU: 8 stacked 64-token rows ran a SmolLM2 FFN 30 %
    # faster per token than one) at the cost of a little work on candidates that are about to be dropped.
    candidate_batch: int = Field(8, ge=1)
    # Dense top-k tokens per position kept by the vocabulary lower bound (prune/vocab_bound.py) that lets
    # the search drop losing candidates without the full LM head; 0 turns it off. The result is the same.
    bound_topk: int = Field(256, ge=0)
    fast: FastOptions = Field(default_factory=FastOptions)

    @field_validator("target_sublayers")
    @classmethod
    def _open_unit_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"must be in (0, 1): the fraction of candidate sublayers to remove (got {v})")
        return v

    @field_validator("exclude_front")
    @classmethod
    def _unit_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1): the official -x rate of front layers to exclude (got {v})")
        return v


# ---- candidates and targets ----------------------------------------------------------------------
def build_candidates(geometry: list[Geometry], mode: str) -> list[Candidate]:
    """Removable units of a model in depth order; positions index the model's present sublayers."""
    if mode not in CANDIDATE_MODES:
        raise ValueError(f"unknown candidates mode {mode!r}; choose one of {', '.join(CANDIDATE_MODES)}")
    out: list[Candidate] = []
    pos = 0
    for i, g in enumerate(geometry):
        present = [(k, n) for k, n, ok in (("attn", g.attn_params(), g.has_attn), ("mlp", g.mlp_params(), g.has_mlp))
                   if ok]
        if mode == "blocks" and present:
            out.append(Candidate(len(out), i, tuple(k for k, _ in present), pos, pos + len(present),
                                 sum(n for _, n in present)))
        else:
            for off, (kind, n) in enumerate(present):
                if mode == "sublayers" or (mode == "attention") == (kind == "attn"):
                    out.append(Candidate(len(out), i, (kind,), pos + off, pos + off + 1, n))
        pos += len(present)
    if not out:
        raise BudgetError(f"the model has no {mode} left to remove")
    return out


class Target:
    """When to stop: after a number of removals, or at the first step whose removed parameters reach a budget."""

    def __init__(self, cfg: FinerCutConfig, sparsity: float, candidates: list[Candidate], total_params: int):
        n = len(candidates)
        self.count: int | None = None
        self.params: float | None = None
        if cfg.target_sublayers is not None:
            self.count = math.floor(cfg.target_sublayers * n)
            self.describe = {"kind": "sublayers", "fraction": cfg.target_sublayers, "removals": self.count,
                             "candidates": n}
            if self.count == 0:
                raise BudgetError(f"target_sublayers {cfg.target_sublayers} of {n} candidates removes nothing; "
                                  f"use at least {1 / n:.4f}")
        else:
            check_sparsity(sparsity)
            self.params = sparsity * total_params
            reachable = sum(c.params for c in candidates)
            self.describe = {"kind": "sparsity", "sparsity": sparsity, "params": round(self.params)}
            if self.params > reachable:
                raise BudgetError(f"sparsity {sparsity:.0%} needs {self.params:,.0f} parameters removed, but all "
                                  f"{cfg.candidates} candidates together hold only {reachable:,} "
                                  f"({reachable / total_params:.1%}); lower --sparsity or widen pruner.candidates")

    def reached(self, removals: int, removed_params: int) -> bool:
        if self.count is not None:
            return removals >= self.count
        return removed_params >= self.params


def front_exclusion(candidates: list[Candidate], rate: float | None) -> tuple[list[Candidate], int | None]:
    """Candidates held back by the official front-layer exclusion, and after how many removals they return."""
    if rate is None:
        return [], None
    n = len(candidates)
    n_layers = int(n * rate / 2) + 1
    return [c for c in candidates if c.layer < n_layers], int(n * rate) + 1


# ---- the pruner --------------------------------------------------------------------------------
def plan_finercut(ctx: PruneContext, cfg: FinerCutConfig) -> Plan:
    tokens = ctx.require_tokens()
    if ctx.offload:
        raise ValueError("finercut runs every block many times and keeps the model on its device; "
                         "--offload is not supported (use a device with room for the model)")
    geometry = ctx.geometry
    candidates = build_candidates(geometry, cfg.candidates)
    total = sum(g.linear_params() for g in geometry)
    target = Target(cfg, ctx.sparsity, candidates, total)
    excluded, readmit_after = front_exclusion(candidates, cfg.exclude_front)
    t0 = time.perf_counter()
    model_was_training = ctx.model.training
    ctx.model.eval()
    try:
        search: Search | ReferenceSearch
        if cfg.mode == "reference":
            search = ReferenceSearch(ctx, cfg.distance)
        else:
            topk = cfg.fast.topk_vocab if cfg.mode == "fast" else 0
            if topk and cfg.distance == "perplexity":
                log.warning("fast.topk_vocab is ignored for the perplexity distance (it needs the full vocabulary)")
            stream = ResidualStream(ctx.model, ctx.family, tokens, cfg.distance, batch_size=ctx.batch_size,
                                    device=ctx.device, topk_vocab=topk, bound_topk=cfg.bound_topk,
                                    progress=ctx.progress)
            search = Search(stream)
        order = _greedy(search, cfg, candidates, target, excluded, readmit_after, ctx.progress)
        final = search.final_distance(order, exact_vocab=cfg.mode == "fast")
    finally:
        ctx.model.train(model_was_training)
    plan = sublayer_plan(geometry, removed_set([c for c, _ in order]))
    plan.extras["removal_order"] = [{"layer": c.layer, "sublayer": kind, "divergence": score, "step": k}
                                    for k, (c, score) in enumerate(order, 1) for kind in c.sublayers]
    plan.extras["finercut"] = {
        "distance": cfg.distance, "mode": cfg.mode, "candidates": cfg.candidates, "n_candidates": len(candidates),
        "target": target.describe, "exclude_front": cfg.exclude_front, "steps": len(order),
        "removed_params": sum(c.params for c, _ in order), "final_divergence": final,
        "calibration_tokens": int(tokens.numel()), "search_seconds": round(time.perf_counter() - t0, 3),
        **search.stats.to_dict(),
    }
    return plan


def _greedy(search: Search, cfg: FinerCutConfig, candidates: list[Candidate], target: Target,
            excluded: list[Candidate], readmit_after: int | None, progress: bool) -> list[tuple[Candidate, float]]:
    from tqdm.auto import tqdm

    held = {c.index for c in excluded}
    available = [c for c in candidates if c.index not in held]
    order: list[tuple[Candidate, float]] = []
    removed_params = 0
    batch = cfg.candidate_batch
    bar = tqdm(total=target.count, desc=f"finercut ({cfg.mode})", unit="removal", disable=not progress)
    try:
        while not target.reached(len(order), removed_params):
            if not available:
                raise BudgetError("ran out of candidates before reaching the target")
            step = len(order)
            if cfg.mode == "reference":
                winner, total = search.reference_step(available)
            elif cfg.mode == "fast":
                winner, total = fast_step(search, available, step, cfg.fast, batch)
            else:
                winner, total = exact_step(search, available, batch)
            score = finalize(cfg.distance, total, search.total_scored, search.vocab)
            order.append((winner, score))
            removed_params += winner.params
            available = [c for c in available if c.index != winner.index]
            search.remove(winner)
            log.info("step %d: removed %s (%s %.6g)", step + 1, winner.name, cfg.distance, score)
            bar.update(1)
            if readmit_after is not None and len(order) == readmit_after:
                available = sorted(available + excluded, key=lambda c: c.index)
    finally:
        bar.close()
    return order


def plan_at(plan: Plan, fraction: float) -> Plan:
    """The plan at a smaller target, from a FinerCut plan's nested removal order (its first floor(F·C) steps)."""
    info = plan.extras.get("finercut") or {}
    order = plan.extras.get("removal_order")
    if order is None or "n_candidates" not in info:
        raise ValueError("not a FinerCut plan: it has no removal_order")
    steps = math.floor(fraction * info["n_candidates"])
    have = max((e.get("step", 0) for e in order), default=0)
    if steps > have:
        raise ValueError(f"the plan's removal order has {have} steps; a fraction of {fraction} needs {steps}")
    prefix = [e for e in order if e["step"] <= steps]
    out = sublayer_plan(plan.geometry, {(e["layer"], e["sublayer"]) for e in prefix})
    out.extras = {"removal_order": prefix}
    return out


__all__ = ["CANDIDATE_MODES", "FastOptions", "FinerCutConfig", "build_candidates", "front_exclusion", "plan_at",
           "plan_finercut"]
