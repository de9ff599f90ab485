"""Certified lower bounds of the per-token distances from a small slice of the vocabulary.

Why: in the exact search a losing candidate pays, after its decoder suffix, the LM head over the
whole vocabulary ([n, d] × [d, V]) and the distance's element-wise math over V — on SmolLM2 (49k
tokens) that is as much as ~20 of its 60 sublayers. A cheap lower bound of the same per-token
value is enough to drop most losers; only candidates whose bound stays below the best complete
sum are scored exactly. The search's result does not change: a candidate is dropped only when a
lower bound of its sum exceeds a sum another candidate really has.

The bounds, per token (p: dense next-token distribution, q = softmax(z): the candidate's):
- `js`, `js_official`, `kl` are f-divergences, so merging outcomes can only lower them (data
  processing inequality). Keep S = the dense model's top-k tokens of this position and merge the
  rest: p' = (p_S, p(rest)), q' = (q_S, q(rest)). q_S = s·r with r = softmax(z_S) needs only the k
  logits z_S; the unknown share s = q(S) ∈ (0, 1] needs the full normalizer, so take the minimum of
  D(p', (s·r, 1−s)) over s — the divergence is convex in s (jointly convex D, affine path), found
  by bisection on its derivative and certified with tangent lines (closed form for KL).
- `perplexity`: −log q(y) = logsumexp(z) − z_y ≥ logsumexp(z_U) − z_y for any U ∋ y.
- `angular` (cosine of the logit vectors) has no such bound: the search scores it exactly.

Per chunk the union U of the slices' tokens is small (a few thousand ids), so the bound costs a
[n, d] × [d, |U|] product plus O(n·k) math. Bounds are computed in float64 and shrunk by a margin
(`REL_MARGIN`, `ABS_MARGIN`) that covers the float32 rounding of the exact per-token values.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

BOUNDED = ("js", "js_official", "kl", "perplexity")
# Per-token safety margin: bound' = bound·(1 − REL) − ABS. It covers the float32 rounding of the exact
# values (sums over the vocabulary: up to ~1e-6 relative, ~5e-7 absolute for JS in tests) and the ulp-level
# difference between the full head's logits and the slice's, at a negligible cost in tightness.
REL_MARGIN = 1e-3
ABS_MARGIN = 1e-5
_BISECTIONS = 30  # from the whole of (0, 1): bracket width 2^-30, the tangent bound is within ~1e-12 of the minimum
_NEAR = 0.05  # half-width (relative) of the starting bracket around the KL minimizer
_NARROW_BISECTIONS = 14  # from that bracket: width below 1e-5, the tangent bound within ~1e-10 of the minimum


def supports(distance: str) -> bool:
    return distance in BOUNDED


Phi = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- per-bin terms φ(a, b) of an f-divergence Σ φ(p_v, q_v), and ∂φ/∂b --------------------------------
def _js_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = a + b
    return 0.5 * (torch.xlogy(a, 2 * a) - torch.xlogy(a, m) + torch.xlogy(b, 2 * b) - torch.xlogy(b, m))


def _js_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.log(2 * b) - torch.log(a + b))


def _official_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (a + b)  # ½·m·log(m/a) + ½·m·log(m/b)
    return 0.5 * (2 * torch.xlogy(m, m) - torch.xlogy(m, a) - torch.xlogy(m, b))


def _official_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (a + b)
    return 0.25 * (2 * torch.log(m) - torch.log(a) - torch.log(b)) + 0.5 - 0.5 * m / b


_F_DIVERGENCES: dict[str, tuple[Phi, Phi]] = {"js": (_js_terms, _js_grad), "js_official": (_official_terms, _official_grad)}


def coarse_bound(distance: str, p: torch.Tensor, p_rest: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """min over s ∈ (0, 1] of D((p, p_rest), (s·softmax(z), 1 − s)), per row, in float64: [n].

    p: [n, k] dense probabilities on the kept tokens; p_rest: [n] the dense mass of all other tokens;
    z: [n, k] the candidate's logits on the kept tokens.
    """
    p, p_rest, z = p.double(), p_rest.double().clamp_min(1e-300), z.double()
    r = torch.softmax(z, dim=-1)  # [n, k] shape of q on the kept tokens
    if distance == "kl":  # Σ p log(p / (s·r)) + p_rest log(p_rest / (1 − s)): minimum at s = p(S) / Σp
        ps = p.sum(-1)
        s = ps / (ps + p_rest)
        return (torch.xlogy(p, p) - torch.xlogy(p, s[:, None] * r)).sum(-1) + p_rest * torch.log((ps + p_rest))
    terms, grad = _F_DIVERGENCES[distance]

    def f(s: torch.Tensor) -> torch.Tensor:
        return terms(p, s[:, None] * r).sum(-1) + terms(p_rest, 1 - s)

    def df(s: torch.Tensor) -> torch.Tensor:  # f'(s) = Σ r·∂φ/∂b(p, s·r) − ∂φ/∂b(p_rest, 1 − s); increasing
        q = s[:, None] * r
        inner = torch.where(r > 0, r * grad(p, q.clamp_min(1e-300)), torch.zeros_like(r)).sum(-1)
        return inner - grad(p_rest, 1 - s)

    # Invariant: the minimizer s* lies in [lo, hi]; lo > 0 only where f'(lo) ≤ 0, hi < 1 only where f'(hi) ≥ 0.
    # Start from a narrow bracket around the KL minimizer s = p(S) / Σp, which is close to the JS one;
    # rows where it does not bracket the minimum start from the whole interval (0, 1).
    ps = p.sum(-1)
    s0 = ps / (ps + p_rest)
    near_lo, near_hi = s0 * (1 - _NEAR), s0 + _NEAR * (1 - s0)
    ok_lo, ok_hi = df(near_lo) <= 0, df(near_hi) >= 0
    zero, one = torch.zeros_like(s0), torch.ones_like(s0)
    lo = torch.where(ok_hi, torch.where(ok_lo, near_lo, zero), near_hi)  # f'(near_hi) < 0: s* is above it
    hi = torch.where(ok_lo, torch.where(ok_hi, near_hi, one), near_lo)  # f'(near_lo) > 0: s* is below it
    lo, hi = torch.where(lo < hi, lo, zero), torch.where(lo < hi, hi, one)  # (rounding) start over
    wide = (lo == 0) | (hi == 1)
    for _ in range(_BISECTIONS if bool(wide.any()) else _NARROW_BISECTIONS):
        mid = 0.5 * (lo + hi)
        up = df(mid) >= 0
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    # Convexity: f(s) ≥ f(a) + f'(a)(s − a) for every a; the best of the tangents at lo and hi, minimized
    # over [lo, hi], bounds f(s*) from below.
    has_lo, has_hi = lo > 0, hi < 1
    a_lo, a_hi = torch.where(has_lo, lo, 0.5), torch.where(has_hi, hi, 0.5)
    f_lo, g_lo, f_hi, g_hi = f(a_lo), df(a_lo), f(a_hi), df(a_hi)
    slope = g_lo - g_hi  # ≤ 0
    cross = torch.where(slope < 0, (f_hi - f_lo + g_lo * a_lo - g_hi * a_hi) / slope.clamp_max(-1e-300), lo)
    x = torch.minimum(torch.maximum(cross, lo), hi)
    t_lo = torch.where(has_lo, f_lo + g_lo * (x - a_lo), torch.full_like(x, -math.inf))
    t_hi = torch.where(has_hi, f_hi + g_hi * (x - a_hi), torch.full_like(x, -math.inf))
    x_only_lo, x_only_hi = hi, lo  # one tangent: its minimum over [lo, hi] is at the far end
    t_lo = torch.where(has_lo & ~has_hi, f_lo + g_lo * (x_only_lo - a_lo), t_lo)
    t_hi = torch.where(has_hi & ~has_lo, f_hi + g_hi * (x_only_hi - a_hi), t_hi)
    return torch.maximum(t_lo, t_hi)


def safe(values: torch.Tensor) -> torch.Tensor:
    """Shrink bounds by the rounding margin; never negative."""
    return (values * (1.0 - REL_MARGIN) - ABS_MARGIN).clamp_min(0.0)


class VocabBound:
    """Per-chunk slices of the vocabulary and the dense model's data there, and the bound of a chunk.

    Built from the dense model's normalized final hidden states; for every chunk j keeps U_j (the union
    of the rows' top-k dense tokens, plus the next-token targets for perplexity), the LM-head rows of
    U_j, each row's positions in U_j [n, k] and the dense probabilities there [n, k] with the rest's mass [n].
    """

    def __init__(self, distance: str, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                 softcap: float | None = None):
        if not supports(distance):
            raise ValueError(f"no vocabulary bound for the {distance} distance")
        self.distance, self.weight, self.bias = distance, weight, bias
        self.softcap = softcap  # logits = c·tanh(z/c) (Gemma 2); elementwise, so the bounds still hold
        self.k = max(1, min(k, weight.shape[0]))
        self.ids: list[torch.Tensor] = []  # [u_j] vocabulary ids
        self.rows: list[torch.Tensor] = []  # [u_j, d] head weights
        self.biases: list[torch.Tensor | None] = []
        self.pos: list[torch.Tensor] = []  # [n, k] (f-divergences) or [n] (perplexity: target's slot, −1: none)
        self.p: list[torch.Tensor] = []  # [n, k] float64 dense probabilities on the kept tokens
        self.p_rest: list[torch.Tensor] = []  # [n] float64

    @property
    def size(self) -> int:
        """Vocabulary ids kept over all chunks (with repeats): the bound's share of the head's work."""
        return sum(int(i.numel()) for i in self.ids)

    @torch.no_grad()
    def add_chunk(self, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One chunk from its row blocks: (dense float32 logits [r, V], next-token targets [r] (−1: none))."""
        tops, targets, p_kept, p_rest = [], [], [], []
        for logits, tgt in blocks:
            top = logits.topk(self.k, dim=-1).indices  # [r, k]
            tops.append(top)
            targets.append(tgt)
            if self.distance != "perplexity":
                p_all = torch.log_softmax(logits.float(), dim=-1).exp()  # the p the exact value uses
                kept = p_all.gather(1, top).double()
                p_kept.append(kept)
                p_rest.append((p_all.double().sum(-1) - kept.sum(-1)).clamp_min(0.0))
        top, tgt = torch.cat(tops), torch.cat(targets)
        if self.distance == "perplexity":
            ids = torch.cat([top.reshape(-1), tgt[tgt >= 0]]).unique()
            slot = torch.searchsorted(ids, tgt.clamp_min(0))
            self.pos.append(torch.where(tgt >= 0, slot, torch.full_like(slot, -1)))
        else:
            ids, inv = top.unique(return_inverse=True)
            self.pos.append(inv)
            self.p.append(torch.cat(p_kept))
            self.p_rest.append(torch.cat(p_rest))
        self.ids.append(ids)
        self.rows.append(self.weight.index_select(0, ids))
        self.biases.append(None if self.bias is None else self.bias.index_select(0, ids))

    @torch.no_grad()
    def values(self, j: int, normed: torch.Tensor) -> torch.Tensor:
        """Safe per-token lower bounds [n] (float64) for chunk j's rows, from normalized final hidden states [n, d]."""
        z = F.linear(normed, self.rows[j], self.biases[j]).double()  # [n, u_j]
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        if self.distance == "perplexity":
            slot = self.pos[j]
            picked = z.gather(1, slot.clamp_min(0).unsqueeze(1)).squeeze(1)
            raw = torch.where(slot >= 0, torch.logsumexp(z, dim=-1) - picked, torch.zeros_like(picked))
        else:
            raw = coarse_bound(self.distance, self.p[j], self.p_rest[j], z.gather(1, self.pos[j]))
        return safe(raw)


__all__ = ["ABS_MARGIN", "BOUNDED", "REL_MARGIN", "VocabBound", "coarse_bound", "safe", "supports"]
