"""The vocabulary bound: never above the exact per-token value, tight where it should be, and an exact
search that uses it still picks the straightforward order while skipping most full LM-head work."""
from __future__ import annotations

import pytest
import torch

from llmprune.prune.finercut import divergence, vocab_bound
from llmprune.prune.finercut.vocab_bound import VocabBound, coarse_bound

from .test_finercut import calib, fc_model, order_of, plan_for  # noqa: F401  (calib is a fixture)

V, D = 500, 32


def _case(seed: int, temperature: float, shift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense and pruned hidden states [n, D], a head [V, D] and next-token targets [n] (some −1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    hp = torch.randn(40, D, generator=g) * temperature
    hq = hp + shift * torch.randn(40, D, generator=g) * torch.rand(40, 1, generator=g)
    targets = torch.randint(0, V, (40,), generator=g)
    targets[::9] = -1
    return hp, hq, w, targets


@pytest.mark.parametrize("distance", vocab_bound.BOUNDED)
@pytest.mark.parametrize("k", [1, 8, 64, V])
@pytest.mark.parametrize("temperature, shift", [(0.5, 0.3), (4.0, 0.3), (4.0, 3.0), (12.0, 1.0), (4.0, 0.0)])
def test_bound_never_exceeds_the_exact_value(distance, k, temperature, shift):
    hp, hq, w, targets = _case(k, temperature, shift)
    zp, zq = hp @ w.T, hq @ w.T
    exact = divergence.token_values(distance, divergence.reference(distance, zp), zq, targets).double()
    bound = VocabBound(distance, w, None, k)
    bound.add_chunk([(zp[:25], targets[:25]), (zp[25:], targets[25:])])  # two row blocks, one chunk
    lower = bound.values(0, hq)
    assert lower.shape == exact.shape and (lower >= 0).all()
    assert (lower <= exact).all(), float((lower - exact).max())
    if shift == 0.0 and distance != "perplexity":  # identical distributions: no divergence to bound
        assert float(lower.max()) == 0.0
    if k == V and distance != "perplexity":  # nothing merged: the bound is the value, less the margin
        big = exact > 1e-3
        torch.testing.assert_close(lower[big], exact[big], rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("distance", ["js", "js_official", "kl"])
def test_coarse_bound_is_the_minimum_over_the_unknown_share(distance):
    """Brute force over the share s = q(kept tokens): the bound is (just below) the smallest value."""
    g = torch.Generator().manual_seed(1)
    p_full = torch.softmax(torch.randn(6, 20, generator=g) * 2, -1).double()
    z = torch.randn(6, 12, generator=g) * 2
    p, p_rest = p_full[:, :12], p_full[:, 12:].sum(-1)
    got = coarse_bound(distance, p, p_rest, z)
    r = torch.softmax(z.double(), -1)
    grid = torch.linspace(1e-6, 1 - 1e-6, 20001, dtype=torch.float64)
    for i in range(6):
        pp = torch.cat([p[i], p_rest[i:i + 1]])
        qq = torch.cat([grid[:, None] * r[i], (1 - grid)[:, None]], -1)  # [G, 13]
        values = divergence._raw_values(distance, pp.log().expand_as(qq), qq.log(), None)
        assert float(got[i]) <= float(values.min()) + 1e-12
        assert float(got[i]) == pytest.approx(float(values.min()), rel=1e-6, abs=1e-9)


def test_angular_has_no_bound():
    assert not vocab_bound.supports("angular")
    with pytest.raises(ValueError, match="no vocabulary bound"):
        VocabBound("angular", torch.zeros(4, 2), None, 2)


@pytest.mark.parametrize("distance", ["js", "kl", "perplexity"])
def test_exact_search_with_the_bound_is_still_exact_and_skips_head_work(distance, calib):  # noqa: F811
    model = fc_model(layers=8)
    ref = plan_for(model, calib, distance=distance, mode="reference")
    plain = plan_for(model, calib, distance=distance, bound_topk=0)
    bounded = plan_for(model, calib, distance=distance, bound_topk=16)
    assert order_of(bounded) == order_of(plain) == order_of(ref)
    for a, b in zip(bounded.extras["removal_order"], ref.extras["removal_order"]):
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-9)
    with_bound, without = bounded.extras["finercut"], plain.extras["finercut"]
    assert without["bounded_chunks"] == 0 and without["bound_tokens"] == 0
    assert with_bound["bounded_chunks"] > 0 and with_bound["bound_tokens"] > 0
    assert with_bound["head_tokens"] < without["head_tokens"]  # losers were ruled out on the slice


def test_bound_with_candidate_batches_and_fast_mode(calib):  # noqa: F811
    model = fc_model(layers=8)
    ref = plan_for(model, calib, mode="reference", target_sublayers=0.4)
    stacked = plan_for(model, calib, candidate_batch=4, bound_topk=8, target_sublayers=0.4)
    assert order_of(stacked) == order_of(ref)
    wide = plan_for(model, calib, mode="fast", bound_topk=8, target_sublayers=0.4,
                    **{"fast.rescore_top": 16, "fast.finalists": 16})
    assert order_of(wide) == order_of(ref)


def test_uneven_micro_batches_are_not_stacked_together(calib):  # noqa: F811
    """5 sequences in micro-batches of 2: the last chunk has another shape, so it forms its own stack."""
    model = fc_model(layers=6)
    tokens = calib[:5]
    ref = plan_for(model, tokens, mode="reference", batch_size=2, target_sublayers=0.4)
    got = plan_for(model, tokens, batch_size=2, candidate_batch=6, bound_topk=8, target_sublayers=0.4)
    assert order_of(got) == order_of(ref)
