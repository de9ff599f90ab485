"""Wanda-sp (scores by hand, sequential propagation) and CFSP (scores by hand, faithful mode, invariance)."""
from __future__ import annotations

import pytest
import torch

from llmprune import api, surgery
from llmprune.calibrate import calibrate
from llmprune.calibrate.stats import site_name
from llmprune.families import family_for
from llmprune.prune.width import cfsp as cfsp_mod
from llmprune.prune.width.allocate import LayerKeep, shape_of
from llmprune.prune.width.cfsp import ffn_relative_importance
from llmprune.prune.width.keeps import plan_from_keeps
from llmprune.prune.width.wanda_sp import wanda_channel_scores
from llmprune.prune.width.engine import block_importance
from llmprune.recipe import RecipeError, load_recipe

from .conftest import make_model


def test_wanda_sp_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [2.0, 0.0], [-2.0, 1.0]])  # [out 3, in 2]
    a = torch.tensor([2.0, 3.0])  # ‖X_j‖₂
    # column means of |W|: 5/3 and 1
    torch.testing.assert_close(wanda_channel_scores(w, a), torch.tensor([10 / 3, 3.0], dtype=torch.float64))


def test_sequential_wanda_sp_scores_layer_two_on_pruned_layer_one(tokens):
    """Layer 1's statistics come from inputs that went through the pruned layer 0 (as the original)."""
    model = make_model("llama")
    fam = family_for(model.config)
    recipe = load_recipe("wanda-sp", {"sparsity": 0.3, "pruner.compensate": True})
    plan = api.make_plan(model, recipe, tokens, progress=False)
    assert plan.recipe["pruner"]["sequential"] is True
    geo = fam.geometry(model)
    keep0 = LayerKeep(kv_groups=plan.layers[0].attn.keep_kv_groups, channels=plan.layers[0].mlp.keep_channels)
    only0 = plan_from_keeps(geo, [keep0, LayerKeep(), LayerKeep()], "t", stats=calibrate(model, tokens, progress=False),
                            compensate=True)
    with surgery.simulate(model, only0):
        propagated = calibrate(model, tokens, progress=False)
    dense = calibrate(model, tokens, progress=False)
    removed = sorted(set(range(geo[1].intermediate)) - set(plan.layers[1].mlp.keep_channels))
    site = site_name(1, "mlp.down_in")
    torch.testing.assert_close(torch.tensor(plan.layers[1].mlp.compensate, dtype=torch.float64), propagated[site].mean[removed])
    assert not torch.allclose(torch.tensor(plan.layers[1].mlp.compensate, dtype=torch.float64), dense[site].mean[removed])


def test_sequential_with_global_allocation_keeps_the_dense_sizes(tokens):
    model = make_model("qwen3")
    dense = api.make_plan(model, load_recipe("wanda-sp", {"sparsity": 0.4, "pruner.allocation": "global",
                                                          "pruner.sequential": False}), tokens, progress=False)
    seq = api.make_plan(model, load_recipe("wanda-sp", {"sparsity": 0.4, "pruner.allocation": "global"}), tokens,
                        progress=False)
    assert [g.intermediate for g in seq.geometry_after()] == [g.intermediate for g in dense.geometry_after()]
    assert seq.params_after() == dense.params_after()
    assert len({g.intermediate for g in seq.geometry_after()}) > 1  # global really is non-uniform here


def test_cfsp_relative_importance_by_hand():
    down = torch.tensor([[1.0, 2.0, 1.0], [0.0, 1.0, 3.0]])  # [d 2, m 3]
    up = torch.tensor([[1.0, 0.0], [1.0, 2.0], [2.0, 2.0]])  # [m 3, d 2]
    gate = torch.tensor([[2.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    a = torch.tensor([1.0, 2.0, 1.0])
    expected = []
    for j in range(3):
        down_share = sum(down[i, j] * a[j] / sum(down[i, k] * a[k] for k in range(3)) for i in range(2)) / 2
        up_share = sum(up[j, i] / sum(up[k, i] for k in range(3)) for i in range(2)) / 2
        gate_share = sum(gate[j, i] / sum(gate[k, i] for k in range(3)) for i in range(2)) / 2
        expected.append(float((down_share + up_share + gate_share) * a[j]))
    got = ffn_relative_importance(down, [gate, up], a, b=1.0, c=1.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_released_cfsp_score_collapses_to_the_activation_norm_but_ours_does_not():
    g = torch.Generator().manual_seed(0)
    d, m = 6, 10
    down, up, gate = torch.rand(d, m, generator=g), torch.rand(m, d, generator=g), torch.rand(m, d, generator=g)
    a = torch.rand(m, generator=g) + 0.1
    # released `three_w_one_wa`: each term normalized over its own channel, then averaged over it
    w_under = down * a
    released = ((w_under / w_under.sum(0)) + (up.t() / up.t().sum(0)) + (gate.t() / gate.t().sum(0))).mean(0) * a
    torch.testing.assert_close(released, 3 / d * a)
    ours = ffn_relative_importance(down, [gate, up], a, 1.0, 1.0)
    down2 = down.clone()
    down2[:, ours.argmax()] *= 0.01  # the same activations, a much weaker weight column
    assert ffn_relative_importance(down2, [gate, up], a, 1.0, 1.0).argmax() != ours.argmax()


def test_faithful_cfsp_ranks_ffn_channels_by_activation_norm_only(tokens):
    model = make_model("llama")
    plan = api.make_plan(model, load_recipe("cfsp", {"sparsity": 0.2, "pruner.faithful": True,
                                                     "pruner.attention": False}), tokens, progress=False)
    stats = calibrate(model, tokens, progress=False)
    for i, lp in enumerate(plan.layers):
        assert lp.attn.is_identity()
        norms = stats[site_name(i, "mlp.down_in")].l2()
        top = torch.topk(norms, len(lp.mlp.keep_channels)).indices.sort().values.tolist()
        assert lp.mlp.keep_channels == top


def test_coarse_to_fine_is_invariant_to_duplicating_the_calibration_set(tokens):
    model = make_model("qwen2")
    twice = torch.cat([tokens, tokens])
    once_stats = calibrate(model, tokens, sites=("block",), progress=False)
    twice_stats = calibrate(model, twice, sites=("block",), progress=False)
    assert block_importance(once_stats, 3) == pytest.approx(block_importance(twice_stats, 3), rel=1e-12)
    for name in ("cfsp", "magnitude", "wanda-sp"):
        r = load_recipe(name, {"sparsity": 0.4, "pruner.allocation": "coarse_to_fine"})
        a = api.make_plan(model, r, tokens, progress=False)
        b = api.make_plan(model, r, twice, progress=False)
        assert [lp.__dict__ for lp in a.layers] == [lp.__dict__ for lp in b.layers], name
        assert len({g.intermediate for g in a.geometry_after()}) > 1  # the allocation is not uniform here


def test_faithful_cfsp_sigmoid_scales_with_calibration_size(tokens, monkeypatch):
    seen = []
    real = cfsp_mod.allocate

    def spy(ctx, units, opts, stats, sharpness=None):  # noqa: ANN001, ANN202
        seen.append(sharpness)
        return real(ctx, units, opts, stats, sharpness=sharpness)

    monkeypatch.setattr(cfsp_mod, "allocate", spy)
    model = make_model("llama")
    r = load_recipe("cfsp", {"sparsity": 0.2, "pruner.faithful": True, "pruner.attention": False})
    api.make_plan(model, r, tokens, progress=False)
    api.make_plan(model, r, torch.cat([tokens, tokens]), progress=False)
    n = tokens.numel()
    assert seen == pytest.approx([13.1072 * n / 131072, 13.1072 * 2 * n / 131072])  # a·n_tokens/1e4 with a = 1


def test_shape_of_round_trips_keep_shape():
    keep = LayerKeep(kv_groups=[1], q_heads=[[0]], channels=[0, 5, 7])
    from llmprune.families.base import Geometry

    g = Geometry(hidden=8, n_q_heads=4, n_kv_heads=2, head_dim=2, intermediate=10)
    assert shape_of(keep, g) == ((1, 1), 3)
    assert shape_of(LayerKeep(kv_groups=[]), g) == ((0, 0), None)


@pytest.mark.parametrize("name, overrides, message", [
    ("cfsp", {"pruner.faithful": True}, "faithful CFSP prunes FFN channels only"),
    ("cfsp", {"pruner.faithful": True, "pruner.attention": False, "pruner.allocation": "owl"},
     "faithful CFSP is its coarse-to-fine allocation"),
    ("wanda-sp", {"pruner.allocation": "random"}, "pruner.allocation: Input should be"),
    ("magnitude", {"pruner.sequential": True}, "pruner.sequential: unknown key"),
    ("wanda-sp", {"pruner.b": 1}, "pruner.b: unknown key"),
])
def test_bad_config_errors(name, overrides, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(name, overrides)
    assert message in str(e.value)


def test_magnitude_needs_data_only_when_asked():
    from llmprune.prune import get_pruner

    spec = get_pruner("magnitude")
    assert not spec.wants_data(load_recipe("magnitude").options)
    assert not spec.wants_data(load_recipe("magnitude", {"pruner.allocation": "global"}).options)
    assert spec.wants_data(load_recipe("magnitude", {"pruner.allocation": "owl"}).options)
    assert spec.wants_data(load_recipe("magnitude", {"pruner.compensate": True}).options)
    model = make_model("llama")
    with pytest.raises(ValueError, match="needs calibration tokens"):
        api.make_plan(model, load_recipe("magnitude", {"pruner.allocation": "coarse_to_fine"}), None, progress=False)
