"""Exact parameter accounting for width pruning, and moving a total onto a parameter target.

Pure functions on Geometry and tensors (no model access). The allocation strategies in
`allocate.py` decide roughly how much each layer keeps; the pieces here make that exact:

- what a module keeps costs, biases included (`attn_kept_params`, `mlp_kept_params`): a module
  that loses some but not all units and is compensated gains a bias when it had none (FLAP);
- the *levels* a module can sit at — attention shapes (KV groups × query heads per group, the
  same count in every group) and FFN widths (optionally multiples of `round_to`) — each with the
  best total score reachable at that size;
- `settle`: step modules up or down one level at a time until the total is as close to the
  target as the finest available step allows ("within one unit").
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...families.base import Geometry
from ...errors import UsageError


class BudgetError(UsageError):
    """The requested sparsity cannot be reached with the units this pruner may remove."""


# ---- costs -----------------------------------------------------------------------------------------
def attn_kept_params(g: Geometry, n_kv: int, per_group: int, compensate: bool) -> int:
    """Parameters of the attention sublayer keeping `n_kv` KV groups of `per_group` query heads each."""
    if not g.has_attn:
        return g.attn_params()  # nothing, or an existing bias-only sublayer
    if n_kv == 0:
        return g.hidden * compensate  # removed; with compensation its mean output stays as a bias
    full = n_kv == g.n_kv_heads and per_group == g.group_size
    after = g.with_(n_kv_heads=n_kv, n_q_heads=n_kv * per_group, o_bias=g.o_bias or (compensate and not full))
    return after.attn_params()


def mlp_kept_params(g: Geometry, width: int, compensate: bool) -> int:
    """Parameters of the FFN sublayer keeping `width` channels."""
    if not g.has_mlp:
        return g.mlp_params()
    if width == 0:
        return g.hidden * compensate
    full = width == g.intermediate
    return g.with_(intermediate=width, down_bias=g.down_bias or (compensate and not full)).mlp_params()


# ---- unit selection --------------------------------------------------------------------------------
def keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the `n_keep` highest scores, sorted; ties go to the lower index (deterministic)."""
    n_keep = max(0, min(int(n_keep), scores.numel()))
    if n_keep == scores.numel():
        return list(range(n_keep))
    s = scores.detach().to(torch.float64).cpu()
    order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))
    return sorted(order[:n_keep])


def head_scores(channel_scores: torch.Tensor, g: Geometry) -> torch.Tensor:
    """[n_kv, g] total score of each query head from [n_q·head_dim] o_proj input channel scores."""
    return channel_scores.double().view(g.n_kv_heads, g.group_size, g.head_dim).sum(-1)


def select_attention(heads: torch.Tensor, n_kv: int, per_group: int) -> tuple[list[int], list[list[int]] | None, float]:
    """Best (kv_groups, q_heads, score) with `n_kv` groups of `per_group` heads from [n_kv_all, g] head scores.

    Each group contributes its best `per_group` heads, so the best groups are those whose top heads
    sum highest — optimal for a fixed shape. q_heads is None when every group keeps all its heads.
    """
    n_groups, g = heads.shape
    local = [keep_top(heads[k], per_group) for k in range(n_groups)]
    group_score = torch.stack([heads[k, local[k]].sum() for k in range(n_groups)])
    groups = keep_top(group_score, n_kv)
    score = float(group_score[groups].sum()) if groups else 0.0
    q_heads = None if per_group == g else [local[k] for k in groups]
    return groups, q_heads, score


# ---- levels ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    params: int  # parameters the module keeps (0: the sublayer is dropped)
    score: float  # best total unit score at this size (higher = more important kept)
    shape: tuple[int, int]  # attention: (KV groups, query heads per group); FFN: (width, 0)


def attention_levels(g: Geometry, heads: torch.Tensor, query_heads: bool, compensate: bool,
                     allow_drop: bool) -> list[Level]:
    """Every attention shape, ascending in parameters; of shapes with equal cost the best-scoring one."""
    per_groups = range(1, g.group_size + 1) if query_heads else [g.group_size]
    best: dict[int, Level] = {}
    shapes = [(0, 0)] if allow_drop else []
    shapes += [(k, q) for k in range(1, g.n_kv_heads + 1) for q in per_groups]
    for k, q in shapes:
        score = select_attention(heads, k, q)[2] if k else 0.0
        lv = Level(attn_kept_params(g, k, q, compensate), score, (k, q))
        cur = best.get(lv.params)
        if cur is None or (lv.score, lv.shape) > (cur.score, cur.shape):
            best[lv.params] = lv
    return [best[p] for p in sorted(best)]


class FfnLevels(Sequence[Level]):
    """FFN widths (multiples of `round_to`, the full width, optionally 0), ascending, built lazily:
    a 70B model has ~2 million of them, so Levels are made only when asked for."""

    def __init__(self, g: Geometry, scores: torch.Tensor, round_to: int, compensate: bool, allow_drop: bool):
        m, step = g.intermediate, max(1, int(round_to))
        self.widths = sorted({w for w in range(step, m, step)} | {m} | ({0} if allow_drop else set()))
        self.prefix = torch.cat([torch.zeros(1, dtype=torch.float64),
                                 scores.double().sort(descending=True).values.cumsum(0)]).tolist()  # [m+1]
        self.m, self.cost = m, g.ffn_channel_cost()
        self.base = g.hidden * g.down_bias  # an existing down_proj bias stays while the FFN does
        self.over = g.hidden if compensate and not g.down_bias else 0  # bias added when partly pruned
        self.gone = g.hidden if compensate else 0  # removed with compensation: a bias-only sublayer stays

    def params(self, width: int) -> int:  # = mlp_kept_params(g, width, compensate), without building Geometries
        return self.gone if width == 0 else width * self.cost + self.base + self.over * (width < self.m)

    def __len__(self) -> int:
        return len(self.widths)

    def __getitem__(self, i: int) -> Level:  # type: ignore[override]
        w = self.widths[i]
        return Level(self.params(w), self.prefix[w], (w, 0))

    def nearest(self, params: float) -> int:
        j = bisect.bisect_left(self.widths, (params - self.base) / self.cost)
        return min((i for i in (j - 1, j, j + 1) if 0 <= i < len(self)),
                   key=lambda i: (abs(self.params(self.widths[i]) - params), -i))

    def max_step(self) -> int:
        return max((self.params(b) - self.params(a) for a, b in zip(self.widths, self.widths[1:])), default=0)


def ffn_levels(g: Geometry, scores: torch.Tensor, round_to: int, compensate: bool, allow_drop: bool) -> FfnLevels:
    """FFN widths as levels, with the total score of the best channels kept at each width."""
    return FfnLevels(g, scores, round_to, compensate, allow_drop)


def nearest_level(levels: Sequence[Level], params: float) -> int:
    """Index of the level whose parameter count is closest to `params` (ties: the larger one)."""
    if isinstance(levels, FfnLevels):
        return levels.nearest(params)
    return min(range(len(levels)), key=lambda i: (abs(levels[i].params - params), -i))


def level_at_least(levels: Sequence[Level], params: float) -> int:
    """Index of the smallest level keeping at least `params` (the largest level if none does)."""
    for i in range(len(levels)):
        if levels[i].params >= params - 1e-9 * max(1.0, abs(params)):
            return i
    return len(levels) - 1


def max_step(levels: Sequence[Level]) -> int:
    """The largest parameter change of one step between neighbouring levels."""
    if isinstance(levels, FfnLevels):
        return levels.max_step()
    return max((b.params - a.params for a, b in zip(levels, levels[1:])), default=0)


# ---- settling a total onto its target --------------------------------------------------------------
Priority = Callable[[int, Level, Level], float]  # (layer, current, candidate) -> preference, higher first


def by_deficit(ideal: Sequence[float]) -> Priority:
    """Move the layer furthest from its ideal size first (uniform-like allocations)."""
    def pri(layer: int, cur: Level, new: Level) -> float:
        gap = ideal[layer] - cur.params
        return gap if new.params > cur.params else -gap
    return pri


def by_score(layer: int, cur: Level, new: Level) -> float:
    """Add the most valuable units per parameter, remove the least valuable (global allocations)."""
    value = (new.score - cur.score) / (new.params - cur.params)  # score per parameter of the step
    return value if new.params > cur.params else -value


def settle(levels: Sequence[Sequence[Level]], current: list[int], fixed: int, target: float,
           priority: Priority) -> list[int]:
    """Step modules one level up or down until `fixed + Σ params` is as close to `target` as possible.

    A step is taken only if it brings the total strictly closer, so this stops after finitely many
    steps; among the helpful steps the one with the highest priority wins (ties: lower layer).
    """
    cur = list(current)
    total = fixed + sum(lv[i].params for lv, i in zip(levels, cur))
    while True:
        gap = target - total
        best: tuple[float, int, int] | None = None
        for layer, (lv, i) in enumerate(zip(levels, cur)):
            j = i + 1 if gap > 0 else i - 1
            if not 0 <= j < len(lv):
                continue
            delta = lv[j].params - lv[i].params
            if abs(gap - delta) >= abs(gap):
                continue
            key = (priority(layer, lv[i], lv[j]), -layer)
            if best is None or key > (best[0], -best[1]):
                best = (key[0], layer, j)
        if best is None:
            return cur
        _, layer, j = best
        total += levels[layer][j].params - levels[layer][cur[layer]].params
        cur[layer] = j


def check_reached(total: int, target: float, levels: Sequence[Sequence[Level]], sparsity: float) -> None:
    """Raise BudgetError when the settled total misses the target by more than one step of its levels."""
    tolerance = max((max_step(lv) for lv in levels), default=0)
    if abs(total - target) > tolerance:
        raise BudgetError(f"sparsity {sparsity:.1%} cannot be reached: the units this pruner may remove allow "
                          f"{total:,} kept parameters against a target of {target:,.0f}; lower the sparsity, "
                          f"let the pruner remove more unit types (pruner.attention / pruner.mlp), or allow "
                          f"whole sublayers to go (allocation: global)")
