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
    top-k tokens (`bound_topk`; vocab_bound.py) replaces the full LM head while a candidate
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

import contextlib
import logging
import math
import time

import torch

from ...plan import Plan, sublayer_plan
from ..context import PruneContext
from ..width.allocate import BudgetError
from .candidates import Candidate, Target, build_candidates, front_exclusion, removed_set
from .config import FinerCutConfig
from .divergence import finalize
from .reference import ReferenceSearch
from ...evaluate.bench import weight_bytes
from .residency import Residency, resident_rest
from .residual_stream import ResidualStream
from .search import ExactSearch, FastSearch, Searcher
from ...errors import UsageError

log = logging.getLogger(__name__)

# ---- the pruner --------------------------------------------------------------------------------
def plan_finercut(ctx: PruneContext, cfg: FinerCutConfig) -> Plan:
    tokens = ctx.require_tokens()
    visiting = ctx.offload or ctx.loader is not None  # blocks come to the device one at a time (residency.py)
    if visiting and cfg.mode == "reference":
        raise UsageError("finercut mode: reference runs the whole model for every candidate and needs it in memory "
                         "on its device; drop --offload / --stream, or use mode: exact")
    geometry = ctx.geometry
    candidates = build_candidates(geometry, cfg.candidates)
    total = sum(g.linear_params() for g in geometry)
    target = Target(cfg, ctx.sparsity, candidates, total)
    excluded, readmit_after = front_exclusion(candidates, cfg.exclude_front)
    t0 = time.perf_counter()
    model_was_training = ctx.model.training
    ctx.model.eval()
    residency = Residency.none()
    try:
        with contextlib.ExitStack() as held:  # what the search keeps on the device, released afterwards
            search: Searcher
            if cfg.mode == "reference":
                search = ReferenceSearch(ctx, cfg.distance)
            else:
                topk = cfg.fast.topk_vocab if cfg.mode == "fast" else 0
                if topk and cfg.distance == "perplexity":
                    log.warning("fast.topk_vocab is ignored for the perplexity distance (it needs the full vocabulary)")
                if visiting:
                    log.info(cost_model(ctx, tokens, len(candidates), cfg))
                    residency = Residency(ctx.family.layers(ctx.model), _device(ctx), ctx.loader)
                    held.callback(residency.release)
                norm, head = held.enter_context(resident_rest(
                    ctx.model, [ctx.family.final_norm(ctx.model), ctx.family.lm_head(ctx.model)],
                    _device(ctx), ctx.loader, ctx.offload))
                stream = ResidualStream(ctx.model, ctx.family, tokens, cfg.distance, batch_size=ctx.batch_size,
                                        device=ctx.device, topk_vocab=topk, bound_topk=cfg.bound_topk,
                                        progress=ctx.progress, residency=residency, rest=(norm, head))
                search = FastSearch(stream, cfg.candidate_batch, cfg.fast) if cfg.mode == "fast" else \
                    ExactSearch(stream, cfg.candidate_batch)
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
    if visiting:
        plan.extras["finercut"].update(block_transfers=residency.transfers, bytes_moved=residency.bytes_moved)
    return plan


def _device(ctx: PruneContext) -> torch.device:
    if ctx.device is not None:
        return torch.device(ctx.device)
    return next(p for p in ctx.model.parameters() if p.device.type != "meta").device


def cost_model(ctx: PruneContext, tokens: torch.Tensor, n_candidates: int, cfg: FinerCutConfig) -> str:
    """What visiting blocks costs, said before the search starts (docs/finercut.md, "Models larger than memory")."""
    block = sum(weight_bytes(m) for m in ctx.family.layers(ctx.model))
    chunks = math.ceil(tokens.shape[0] / max(1, ctx.batch_size))
    passes = math.ceil(n_candidates * chunks / max(1, cfg.candidate_batch)) + chunks
    how = "read from the checkpoint's shards" if ctx.loader is not None else "copied from host memory"
    gib = 2 ** 30
    return (f"finercut with blocks {how} one at a time: one pass over the blocks moves up to {block / gib:.2f} GiB; "
            f"the dense pass is one pass per micro-batch ({chunks}), and a search step makes at most "
            f"~{passes} passes over the blocks after its earliest candidate ({n_candidates} candidates x {chunks} "
            f"micro-batches in stacks of {cfg.candidate_batch}, plus the winner's), usually far fewer "
            f"(early abandoning) — up to ~{passes * block / gib:.1f} GiB per step; the bytes actually moved go into "
            f"pruning.json (finercut.bytes_moved)")


def _greedy(search: Searcher, cfg: FinerCutConfig, candidates: list[Candidate], target: Target,
            excluded: list[Candidate], readmit_after: int | None, progress: bool) -> list[tuple[Candidate, float]]:
    from tqdm.auto import tqdm

    held = {c.index for c in excluded}
    available = [c for c in candidates if c.index not in held]
    order: list[tuple[Candidate, float]] = []
    removed_params = 0
    bar = tqdm(total=target.count, desc=f"finercut ({cfg.mode})", unit="removal", disable=not progress)
    try:
        while not target.reached(len(order), removed_params):
            if not available:
                raise BudgetError("ran out of candidates before reaching the target")
            step = len(order)
            winner, total = search.step(available, step)
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
        raise UsageError("not a FinerCut plan: it has no removal_order")
    steps = math.floor(fraction * info["n_candidates"])
    have = max((e.get("step", 0) for e in order), default=0)
    if steps > have:
        raise UsageError(f"the plan's removal order has {have} steps; a fraction of {fraction} needs {steps}")
    prefix = [e for e in order if e["step"] <= steps]
    out = sublayer_plan(plan.geometry, {(e["layer"], e["sublayer"]) for e in prefix})
    out.extras = {"removal_order": prefix}
    return out


__all__ = ["plan_at", "plan_finercut"]
