"""Checkpoints and reports for the Hub/model-card tests, built with the real surgery + save_pruned."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from llmprune import surgery
from llmprune.api import count_params, params_summary
from llmprune.checkpoint import save_pruned
from llmprune.families import family_for
from llmprune.plan import MlpPlan, Plan

from .conftest import make_model
from .test_surgery import mixed_plan

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
# The smallest valid PNG (1x1, grey); the card only links figures that exist.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                    "3a7e9b550000000a49444154789c6368000000820081dd436af40000000049454e44ae426082")

REPORT: dict[str, Any] = {
    "format": "llmprune.report", "version": 1, "created": "2026-11-23T12:00:00Z", "model": "out/tiny",
    "baseline": SMOL,
    "environment": {"device": "cpu", "dtype": "float32", "torch": "2.13.0", "transformers": "5.23.0",
                    "lm_eval": "0.4.13"},
    "perplexity": {"python-docs": {"split": "test", "seqlen": 256, "n_windows": 32, "pruned": 31.2, "baseline": 24.1},
                   "wikitext2": {"split": "test", "seqlen": 512, "n_windows": 8, "pruned": 40.5, "baseline": 30.25}},
    "tasks": {"arc_easy": {"metric": "acc_norm", "pruned": 0.51, "baseline": 0.6, "retained_pct": 85.0,
                           "num_fewshot": 0, "limit": 100, "stderr": 0.05,
                           "all_metrics": {"acc": 0.5, "acc_norm": 0.51}}},
    "tasks_average": {"pruned": 0.51, "baseline": 0.6, "retained_pct": 85.0},
    "speed": {"device": "cpu", "dtype": "float32", "prompt_len": 512, "decode_tokens": 64, "batch_sizes": [1],
              "prefill_speedup": 1.31, "decode_speedup": 1.22, "ideal_speedup": 1.45, "memory_saving": 0.21,
              "runs": [{"batch_size": 1, "model": "pruned", "prefill_ms_median": 10.0, "prefill_ms_iqr": 0.4,
                        "decode_tok_s_median": 80.0, "decode_tok_s_iqr": 2.0, "peak_mem_bytes": 3 * 2**20,
                        "kv_cache_bytes": 2**20}]},
    "figures": ["report.png"],
}
REMOVAL_ORDER = [{"layer": 0, "sublayer": "attn", "divergence": 0.0125},
                 {"layer": 2, "sublayer": "mlp", "divergence": 0.031},
                 {"layer": 1, "sublayer": "mlp", "divergence": 0.5}]  # the last step is not in the plan


def _tokenizer(tiny_tokenizer: Any) -> Any:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def nonuniform_checkpoint(out: Path, tiny_tokenizer: Any, report: bool = True) -> tuple[Path, Any]:
    """llama, attention of layer 0 and FFN of layer 2 removed, layer 1 narrowed; made "from" SmolLM2."""
    model = make_model("llama", tie=True)
    before = count_params(model)
    plan = mixed_plan(model)
    plan.method, plan.base_model = "finercut", SMOL
    plan.recipe = {"method": "finercut", "sparsity": 0.25, "calibration": {"source": "wikitext2", "nsamples": 8}}
    plan.extras = {"removal_order": REMOVAL_ORDER}
    pruned = surgery.apply(model, plan)
    info = {"params": params_summary(plan, before, count_params(pruned)),
            "provenance": {"llmprune_version": "0.1.0", "created": "2026-11-23T11:00:00Z", "base_model": SMOL,
                           "model_arg": "smollm2-135m", "method": "finercut", "seed": 0, "dtype": "float32",
                           "command": "llmprune --model smollm2-135m --recipe finercut --sparsity 0.25 -o out/tiny",
                           "calibration": {"spec": "wikitext2", "kind": "preset", "name": "wikitext2",
                                           "config": "wikitext-2-raw-v1", "split": "train", "nsamples": 8,
                                           "seqlen": 64, "seed": 0},
                           "embedded": {"name": "smollm2-135m", "note": "dequantized from a Q4_1 GGUF"}}}
    save_pruned(pruned, _tokenizer(tiny_tokenizer), out, plan, info=info, verify=False)
    if report:
        (out / "report.json").write_text(json.dumps(REPORT, indent=1))
        (out / "report.md").write_text("# Report\n\nsee report.json\n")
        (out / "report.png").write_bytes(PNG)
    return out, pruned


def uniform_checkpoint(out: Path, tiny_tokenizer: Any, base: str = "acme/base-model",
                       provenance: dict[str, Any] | None = None) -> tuple[Path, Any]:
    """mistral with every FFN cut to 64 channels: stock config, no remote code; no evaluation."""
    model = make_model("mistral")
    before = count_params(model)
    fam = family_for(model.config)
    plan = Plan.identity(fam.geometry(model), method="magnitude", base_model=base, family=fam.name,
                         recipe={"method": "magnitude", "sparsity": 0.2})
    for lp in plan.layers:
        lp.mlp = MlpPlan(keep_channels=list(range(64)))
    pruned = surgery.apply(model, plan, fam)
    prov = {"base_model": base, "model_arg": base, "method": "magnitude",
            "command": f"llmprune --model {base} --recipe magnitude -o out/u",
            "calibration": {"spec": "/data/local.txt", "kind": "local", "name": "/data/local.txt", "split": "train",
                            "nsamples": 4, "seqlen": 32, "seed": 1}}
    prov.update(provenance or {})
    save_pruned(pruned, _tokenizer(tiny_tokenizer), out, plan, verify=False,
                info={"params": params_summary(plan, before, count_params(pruned)), "provenance": prov})
    return out, pruned


def front_matter(readme: str) -> dict[str, Any]:
    import yaml

    assert readme.startswith("---\n"), readme[:80]
    return yaml.safe_load(readme.split("---\n", 2)[1])
