"""Report merging, rendering and the baseline cache."""
from __future__ import annotations

import json

import pytest

from llmprune import api, loading, surgery
from llmprune.checkpoint import save_pruned
from llmprune.evaluate.report import (REPORT_FORMAT, ReportError, load_report, merge_reports, new_report,
                                      render_markdown, save_report)
from llmprune.evaluate.runner import EvalRequest, PerplexityRequest

from .conftest import make_model
from .test_surgery import mixed_plan


def _task(pruned: float, baseline: float | None, metric: str = "acc") -> dict:
    return {"metric": metric, "pruned": pruned, "baseline": baseline, "num_fewshot": 0, "limit": None,
            "higher_is_better": True, "all_metrics": {metric: pruned}}


def test_merge_keeps_earlier_sections_and_recomputes_averages():
    old = new_report("m", "base", {"device": "cpu"})
    old["perplexity"] = {"wikitext2": {"split": "test", "seqlen": 128, "n_windows": 4, "pruned": 20.0,
                                       "baseline": 15.0}}
    old["tasks"] = {"a": _task(0.5, 0.8), "b": _task(0.3, 0.6)}
    old["speed"] = {"prefill_speedup": 1.2}
    merged = merge_reports(None, old)
    assert merged["tasks"]["a"]["retained_pct"] == pytest.approx(62.5)
    assert merged["tasks_average"]["retained_pct"] == pytest.approx(100 * 0.4 / 0.7)
    assert merged["tasks_average"]["mean_task_retained_pct"] == pytest.approx((62.5 + 50.0) / 2)

    new = new_report("m", None, {"device": "cuda"})
    new["tasks"] = {"b": _task(0.45, 0.6), "c": _task(0.2, 0.4)}
    new["speed"] = {"prefill_speedup": 1.5, "decode_speedup": 1.1}
    out = merge_reports(merged, new)
    assert out["perplexity"] == old["perplexity"]  # untouched section kept
    assert out["baseline"] == "base"  # a run without a baseline does not erase the report's
    assert out["environment"] == {"device": "cuda"}
    assert set(out["tasks"]) == {"a", "b", "c"} and out["tasks"]["b"]["pruned"] == 0.45
    assert out["speed"] == {"prefill_speedup": 1.5, "decode_speedup": 1.1}  # speed is replaced as a whole
    assert out["tasks_average"]["pruned"] == pytest.approx((0.5 + 0.45 + 0.2) / 3)
    assert out["tasks_average"]["retained_pct"] == pytest.approx(100 * (0.5 + 0.45 + 0.2) / (0.8 + 0.6 + 0.4))
    assert merged["tasks"]["b"]["pruned"] == 0.3  # inputs are not mutated

    half = merge_reports(out, {"tasks": {"d": _task(0.9, None)}})
    assert "baseline" not in half["tasks_average"]  # averages only over tasks that all have a baseline
    assert half["tasks"]["d"]["retained_pct"] is None


def test_save_writes_json_md_png_and_pruning_json(tmp_path, tiny_tokenizer):
    model = make_model("llama")
    plan = mixed_plan(model)
    ckpt = save_pruned(surgery.apply(model, plan), tiny_tokenizer, tmp_path / "ckpt", plan,
                       info={"params": api.params_summary(plan, 100, 80)})
    rep = new_report(str(ckpt), "dense", {"device": "cpu", "dtype": "float32"})
    rep["tasks"] = {"a": _task(0.5, 0.8)}
    rep["speed"] = {"device": "cpu", "prompt_len": 8, "prefill_speedup": 1.3, "decode_speedup": 1.1,
                    "ideal_speedup": 1.4, "memory_saving": 0.2, "runs": []}
    written = save_report(ckpt, rep)
    assert {p.name for p in written} == {"report.json", "report.md", "report.png"}
    assert (ckpt / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = load_report(ckpt)
    assert doc["format"] == REPORT_FORMAT and doc["figures"] == ["report.png"]
    assert "results" not in json.loads((ckpt / "pruning.json").read_text())  # report.json is the one copy
    md = (ckpt / "report.md").read_text()
    assert "62.5 %" in md and "1.300×" in md and "decoder linear params" in md

    save_report(ckpt, merge_reports(load_report(ckpt), {"perplexity": {"x": {"pruned": 3.0, "baseline": 2.0}}}))
    again = load_report(ckpt)
    assert set(again) >= {"tasks", "speed", "perplexity"}

    (ckpt / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_report(ckpt)
    (ckpt / "report.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ReportError, match="not an llmprune report"):
        load_report(ckpt)


def test_markdown_without_sections_and_no_png_when_nothing_to_plot(tmp_path):
    rep = new_report("m", None, {})
    assert "# Evaluation report: m" in render_markdown(rep)
    save_report(tmp_path, rep)
    assert not (tmp_path / "report.png").exists() and (tmp_path / "report.json").exists()
    assert not (tmp_path / "pruning.json").exists()  # not a checkpoint: nothing else is touched
    with pytest.raises(ReportError, match="does not exist"):
        save_report(tmp_path / "missing", rep)


@pytest.mark.parametrize("family_name", ["llama"])
def test_baseline_results_are_cached_in_the_report(tmp_path, model_dir, tiny_tokenizer, text_file, monkeypatch):
    model = make_model("llama", tie=True)
    plan = mixed_plan(model)
    ckpt = save_pruned(surgery.apply(model, plan), tiny_tokenizer, tmp_path / "ckpt", plan)

    def request() -> EvalRequest:
        return EvalRequest(perplexity=PerplexityRequest(source=str(text_file), seqlen=16, max_windows=2),
                           baseline=str(model_dir))

    loads: list[str] = []
    real_load = loading.load
    counting = lambda spec, **kw: (loads.append(spec), real_load(spec, **kw))[1]  # noqa: E731
    monkeypatch.setattr(api, "load", counting)  # the checkpoint itself
    monkeypatch.setattr(loading, "load", counting)  # the baseline (evaluate/runner.py)
    first = api.run_eval(str(ckpt), request(), report_dir=ckpt).report
    assert loads == [str(ckpt), str(model_dir)]
    assert len(first["baseline_cache"]) == 1
    second = api.run_eval(str(ckpt), request(), report_dir=ckpt).report
    assert loads[2:] == [str(ckpt)]  # the dense model was not loaded again
    key = next(iter(first["perplexity"]))
    assert second["perplexity"][key]["baseline"] == first["perplexity"][key]["baseline"]
    req = request()
    req.use_cache = False
    api.run_eval(str(ckpt), req, report_dir=ckpt)
    assert loads[3:] == [str(ckpt), str(model_dir)]  # --no-cache recomputes
    other = request()
    other.perplexity.seqlen = 8  # different settings: a new cache entry
    third = api.run_eval(str(ckpt), other, report_dir=ckpt).report
    assert loads[5:] == [str(ckpt), str(model_dir)] and len(third["baseline_cache"]) == 2


def test_report_json_is_strict_json(tmp_path):
    rep = new_report("m", None, {})
    rep["tasks"] = {"a": {**_task(0.5, 0.8), "stderr": float("nan")}}
    rep["speed"] = {"prefill_speedup": float("inf"), "runs": []}
    save_report(tmp_path, rep)
    doc = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert doc["tasks"]["a"]["stderr"] is None and doc["speed"]["prefill_speedup"] is None
