"""Evaluation end to end on the real offline model (SmolLM2-135M): lm-eval, perplexity and bench.

A non-uniform plan (attention removed in the deepest 6 of 30 layers) is applied in memory and saved;
both must give the same scores, the dense baseline must beat chance on the local task, and the bench
must produce a complete speed section.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import llmprune as lp
from llmprune import api
from llmprune.evaluate.bench import BenchSettings
from llmprune.evaluate.runner import EvalRequest, PerplexityRequest
from llmprune.evaluate.tasks import parse_task_spec
from llmprune.plan import AttnPlan, Plan

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data" / "tiny_mc"


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory):  # noqa: ANN001, ANN201
    loaded = lp.load("smollm2-135m", device="cpu", dtype="float32")
    geo = loaded.family.geometry(loaded.model)
    plan = Plan.identity(geo, base_model=loaded.base_model)
    for i in range(len(geo) - 6, len(geo)):
        plan.layers[i].attn = AttnPlan(drop=True)
    pruned = lp.apply(loaded.model, plan)
    out = tmp_path_factory.mktemp("smol") / "attn6"
    lp.save_pruned(pruned, loaded.tokenizer, out, plan, info={"provenance": {"model_arg": "smollm2-135m"}})
    tasks = tmp_path_factory.mktemp("tasks")
    cfg = yaml.safe_load((DATA / "tiny_mc.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str((DATA / "tiny_mc.jsonl").resolve())
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump(cfg))
    return pruned, loaded.tokenizer, out, tasks


def _request(tasks: Path, baseline: str | None) -> EvalRequest:
    return EvalRequest(tasks=parse_task_spec("tiny_mc"), include_paths=[str(tasks)], batch_size=4, baseline=baseline,
                       perplexity=PerplexityRequest(source="python-docs", seqlen=128, max_windows=2))


def test_in_memory_and_saved_smollm2_give_the_same_scores(pruned_pair):
    pruned, tok, out, tasks = pruned_pair
    mem = api.run_eval(pruned, _request(tasks, None), tokenizer=tok).run
    disk = api.run_eval(str(out), _request(tasks, "base"), report_dir=out).report
    assert disk["tasks"]["tiny_mc"]["all_metrics"] == mem["tasks"]["tiny_mc"]["all_metrics"]
    ppl_mem, ppl_disk = mem["perplexity"]["python-docs"], disk["perplexity"]["python-docs"]
    assert ppl_disk["pruned"] == pytest.approx(ppl_mem["pruned"], rel=1e-4)
    task = disk["tasks"]["tiny_mc"]
    assert task["baseline"] >= 0.5  # the dense model answers most of the 12 easy questions (chance: 0.25)
    assert task["retained_pct"] == pytest.approx(100 * task["pruned"] / task["baseline"])
    assert 1 < ppl_disk["baseline"] < ppl_disk["pruned"]


def test_bench_smollm2(pruned_pair):
    _, _, out, _ = pruned_pair
    settings = BenchSettings(prompt_len=32, decode_tokens=4, batch_sizes=(1,), repeats=2, warmup=1, threads=1)
    speed = api.run_bench(str(out), "base", settings, device="cpu", dtype="float32", progress=False)["speed"]
    assert speed["ideal_speedup"] > 1.0 and speed["prefill_speedup"] > 0 and speed["decode_speedup"] > 0
    assert speed["kv_cache_saving"] == pytest.approx(6 / 30)  # 6 of 30 layers keep no KV cache
    runs = {r["model"]: r for r in speed["runs"]}
    assert runs["dense"]["peak_mem_bytes"] > runs["dense"]["weight_bytes"] > runs["pruned"]["weight_bytes"]
