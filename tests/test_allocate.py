"""Budget allocation: every strategy lands on the parameter target, respects bounds and rounding."""
from __future__ import annotations

import math

import pytest
import torch

from llmprune.calibrate.stats import RunningMoments, Stats, site_name
from llmprune.families.base import Geometry
from llmprune.prune.width.allocate import (BudgetError, LayerUnits, Rules, cfsp_keep_ratios, coarse_to_fine,
                                     global_threshold, outlier_ratio, owl, owl_keep_ratios, shape_of, standardize,
                                     uniform)
from llmprune.prune.width.budget import attn_kept_params, mlp_kept_params
from llmprune.prune.width.keeps import plan_from_keeps

GQA = Geometry(hidden=64, n_q_heads=6, n_kv_heads=3, head_dim=16, intermediate=128)
QWEN2 = Geometry(hidden=48, n_q_heads=4, n_kv_heads=2, head_dim=24, intermediate=96, qkv_bias=True)


def make_units(geo: Geometry, n_layers: int = 4, seed: int = 0) -> list[LayerUnits]:
    g = torch.Generator().manual_seed(seed)
    return [LayerUnits(geo, attn=torch.rand(geo.n_q_heads * geo.head_dim, generator=g) * (i + 1),
                       mlp=torch.rand(geo.intermediate, generator=g).pow(i + 1)) for i in range(n_layers)]


def strategies(rules: Rules):  # noqa: ANN201
    imp = [0.05, 0.3, 0.12, 0.2]
    return {
        "uniform": lambda u, p: uniform(u, p, rules),
        "global": lambda u, p: global_threshold(u, p, rules),
        "coarse_to_fine": lambda u, p: coarse_to_fine(u, p, imp[:len(u)], 13.1, rules),
        "owl": lambda u, p: owl(u, p, [0.01, 0.04, 0.02, 0.03][:len(u)], 0.08, rules),
    }


def fake_stats(units: list[LayerUnits]) -> Stats:
    st = Stats()
    for i, u in enumerate(units):
        g = u.geometry
        for site, n in (("attn.o_in", g.n_q_heads * g.head_dim), ("mlp.down_in", g.intermediate)):
            st.moments[site_name(i, site)] = RunningMoments(count=2, mean=torch.ones(n, dtype=torch.float64),
                                                            m2=torch.ones(n, dtype=torch.float64))
    return st


def kept_params(units: list[LayerUnits], keeps, compensate: bool) -> int:
    total = 0
    for u, k in zip(units, keeps):
        g = u.geometry
        attn, width = shape_of(k, g)
        total += attn_kept_params(g, *attn, compensate) if attn is not None else g.attn_params()
        total += mlp_kept_params(g, width, compensate) if width is not None else g.mlp_params()
    return total


@pytest.mark.parametrize("name", ["uniform", "global", "coarse_to_fine", "owl"])
@pytest.mark.parametrize("geo", [GQA, QWEN2], ids=["gqa", "qwen2-bias"])
@pytest.mark.parametrize("rules", [Rules(), Rules(compensate=True), Rules(query_heads=True, compensate=True)],
                         ids=["plain", "compensate", "query-heads"])
def test_budget_sums_to_target_within_one_unit(name, geo, rules):
    units = make_units(geo)
    total = sum(u.geometry.linear_params() for u in units)
    for p in (0.0, 0.1, 0.25, 0.4, 0.55):
        keeps = strategies(rules)[name](units, p)
        kept = kept_params(units, keeps, rules.compensate)
        assert abs(kept - (1 - p) * total) <= geo.ffn_channel_cost(), (name, p, kept, (1 - p) * total)
        # the Plan (what surgery builds, compensation biases included) counts the same parameters
        plan = plan_from_keeps([geo] * len(units), keeps, "t", stats=fake_stats(units), compensate=rules.compensate)
        assert plan.params_after() == kept
        for k in keeps:  # no layer above 100 % or below 0
            attn, width = shape_of(k, geo)
            assert 0 <= width <= geo.intermediate and 0 <= attn[0] <= geo.n_kv_heads


@pytest.mark.parametrize("name", ["uniform", "global", "coarse_to_fine", "owl"])
@pytest.mark.parametrize("multiple", [8, 32])
def test_rounding_keeps_multiples_and_the_budget(name, multiple):
    units = make_units(GQA)
    total = sum(u.geometry.linear_params() for u in units)
    for p in (0.15, 0.35, 0.5):
        keeps = strategies(Rules(round_to=multiple))[name](units, p)
        for k in keeps:
            assert len(k.channels) % multiple == 0 or len(k.channels) == GQA.intermediate
        kept = kept_params(units, keeps, False)
        assert abs(kept - (1 - p) * total) <= multiple * GQA.ffn_channel_cost()


def test_attention_only_budget_within_one_kv_group():
    units = [LayerUnits(u.geometry, attn=u.attn) for u in make_units(GQA)]
    total = sum(u.geometry.linear_params() for u in units)
    for p in (0.05, 0.1, 0.2):
        for fn in (uniform, global_threshold):
            kept = kept_params(units, fn(units, p), False)
            assert abs(kept - (1 - p) * total) <= GQA.kv_group_cost()


def test_uniform_keeps_equal_shapes_and_never_drops():
    units = make_units(GQA)
    keeps = uniform(units, 0.5)
    shapes = {shape_of(k, GQA)[0] for k in keeps}
    assert len(shapes) == 1 and all(k.kv_groups and k.channels for k in keeps)
    widths = [len(k.channels) for k in keeps]
    assert max(widths) - min(widths) <= 1  # only the settling remainder differs


def test_infeasible_budget_is_a_clear_error():
    mlp_only = [LayerUnits(GQA, mlp=torch.rand(GQA.intermediate)) for _ in range(2)]
    share = GQA.mlp_params() / GQA.linear_params()
    with pytest.raises(BudgetError, match="more than the prunable share"):
        uniform(mlp_only, share + 0.05)
    with pytest.raises(BudgetError, match="nothing is prunable"):
        uniform([LayerUnits(GQA)], 0.2)
    with pytest.raises(BudgetError, match=r"must be in \[0, 1\)"):
        global_threshold(mlp_only, 1.0)


# ---- global (FLAP AL-AM) ------------------------------------------------------------------------------
def test_global_threshold_hand_example():
    """Two FFN-only layers, 4 channels each; z-scores are computable by hand."""
    g = Geometry(hidden=2, n_q_heads=1, n_kv_heads=1, head_dim=2, intermediate=4)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])  # z = (x - 2.5) / 1.291
    b = torch.tensor([0.0, 0.0, 0.0, 8.0])  # z = [-0.5, -0.5, -0.5, 1.5]
    units = [LayerUnits(g, mlp=a), LayerUnits(g, mlp=b)]
    torch.testing.assert_close(standardize(b), torch.tensor([-0.5, -0.5, -0.5, 1.5], dtype=torch.float64))
    # keep 3 of 8 channels: remove 5·3·2 = 30 of 2·(4·2·2 + 3·2·4) = 80 parameters -> sparsity 0.375
    keeps = global_threshold(units, 30 / 80)
    # ranking: b3 (1.5), a3 (1.16), a2 (0.39), a1 (-0.39), then the -0.5s and a0 (-1.16)
    assert keeps[0].channels == [2, 3] and keeps[1].channels == [3]


def test_global_drops_a_module_whose_units_all_fall_below_the_threshold():
    g = Geometry(hidden=8, n_q_heads=2, n_kv_heads=2, head_dim=4, intermediate=16)
    gen = torch.Generator().manual_seed(0)
    spread = torch.cat([torch.full((4,), 10.0), torch.zeros(4)])  # group 0 far above group 1: z-means ±0.94
    units = [LayerUnits(g, attn=spread, mlp=torch.rand(16, generator=gen)) for _ in range(3)]
    units[1].attn = torch.ones(8)  # constant: z = 0 for both groups of layer 1
    keeps = global_threshold(units, 0.6)
    assert keeps[1].kv_groups == []  # layer 1 loses its attention sublayer
    assert keeps[0].kv_groups == [0] and keeps[2].kv_groups == [0]
    plan = plan_from_keeps([g] * 3, keeps, "t")
    assert plan.layers[1].attn.drop and not plan.geometry_after()[1].has_attn


def test_global_query_heads_keep_uniform_counts_per_group():
    units = make_units(GQA)
    for p in (0.2, 0.4):
        for k in global_threshold(units, p, Rules(query_heads=True)):
            if k.q_heads is not None:
                assert len({len(q) for q in k.q_heads}) == 1


# ---- coarse_to_fine (CFSP) -------------------------------------------------------------------------
def test_cfsp_keep_ratios_match_the_formula():
    imp, keep, a = [0.1, 0.2, 0.6], 0.5, 2.0
    s = [1 / (1 + math.exp(-a * (x - 0.3))) for x in imp]
    expected = [keep * v / (sum(s) / 3) for v in s]
    assert max(expected) < 1  # no clamp in this example
    assert cfsp_keep_ratios(imp, keep, a) == pytest.approx(expected)


def test_cfsp_clamp_never_keeps_more_than_everything():
    ratios = cfsp_keep_ratios([0.0, 0.0, 0.0, 5.0], keep=0.8, sharpness=50.0)
    assert max(ratios) == pytest.approx(0.8 + 0.2 / 1.05) and max(ratios) < 1
    assert sum(ratios) / 4 == pytest.approx(0.8) and min(ratios) >= 0


def test_coarse_to_fine_gives_important_layers_more():
    units = make_units(GQA)
    keeps = coarse_to_fine(units, 0.4, [0.05, 0.3, 0.12, 0.2], 13.1)
    kept = [kept_params([u], [k], False) for u, k in zip(units, keeps)]
    assert kept[1] > kept[3] > kept[2] > kept[0]


# ---- owl ---------------------------------------------------------------------------------------------
def test_owl_keep_ratios_spread_two_lambda_around_the_mean():
    ratios = owl_keep_ratios([0.01, 0.03, 0.02, 0.05], keep=0.6, lam=0.08)
    assert sum(ratios) / 4 == pytest.approx(0.6)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)
    assert ratios[3] == max(ratios) and ratios[0] == min(ratios)  # more outliers, more kept
    squeezed = owl_keep_ratios([0.0, 1.0], keep=0.95, lam=0.2)  # would exceed 1: spread shrinks
    assert max(squeezed) <= 1 and sum(squeezed) / 2 == pytest.approx(0.95)


def test_owl_budgets_follow_outlier_ratios():
    units = make_units(GQA)
    keeps = owl(units, 0.4, [0.01, 0.04, 0.02, 0.03], 0.08)
    kept = [kept_params([u], [k], False) for u, k in zip(units, keeps)]
    assert kept[1] > kept[3] > kept[2] > kept[0]


def test_outlier_ratio_by_hand():
    w = torch.tensor([[1.0, 1.0], [1.0, 12.0]])
    a = torch.tensor([1.0, 1.0])  # metric = w; mean 3.75; 2 × mean = 7.5: one entry of four above
    assert outlier_ratio([(w, a)], 2.0) == 0.25
    assert outlier_ratio([(w, a), (torch.ones(1, 4), torch.ones(4))], 2.0) == pytest.approx(1 / 8)


@pytest.mark.parametrize("geo", [GQA, QWEN2.with_(down_bias=True, mlp_in_bias=True)], ids=["plain", "biases"])
def test_lazy_ffn_levels_match_the_exact_costs(geo):
    from llmprune.prune.width.budget import ffn_levels, nearest_level

    scores = torch.rand(geo.intermediate, generator=torch.Generator().manual_seed(0))
    for compensate in (False, True):
        for step, drop in ((1, False), (8, True), (24, True)):
            lv = ffn_levels(geo, scores, step, compensate, drop)
            assert [lv[i].params for i in range(len(lv))] == [mlp_kept_params(geo, w, compensate) for w in lv.widths]
            assert lv[len(lv) - 1].score == pytest.approx(float(scores.double().sum()))
            for target in torch.linspace(0, geo.mlp_params() * 1.1, 37).tolist():
                scan = min(range(len(lv)), key=lambda i: (abs(lv[i].params - target), -i))
                assert nearest_level(lv, target) == scan


@pytest.mark.parametrize("keep", [1.0, 0.7])
def test_cfsp_keep_ratios_equal_importances(keep):
    # keep = 1 with equal importances divided 0 by 0 (ZeroDivisionError); equal importances keep `keep` everywhere.
    assert cfsp_keep_ratios([0.3, 0.3, 0.3], keep=keep, sharpness=10.0) == pytest.approx([keep] * 3)
    assert cfsp_keep_ratios([0.3, 0.3, 0.3], keep=keep, sharpness=10.0, weights=[1, 0, 2]) == pytest.approx([keep] * 3)
    assert cfsp_keep_ratios([0.1, 0.9], keep=1.0, sharpness=10.0) == [1.0, 1.0]
