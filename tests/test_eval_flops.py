"""The FLOP model behind `ideal_speedup`, checked against numbers worked out by hand."""
from __future__ import annotations

import pytest

from llmprune.evaluate.flops import decode_flops, ideal_speedups, prefill_flops, prefill_flops_per_token
from llmprune.evaluate.speed import model_shape
from llmprune.families import family_for
from llmprune.families.base import Geometry
from llmprune.surgery import apply

from .conftest import make_model
from .test_surgery import mixed_plan

# hidden 8, 4 query heads / 2 KV heads of dim 2, FFN 16 (gated, no biases)
DENSE = Geometry(hidden=8, n_q_heads=4, n_kv_heads=2, head_dim=2, intermediate=16)
NO_ATTN = DENSE.with_(has_attn=False, n_q_heads=0, n_kv_heads=0)


def test_prefill_flops_by_hand():
    # attention params (2·4 + 2·2)·2·8 = 192, FFN 3·16·8 = 384 -> linear FLOPs per token 2·576 = 1152 per layer.
    # Prompt T = 4: causal attention sums to 1+2+3+4 = 10 attended positions, each 4·n_q·hd = 4·4·2 = 32 FLOPs.
    # LM head once (last position): 2·8·vocab 10 = 160.
    dense = [DENSE, DENSE]
    assert prefill_flops(dense, hidden=8, vocab=10, prompt_len=4) == 4 * 2 * 1152 + 2 * 10 * 32 + 160
    # layer 1 without attention: 4 · (1152 + 768) + 10 · 32 + 160
    pruned = [DENSE, NO_ATTN]
    assert prefill_flops(pruned, hidden=8, vocab=10, prompt_len=4) == 4 * (1152 + 768) + 10 * 32 + 160
    assert prefill_flops(dense, 8, 10, 4, logits_positions=4) == 4 * 2 * 1152 + 2 * 10 * 32 + 4 * 160
    assert prefill_flops_per_token(dense, 8, 10, 4) == (9216 + 640 + 160) / 4

    ideal = ideal_speedups(dense, pruned, hidden=8, vocab=10, prompt_len=4, decode_tokens=2)
    assert ideal["ideal_speedup"] == pytest.approx(10016 / 8160)
    # decode after the 4-token prompt: steps at context 5 and 6 -> 2·(linear + LM head) + attention over 11 positions
    assert decode_flops(dense, 8, 10, prompt_len=4, new_tokens=2) == 2 * (2304 + 160) + 2 * 11 * 32
    assert ideal["ideal_decode_speedup"] == pytest.approx((2 * 2464 + 704) / (2 * (1920 + 160) + 352))


def test_pruned_widths_and_the_identity():
    narrow = DENSE.with_(n_q_heads=2, n_kv_heads=1, intermediate=8)  # one KV group, half the FFN
    # attention (2·2 + 2·1)·2·8 = 96, FFN 3·8·8 = 192 -> 576 FLOPs; attention 4·2·2 = 16 per position
    assert prefill_flops([narrow], 8, 10, 3) == 3 * 576 + 6 * 16 + 160
    assert ideal_speedups([DENSE], [DENSE], 8, 10, 64, 8)["ideal_speedup"] == 1.0
    with pytest.raises(ValueError):
        prefill_flops([DENSE], 8, 10, 0)


def test_geometry_read_from_models_matches_the_plan():
    model = make_model("llama", tie=True)
    plan = mixed_plan(model)
    pruned = apply(model, plan)
    geo_dense, hidden, vocab = model_shape(model)
    geo_pruned, _, _ = model_shape(pruned)
    assert geo_dense == family_for(model.config).geometry(model) == plan.geometry
    assert [(g.n_q_heads, g.n_kv_heads, g.intermediate, g.has_attn, g.has_mlp) for g in geo_pruned] == \
        [(g.n_q_heads, g.n_kv_heads, g.intermediate, g.has_attn, g.has_mlp) for g in plan.geometry_after()]
    assert (hidden, vocab) == (model.config.hidden_size, model.config.vocab_size)
