"""Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2: every pruner, the calibration sites, and each family's own
structure (fused projections, sandwich / post norms, whole-projection q/k norms, sliding layers)."""
from __future__ import annotations

import json

import pytest
import torch

from llmprune import api, surgery
from llmprune.calibrate import BlockWalker, calibrate
from llmprune.calibrate.stats import site_name
from llmprune.checkpoint import save_pruned
from llmprune.families import UnsupportedModelError, family_for
from llmprune.plan import AttnPlan, LayerPlan, MlpPlan, Plan
from llmprune.prune import get_pruner
from llmprune.recipe import builtin_recipes, load_recipe

from .conftest import SLIDING_WINDOW, make_model
from .test_surgery import mixed_plan

NEW = ("gemma2", "gemma3_text", "phi3", "olmo2")


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_recipe_runs_on_every_family(family, name, tokens):
    model = make_model(family, tie=family.startswith("gemma"))
    recipe = load_recipe(name)
    calib = tokens if get_pruner(recipe.method).wants_data(recipe.options) else None
    plan = api.make_plan(model, recipe, calib, progress=False)
    plan.validate()
    assert plan.params_after() < plan.params_before()
    with surgery.simulate(model, plan) as m:
        simulated = m(tokens).logits
    pruned = surgery.apply(model, plan)
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-4, atol=1e-4)
    prompt = tokens[:1, :4]
    cached = pruned.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


@pytest.mark.parametrize("family", NEW + ("llama",))
def test_calibration_sites_record_the_sublayer_inputs(family, tokens):
    """attn.in / mlp.in see what the projections receive (after the family's pre-norm, if any); o_in / down_in
    have the width of the o_proj / down_proj inputs, also where q/k/v and gate/up are fused."""
    model = make_model(family)
    fam = family_for(model.config)
    sites = ("attn.in", "attn.o_in", "mlp.in", "mlp.down_in")
    stats = calibrate(model, tokens, sites=sites, progress=False)
    walker = BlockWalker(model, fam, tokens, batch_size=len(tokens))
    for i, g in enumerate(fam.geometry(model)):
        b = fam.block(model, i)
        h, (_, kwargs) = walker.hidden[0], walker.layer_args[i][0]
        with torch.no_grad():
            attn_in = b.attn.norm(h) if b.attn.norm is not None else h
            mid = fam.attn_residual(b, h, kwargs)
            mlp_in = b.mlp.norm(mid) if b.mlp.norm is not None else mid
        for site, x in (("attn.in", attn_in), ("mlp.in", mlp_in)):
            want = x.reshape(-1, x.shape[-1]).double().mean(0)
            torch.testing.assert_close(stats[site_name(i, site)].mean, want, rtol=1e-6, atol=1e-6)
        assert stats[site_name(i, "attn.o_in")].mean.numel() == g.n_q_heads * g.head_dim
        assert stats[site_name(i, "mlp.down_in")].mean.numel() == g.intermediate
        walker.advance(walker.run(i))


def test_phi3_fused_projections_are_cut_block_by_block():
    model = make_model("phi3")
    fam = family_for(model.config)
    hd, m = 16, 96
    b = fam.block(model, 1)
    qkv, gate_up = b.attn.module.qkv_proj.weight, b.mlp.module.gate_up_proj.weight  # [4·16 + 2·2·16, 64], [2·96, 64]
    assert torch.equal(b.attn.k.weight, qkv[4 * hd:6 * hd]) and torch.equal(b.attn.v.weight, qkv[6 * hd:])
    assert torch.equal(b.mlp.inputs[1].weight, gate_up[m:])
    plan = Plan.identity(fam.geometry(model))
    keep = list(range(0, m, 3))
    plan.layers[1] = LayerPlan(attn=AttnPlan(keep_kv_groups=[1], keep_q=[[1]]), mlp=MlpPlan(keep_channels=keep))
    pruned = surgery.apply(model, plan, fam)
    nb = fam.block(pruned, 1)
    # KV group 1 owns query heads 2, 3 (keep the second: head 3), key head 1 and value head 1.
    want_qkv = torch.cat([qkv[3 * hd:4 * hd], qkv[5 * hd:6 * hd], qkv[7 * hd:8 * hd]])
    assert torch.equal(nb.attn.module.qkv_proj.weight, want_qkv)
    idx = torch.tensor(keep)
    assert torch.equal(nb.mlp.module.gate_up_proj.weight, torch.cat([gate_up[idx], gate_up[m + idx]]))
    geo = fam.geometry(pruned)[1]
    assert (geo.n_q_heads, geo.n_kv_heads, geo.intermediate) == (1, 1, len(keep))


def test_olmo2_whole_projection_qk_norms_follow_the_kept_heads(tokens):
    model = make_model("olmo2")
    fam = family_for(model.config)
    b = fam.block(model, 1)
    assert not b.attn.qk_norm_per_head and b.attn.norm is None and b.mlp.norm is None
    plan = mixed_plan(model)  # layer 1: KV group 1, its second query head
    pruned = surgery.apply(model, plan, fam)
    nb = fam.block(pruned, 1)
    assert torch.equal(nb.attn.q_norm.weight, b.attn.q_norm.weight[48:64])
    assert torch.equal(nb.attn.k_norm.weight, b.attn.k_norm.weight[16:32])
    with surgery.simulate(model, plan) as m:
        simulated = m(tokens).logits
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(b.attn.q_norm) and "forward" not in vars(b.attn.k_norm), "simulate restores the norms"
    # Masking o_proj inputs alone is not the pruned model: the norms' statistic spans the removed heads.
    g = plan.geometry[1]
    masked = surgery._mask_inputs(b.attn.o, [c for c in range(g.n_q_heads * g.head_dim) if not 48 <= c < 64], None)
    others = Plan.identity(fam.geometry(model))
    others.layers[0], others.layers[2] = plan.layers[0], plan.layers[2]
    with surgery.simulate(model, others) as m, torch.no_grad():
        plain = m(tokens).logits
    masked()
    assert not torch.allclose(plain, simulated, atol=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_removed_sublayers_take_their_norms(family, tokens):
    model = make_model(family, tie=True)
    plan = mixed_plan(model)  # layer 0: attention dropped; layer 2: FFN dropped
    pruned = surgery.apply(model, plan)
    keys = set(pruned.state_dict())
    for name in ("input_layernorm", "post_attention_layernorm"):
        assert f"model.layers.0.{name}.weight" not in keys and f"model.layers.1.{name}.weight" in keys
    for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert f"model.layers.2.{name}.weight" not in keys and f"model.layers.0.{name}.weight" in keys
    cfg = pruned.config
    assert cfg.model_type == f"llmprune_{family}"
    assert cfg.base_layer_types == model.config.layer_types and cfg.sliding_window == SLIDING_WINDOW
    assert cfg.layer_types[0] == "mlp"  # no KV cache for the attention-free layer
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # tied head survives


@pytest.mark.parametrize("family", NEW)
def test_uniform_result_is_stock_and_reloads_without_llmprune(family, tmp_path, tokens, tiny_tokenizer):
    """Same widths everywhere and a whole block removed: the stock config, loadable by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = make_model(family, tie=family.startswith("gemma"))
    fam = family_for(model.config)
    plan = Plan.identity(fam.geometry(model))
    for lp in plan.layers:
        lp.mlp = MlpPlan(keep_channels=list(range(0, 96, 2)))
        lp.attn = AttnPlan(keep_kv_groups=[0])
    plan.layers[1] = LayerPlan(attn=AttnPlan(drop=True), mlp=MlpPlan(drop=True))
    pruned = surgery.apply(model, plan, fam)
    assert pruned.config.model_type == family and pruned.config.num_hidden_layers == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert pruned.config.layer_types == [model.config.layer_types[i] for i in (0, 2)]
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "u", plan)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and "auto_map" not in cfg
    stock = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(stock(tokens).logits, pruned(tokens).logits, rtol=1e-5, atol=1e-5)


def test_multimodal_gemma3_fails_with_the_supported_list():
    from transformers import Gemma3Config

    with pytest.raises(UnsupportedModelError, match=r"model_type 'gemma3'.*Supported model types: .*gemma2, "
                                                    r"gemma3_text.*olmo2.*phi3.*gemma3_text checkpoints"):
        family_for(Gemma3Config())


@pytest.mark.parametrize("family", NEW)
def test_finercut_exact_equals_reference(family):
    """The residual-stream search (half blocks, final norm, LM head, Gemma 2's logit soft-capping) scores
    exactly what the reference search measures with full forwards of the simulated model."""
    from .test_finercut import fc_model, order_of, plan_for

    model = fc_model(family, layers=4, tie=family.startswith("gemma"))
    tokens = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(target_sublayers=0.5, batch_size=2)
    ref = plan_for(model, tokens, mode="reference", **kw)
    exact = plan_for(model, tokens, mode="exact", **kw)
    assert order_of(exact) == order_of(ref)
    for a, b in zip(exact.extras["removal_order"], ref.extras["removal_order"]):
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("name, overrides", [
    ("wanda-sp", {"pruner.allocation": "owl", "pruner.query_heads": True}),  # OWL reads q/k/v/gate/up weights
    ("flap", {"pruner.sequential": True}),  # simulate() between layers
    ("magnitude", {"pruner.allocation": "coarse_to_fine"}),  # block similarity sites
])
def test_width_options_on_every_family(family, name, overrides, tokens):
    model = make_model(family)
    recipe = load_recipe(name, {"sparsity": 0.3, **overrides})
    plan = api.make_plan(model, recipe, tokens, progress=False)
    with surgery.simulate(model, plan) as m:
        simulated = m(tokens).logits
    pruned = surgery.apply(model, plan)
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-4, atol=1e-4)
    assert abs(plan.sparsity() - 0.3) < 0.1


def test_phi3_sliding_window_survives_non_uniform_pruning(tokens):
    """Phi-3 checkpoints set one sliding window for every layer (no layer_types): it must stay on."""
    model = make_model("phi3", sliding_window=SLIDING_WINDOW)
    plan = mixed_plan(model)
    with surgery.simulate(model, plan) as m:
        simulated = m(tokens).logits
    pruned = surgery.apply(model, plan)
    assert pruned.config.sliding_window == SLIDING_WINDOW
    assert pruned.config.layer_types == ["mlp", "sliding_attention", "sliding_attention"]
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :4]
    cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))
