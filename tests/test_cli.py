"""The command line, end to end on tiny model folders, and its errors."""
from __future__ import annotations

import json

import pytest
import torch

from llmprune.checkpoint import load_pruned
from llmprune.cli import main
from llmprune.plan import Plan


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("family_name", ["llama", "qwen3"])
def test_main_job_then_inspect_and_eval(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    assert run_cli("--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.3", "-o", out, "-q") == 0
    printed = capsys.readouterr().out
    assert "decoder linear params" in printed and "total params" in printed and "wall time" in printed
    doc = json.loads((out / "pruning.json").read_text())
    assert abs(doc["params"]["sparsity"] - 0.3) < 0.05
    assert doc["params"]["total_after"] < doc["params"]["total_before"]
    assert doc["provenance"]["method"] == "magnitude"
    model, tok = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == doc["params"]["total_after"]

    assert run_cli("inspect", out) == 0
    assert "linear params" in capsys.readouterr().out
    assert run_cli("eval", out, "--data", text_file, "--seqlen", "32", "--max-windows", "4", "-q") == 0
    assert "ppl" in capsys.readouterr().out
    ppl = json.loads((out / "report.json").read_text())["perplexity"][str(text_file.resolve())]
    assert ppl["n_windows"] == 4 and ppl["pruned"] > 1
    assert run_cli("inspect", out) == 0
    assert f"perplexity on {text_file.resolve()} [all]: {ppl['pruned']:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("family_name", ["mistral"])
def test_plan_then_apply_equals_main_job(tmp_path, model_dir, capsys):
    plan_file = tmp_path / "plan.json"
    assert run_cli("plan", "--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.25", "-o", plan_file,
                   "-q") == 0
    assert run_cli("apply", "--model", model_dir, "--plan", plan_file, "-o", tmp_path / "a", "-q") == 0
    assert run_cli("--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.25", "-o", tmp_path / "b",
                   "-q") == 0
    a, _ = load_pruned(tmp_path / "a")
    b, _ = load_pruned(tmp_path / "b")
    ids = torch.tensor([[3, 9, 27, 81, 243]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert Plan.load(plan_file).layers == Plan.load(tmp_path / "b").layers


@pytest.mark.parametrize("family_name", ["llama"])
@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity: must be in [0, 1)"),
    (["--set", "pruner.mpl=false"], "pruner.mpl: unknown key (did you mean 'mlp'?)"),
    (["--recipe", "nonexistent"], "unknown recipe 'nonexistent'"),
    (["--device", "cuda:3"], "CUDA is not available"),
    (["--dtype", "float8"], "unknown dtype"),
])
def test_bad_inputs_fail_early_and_clearly(tmp_path, model_dir, capsys, args, message):
    out = tmp_path / "o"
    base = ["--model", str(model_dir), "--recipe", "magnitude", "-o", str(out)]
    if "--recipe" in args:
        base = base[:2] + base[4:]
    assert run_cli(*base, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing may be written on failure"


def test_unknown_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d)
    assert run_cli("--model", d, "--recipe", "magnitude", "-o", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "does not support model_type 'gpt2'" in err and "llama" in err and "qwen3" in err


@pytest.mark.parametrize("family_name", ["llama"])
def test_non_empty_output_dir(tmp_path, model_dir, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("mine")
    assert run_cli("--model", model_dir, "--recipe", "magnitude", "-o", out) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "x").read_text() == "mine"


def test_missing_model_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("--model", tmp_path / "empty", "--recipe", "magnitude", "-o", tmp_path / "o") == 2
    assert "no config.json" in capsys.readouterr().err


def test_help_lists_every_flag_and_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--recipe", "--sparsity", "--calibration", "--nsamples", "--seqlen", "--seed",
                 "--device", "--dtype", "--output", "--overwrite", "--set"):
        assert flag in text
    for sub in ("plan", "apply", "inspect", "eval"):
        assert f"\n  {sub}" in text


@pytest.mark.parametrize("family_name", ["llama"])
def test_default_calibration_source_falls_back_but_a_named_one_never(tmp_path, model_dir, monkeypatch, capsys):
    """No source anywhere -> wikitext2, or python-docs when wikitext2 cannot be loaded; a named source stays."""
    from llmprune import data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(data, "_preset_available", lambda name: False)  # wikitext2 not cached
    small = ["--model", model_dir, "--recipe", "flap", "--sparsity", "0.2", "--nsamples", "4", "--seqlen", "32", "-q"]
    assert run_cli(*small, "-o", tmp_path / "a") == 0
    cal = json.loads((tmp_path / "a" / "pruning.json").read_text())["provenance"]["calibration"]
    assert cal["spec"] == "python-docs"

    def probe(name: str) -> bool:
        raise AssertionError("a named source must not be probed")

    monkeypatch.setattr(data, "_preset_available", probe)
    assert run_cli(*small, "--calibration", "wikitext2", "-o", tmp_path / "b") == 2  # offline: no fallback
    assert "wikitext" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert run_cli(*small, "--set", "calibration.source=python-docs", "-o", tmp_path / "c") == 0
    cal = json.loads((tmp_path / "c" / "pruning.json").read_text())["provenance"]["calibration"]
    assert cal["spec"] == "python-docs"
