"""lm-eval offline on a local multiple-choice task: in-memory vs saved checkpoints, task lists, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmprune import api, surgery
from llmprune.checkpoint import save_pruned
from llmprune.cli import main
from llmprune.evaluate import tasks as tasks_mod
from llmprune.evaluate.runner import EvalRequest
from llmprune.evaluate.tasks import TaskError, TaskRequest, check_tasks, parse_task_spec, score_from_results

from .conftest import make_model
from .test_surgery import mixed_plan

DATA = Path(__file__).parent / "data" / "tiny_mc"


@pytest.fixture
def tiny_mc_dir(tmp_path: Path) -> Path:
    """tests/data/tiny_mc/tiny_mc.yaml with its data path made absolute (lm-eval resolves it against the CWD)."""
    d = tmp_path / "tasks"
    d.mkdir()
    cfg = yaml.safe_load((DATA / "tiny_mc.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str((DATA / "tiny_mc.jsonl").resolve())
    (d / "tiny_mc.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return d


@pytest.fixture
def local_tasks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never build lm-eval's built-in task index (≈15 s): only the include paths are known."""
    real = tasks_mod.task_manager
    monkeypatch.setattr(tasks_mod, "task_manager", lambda paths=(), defaults=True: real(paths, defaults=False))


def _loglikelihoods(lm, include: Path) -> tuple[dict, list[float]]:  # noqa: ANN001
    import lm_eval

    tm = tasks_mod.task_manager([str(include)], defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tm, bootstrap_iters=0, log_samples=True)
    lls = [r[0][0] for s in res["samples"]["tiny_mc"] for r in s["resps"]]  # one log-likelihood per choice
    return res["results"]["tiny_mc"], lls


def test_in_memory_and_saved_nonuniform_checkpoint_same_scores(tmp_path, tiny_tokenizer, tiny_mc_dir):
    from lm_eval.models.huggingface import HFLM

    model = make_model("llama", tie=True)
    plan = mixed_plan(model, compensate=True)  # attention dropped in layer 0, narrower layer 1, no FFN in layer 2
    pruned = surgery.apply(model, plan)
    ckpt = save_pruned(pruned, tiny_tokenizer, tmp_path / "ckpt", plan)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "llmprune_llama"

    mem, mem_ll = _loglikelihoods(HFLM(pretrained=pruned, tokenizer=tiny_tokenizer, batch_size=4, backend="causal"),
                                  tiny_mc_dir)
    # lm-eval's own loader, as `lm_eval run --model hf --model_args pretrained=DIR,trust_remote_code=True` does
    disk, disk_ll = _loglikelihoods(HFLM(pretrained=str(ckpt), trust_remote_code=True, dtype="float32", device="cpu",
                                         batch_size=4, backend="causal"), tiny_mc_dir)
    assert len(mem_ll) == 12 * 4
    torch.testing.assert_close(torch.tensor(disk_ll), torch.tensor(mem_ll), atol=1e-4, rtol=1e-5)
    assert (disk["acc,none"], disk["acc_norm,none"]) == (mem["acc,none"], mem["acc_norm,none"])

    # llmprune's wrapper: the in-memory object and the checkpoint path report the same scores
    req = parse_task_spec("tiny_mc")
    a = api.run_eval(pruned, EvalRequest(tasks=req, include_paths=[str(tiny_mc_dir)]), tokenizer=tiny_tokenizer)
    b = api.run_eval(str(ckpt), EvalRequest(tasks=req, include_paths=[str(tiny_mc_dir)]), report_dir=ckpt)
    assert a.run["tasks"]["tiny_mc"]["all_metrics"] == b.run["tasks"]["tiny_mc"]["all_metrics"]
    assert b.run["tasks"]["tiny_mc"]["all_metrics"] == {"acc": mem["acc,none"], "acc_norm": mem["acc_norm,none"]}
    assert b.run["tasks"]["tiny_mc"]["metric"] == "acc_norm" and b.run["tasks"]["tiny_mc"]["n_samples"] == 12


@pytest.mark.parametrize("family_name", ["qwen2"])
def test_main_job_eval_tasks_equals_eval_of_saved_checkpoint(tmp_path, model_dir, tiny_mc_dir, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--recipe", "magnitude", "--sparsity", "0.3", "-o", str(out), "-q",
                 "--eval-tasks", "tiny_mc", "--include-path", str(tiny_mc_dir), "--eval-baseline",
                 "--eval-batch-size", "3"]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    first = json.loads((out / "report.json").read_text())
    entry = first["tasks"]["tiny_mc"]
    assert entry["baseline"] is not None and entry["baseline_model"] == str(model_dir)
    assert entry["retained_pct"] == pytest.approx(100 * entry["pruned"] / entry["baseline"])
    assert "results" not in json.loads((out / "pruning.json").read_text())  # report.json is the one copy

    assert main(["eval", str(out), "--tasks", "tiny_mc", "--include-path", str(tiny_mc_dir), "--batch-size", "3",
                 "-q"]) == 0
    again = json.loads((out / "report.json").read_text())["tasks"]["tiny_mc"]
    assert again["all_metrics"] == entry["all_metrics"]  # saved checkpoint == in-memory pruned model
    # no --baseline: the report's baseline fills in from its cache (same task settings), nothing reloaded
    assert again["baseline"] == entry["baseline"] and again["retained_pct"] == entry["retained_pct"]
    assert main(["eval", str(out), "--tasks", "tiny_mc", "--include-path", str(tiny_mc_dir), "--limit", "6",
                 "-q"]) == 0
    limited = json.loads((out / "report.json").read_text())["tasks"]["tiny_mc"]
    assert limited["limit"] == 6 and limited["n_samples"] == 6
    assert limited["baseline"] is None  # other settings: the cached baseline does not apply


def test_task_lists_expand_with_overrides(tmp_path):
    reqs = parse_task_spec("zero_shot")
    assert [r.name for r in reqs] == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                      "openbookqa"]
    assert {r.name: r.metric for r in reqs}["hellaswag"] == "acc_norm" and reqs[0].metric == "acc"
    fc = {r.name: r for r in parse_task_spec("finercut")}
    assert len(fc) == 9 and fc["mmlu"].num_fewshot == 5 and fc["mmlu"].limit == 50 and fc["piqa"].limit == 1000
    assert fc["piqa"].metric is None and fc["piqa"].metric_preference[0] == "acc_norm"
    over = {r.name: r for r in parse_task_spec("finercut,arc_easy,my_task", num_fewshot=2, limit=10)}
    assert over["mmlu"].num_fewshot == 2 and over["mmlu"].limit == 10 and over["my_task"].limit == 10
    assert list(over).count("arc_easy") == 1  # duplicates collapse, first occurrence wins
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\nnum_fewshot: 1\ntasks: [a, {task: b, metric: f1}]\n")
    assert [(r.name, r.num_fewshot, r.metric) for r in parse_task_spec(str(own))] == [("a", 1, None), ("b", 1, "f1")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [a]\nlimt: 3\n")
    with pytest.raises(TaskError, match="unknown key"):
        parse_task_spec(str(bad))
    with pytest.raises(TaskError, match="no task given"):
        parse_task_spec(" , ")


def test_metric_choice_follows_preference_and_explicit_metric():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                             "acc_norm_stderr,none": "N/A", "perplexity,none": 12.0}},
           "higher_is_better": {"t": {"acc": True, "acc_norm": True, "perplexity": False}},
           "n-samples": {"t": {"effective": 8}}, "n-shot": {"t": 0}}
    s = score_from_results(res, TaskRequest("t"))
    assert (s.metric, s.value, s.stderr, s.n_samples) == ("acc_norm", 0.6, None, 8)
    s = score_from_results(res, TaskRequest("t", metric="acc"))
    assert (s.metric, s.value, s.stderr) == ("acc", 0.5, 0.1)
    s = score_from_results(res, TaskRequest("t", metric="perplexity"))
    assert s.higher_is_better is False
    with pytest.raises(TaskError, match="has no metric 'f1'"):
        score_from_results(res, TaskRequest("t", metric="f1"))


def test_unknown_task_says_how_to_find_tasks(tiny_mc_dir, local_tasks_only):
    with pytest.raises(TaskError) as e:
        check_tasks(parse_task_spec("tiny_mcc"), [str(tiny_mc_dir)])
    msg = str(e.value)
    assert "'tiny_mcc'" in msg and "did you mean tiny_mc" in msg and "lm-eval ls tasks" in msg
    assert "zero_shot" in msg and "--include-path" in msg
    with pytest.raises(TaskError, match="no such directory"):
        check_tasks(parse_task_spec("tiny_mc"), [str(tiny_mc_dir / "missing")])


@pytest.mark.parametrize("family_name", ["llama"])
def test_cli_task_errors(tmp_path, model_dir, tiny_mc_dir, local_tasks_only, capsys):
    assert main(["eval", str(model_dir), "--tasks", "tiny_mc,nope", "--include-path", str(tiny_mc_dir)]) == 2
    assert "unknown lm-eval task(s): 'nope'" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--limit", "5"]) == 2
    assert "add --tasks" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main(["--model", str(model_dir), "--recipe", "magnitude", "-o", str(out), "--eval-tasks", "nope",
                 "--include-path", str(tiny_mc_dir)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err and not out.exists()  # failed before pruning


def test_shipped_task_yaml_is_the_one_tests_use():
    cfg = yaml.safe_load((DATA / "tiny_mc.yaml").read_text())
    assert cfg["task"] == "tiny_mc" and cfg["dataset_path"] == "json"
    rows = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(0 <= r["label"] < len(r["choices"]) for r in rows)
