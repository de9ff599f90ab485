"""Width pruners on the real offline model (SmolLM2-135M-Instruct, GQA 9 q / 3 KV heads): FLAP keeps the
model usable where the weight-norm baseline collapses. Small calibration and evaluation sets (minutes on CPU)."""
from __future__ import annotations

import pytest

import llmprune as lp
from llmprune import api, surgery
from llmprune.evaluate.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():  # noqa: ANN201
    loaded = lp.load("smollm2-135m", device="cpu", dtype="float32")
    eval_ids, _ = lp.data.eval_tokens(loaded.tokenizer, "python-docs", split="test")
    return loaded, eval_ids


def ppl(model, eval_ids) -> float:  # noqa: ANN001
    return perplexity(model, eval_ids, seqlen=128, max_windows=8, progress=False).perplexity


def test_flap_beats_magnitude_and_stays_near_dense(smol):
    loaded, eval_ids = smol
    dense = ppl(loaded.model, eval_ids)
    results = {}
    for name in ("magnitude", "flap"):
        recipe = lp.load_recipe(name, {"sparsity": 0.2, "calibration.source": "python-docs",
                                       "calibration.nsamples": 16, "calibration.seqlen": 128})
        tokens, _ = api.calibration_tokens(loaded.tokenizer, recipe)
        plan = api.make_plan(loaded.model, recipe, tokens, family=loaded.family, progress=False)
        assert abs(plan.sparsity() - 0.2) < 1e-4
        results[name] = ppl(surgery.apply(loaded.model, plan, loaded.family), eval_ids)
    assert results["flap"] < 2 * dense
    assert results["flap"] * 100 < results["magnitude"]
