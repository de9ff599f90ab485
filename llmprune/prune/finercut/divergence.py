"""Output distances between a pruned model and the dense model, computed per token in float32.

Every distance is a mean over scored tokens of a non-negative per-token value. That matters for
the search: the running sum over the tokens seen so far is a lower bound of the final sum, so a
candidate whose partial sum already exceeds the best complete one can be abandoned exactly.

| name          | per-token value (p: dense, q: pruned next-token distribution)     | final value      |
|---------------|-------------------------------------------------------------------|------------------|
| `js`          | ½·KL(p‖m) + ½·KL(q‖m), m = (p+q)/2 (textbook Jensen–Shannon)      | mean             |
| `js_official` | ½·KL(m‖p) + ½·KL(m‖q) (the official FinerCut code's form)         | mean / vocab     |
| `kl`          | KL(p‖q)                                                           | mean             |
| `angular`     | arccos(cos(z_p, z_q)) of the two logit vectors, in radians         | mean             |
| `perplexity`  | −log q(next token) (no dense reference needed)                     | exp(mean)        |

`js_official` reproduces `F.kl_div(log_softmax(x), m, reduction="mean")`: `F.kl_div(input, target)`
is KL(target‖input) and "mean" divides by every element, i.e. by tokens × vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTANCES = ("js", "js_official", "kl", "angular", "perplexity")
_LOG2 = math.log(2.0)
_TINY = torch.finfo(torch.float32).tiny


def check_distance(name: str) -> str:
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")
    return name


def needs_reference(distance: str) -> bool:
    """Whether the distance compares with the dense model (all but perplexity)."""
    return distance != "perplexity"


def reference(distance: str, logits: torch.Tensor) -> torch.Tensor | None:
    """What to keep of the dense model's logits [n, V]: float32 log-probabilities, or the logits themselves."""
    if distance == "perplexity":
        return None
    z = logits.float()
    return z if distance == "angular" else torch.log_softmax(z, dim=-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v]·b[n, v] per row, without materializing the product: [n]."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def token_values(distance: str, ref: torch.Tensor | None, logits: torch.Tensor,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token values [n] (float32, ≥ 0) for pruned-model logits [n, V].

    ref: what `reference` returned for the same tokens; targets: [n] next-token ids for perplexity,
    negative where a position has no next token (those give 0 and are not counted). Values are
    clamped at 0: they are non-negative in exact arithmetic, and the clamp keeps partial sums
    monotone, which the search's early abandoning relies on.
    """
    return _raw_values(distance, ref, logits.float(), targets).clamp_min_(0.0)


def _raw_values(distance: str, ref: torch.Tensor | None, z: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if distance == "perplexity":
        if targets is None:
            raise ValueError("the perplexity distance needs next-token targets")
        valid = targets >= 0
        picked = z.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
        return torch.where(valid, torch.logsumexp(z, dim=-1) - picked, torch.zeros_like(picked))
    if ref is None:
        raise ValueError(f"the {distance} distance needs the dense model's reference")
    if distance == "angular":
        cos = F.cosine_similarity(ref, z, dim=-1)
        return torch.acos(cos.clamp(-1.0, 1.0))
    lq = torch.log_softmax(z, dim=-1)  # [n, V]
    lp = ref
    if distance == "kl":
        return _rowdot(lp.exp(), lp - lq)
    p, q = lp.exp(), lq.exp()
    lm = (p + q).clamp_min_(_TINY).log_().sub_(_LOG2)  # log of the mixture m = (p+q)/2
    if distance == "js":
        # The differences lp−lm, lq−lm are small where p≈q, so the sums lose no precision to cancellation.
        return 0.5 * (_rowdot(p, lp - lm) + _rowdot(q, lq - lm))
    if distance == "js_official":
        m = 0.5 * (p + q)
        return 0.5 * _rowdot(m, 2.0 * lm - lp - lq)
    raise ValueError(f"unknown distance {distance!r}")


# Elements of one float32 [rows, vocab] logits block (4 Mi float32 = 16 MiB per temporary), used for
# the element-wise math here and for the LM head + distance in residual_stream / reference: bounds
# memory whatever the vocabulary and micro-batch size, and is the granularity at which a hopeless
# candidate stops being scored (85 rows for a 49k vocabulary, 32 for 128k). Smaller blocks would sit
# better in the CPU cache, but each op is then too small to share between threads: on a busy 2-core
# machine 8-row blocks were 8x slower with 2 threads (measured, 49k vocabulary).
BLOCK_ELEMS = 1 << 22


def block_values(distance: str, ref: torch.Tensor | None, logits: torch.Tensor,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
    """`token_values` over the rows of `logits` [n, V], a bounded number of elements at a time: [n]."""
    rows = max(1, BLOCK_ELEMS // logits.shape[-1])
    return torch.cat([token_values(distance, None if ref is None else ref[r:r + rows], logits[r:r + rows],
                                   None if targets is None else targets[r:r + rows])
                      for r in range(0, logits.shape[0], rows)])


def token_sum(distance: str, ref: torch.Tensor | None, logits: torch.Tensor,
              targets: torch.Tensor | None = None) -> float:
    """Sum of the per-token values over the rows of `logits` [n, V], accumulated in float64."""
    return float(block_values(distance, ref, logits, targets).double().sum())


def finalize(distance: str, total: float, n_tokens: int, vocab: int) -> float:
    """The reported distance from a sum of per-token values over `n_tokens` scored tokens."""
    mean = total / max(n_tokens, 1)
    if distance == "perplexity":
        return math.exp(mean)
    if distance == "js_official":
        return mean / vocab
    return mean


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """[b, T] ids -> [b·T] next-token targets, −1 at the last position of every sequence."""
    t = torch.full_like(tokens, -1)
    t[:, :-1] = tokens[:, 1:]
    return t.reshape(-1)


def count_scored(distance: str, targets: torch.Tensor) -> int:
    """How many of these positions (next-token targets as from `next_token_targets`) a distance scores."""
    return int((targets >= 0).sum()) if distance == "perplexity" else targets.numel()


def scored_tokens(distance: str, tokens: torch.Tensor) -> int:
    """How many positions of a [b, T] batch a distance scores (perplexity: all but the last of each row)."""
    b, t = tokens.shape
    return b * (t - 1) if distance == "perplexity" else b * t


__all__ = ["BLOCK_ELEMS", "DISTANCES", "block_values", "check_distance", "count_scored", "finalize", "needs_reference", "next_token_targets", "reference",
           "scored_tokens", "token_sum", "token_values"]
