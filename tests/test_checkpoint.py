"""Saved checkpoints reload (with llmprune, and with plain transformers + remote code) to the same logits."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmprune import checkpoint, surgery
from llmprune.checkpoint import CheckpointError, load_pruned, save_pruned
from llmprune.families import family_for
from llmprune.plan import MlpPlan, Plan

from .conftest import NO_LLMPRUNE_PREAMBLE, make_model
from .test_surgery import mixed_plan

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter where `import llmprune` is impossible: only transformers + remote code.
NO_LLMPRUNE = NO_LLMPRUNE_PREAMBLE + textwrap.dedent("""
    from transformers import AutoModelForCausalLM
    d, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = m(ids).logits
        gen = m.generate(ids[:1], max_new_tokens=4, do_sample=False)
    print(json.dumps({"cls": type(m).__module__ + "." + type(m).__name__, "logits": logits.tolist(),
                      "gen": gen.tolist()}))
""")


def run_without_llmprune(path: Path, ids: torch.Tensor) -> dict:
    proc = subprocess.run([sys.executable, "-c", NO_LLMPRUNE, str(path), json.dumps(ids.tolist())],
                          capture_output=True, text=True, cwd=path.parent, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_nonuniform_round_trip_both_loaders(tmp_path, tokens, tiny_tokenizer, family):
    model = make_model(family, tie=family in ("llama", "gemma2", "gemma3_text"))
    plan = mixed_plan(model, compensate=True)
    pruned = surgery.apply(model, plan)
    ref = pruned(tokens).logits
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "ckpt", plan, info={"params": {"x": 1}})
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "pruning.json", "configuration_llmprune.py",
            "modeling_llmprune.py", "tokenizer.json"} <= files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("llmprune_llama" if family in ("llama", "qwen3") else f"llmprune_{family}")
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    per_layer = {int(k): v for k, v in cfg["per_layer_config"].items()}
    assert per_layer[0]["skip"] == ["attention"] and per_layer[2]["skip"] == ["mlp"]

    loaded, tok = load_pruned(out)
    torch.testing.assert_close(loaded(tokens).logits, ref, rtol=1e-5, atol=1e-5)
    assert tok is not None and len(tok) == len(tiny_tokenizer)

    remote = run_without_llmprune(out, tokens)
    assert remote["cls"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(remote["logits"]), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.tensor(remote["gen"]), pruned.generate(tokens[:1], max_new_tokens=4, do_sample=False))

    doc = json.loads((out / "pruning.json").read_text())
    assert doc["format"] == "llmprune.checkpoint" and doc["params"] == {"x": 1}
    assert Plan.load(out).to_dict() == plan.to_dict()


def test_uniform_result_saves_stock_config(tmp_path, tokens, tiny_tokenizer):
    model = make_model("mistral")
    fam = family_for(model.config)
    plan = Plan.identity(fam.geometry(model))
    for lp in plan.layers:
        lp.mlp = MlpPlan(keep_channels=list(range(64)))
    pruned = surgery.apply(model, plan, fam)
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "u", plan)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["intermediate_size"] == 64 and "auto_map" not in cfg
    assert not (out / "modeling_llmprune.py").exists()
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no remote code
    torch.testing.assert_close(stock(tokens).logits, pruned(tokens).logits, rtol=1e-5, atol=1e-5)


def test_refuses_non_empty_output_dir(tmp_path, tiny_tokenizer):
    model = make_model("llama")
    plan = Plan.identity(family_for(model.config).geometry(model))
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="not empty; pass --overwrite"):
        save_pruned(model, tiny_tokenizer, out, plan)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(CheckpointError, match="--overwrite only replaces a model directory"):
        save_pruned(model, tiny_tokenizer, out, plan, overwrite=True)  # a folder of other files is never deleted
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    save_pruned(model, tiny_tokenizer, out, plan)
    (out / "extra.txt").write_text("stale")
    save_pruned(model, tiny_tokenizer, out, plan, overwrite=True)  # a checkpoint is replaced as a whole
    assert not (out / "extra.txt").exists() and (out / "config.json").exists()


def test_failed_save_leaves_nothing_behind(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_model("llama")
    plan = Plan.identity(family_for(model.config).geometry(model))

    def broken(*_a, **_k):
        raise CheckpointError("verification failed (simulated)")

    monkeypatch.setattr(checkpoint, "_verify", broken)
    with pytest.raises(CheckpointError, match="simulated"):
        save_pruned(model, tiny_tokenizer, tmp_path / "out", plan)
    assert list(tmp_path.iterdir()) == []

