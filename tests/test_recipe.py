"""Recipes: every built-in validates and plans on a tiny model; bad keys are reported by path."""
from __future__ import annotations

import pytest

from llmprune import api
from llmprune.prune import get_pruner
from llmprune.recipe import RecipeError, builtin_recipes, load_recipe, parse_override

from .conftest import make_model


def test_builtin_recipes_exist():
    assert "magnitude" in builtin_recipes()


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_recipe_validates_and_plans(name, tokens):
    recipe = load_recipe(name)
    model = make_model("llama", layers=3)
    calib = tokens if get_pruner(recipe.method).wants_data(recipe.options) else None
    plan = api.make_plan(model, recipe, calib, progress=False)
    plan.validate()
    assert plan.method == recipe.method
    assert plan.recipe["method"] == recipe.method


@pytest.mark.parametrize("overrides, path", [
    ({"pruner.atention": True}, "pruner.atention: unknown key (did you mean 'attention'?)"),
    ({"calibration.nsample": 4}, "calibration.nsample: unknown key (did you mean 'nsamples'?)"),
    ({"sparsity": 1.2}, "sparsity: must be in [0, 1)"),
    ({"sparsity": -0.1}, "sparsity: must be in [0, 1)"),
    ({"calibration.seqlen": 1}, "calibration.seqlen:"),
    ({"method": "flapp"}, "method: unknown method 'flapp'"),
])
def test_recipe_errors_name_the_key(overrides, path):
    with pytest.raises(RecipeError) as e:
        load_recipe("magnitude", overrides)
    assert path in str(e.value)


def test_unknown_top_level_key_in_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: magnitude\nsparsity: 0.3\nsparsty: 0.4\n")
    with pytest.raises(RecipeError, match=r"sparsty: unknown key \(did you mean 'sparsity'\?\)"):
        load_recipe(str(p))


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="built-in recipes: .*magnitude"):
        load_recipe("magnitud")


def test_yaml_path_and_overrides(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("method: magnitude\nsparsity: 0.3\npruner: {mlp: false}\n")
    r = load_recipe(str(p), {"sparsity": 0.1, "calibration.seed": 7})
    assert r.recipe.sparsity == 0.1 and r.recipe.calibration.seed == 7 and r.options.mlp is False
    pruner = r.to_dict()["pruner"]
    assert (pruner["attention"], pruner["mlp"], pruner["allocation"]) == (True, False, "uniform")


def test_parse_override_types():
    assert parse_override("pruner.metric=ifv") == ("pruner.metric", "ifv")
    assert parse_override("sparsity=0.25") == ("sparsity", 0.25)
    assert parse_override("pruner.mlp=false") == ("pruner.mlp", False)
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_override("sparsity")


def test_same_inputs_same_plan(tokens):
    model = make_model("qwen2")
    r = load_recipe("magnitude", {"sparsity": 0.3})
    a = api.make_plan(model, r, None, progress=False)
    b = api.make_plan(model, r, None, progress=False)
    assert a.to_dict() == b.to_dict()
    assert abs(a.sparsity() - 0.3) < 0.05
