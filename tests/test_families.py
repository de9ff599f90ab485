"""Family detection, geometry and parameter costs."""
from __future__ import annotations

import pytest
from transformers import GPT2Config

from llmprune.families import UnsupportedModelError, family_for
from llmprune.families.base import Geometry



def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError, match="gpt2.*Supported model types: .*llama.*qwen3"):
        family_for(GPT2Config())


def test_geometry_matches_modules(tiny_model):
    fam = family_for(tiny_model.config)
    geo = fam.geometry(tiny_model)
    assert len(geo) == 3
    g = geo[0]
    assert (g.n_q_heads, g.n_kv_heads, g.intermediate, g.group_size) == (4, 2, 96, 2)
    assert g.head_dim == (24 if tiny_model.config.model_type in ("qwen3", "gemma2", "gemma3_text") else 16)
    assert g.qkv_bias == (tiny_model.config.model_type == "qwen2")
    linear = sum(p.numel() for n, p in tiny_model.named_parameters()
                 if ".layers." in n and ("proj" in n))
    assert sum(x.linear_params() for x in geo) == linear


def test_unit_costs_add_up():
    g = Geometry(hidden=576, n_q_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536)
    assert g.kv_group_cost() == (2 * 3 + 2) * 64 * 576
    assert g.kv_group_cost() * g.n_kv_heads == g.attn_params()
    assert g.ffn_channel_cost() * g.intermediate == g.mlp_params()
    gb = g.with_(qkv_bias=True)
    assert gb.kv_group_cost() * 3 == gb.attn_params()


def test_half_blocks_compose_to_the_decoder_layer(tiny_model, tokens):
    """attn_residual then mlp_residual is exactly what the decoder layer computes (FinerCut's what-if runner)."""
    import torch

    from llmprune.calibrate import BlockWalker

    fam = family_for(tiny_model.config)
    walker = BlockWalker(tiny_model, fam, tokens, batch_size=2)
    for i in range(len(fam.layers(tiny_model))):
        block = fam.block(tiny_model, i)
        h, (_, kwargs) = walker.hidden[0], walker.layer_args[i][0]
        with torch.no_grad():
            want = walker.run(i)[0]
            got = fam.mlp_residual(block, fam.attn_residual(block, h, kwargs))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        walker.advance(walker.run(i))
