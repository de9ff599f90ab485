"""FinerCut: exact search equals the straightforward one, targets, candidates, distances, report, checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmprune import api, surgery
from llmprune.checkpoint import load_pruned, save_pruned
from llmprune.cli import main
from llmprune.families import family_for
from llmprune.plan import Plan
from llmprune.prune.finercut import divergence
from llmprune.prune.width.allocate import BudgetError
from llmprune.prune import PruneContext
from llmprune.prune.finercut import FinerCutConfig, plan_at, plan_finercut
from llmprune.prune.finercut.candidates import build_candidates, front_exclusion
from llmprune.prune.finercut.report import FIGURE_FILE, removal_report
from llmprune.recipe import RecipeError, load_recipe

from .conftest import make_model
from .test_checkpoint import run_without_llmprune

# Random init at the default scale makes every sublayer nearly irrelevant; a larger one gives clear,
# depth-varying sublayer importance (and non-trivial removal orders).
INIT = 0.15


def fc_model(family: str = "llama", layers: int = 6, seed: int = 0, **kw) -> torch.nn.Module:
    return make_model(family, layers=layers, seed=seed, initializer_range=INIT, **kw)


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(3, 300, (6, 16), generator=torch.Generator().manual_seed(3))


def plan_for(model, tokens, **pruner) -> Plan:  # noqa: ANN001
    overrides = {f"pruner.{k}": v for k, v in pruner.items() if k not in ("sparsity", "batch_size")}
    overrides["calibration.batch_size"] = pruner.get("batch_size", 1)
    if "sparsity" in pruner:
        overrides["sparsity"] = pruner["sparsity"]
    elif "target_sublayers" not in pruner:
        overrides["pruner.target_sublayers"] = 0.5
    return api.make_plan(model, load_recipe("finercut", overrides), tokens, progress=False)


def order_of(plan: Plan) -> list[tuple[int, str]]:
    return [(e["layer"], e["sublayer"]) for e in plan.extras["removal_order"]]


# ---- distances -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:reduction")
def test_distances_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    zp, zq = torch.randn(3, 5, generator=g) * 2, torch.randn(3, 5, generator=g) * 2
    p, q = zp.double().softmax(-1), zq.double().softmax(-1)
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per row
        return (a * (a / b).log()).sum(-1)

    ref = {d: divergence.reference(d, zp) for d in divergence.DISTANCES}
    got = {d: divergence.token_values(d, ref[d], zq, torch.tensor([1, 4, -1])).double() for d in divergence.DISTANCES}
    torch.testing.assert_close(got["js"], 0.5 * kl(p, m) + 0.5 * kl(q, m), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["kl"], kl(p, q), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["js_official"], 0.5 * kl(m, p) + 0.5 * kl(m, q), rtol=1e-5, atol=1e-7)
    cos = (zp.double() * zq.double()).sum(-1) / (zp.double().norm(dim=-1) * zq.double().norm(dim=-1))
    torch.testing.assert_close(got["angular"], torch.acos(cos), rtol=1e-5, atol=1e-6)
    nll = -q.log()
    torch.testing.assert_close(got["perplexity"], torch.stack([nll[0, 1], nll[1, 4], nll.new_zeros(())]))

    # The official code's form: 0.5·(F.kl_div(log p, m) + F.kl_div(log q, m)) with reduction="mean" —
    # KL(m‖·), averaged over tokens × vocabulary. It is not the textbook JS.
    official = 0.5 * (F.kl_div(zp.log_softmax(-1), m.float(), reduction="mean")
                      + F.kl_div(zq.log_softmax(-1), m.float(), reduction="mean"))
    total = divergence.token_sum("js_official", ref["js_official"], zq)
    assert math.isclose(divergence.finalize("js_official", total, 3, 5), float(official), rel_tol=1e-5)
    js = divergence.finalize("js", divergence.token_sum("js", ref["js"], zq), 3, 5)
    assert not math.isclose(js, float(official), rel_tol=0.05) and not math.isclose(js / 5, float(official),
                                                                                        rel_tol=0.05)
    assert divergence.finalize("perplexity", float(nll[0, 1] + nll[1, 4]), 2, 5) == pytest.approx(
        math.exp(float(nll[0, 1] + nll[1, 4]) / 2))
    same = divergence.token_values("js", ref["js"], zp)
    assert float(same.abs().max()) < 1e-6  # identical distributions: zero, never negative
    assert (got["js"] >= 0).all() and (got["js"] <= math.log(2) + 1e-6).all()


# ---- exact search == straightforward search ---------------------------------------------------------
@pytest.mark.parametrize("distance", ["js", "js_official", "kl", "angular", "perplexity"])
def test_exact_mode_picks_the_straightforward_order(distance, calib):
    model = fc_model()
    ref = plan_for(model, calib, distance=distance, mode="reference")
    exact = plan_for(model, calib, distance=distance, mode="exact", candidate_batch=3)
    assert order_of(exact) == order_of(ref)
    assert len(order_of(ref)) == 6  # floor(0.5 · 12)
    for a, b in zip(exact.extras["removal_order"], ref.extras["removal_order"]):
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-9)
    assert exact.layers == ref.layers
    assert exact.extras["finercut"]["full_equivalents"] <= ref.extras["finercut"]["full_equivalents"]
    assert order_of(ref) != sorted(order_of(ref), key=lambda x: (-x[0], x[1]))  # a non-trivial order


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
@pytest.mark.parametrize("candidates", ["attention", "mlp", "blocks"])
def test_exact_equals_reference_other_families_and_candidate_modes(family, candidates, calib):
    model = fc_model(family, layers=5)
    kw = dict(candidates=candidates, target_sublayers=0.6, batch_size=2)
    ref = plan_for(model, calib, mode="reference", **kw)
    for batch in (1, 4):
        assert order_of(plan_for(model, calib, mode="exact", candidate_batch=batch, **kw)) == order_of(ref)
    kinds = {s for _, s in order_of(ref)}
    assert kinds == {"attention": {"attn"}, "mlp": {"mlp"}, "blocks": {"attn", "mlp"}}[candidates]
    assert ref.extras["finercut"]["steps"] == 3  # floor(0.6 · 5 candidates)


def test_exact_on_an_already_pruned_model(calib):
    base = fc_model(layers=5)
    fam = family_for(base.config)
    first = Plan.identity(fam.geometry(base))
    first.layers[1].attn.drop = True
    first.layers[3].mlp.drop = True
    pruned = surgery.apply(base, first, fam)
    ref = plan_for(pruned, calib, mode="reference", target_sublayers=0.4)
    exact = plan_for(pruned, calib, mode="exact", target_sublayers=0.4)
    assert order_of(exact) == order_of(ref) and len(order_of(ref)) == 3  # floor(0.4 · 8 present sublayers)
    assert (1, "attn") not in order_of(ref) and exact.layers[1].attn.drop and exact.layers[3].mlp.drop


# ---- targets -----------------------------------------------------------------------------------
def test_removal_order_is_nested(calib):
    model = fc_model()
    big = plan_for(model, calib, target_sublayers=0.75)
    small = plan_for(model, calib, target_sublayers=0.25)
    assert order_of(small) == order_of(big)[:3]
    assert plan_at(big, 0.25).layers == small.layers
    with pytest.raises(ValueError, match="has 9 steps"):
        plan_at(big, 0.9)


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.33])
def test_sparsity_target_stops_at_first_step_reaching_it(sparsity, calib):
    model = fc_model()
    geo = family_for(model.config).geometry(model)
    total = sum(g.linear_params() for g in geo)
    plan = plan_for(model, calib, sparsity=sparsity)
    cost = {(i, "attn"): g.attn_params() for i, g in enumerate(geo)} | {(i, "mlp"): g.mlp_params()
                                                                         for i, g in enumerate(geo)}
    removed = [cost[x] for x in order_of(plan)]
    assert sum(removed) >= sparsity * total > sum(removed[:-1])
    assert plan.sparsity() == pytest.approx(sum(removed) / total)
    assert plan.extras["finercut"]["target"]["kind"] == "sparsity"


@pytest.mark.parametrize("candidates, n", [("sublayers", 12), ("attention", 6), ("mlp", 6), ("blocks", 6)])
def test_target_sublayers_counts_candidates(candidates, n, calib):
    model = fc_model()
    plan = plan_for(model, calib, candidates=candidates, target_sublayers=0.34, mode="fast")
    steps = math.floor(0.34 * n)
    assert plan.extras["finercut"]["steps"] == steps and plan.extras["finercut"]["n_candidates"] == n
    assert len(plan.extras["removal_order"]) == steps * (2 if candidates == "blocks" else 1)


def test_front_layer_exclusion(calib):
    model = fc_model()
    with torch.no_grad():  # layer 0's attention now contributes nothing: the obvious first removal
        family_for(model.config).block(model, 0).attn.o.weight.zero_()
    free = plan_for(model, calib, target_sublayers=0.5)
    assert order_of(free)[0] == (0, "attn") and free.extras["removal_order"][0]["divergence"] < 1e-9
    cands = build_candidates(family_for(model.config).geometry(model), "sublayers")
    held, readmit = front_exclusion(cands, 0.3)  # int(12·0.3/2)+1 = 2 layers held until int(3.6)+1 = 4 removals
    assert {c.layer for c in held} == {0, 1} and readmit == 4
    plan = plan_for(model, calib, target_sublayers=0.5, exclude_front=0.3)
    order = order_of(plan)
    assert all(layer >= 2 for layer, _ in order[:4])
    assert order[4] == (0, "attn")  # back in the pool after 4 removals, and still free to remove


# ---- fast mode, determinism ------------------------------------------------------------------------
def test_fast_mode_close_to_exact(calib):
    model = fc_model(layers=8)
    exact = plan_for(model, calib, target_sublayers=0.5)
    fast = plan_for(model, calib, target_sublayers=0.5, mode="fast", **{"fast.topk_vocab": 64})
    fx, ff = exact.extras["finercut"], fast.extras["finercut"]
    assert ff["full_equivalents"] < fx["full_equivalents"]  # less scoring work (exact already abandons early)
    overlap = len(set(order_of(exact)) & set(order_of(fast))) / len(order_of(exact))
    assert overlap >= 0.75
    assert ff["final_divergence"] <= 1.25 * fx["final_divergence"]
    # top-k off and enough finalists: the fast step degenerates to the exact race
    wide = plan_for(model, calib, target_sublayers=0.5, mode="fast", **{"fast.rescore_top": 16, "fast.finalists": 16})
    assert order_of(wide) == order_of(exact)


def test_same_inputs_same_plan(calib):
    model = fc_model()
    a = plan_for(model, calib, mode="fast", **{"fast.topk_vocab": 32})
    b = plan_for(model, calib, mode="fast", **{"fast.topk_vocab": 32})
    assert a.extras["removal_order"] == b.extras["removal_order"] and a.layers == b.layers


# ---- checkpoint, CLI, report -------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["llama"])
def test_cli_run_saves_loadable_model_figure_and_order(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "fc"
    assert main(["--model", str(model_dir), "--recipe", "finercut", "--target-sublayers", "0.5",
                 "--calibration", str(text_file), "--nsamples", "4", "--seqlen", "16", "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "sublayers removed: 3 of 6 (50.0%)" in printed and "removal order" in printed
    doc = json.loads((out / "pruning.json").read_text())
    order = doc["removal_order"]
    assert len(order) == 3 and all(set(e) >= {"layer", "sublayer", "divergence"} for e in order)
    assert doc["artifacts"] == [FIGURE_FILE]
    assert (out / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["finercut"]["target"] == {"kind": "sublayers", "fraction": 0.5, "removals": 3, "candidates": 6}

    model, tok = load_pruned(out)
    cfg = model.config
    n_attn = sum(1 for layer in model.model.layers if getattr(layer, "self_attn", None) is not None)
    n_mlp = sum(1 for layer in model.model.layers if getattr(layer, "mlp", None) is not None)
    removed_blocks = sum(1 for lp in Plan.load(out).layers if lp.removed)
    assert n_attn + n_mlp == 3 and cfg.num_hidden_layers == 3 - removed_blocks
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (out / "model.safetensors.index.json").exists() else None
    if names is None:
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            names = set(f.keys())
    dropped = {(e["layer"], e["sublayer"]) for e in order}
    kept_layers = Plan.load(out).kept_layers()
    for new_i, old_i in enumerate(kept_layers):  # physically gone: no tensors of removed sublayers
        has_attn = any(n.startswith(f"model.layers.{new_i}.self_attn.") for n in names)
        has_mlp = any(n.startswith(f"model.layers.{new_i}.mlp.") for n in names)
        assert has_attn == ((old_i, "attn") not in dropped) and has_mlp == ((old_i, "mlp") not in dropped)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    remote = run_without_llmprune(out, ids)
    torch.testing.assert_close(torch.tensor(remote["logits"]), model(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(remote["gen"][0]) == ids.shape[1] + 4

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "removal order" in shown and FIGURE_FILE in shown
    for e in order:
        assert f"{e['layer']:>5}  {e['sublayer']:<9}" in shown


def test_blocks_are_renumbered_away_and_reload(tmp_path, calib, tiny_tokenizer):
    model = fc_model(layers=5, tie=True)
    plan = plan_for(model, calib, candidates="blocks", target_sublayers=0.4)
    pruned = surgery.apply(model, plan)
    assert pruned.config.num_hidden_layers == 3 and pruned.config.model_type == "llama"  # stock config
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "b", plan)
    again, _ = load_pruned(out)
    torch.testing.assert_close(again(calib).logits, pruned(calib).logits)
    assert (out / FIGURE_FILE).exists()
    text = removal_report(Plan.load(out))
    assert "attention (2)" in text and "FFN (2)" in text


def test_apply_subcommand_writes_the_figure_too(tmp_path, calib, tiny_tokenizer):
    model = fc_model(layers=4)
    plan = plan_for(model, calib, target_sublayers=0.25)
    out = save_pruned(surgery.apply(model, plan), tiny_tokenizer, tmp_path / "a", plan)
    assert json.loads((out / "pruning.json").read_text())["artifacts"] == [FIGURE_FILE]


# ---- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"pruner.target_sublayers": 0}, "pruner.target_sublayers: must be in (0, 1)"),
    ({"pruner.target_sublayers": 1.0}, "pruner.target_sublayers: must be in (0, 1)"),
    ({"pruner.exclude_front": 1.5}, "pruner.exclude_front: must be in [0, 1)"),
    ({"pruner.distance": "jsd"}, "pruner.distance:"),
    ({"pruner.candidates": "heads"}, "pruner.candidates:"),
    ({"pruner.fast.topk_vocb": 5}, "pruner.fast.topk_vocb: unknown key (did you mean 'topk_vocab'?)"),
    ({"pruner.mode": "quick"}, "pruner.mode:"),
])
def test_bad_config_is_reported_by_key(overrides, message):
    with pytest.raises(RecipeError) as e:
        load_recipe("finercut", overrides)
    assert message in str(e.value)


def test_unreachable_targets_fail_before_searching(calib):
    model = fc_model()
    with pytest.raises(BudgetError, match="candidates together hold only"):
        plan_for(model, calib, candidates="attention", sparsity=0.5)
    with pytest.raises(BudgetError, match="removes nothing"):
        plan_for(model, calib, target_sublayers=0.05)
    with pytest.raises(ValueError, match="needs calibration"):
        api.make_plan(model, load_recipe("finercut"), None, progress=False)
    ctx = PruneContext(model=model, family=family_for(model.config), sparsity=0.2, tokens=calib, offload=True)
    with pytest.raises(ValueError, match="mode: reference.*needs it in memory"):
        plan_finercut(ctx, FinerCutConfig(mode="reference"))


@pytest.mark.parametrize("family_name", ["llama"])
def test_cli_refuses_two_targets(tmp_path, model_dir, capsys):
    out = tmp_path / "o"
    assert main(["--model", str(model_dir), "--recipe", "finercut", "--sparsity", "0.2", "--target-sublayers",
                 "0.25", "-o", str(out)]) == 2
    assert "give one target" in capsys.readouterr().err and not out.exists()
    assert main(["--model", str(model_dir), "--recipe", "magnitude", "--target-sublayers", "0.25",
                 "-o", str(out)]) == 2
    assert "--target-sublayers is FinerCut's target" in capsys.readouterr().err
