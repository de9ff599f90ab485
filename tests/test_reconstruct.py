"""Least-squares reconstruction, structured OBS and the per-layer search (issue 14), on tiny models."""
from __future__ import annotations

import logging

import pytest
import torch

from llmprune import api, surgery
from llmprune.families import family_for
from llmprune.plan import Plan, PlanError, sidecar_path
from llmprune.prune.width.obs import ObsSelector, obs_remove
from llmprune.prune.width.reconstruct import Gram, ReconstructionError, output_error, record_grams, refit
from llmprune.recipe import load_recipe

from .conftest import make_model


def _gram(x: torch.Tensor) -> torch.Tensor:
    g = Gram()
    g.update(x)
    return g.matrix()


def _data(n: int = 400, d_in: int = 8, d_out: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64)
    return x, w, b


def test_product_sums_match_float64_across_flushes():
    """accumulate.ProductSum: float32 GEMMs folded into a float64 total every FLUSH_TOKENS tokens equal the
    float64 sum (and Gram's augmented matrix is assembled from it)."""
    from llmprune.prune.width.accumulate import FLUSH_TOKENS, ProductSum

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(1000, 6, generator=gen) + 2.0 for _ in range(3 * FLUSH_TOKENS // 1000)]
    ref = sum(b.double().T @ b.double() for b in batches)
    acc, g = ProductSum(torch.float64), Gram()
    for b in batches:
        acc.add(b, b)
        g.update(b)
    torch.testing.assert_close(acc.result(), ref, rtol=1e-5, atol=0)  # float32 sums of <= 8k products
    x = torch.cat(batches).double()
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(g.matrix(), xt.T @ xt / len(x), rtol=1e-5, atol=0)
    low = ProductSum(torch.float32)  # hessian_dtype: float32 sums in place, no buffer
    for b in batches:
        low.add(b, b)
    assert low.result().dtype == torch.float32 and low._buf is None
    torch.testing.assert_close(low.result().double(), ref, rtol=1e-4, atol=0)


def test_symmetric_product_sum_is_the_full_second_moment():
    """Gram's ProductSum sums only the upper-triangle panels of xᵀx and mirrors them: equal to the full
    float64 product over several panels (a partial last one too), exactly symmetric, in both dtypes."""
    from llmprune.prune.width.accumulate import PANEL, ProductSum

    gen = torch.Generator().manual_seed(4)
    p = 2 * PANEL + 37
    batches = [torch.randn(300, p, generator=gen) + 0.5 for _ in range(3)]
    ref = sum(b.double().T @ b.double() for b in batches)
    for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        acc = ProductSum(dtype, symmetric=True)
        for b in batches:
            acc.add(b, b)
        got = acc.result()
        assert got.dtype == dtype and torch.equal(got, got.T)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    with pytest.raises(ValueError, match="add\\(a, a\\)"):
        ProductSum(symmetric=True).add(batches[0], batches[1])


def test_cross_moment_over_kept_columns_matches_the_full_one():
    """targets.cross_moment(columns=K): the kept inputs' columns and the constant equal the full P's, the
    others are zero (the refit reads only K̃; formed after the choice, it skips the removed inputs' products)."""
    from llmprune.prune.width.targets import cross_moment

    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(2, 5, 12, generator=gen) for _ in range(3)]
    ts = [torch.randn(2, 5, 4, generator=gen) for _ in range(3)]
    kept = [0, 3, 4, 9, 11]
    full = cross_moment(xs, ts.__getitem__)
    part = cross_moment(xs, ts.__getitem__, columns=kept)
    k = kept + [12]
    torch.testing.assert_close(part[:, k], full[:, k], rtol=1e-6, atol=1e-7)
    gone = [c for c in range(12) if c not in kept]
    assert part.shape == full.shape and torch.count_nonzero(part[:, gone]) == 0


def test_refit_with_nothing_removed_is_the_identity():
    x, w, b = _data()
    new_w, new_b = refit(w, b, _gram(x), list(range(w.shape[1])), damp=0.01)
    assert torch.equal(new_w, w) and torch.equal(new_b, b)


def test_removed_channel_that_is_a_combination_of_kept_ones_is_reconstructed_exactly():
    x, w, b = _data()
    x[:, 7] = 2 * x[:, 0] - x[:, 3] + 0.5  # channel 7 = linear combination of kept channels and the constant
    kept = list(range(7))
    h = _gram(x)
    new_w, new_b = refit(w, b, h, kept, damp=1e-10)
    dense = x @ w.T + b
    err = (x[:, kept] @ new_w.T + new_b - dense).abs().max()
    assert err < 1e-6
    assert output_error(w, b, h, new_w, new_b, kept) < 1e-10
    # without the refit (plain slicing) the error is large, with FLAP-style mean compensation still nonzero
    assert (x[:, kept] @ w[:, kept].T + b - dense).abs().max() > 0.1
    flap_b = b + w[:, 7] * x[:, 7].mean()
    assert (x[:, kept] @ w[:, kept].T + flap_b - dense).abs().max() > 0.1


def test_refit_is_least_squares_and_beats_slicing_at_default_damping():
    x, w, b = _data(d_in=10, seed=3)
    kept = [0, 2, 3, 5, 8, 9]
    h = _gram(x)
    lw, lb = refit(w, b, h, kept, damp=0.0 + 1e-12)
    xa = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(xa, x @ w.T + b).solution.T  # [out, |K|+1]
    torch.testing.assert_close(lw, sol[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(lb, sol[:, -1], rtol=1e-6, atol=1e-8)
    dw, db = refit(w, b, h, kept)  # damp 0.01: between the exact fit and slicing
    exact, damped = output_error(w, b, h, lw, lb, kept), output_error(w, b, h, dw, db, kept)
    assert exact <= damped < output_error(w, b, h, w[:, kept], b, kept)


def test_singular_second_moment_escalates_damping_with_a_warning(caplog):
    x, w, b = _data()
    x[:, 1] = 0.0  # a dead channel: H is singular
    x[:, 2] = x[:, 3]  # and two identical ones
    with caplog.at_level(logging.WARNING, logger="llmprune.prune.width.reconstruct"):
        new_w, new_b = refit(w, b, _gram(x), [0, 1, 2, 3, 5], damp=0.0)
    assert "damping raised" in caplog.text
    assert torch.isfinite(new_w).all() and torch.isfinite(new_b).all()


def test_non_finite_second_moment_fails_clearly():
    x, w, b = _data()
    h = _gram(x)
    h[0, 0] = float("nan")
    with pytest.raises(ReconstructionError, match="not positive definite"):
        refit(w, b, h, [0, 2, 4], damp=0.01)


@torch.no_grad()
def _layer_inputs(model: torch.nn.Module, tokens: torch.Tensor, layer: int, which: str) -> torch.Tensor:
    fam = family_for(model.config)
    block = fam.block(model, layer)
    mod = block.attn.o if which == "o" else block.mlp.down
    g = {"x": Gram()}
    with record_grams({"x": mod}, g):
        model(tokens)
    return g["x"].matrix()


def test_obs_update_beats_the_same_selection_without_update(tokens):
    model = make_model("llama")
    down = family_for(model.config).block(model, 1).mlp.down
    h = _layer_inputs(model, tokens, 1, "down")
    m = down.weight.shape[1]
    wa = torch.cat([down.weight.double(), torch.zeros(down.weight.shape[0], 1, dtype=torch.float64)], 1)
    gone, updated = obs_remove(wa, h, [[j] for j in range(m)], m // 2, per_step=4, damp=0.01)
    kept = [j for j in range(m) if j not in set(gone)]
    assert len(gone) == m // 2 and torch.equal(updated[:, gone], torch.zeros_like(updated[:, gone]))
    err_obs = output_error(down.weight, None, h, updated[:, kept], updated[:, -1], kept)
    err_plain = output_error(down.weight, None, h, down.weight[:, kept], None, kept)
    assert err_obs < 0.5 * err_plain
    # the accumulated OBS updates equal the least-squares refit on the kept columns
    rw, rb = refit(down.weight, None, h, kept, damp=0.01)
    torch.testing.assert_close(updated[:, kept], rw, rtol=1e-5, atol=1e-7)


def test_obs_toward_a_target_removes_what_the_refit_objective_misses_least():
    """obs_remove(cross=P): one greedy step removes the column whose loss is smallest for the refit's own
    objective E‖T − W'x̃‖² + λ‖W' − W‖² with that column at 0 (brute force over every column); with
    P = W H (the module target) it is the plain OBS."""
    gen = torch.Generator().manual_seed(1)
    n, d_out, n_tok = 12, 5, 600
    x = torch.randn(n_tok, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(n_tok, 1, dtype=torch.float64)], 1)  # x̃ = [x; 1]
    w = torch.cat([torch.randn(d_out, n, generator=gen, dtype=torch.float64), torch.zeros(d_out, 1, dtype=torch.float64)], 1)
    t = xt @ w.T + x @ torch.randn(n, d_out, generator=gen, dtype=torch.float64)  # a target W x̃ misses
    h, p = xt.T @ xt / n_tok, t.T @ xt / n_tok
    lam = 0.01 * float(h.diagonal()[:-1].mean())

    def objective(j: int) -> float:
        k = [c for c in range(n + 1) if c != j]
        wk = (p[:, k] + lam * w[:, k]) @ torch.linalg.inv(h[k][:, k] + lam * torch.eye(n, dtype=torch.float64))
        # the removed column's weights become 0: its ‖0 − W_j‖² is part of the objective
        return float(((t - xt[:, k] @ wk.T) ** 2).sum(1).mean() + lam * (((wk - w[:, k]) ** 2).sum() + (w[:, j] ** 2).sum()))

    losses = [objective(j) for j in range(n)]
    groups = [[j] for j in range(n)]
    gone, _ = obs_remove(w, h, groups, 1, damp=0.01, cross=p)
    assert gone == [min(range(n), key=losses.__getitem__)]
    assert obs_remove(w, h, groups, 1, damp=0.01)[0] != gone  # the dense weights' choice misses it here
    plain, _ = obs_remove(w, h, groups, 4, damp=0.01)
    same, _ = obs_remove(w, h, groups, 4, damp=0.01, cross=w @ h)
    assert same == plain


def test_gqa_kv_group_is_its_query_heads_o_proj_columns(tokens):
    """4 q / 2 KV heads: KV group 1 owns query heads 2, 3, i.e. o_proj columns 2·hd .. 4·hd."""
    model = make_model("llama")
    fam = family_for(model.config)
    g = fam.geometry(model)[0]
    hd = g.head_dim
    h = _layer_inputs(model, tokens, 0, "o")
    sel = ObsSelector(damp=0.01, ffn_batch=4)
    keep = sel.attn(0, fam.block(model, 0), g, None, h, (1, g.group_size))
    assert keep.kv_groups in ([0], [1])
    recipe = load_recipe("flap", {"sparsity": 0.5, "pruner.reconstruct": "ls", "pruner.structure": "UL-UM",
                                  "calibration.batch_size": 2})
    plan = api.make_plan(model, recipe, tokens, progress=False)
    layer = next(i for i, lp in enumerate(plan.layers) if lp.attn.keep_kv_groups is not None)
    grp = plan.layers[layer].attn.keep_kv_groups[0]
    cols = list(range(grp * g.group_size * hd, (grp + 1) * g.group_size * hd))
    assert plan.tensors[f"L{layer}.attn.o.weight"].shape == (g.hidden, len(cols))
    if layer == 0:  # layer 0's inputs are the dense model's: the refit can be recomputed by hand
        o = fam.block(model, 0).attn.o
        rw, rb = refit(o.weight, o.bias, h, cols, damp=0.01)
        torch.testing.assert_close(plan.tensors["L0.attn.o.weight"], rw.float())
        torch.testing.assert_close(plan.tensors["L0.attn.o.bias"], rb.float())


@pytest.mark.parametrize("method,overrides", [
    ("flap", {"pruner.reconstruct": "ls"}),
    ("wanda-sp", {"pruner.reconstruct": "ls"}),
    ("magnitude", {"pruner.reconstruct": "ls"}),
    ("cfsp", {"pruner.reconstruct": "ls", "pruner.allocation": "uniform"}),
    ("obs", {}),
    ("obs", {"pruner.allocation": "coarse_to_fine"}),
])
def test_reconstruction_lowers_the_output_error_and_apply_equals_simulate(method, overrides, tokens):
    model = make_model("qwen2")  # q/k/v biases
    fam = family_for(model.config)
    base = dict(sparsity=0.4, **{"calibration.batch_size": 8})
    calib = torch.randint(3, 320, (16, 32), generator=torch.Generator().manual_seed(5))
    dense = model(tokens).logits
    plan = api.make_plan(model, load_recipe(method, {**base, **overrides}), calib, progress=False)
    assert plan.tensors and abs(plan.sparsity() - 0.4) < 0.01
    for i, lp in enumerate(plan.layers):  # the FFN refit saw the removed channels (not masked to zero)
        if lp.mlp.keep_channels is not None:
            down = fam.block(model, i).mlp.down.weight[:, lp.mlp.keep_channels]
            assert (plan.tensors[f"L{i}.mlp.down.weight"] - down).abs().max() > 1e-4
    pruned = surgery.apply(model, plan, fam)
    with surgery.simulate(model, plan, fam):
        sim = model(tokens).logits
    out = pruned(tokens).logits
    torch.testing.assert_close(out, sim, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for n, p in pruned.named_parameters() if ".layers." in n and "norm" not in n) \
        == plan.params_after()
    if method != "obs":
        plain = dict(overrides, **{"pruner.reconstruct": "none"})
        ref = surgery.apply(model, api.make_plan(model, load_recipe(method, {**base, **plain}), calib,
                                                 progress=False), fam)(tokens).logits
        assert (out - dense).pow(2).mean() < (ref - dense).pow(2).mean()


def test_zero_sparsity_with_reconstruction_is_the_identity(tokens):
    model = make_model("llama")
    plan = api.make_plan(model, load_recipe("wanda-sp", {"sparsity": 0.0, "pruner.reconstruct": "ls"}), tokens,
                         progress=False)
    assert plan.is_identity() and not plan.tensors
    torch.testing.assert_close(surgery.apply(model, plan)(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_plan_side_car_round_trip(tmp_path, tokens):
    model = make_model("llama")
    plan = api.make_plan(model, load_recipe("obs", {"sparsity": 0.3}), tokens, progress=False)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert sidecar_path(path).exists() and '"tensors"' in path.read_text()
    back = Plan.load(path)
    assert set(back.tensors) == set(plan.tensors)
    torch.testing.assert_close(surgery.apply(model, back)(tokens).logits, surgery.apply(model, plan)(tokens).logits)
    sidecar_path(path).unlink()
    lonely = Plan.load(path)  # inspecting still works; applying says what is missing
    with pytest.raises(ValueError, match="plan.safetensors"):
        surgery.apply(model, lonely)
    bad = Plan.load(path)
    bad.tensors = {k: v[:, :1] if v.ndim == 2 else v for k, v in plan.tensors.items()}
    bad.tensor_manifest = {}
    with pytest.raises(PlanError, match="shape"):
        bad.validate()


def _search_recipe(seed: int = 0, **kw: object) -> object:
    return load_recipe("wanda-sp", {"sparsity": 0.35, "calibration.seed": seed, "calibration.batch_size": 2,
                                    "pruner.allocation": "search", "pruner.search.generations": 4,
                                    "pruner.search.offspring": 6, "pruner.search.samples": 2, **kw})


def test_search_meets_the_budget_exactly_and_is_deterministic(tokens):
    model = make_model("llama", layers=4)
    for rc in ("none", "ls"):
        uni = api.make_plan(model, _search_recipe(**{"pruner.allocation": "uniform", "pruner.reconstruct": rc}),
                            tokens, progress=False)
        a = api.make_plan(model, _search_recipe(**{"pruner.reconstruct": rc}), tokens, progress=False)
        b = api.make_plan(model, _search_recipe(**{"pruner.reconstruct": rc}), tokens, progress=False)
        assert a.params_after() == uni.params_after()
        assert surgery.apply(model, a).num_parameters() == surgery.apply(model, uni).num_parameters()
        assert a.to_dict()["layers"] == b.to_dict()["layers"]
        assert a.extras["search"] == b.extras["search"]
        s = a.extras["search"]
        assert s["kl_best"] <= s["kl_centre"] and s["generations"] >= 1
        assert list(s["history"]) == sorted(s["history"], reverse=True)
    # around another allocation's sizes: that allocation's budget, met exactly
    c2f = api.make_plan(model, _search_recipe(**{"pruner.allocation": "coarse_to_fine"}), tokens, progress=False)
    a = api.make_plan(model, _search_recipe(**{"pruner.search.start": "coarse_to_fine"}), tokens, progress=False)
    b = api.make_plan(model, _search_recipe(**{"pruner.search.start": "coarse_to_fine"}), tokens, progress=False)
    assert a.params_after() == c2f.params_after() and a.to_dict()["layers"] == b.to_dict()["layers"]
    assert a.extras["search"]["start"] == "coarse_to_fine" and a.extras["search"]["kl_best"] <= \
        a.extras["search"]["kl_centre"]


def test_search_options_are_checked(tokens):
    with pytest.raises(Exception, match="query_heads"):
        _search_recipe(**{"pruner.query_heads": True})
    model = make_model("llama")
    with pytest.raises(ValueError, match="search.samples"):
        api.make_plan(model, _search_recipe(**{"pruner.search.samples": 99}), tokens, progress=False)


def test_checkpoint_round_trip_with_refit_biases(tmp_path, tokens, tiny_tokenizer):
    """Refit biases make o_proj / down_proj gain a bias (non-uniform config); save -> load is exact."""
    from llmprune.checkpoint import load_pruned, save_pruned

    model = make_model("llama")
    plan = api.make_plan(model, load_recipe("obs", {"sparsity": 0.3, "pruner.allocation": "coarse_to_fine"}),
                         tokens, progress=False)
    pruned = surgery.apply(model, plan)
    assert any(g.o_bias or g.down_bias for g in plan.geometry_after())
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "ck", plan)
    back, _ = load_pruned(out)
    torch.testing.assert_close(back(tokens).logits, pruned(tokens).logits)
    assert "tensors" in Plan.load(out).to_dict()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3", "olmo2"])
@pytest.mark.parametrize("method,overrides", [("obs", {}), ("wanda-sp", {"pruner.reconstruct": "ls"}),
                                              ("obs", {"pruner.reconstruct_target": "residual"}),
                                              ("wanda-sp", {"pruner.reconstruct": "ls",
                                                            "pruner.reconstruct_target": "dense"})])
def test_replayed_sublayers_give_the_same_plan_as_recomputing(family, method, overrides, monkeypatch):
    """replay.py: the walk's pass B / C stand-ins (recorded o_proj / down_proj inputs), and pass C as the FFN
    entry's residual + down_proj' where no post-norm follows the FFN, change nothing."""
    from llmprune.prune.width import reconstruct, replay

    model = make_model(family)
    calib = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(2))
    recipe = load_recipe(method, {"sparsity": 0.4, "calibration.batch_size": 4, **overrides})
    calls = []
    real_stand_in = replay.Replay.stand_in
    monkeypatch.setattr(replay.Replay, "stand_in", lambda self, *a, **k: calls.append(1) or real_stand_in(self, *a, **k))
    shortcuts = []
    real_advance = reconstruct.advance_by_residual
    monkeypatch.setattr(reconstruct, "advance_by_residual", lambda *a: shortcuts.append(1) or real_advance(*a))
    fast = api.make_plan(model, recipe, calib, progress=False)
    assert calls  # the stand-ins were used
    post_norm = family_for(model.config).block(model, 0).mlp.post_norm is not None
    assert bool(shortcuts) == (not post_norm)  # Gemma 2 / OLMo 2 normalise the FFN's output: the full pass C
    monkeypatch.setattr(replay, "MAX_BYTES", 0)  # too big to record: recompute every pass
    slow = api.make_plan(model, recipe, calib, progress=False)
    assert fast.to_dict() == slow.to_dict()
    assert fast.tensors.keys() == slow.tensors.keys()
    for k in fast.tensors:
        torch.testing.assert_close(fast.tensors[k], slow.tensors[k], rtol=1e-4, atol=2e-5)  # float32 products


@pytest.mark.parametrize("method,overrides,gate_passes,down_passes", [
    # obs: A stops after the attention, B before down_proj (its input is all the refit needs), C replays down_proj
    ("obs", {"pruner.allocation": "uniform", "pruner.reconstruct_target": "module"}, 1, 1),
    ("obs", {"pruner.allocation": "uniform", "pruner.reconstruct_target": "residual"}, 2, 2),  # + pass D (dense)
    ("flap", {"pruner.reconstruct": "ls"}, 1, 1),  # the refit walk of a fixed selection records no statistics
    ("flap", {"pruner.sequential": True, "pruner.reconstruct": "ls"}, 2, 2)])  # A's FFN statistics: FLAP's score
def test_walk_passes_compute_only_what_they_record(method, overrides, gate_passes, down_passes):
    """Pass A of the layer walk stops after the attention unless a statistic past it is wanted; pass B stops
    before down_proj; only the dense stream (pass D) and the advancing pass C compute down_proj."""
    model = make_model("llama")
    fam = family_for(model.config)
    calib = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(2))
    recipe = load_recipe(method, {"sparsity": 0.4, "calibration.batch_size": 4, **overrides})
    n = len(fam.layers(model))
    gate, down = [0] * n, [0] * n
    handles = []
    for i in range(n):
        mlp = fam.block(model, i).mlp
        handles.append(mlp.inputs[0].register_forward_hook(lambda *_, i=i: gate.__setitem__(i, gate[i] + 1)))
        handles.append(mlp.down.register_forward_hook(lambda *_, i=i: down.__setitem__(i, down[i] + 1)))
    try:
        api.make_plan(model, recipe, calib, progress=False)
    finally:
        for h in handles:
            h.remove()
    dense = 1 if recipe.options.allocation != "uniform" else 0  # the allocation's dense pass
    assert gate == [2 * (gate_passes + dense)] * n  # 2 micro-batches per pass
    assert down == [2 * (down_passes + dense)] * n


def test_allocation_statistics_read_only_the_first_sequences_when_asked():
    """allocation_nsamples: the sizes' dense pass reads that many sequences; refused where it also selects."""
    model = make_model("llama")
    fam = family_for(model.config)
    calib = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(2))
    counts = []
    hook = fam.block(model, 0).mlp.down.register_forward_hook(lambda _m, args, _o: counts.append(args[0].shape[0]))
    try:
        for n in (None, 4):
            counts.clear()
            recipe = load_recipe("obs", {"sparsity": 0.4, "calibration.batch_size": 4, "pruner.allocation_nsamples": n,
                                         "pruner.reconstruct_target": "module"})
            api.make_plan(model, recipe, calib, progress=False)
            # down_proj in the dense pass, then in the walk's pass C on all 8 sequences (B stops before it)
            assert counts == ([4, 4] if n is None else [4]) + [4, 4]
    finally:
        hook.remove()
    with pytest.raises(Exception, match="allocation_nsamples applies only"):
        load_recipe("flap", {"pruner.allocation_nsamples": 16})
    assert load_recipe("flap", {"pruner.allocation_nsamples": 16, "pruner.sequential": True})


def test_reconstruct_target_needs_a_refit():
    with pytest.raises(Exception, match="reconstruct_target.*add reconstruct: ls"):
        load_recipe("flap", {"pruner.reconstruct_target": "residual"})
    assert load_recipe("obs", {"pruner.reconstruct_target": "residual"}).options.reconstruct_target == "residual"
    with pytest.raises(Exception, match="reconstruct_target"):
        load_recipe("obs", {"pruner.reconstruct_target": "dens"})


def test_residual_target_with_few_tokens_warns(caplog):
    model = make_model("llama")
    few = torch.randint(3, 320, (2, 8), generator=torch.Generator().manual_seed(3))  # 16 tokens
    with caplog.at_level(logging.WARNING):
        api.make_plan(model, load_recipe("obs", {"sparsity": 0.3, "pruner.reconstruct_target": "residual"}), few,
                      progress=False)
    assert "may overfit" in caplog.text and "reconstruct_target: module" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        api.make_plan(model, load_recipe("obs", {"sparsity": 0.3, "pruner.reconstruct_target": "module"}), few,
                      progress=False)
    assert "may overfit" not in caplog.text
