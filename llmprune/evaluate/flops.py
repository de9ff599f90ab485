"""Forward FLOPs of a decoder-only model from its per-layer Geometry (the "ideal" speed-up).

Counting convention (one multiply-add = 2 FLOPs; norms, RoPE, softmax and activations ignored):

    linear layers       2 · linear_params(g)                     per token and layer (q/k/v/o, gate/up/down)
    attention           4 · n_q_heads · head_dim · c             per token at context c (QKᵀ and A·V, 2·n_q·hd·c each),
                                                                 only in layers that still have attention
    LM head             2 · hidden · vocab                       per position whose logits are computed

Prefill of a prompt of T tokens is causal: token t (1-based) attends to t positions, so the attention
term sums to 4·n_q·hd·T(T+1)/2 over the prompt. Logits are computed for the last position only, exactly
as `generate` does (`logits_to_keep=1`), so the LM head is counted once per sequence. The benchmark
times exactly this computation, which is what makes measured and ideal speed-ups comparable.

A decode step at context c (the new token plus c−1 cached ones) costs the linear layers, 4·n_q·hd·c of
attention and one LM head.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..families.base import Geometry


def linear_flops(geometries: Sequence[Geometry]) -> int:
    """FLOPs of all decoder linear layers for one token."""
    return sum(2 * g.linear_params() for g in geometries)


def attention_flops(geometries: Sequence[Geometry], context: float) -> float:
    """Score (QKᵀ) and value (A·V) FLOPs for one query token attending to `context` positions."""
    return sum(4 * g.n_q_heads * g.head_dim * context for g in geometries if g.has_attn)


def lm_head_flops(hidden: int, vocab: int) -> int:
    return 2 * hidden * vocab


def prefill_flops(geometries: Sequence[Geometry], hidden: int, vocab: int, prompt_len: int,
                  logits_positions: int = 1) -> float:
    """FLOPs of one causal forward pass over `prompt_len` tokens (one sequence), logits at the last
    `logits_positions` positions."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be at least 1, got {prompt_len}")
    attended = prompt_len * (prompt_len + 1) / 2  # Σ_t t: causal context summed over the prompt
    return (prompt_len * linear_flops(geometries) + attention_flops(geometries, attended)
            + min(logits_positions, prompt_len) * lm_head_flops(hidden, vocab))


def prefill_flops_per_token(geometries: Sequence[Geometry], hidden: int, vocab: int, prompt_len: int) -> float:
    """Forward FLOPs per prompt token at this prompt length (the LM head amortised over the prompt)."""
    return prefill_flops(geometries, hidden, vocab, prompt_len) / prompt_len


def decode_flops(geometries: Sequence[Geometry], hidden: int, vocab: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of `new_tokens` cached decode steps after a prompt of `prompt_len` (one sequence)."""
    # step i (0-based) processes one token at context prompt_len + i + 1
    attended = sum(prompt_len + i + 1 for i in range(new_tokens))
    return (new_tokens * (linear_flops(geometries) + lm_head_flops(hidden, vocab))
            + attention_flops(geometries, attended))


def ideal_speedups(dense: Sequence[Geometry], pruned: Sequence[Geometry], hidden: int, vocab: int,
                   prompt_len: int, decode_tokens: int) -> dict[str, float]:
    """Dense/pruned FLOP ratios for prefill (the report's `ideal_speedup`) and decode, plus the counts."""
    pd, pp = prefill_flops(dense, hidden, vocab, prompt_len), prefill_flops(pruned, hidden, vocab, prompt_len)
    out = {"ideal_speedup": pd / pp, "dense_flops_per_token": pd / prompt_len,
           "pruned_flops_per_token": pp / prompt_len}
    if decode_tokens > 0:
        dd = decode_flops(dense, hidden, vocab, prompt_len, decode_tokens)
        dp = decode_flops(pruned, hidden, vocab, prompt_len, decode_tokens)
        out["ideal_decode_speedup"] = dd / dp
    return out


__all__ = ["attention_flops", "decode_flops", "ideal_speedups", "linear_flops", "lm_head_flops", "prefill_flops",
           "prefill_flops_per_token"]
