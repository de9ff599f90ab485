"""Property-based tests (hypothesis): random valid plans on every family, random recipe dictionaries.

Kept small for CI (2 cores): few examples, tiny 2-layer models, no deadline.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmprune import surgery  # noqa: E402
from llmprune.checkpoint import load_pruned, save_pruned  # noqa: E402
from llmprune.families import family_for  # noqa: E402
from llmprune.families.base import Geometry  # noqa: E402
from llmprune.plan import AttnPlan, LayerPlan, MlpPlan, Plan, attn_kept_channels  # noqa: E402
from llmprune.recipe import RecipeError, builtin_recipes, load_recipe  # noqa: E402

from .conftest import NO_LLMPRUNE_PREAMBLE, FAMILIES, make_model  # noqa: E402

FUZZ = settings(max_examples=4, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IDS = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(5))


@st.composite
def subset(draw: st.DrawFn, n: int) -> list[int]:
    """A sorted non-empty proper-or-full subset of range(n)."""
    return sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))


def means(draw: st.DrawFn, n: int) -> list[float] | None:
    if not draw(st.booleans()):
        return None
    return draw(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=n, max_size=n))


@st.composite
def attn_plan(draw: st.DrawFn, g: Geometry) -> AttnPlan:
    kind = draw(st.sampled_from(["keep", "drop", "slice"]))
    if kind == "keep":
        return AttnPlan()
    if kind == "drop":
        return AttnPlan(drop=True, compensate=means(draw, g.n_q_heads * g.head_dim))
    groups = draw(subset(g.n_kv_heads))
    a = AttnPlan(keep_kv_groups=groups if len(groups) < g.n_kv_heads else None)
    if draw(st.booleans()):
        per = draw(st.integers(1, g.group_size))
        a.keep_q = [sorted(draw(st.sets(st.integers(0, g.group_size - 1), min_size=per, max_size=per)))
                    for _ in groups]
    removed = g.n_q_heads * g.head_dim - len(attn_kept_channels(g, a))
    a.compensate = means(draw, removed)
    return a


@st.composite
def mlp_plan(draw: st.DrawFn, g: Geometry) -> MlpPlan:
    kind = draw(st.sampled_from(["keep", "drop", "slice"]))
    if kind == "keep":
        return MlpPlan()
    if kind == "drop":
        return MlpPlan(drop=True, compensate=means(draw, g.intermediate))
    keep = draw(subset(g.intermediate))
    return MlpPlan(keep_channels=keep, compensate=means(draw, g.intermediate - len(keep)))


@st.composite
def plans(draw: st.DrawFn, geometry: list[Geometry]) -> Plan:
    layers = [LayerPlan(attn=draw(attn_plan(g)), mlp=draw(mlp_plan(g))) for g in geometry]
    plan = Plan(layers=layers, geometry=list(geometry))
    assume(plan.kept_layers())  # removing every layer is refused by validate (tested elsewhere)
    # a plan without any attention is refused at save (checkpoint.check_runnable; tests/test_faults.py)
    assume(any(not lp.attn.drop for lp in layers))
    plan.validate()
    return plan


MODELS = {f: make_model(f, layers=2) for f in FAMILIES}


# Loads every listed checkpoint in a fresh interpreter where `import llmprune` is impossible (only the
# code shipped in the checkpoint), and prints the largest logit difference to the expected logits.
NO_LLMPRUNE_MANY = NO_LLMPRUNE_PREAMBLE + textwrap.dedent("""
    from transformers import AutoModelForCausalLM
    ids, diffs = torch.tensor(json.loads(sys.argv[1])), []
    for d in sys.argv[2:]:
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        with torch.no_grad():
            diffs.append(float((m(ids).logits - torch.load(d + "/expected.pt")).abs().max()))
    print(json.dumps(diffs))
""")


@pytest.mark.parametrize("family", FAMILIES)
def test_random_plans_apply_save_reload_equal_simulate(family, tmp_path):
    model = MODELS[family]
    fam = family_for(model.config)
    geometry = fam.geometry(model)
    remote: list[str] = []  # non-uniform checkpoints, checked without llmprune at the end (one process)

    @FUZZ
    @given(plan=plans(geometry))
    def check(plan: Plan) -> None:
        with torch.no_grad(), surgery.simulate(model, plan, fam):
            expected = model(IDS).logits
        pruned = surgery.apply(model, plan, fam)
        with torch.no_grad():
            torch.testing.assert_close(pruned(IDS).logits, expected, rtol=1e-4, atol=1e-4)
        out = save_pruned(pruned, None, tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}", plan)
        loaded, _ = load_pruned(out, with_tokenizer=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-4, atol=1e-4)
        if loaded.config.model_type == "llmprune_llama":
            torch.save(expected, out / "expected.pt")
            remote.append(str(out))

    check()
    if remote:
        proc = subprocess.run([sys.executable, "-c", NO_LLMPRUNE_MANY, json.dumps(IDS.tolist()), *remote],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
        assert proc.returncode == 0, proc.stderr[-2000:]
        diffs = json.loads(proc.stdout.strip().splitlines()[-1])
        assert len(diffs) == len(remote) and max(diffs) < 1e-4, diffs


# ---- recipes ----------------------------------------------------------------------------------------
RECIPES = {name: yaml.safe_load(path.read_text()) for name, path in builtin_recipes().items()}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.floats(-1, 2, allow_nan=False),
                   st.sampled_from(["", "abc", "AL-AM", "wifv", "js", "uniform"]), st.lists(st.integers(0, 3), max_size=2))


def _paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _paths(v, prefix + k + ".")
    return out


@st.composite
def mutated_recipes(draw: st.DrawFn) -> tuple[dict, str]:
    """A built-in recipe with one key set to a random value, or one unknown key added; returns (data, key)."""
    name = draw(st.sampled_from(sorted(RECIPES)))
    data = yaml.safe_load(yaml.safe_dump(RECIPES[name]))
    paths = [p for p in _paths(data) if p != "method"]
    if draw(st.booleans()):
        key = draw(st.sampled_from(paths))
    else:
        parent = draw(st.sampled_from(["", "calibration.", "pruner."]))
        key = parent + draw(st.sampled_from(["bogus", "sparsty", "metrc", "nsample"]))
    node = data
    *head, last = key.split(".")
    for part in head:
        node = node.setdefault(part, {})
    node[last] = draw(VALUES)
    return data, key


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=mutated_recipes())
def test_random_recipes_validate_or_name_the_key(case):
    data, key = case
    try:
        load_recipe(data=data)
    except RecipeError as e:
        msg = str(e)
        leaf = key.split(".")[-1]
        assert leaf in msg, f"error for {key!r} does not name it: {msg}"
