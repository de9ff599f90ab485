"""FLAP compensation of fully removed sublayers: a bias-only sublayer (its mean output) in plan, surgery,
checkpoint and remote code."""
from __future__ import annotations

import json

import pytest
import torch

from llmprune import surgery
from llmprune.calibrate import calibrate
from llmprune.checkpoint import load_pruned, save_pruned
from llmprune.families import family_for
from llmprune.plan import AttnPlan, MlpPlan, Plan, PlanError, sublayer_plan
from llmprune.prune.width.allocate import LayerKeep
from llmprune.prune.width.keeps import plan_from_keeps

from .conftest import make_model
from .test_checkpoint import run_without_llmprune


def test_fully_removed_sublayers_keep_their_mean_output(tokens):
    model = make_model("llama")
    fam = family_for(model.config)
    geo = fam.geometry(model)
    stats = calibrate(model, tokens, progress=False)
    keeps = [LayerKeep(kv_groups=[], channels=None), LayerKeep(kv_groups=None, channels=[]), LayerKeep()]
    plan = plan_from_keeps(geo, keeps, "flap", stats=stats, compensate=True)
    a, m = plan.layers[0].attn, plan.layers[1].mlp
    assert a.drop and a.compensate is not None and len(a.compensate) == geo[0].n_q_heads * geo[0].head_dim
    assert m.drop and m.compensate is not None and len(m.compensate) == geo[1].intermediate
    # the bias is counted: hidden parameters per bias-only sublayer
    assert plan.geometry_after()[0].attn_params() == geo[0].hidden
    # without compensation a removed sublayer leaves nothing
    bare = plan_from_keeps(geo, keeps, "flap", stats=stats, compensate=False)
    assert bare.layers[0].attn.compensate is None and bare.geometry_after()[0].attn_params() == 0


def bias_only_plan(model: torch.nn.Module) -> Plan:
    fam = family_for(model.config)
    geo = fam.geometry(model)
    gen = torch.Generator().manual_seed(1)
    plan = Plan.identity(geo)
    plan.layers[0].attn = AttnPlan(drop=True, compensate=torch.randn(geo[0].n_q_heads * geo[0].head_dim,
                                                                     generator=gen).tolist())
    plan.layers[1].mlp = MlpPlan(drop=True, compensate=torch.randn(geo[1].intermediate, generator=gen).tolist())
    plan.layers[2].mlp = MlpPlan(drop=True)  # a plain removal beside them
    plan.validate()
    return plan


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bias_only_apply_simulate_save_reload(family, tokens, tmp_path, tiny_tokenizer):
    model = make_model(family)
    fam = family_for(model.config)
    plan = bias_only_plan(model)
    with surgery.simulate(model, plan, fam):
        sim = model(tokens).logits
    pruned = surgery.apply(model, plan, fam)
    torch.testing.assert_close(pruned(tokens).logits, sim, rtol=1e-5, atol=1e-5)
    names = set(pruned.state_dict())
    assert "model.layers.0.attn_residual.bias" in names and "model.layers.1.mlp_residual.bias" in names
    assert not any(n.startswith("model.layers.2.mlp") for n in names)

    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "ckpt", plan)
    per_layer = json.loads((out / "config.json").read_text())["per_layer_config"]
    assert per_layer["0"]["skip"] == ["attention"] and per_layer["0"]["o_proj_bias"] is True
    assert per_layer["1"]["skip"] == ["mlp"] and per_layer["1"]["down_proj_bias"] is True
    assert per_layer["2"]["skip"] == ["mlp"] and not per_layer["2"].get("down_proj_bias", False)
    loaded, _ = load_pruned(out)
    torch.testing.assert_close(loaded(tokens).logits, sim, rtol=1e-5, atol=1e-5)
    remote = run_without_llmprune(out, tokens)
    torch.testing.assert_close(torch.tensor(remote["logits"]), sim, rtol=1e-4, atol=1e-4)

    # re-pruning keeps the bias-only sublayers: geometry sees them, an identity plan changes nothing
    geo = fam.geometry(loaded)
    assert not geo[0].has_attn and geo[0].o_bias and not geo[1].has_mlp and geo[1].down_bias
    again = surgery.apply(loaded, sublayer_plan(geo, set()), fam)
    torch.testing.assert_close(again(tokens).logits, sim, rtol=1e-5, atol=1e-5)


def test_bias_only_mean_output_equals_inputs_at_their_means(tokens):
    model = make_model("llama")
    fam = family_for(model.config)
    plan = bias_only_plan(model)
    block = fam.block(model, 0)
    mean = torch.tensor(plan.layers[0].attn.compensate)
    only_attn = Plan.identity(plan.geometry)
    only_attn.layers[0].attn = plan.layers[0].attn
    with torch.no_grad():
        h = torch.randn(2, 5, model.config.hidden_size)
        expected = block.attn.o(mean.expand(2, 5, -1))  # o_proj with every input channel at its mean
    with surgery.simulate(model, only_attn, fam):
        out, _ = block.attn.module(hidden_states=h, position_embeddings=None, attention_mask=None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_bias_only_plan_validation():
    model = make_model("llama")
    geo = family_for(model.config).geometry(model)
    plan = Plan.identity(geo)
    plan.layers[0].attn = AttnPlan(drop=True, compensate=[0.0] * 3)
    with pytest.raises(PlanError, match="means of all"):
        plan.validate()


def test_plan_removing_every_layer_is_refused_but_bias_only_layers_stay():
    model = make_model("llama", layers=2)
    fam = family_for(model.config)
    geo = fam.geometry(model)
    gone = sublayer_plan(geo, set()).__class__.identity(geo)
    for lp in gone.layers:
        lp.attn, lp.mlp = AttnPlan(drop=True), MlpPlan(drop=True)
    with pytest.raises(PlanError, match="removes every decoder layer"):
        gone.validate()  # was an IndexError deep inside surgery.apply
    gone.layers[1].mlp.compensate = [0.5] * geo[1].intermediate  # layer 1 becomes bias-only: kept
    gone.validate()
    assert gone.kept_layers() == [1]
    pruned = surgery.apply(model, gone, fam)
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()  # attention-free model: no KV cache needed
