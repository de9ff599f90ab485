"""GQA: KV-group units and uniform query heads within groups, on Qwen3 (head_dim ≠ hidden/heads) and
Qwen2 (q/k/v biases): the right units are chosen, and the pruned model runs, generates and round-trips."""
from __future__ import annotations

import pytest
import torch

from llmprune import api, surgery
from llmprune.calibrate import calibrate
from llmprune.checkpoint import load_pruned, save_pruned
from llmprune.families import family_for
from llmprune.prune.width.budget import head_scores
from llmprune.prune.width.flap import flap_scorer
from llmprune.prune.width.wanda_sp import wanda_sp_scores
from llmprune.recipe import load_recipe

from .conftest import make_model


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_query_heads_within_groups(family, tokens, tmp_path, tiny_tokenizer):
    model = make_model(family)
    fam = family_for(model.config)
    geo = fam.geometry(model)
    assert geo[0].group_size == 2 and (family != "qwen3" or geo[0].head_dim * 4 != model.config.hidden_size)
    recipe = load_recipe("flap", {"sparsity": 0.15, "pruner.mlp": False, "pruner.query_heads": True,
                                  "pruner.structure": "UL-MM"})
    plan = api.make_plan(model, recipe, tokens, progress=False)
    with_q = [i for i, lp in enumerate(plan.layers) if lp.attn.keep_q is not None]
    assert with_q, "this budget is met by keeping one query head per group"
    stats = calibrate(model, tokens, progress=False)
    score = flap_scorer("wifv", square_attention=False)
    for i in with_q:
        a = plan.layers[i].attn
        assert len({len(q) for q in a.keep_q}) == 1  # the same count in every kept group
        heads = head_scores(score(fam.block(model, i), geo[i], stats, i)[0], geo[i])  # [n_kv, g]
        groups = a.keep_kv_groups or list(range(geo[i].n_kv_heads))
        for k, q in zip(groups, a.keep_q):
            assert q == [int(heads[k].argmax())]  # the better query head of each group survives
    pruned = surgery.apply(model, plan)
    for i, layer in enumerate(pruned.model.layers):
        after = plan.geometry_after()[i]
        assert layer.self_attn.q_proj.out_features == after.n_q_heads * geo[i].head_dim
        assert layer.self_attn.k_proj.out_features == after.n_kv_heads * geo[i].head_dim
        if family == "qwen2":
            assert layer.self_attn.q_proj.bias.shape[0] == after.n_q_heads * geo[i].head_dim
    with surgery.simulate(model, plan):
        simulated = model(tokens).logits
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :5]
    assert torch.equal(pruned.generate(prompt, max_new_tokens=4, do_sample=False),
                       pruned.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "q", plan)
    torch.testing.assert_close(load_pruned(out)[0](tokens).logits, simulated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_kv_group_is_the_attention_unit(family, tokens):
    """Wanda-sp removing one of two KV groups per layer keeps the group whose channels score higher in sum,
    and takes its query heads, k/v rows and o_proj columns together."""
    model = make_model(family)
    fam = family_for(model.config)
    g = fam.geometry(model)[0]
    share = (g.kv_group_cost()) / g.linear_params()
    recipe = load_recipe("wanda-sp", {"sparsity": share, "pruner.mlp": False, "pruner.sequential": False})
    plan = api.make_plan(model, recipe, tokens, progress=False)
    stats = calibrate(model, tokens, progress=False)
    for i, lp in enumerate(plan.layers):
        attn_scores = wanda_sp_scores(fam.block(model, i), g, stats, i)[0]
        best = int(attn_scores.view(g.n_kv_heads, -1).sum(1).argmax())
        assert lp.attn.keep_kv_groups == [best] and lp.attn.keep_q is None
    pruned = surgery.apply(model, plan)
    kept = plan.layers[0].attn.keep_kv_groups[0]
    hd = g.head_dim
    src, dst = fam.block(model, 0).attn, pruned.model.layers[0].self_attn
    torch.testing.assert_close(dst.k_proj.weight, src.k.weight[kept * hd:(kept + 1) * hd])
    q_rows = slice(kept * g.group_size * hd, (kept + 1) * g.group_size * hd)
    torch.testing.assert_close(dst.q_proj.weight, src.q.weight[q_rows])
    torch.testing.assert_close(dst.o_proj.weight, src.o.weight[:, q_rows])
    assert pruned.config.num_key_value_heads == 1 and pruned.config.num_attention_heads == g.group_size
