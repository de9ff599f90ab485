"""apply / simulate identities on tiny models of every family."""
from __future__ import annotations

import copy

import pytest
import torch

from llmprune import surgery
from llmprune.families import family_for
from llmprune.plan import AttnPlan, LayerPlan, MlpPlan, Plan, PlanError, attn_kept_channels, removed_indices

from .conftest import make_model


def mixed_plan(model: torch.nn.Module, compensate: bool = False) -> Plan:
    """Layer 0: attention dropped. Layer 1: one KV group kept with one query head per group, FFN halved.
    Layer 2: FFN dropped. With `compensate`, FLAP-style biases for the removed channels."""
    fam = family_for(model.config)
    geo = fam.geometry(model)
    plan = Plan.identity(geo)
    g1 = geo[1]
    plan.layers[0].attn = AttnPlan(drop=True)
    attn = AttnPlan(keep_kv_groups=[1], keep_q=[[1]])
    keep = list(range(0, g1.intermediate, 2))
    mlp = MlpPlan(keep_channels=keep)
    if compensate:
        gen = torch.Generator().manual_seed(3)
        n_att = g1.n_q_heads * g1.head_dim - len(attn_kept_channels(g1, attn))
        attn.compensate = torch.randn(n_att, generator=gen).tolist()
        mlp.compensate = torch.randn(g1.intermediate - len(keep), generator=gen).tolist()
    plan.layers[1] = LayerPlan(attn=attn, mlp=mlp)
    plan.layers[2].mlp = MlpPlan(drop=True)
    plan.validate()
    return plan


def test_identity_plan_is_bit_identical(tiny_model, tokens):
    ref = tiny_model(tokens).logits
    fam = family_for(tiny_model.config)
    pruned = surgery.apply(tiny_model, Plan.identity(fam.geometry(tiny_model)), fam)
    assert type(pruned) is type(tiny_model)  # uniform result keeps the stock class
    assert torch.equal(pruned(tokens).logits, ref)


def test_masking_equals_slicing(tiny_model, tokens):
    """Zeroing the o_proj / down_proj input columns of removed units gives the sliced model's logits."""
    plan = mixed_plan(tiny_model)
    fam = family_for(tiny_model.config)
    masked = copy.deepcopy(tiny_model)
    g1 = plan.geometry[1]
    with torch.no_grad():
        b1 = fam.block(masked, 1)
        gone = removed_indices(attn_kept_channels(g1, plan.layers[1].attn), g1.n_q_heads * g1.head_dim)
        b1.attn.o.weight[:, gone] = 0
        b1.mlp.down.weight[:, removed_indices(plan.layers[1].mlp.keep_channels, g1.intermediate)] = 0
        b0, b2 = fam.block(masked, 0), fam.block(masked, 2)
        b0.attn.o.weight.zero_()
        if b0.attn.o.bias is not None:
            b0.attn.o.bias.zero_()
        b2.mlp.down.weight.zero_()
    pruned = surgery.apply(tiny_model, plan, fam)
    torch.testing.assert_close(pruned(tokens).logits, masked(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compensate", [False, True])
def test_simulate_equals_apply(tiny_model, tokens, compensate):
    plan = mixed_plan(tiny_model, compensate=compensate)
    ref = tiny_model(tokens).logits
    with surgery.simulate(tiny_model, plan) as m:
        simulated = m(tokens).logits
    assert torch.equal(tiny_model(tokens).logits, ref), "simulate must undo every change"
    pruned = surgery.apply(tiny_model, plan)
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(simulated, ref, atol=1e-3), "the plan must change the output"


def test_compensation_is_exact_for_constant_channels(tokens):
    """If removed channels are constant, the mean-bias reproduces the dense output exactly."""
    model = make_model("llama")
    fam = family_for(model.config)
    geo = fam.geometry(model)
    block = fam.block(model, 1)
    removed = list(range(10, 40))
    const = torch.linspace(-1, 1, len(removed))

    def force(_m, args):  # make the removed down_proj inputs constant in the dense model
        x = args[0].clone()
        x[..., removed] = const
        return (x,)

    h = block.mlp.down.register_forward_pre_hook(force)
    dense = model(tokens).logits
    h.remove()
    keep = [c for c in range(geo[1].intermediate) if c not in removed]
    plan = Plan.identity(geo)
    plan.layers[1].mlp = MlpPlan(keep_channels=keep, compensate=const.tolist())
    pruned = surgery.apply(model, plan, fam)
    torch.testing.assert_close(pruned(tokens).logits, dense, rtol=1e-5, atol=1e-5)


def test_generate_after_dropping_attention(tiny_model):
    plan = mixed_plan(tiny_model)  # layer 0 has no attention at all
    pruned = surgery.apply(tiny_model, plan)
    assert pruned.config.model_type == "llmprune_llama"
    prompt = torch.tensor([[5, 17, 42, 8]])
    with_cache = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
    no_cache = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 12)
    assert torch.equal(with_cache, no_cache)
    static = pruned.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(static, no_cache)
    pruned.config._attn_implementation = "eager"  # the per-layer attention modules follow the live config
    assert torch.equal(pruned.generate(prompt, max_new_tokens=8, do_sample=False), no_cache)


def test_whole_block_removal_renumbers_and_stays_stock(tokens):
    model = make_model("qwen2", layers=3)
    fam = family_for(model.config)
    plan = Plan.identity(fam.geometry(model))
    plan.layers[1] = LayerPlan(attn=AttnPlan(drop=True), mlp=MlpPlan(drop=True))
    with surgery.simulate(model, plan):
        simulated = model(tokens).logits
    pruned = surgery.apply(model, plan, fam)
    assert pruned.config.model_type == "qwen2" and pruned.config.num_hidden_layers == 2
    torch.testing.assert_close(pruned(tokens).logits, simulated, rtol=1e-5, atol=1e-5)


def test_uniform_width_keeps_stock_config(tokens):
    model = make_model("llama")
    fam = family_for(model.config)
    plan = Plan.identity(fam.geometry(model))
    for lp in plan.layers:
        lp.mlp = MlpPlan(keep_channels=list(range(0, 96, 3)))
        lp.attn = AttnPlan(keep_kv_groups=[0])
    pruned = surgery.apply(model, plan, fam)
    assert pruned.config.model_type == "llama"
    assert (pruned.config.intermediate_size, pruned.config.num_key_value_heads) == (32, 1)


def test_apply_leaves_input_model_untouched(tiny_model, tokens):
    ref = tiny_model(tokens).logits
    surgery.apply(tiny_model, mixed_plan(tiny_model, compensate=True))
    assert torch.equal(tiny_model(tokens).logits, ref)


def test_repruning_a_pruned_model(tokens):
    model = make_model("llama")
    first = surgery.apply(model, mixed_plan(model))
    fam = family_for(first.config)
    geo = fam.geometry(first)
    assert not geo[0].has_attn and not geo[2].has_mlp
    plan = Plan.identity(geo)
    plan.layers[0].attn = AttnPlan(drop=True)
    plan.layers[2].mlp = MlpPlan(drop=True)
    plan.layers[0].mlp = MlpPlan(keep_channels=list(range(48)))
    with surgery.simulate(first, plan):
        simulated = first(tokens).logits
    second = surgery.apply(first, plan, fam)
    torch.testing.assert_close(second(tokens).logits, simulated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_plan, message", [
    (LayerPlan(attn=AttnPlan(keep_kv_groups=[0, 5])), "indices must lie"),
    (LayerPlan(attn=AttnPlan(keep_kv_groups=[1, 0])), "sorted and unique"),
    (LayerPlan(attn=AttnPlan(keep_kv_groups=[])), "use drop: true"),
    (LayerPlan(attn=AttnPlan(keep_q=[[0], [0, 1]])), "same, non-zero number"),
    (LayerPlan(mlp=MlpPlan(keep_channels=[0, 1], compensate=[0.0])), "compensate has 1 means"),
    (LayerPlan(mlp=MlpPlan(drop=True, keep_channels=[1])), "drop excludes"),
])
def test_plan_validation_errors(layer_plan, message):
    model = make_model("llama")
    plan = Plan.identity(family_for(model.config).geometry(model))
    plan.layers[1] = layer_plan
    with pytest.raises(PlanError, match=message):
        plan.validate()


def test_plan_for_another_model_is_rejected():
    small, other = make_model("llama"), make_model("llama", intermediate_size=80)
    plan = mixed_plan(small)
    with pytest.raises(PlanError, match="plan was made for"):
        surgery.apply(other, plan)


def test_plan_json_round_trip(tmp_path):
    model = make_model("qwen3")
    plan = mixed_plan(model, compensate=True)
    plan.extras["note"] = "x"
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back.to_dict() == plan.to_dict() and back.extras["note"] == "x"
    assert back.layers == plan.layers and back.geometry == plan.geometry


def _decoder_linear_params(model) -> int:
    fam = family_for(model.config)
    return sum(p.numel() for layer in fam.layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)
               for p in m.parameters())


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("compensate", [False, True])
def test_plan_parameter_counts_match_the_pruned_model(family_name, compensate):
    """params_before/after and sparsity() count what the models really hold (compensation biases included)."""
    model = make_model(family_name)
    plan = mixed_plan(model, compensate=compensate)
    pruned = surgery.apply(model, plan)
    before, after = _decoder_linear_params(model), _decoder_linear_params(pruned)
    assert (plan.params_before(), plan.params_after()) == (before, after) and after < before
    assert plan.sparsity() == pytest.approx(1 - after / before)
