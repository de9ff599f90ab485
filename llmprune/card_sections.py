"""Markdown sections of the model card (see modelcard.py); each returns text, never raises on missing data."""
from __future__ import annotations

import json
import shlex
from typing import Any

import yaml

from .card_facts import CardFacts

HOW_TO_EVALUATE = "llmprune eval DIR --data wikitext2 --baseline BASE_MODEL"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def num(v: Any, fmt: str = ".4g") -> str:
    return format(v, fmt) if is_number(v) else "—"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- structure -------------------------------------------------------------------------------------
def structure_section(f: CardFacts) -> str:
    p, plan = f.params, f.plan
    lb, la = p.get("linear_before", plan.params_before()), p.get("linear_after", plan.params_after())
    rows = [["decoder-layer linear", f"{lb:,}", f"{la:,}", f"{p.get('sparsity', plan.sparsity()):.2%}"]]
    if is_number(p.get("total_before")) and is_number(p.get("total_after")):
        rows.append(["all parameters", f"{p['total_before']:,}", f"{p['total_after']:,}",
                     f"{p.get('total_sparsity', 1 - p['total_after'] / p['total_before']):.2%}"])
    else:
        rows.append(["all parameters", "not recorded", "not recorded", "—"])
    parts = ["## What was removed",
             "Sparsity is the fraction of decoder-layer linear parameters (q/k/v/o, gate/up/down weights and "
             "biases) removed; embeddings, LM head and norms are excluded. The fraction of all parameters is "
             "shown next to it.",
             table(["parameters", "before", "after", "removed"], rows)]
    kept = set(plan.kept_layers())
    dropped_attn = [i for i, lp in enumerate(plan.layers) if lp.attn.drop and i in kept]
    dropped_mlp = [i for i, lp in enumerate(plan.layers) if lp.mlp.drop and i in kept]
    gone = [i for i in range(len(plan.layers)) if i not in kept]
    summary = [f"- attention sublayer removed in layers: {_ids(dropped_attn)}",
               f"- FFN sublayer removed in layers: {_ids(dropped_mlp)}",
               f"- whole blocks removed (later blocks renumbered): {_ids(gone)}"]
    parts.append("\n".join(summary))
    layer_rows = []
    for i, (b, a) in enumerate(zip(plan.geometry, plan.geometry_after())):
        if i not in kept:
            att = ffn = "removed (block)"
        else:
            att = "removed" if not a.has_attn else f"{b.n_q_heads} / {b.n_kv_heads} → {a.n_q_heads} / {a.n_kv_heads}"
            ffn = "removed" if not a.has_mlp else f"{b.intermediate} → {a.intermediate}"
        layer_rows.append([str(i), att, ffn, f"{b.linear_params():,} → {a.linear_params():,}"])
    parts.append("Per layer (indices of the base model; query / KV heads, FFN width, linear parameters):")
    parts.append(table(["layer", "attention q / kv heads", "FFN width", "linear params"], layer_rows))
    order = f.doc.get("removal_order")
    if isinstance(order, list) and order:
        parts.append(_removal_order(f, order))
    for name in f.doc.get("artifacts") or []:  # figures the pruner saved beside the weights (relative links)
        if isinstance(name, str) and name.endswith(".png"):
            parts.append(f"![{name[:-4].replace('_', ' ')}]({name})")
    return "\n\n".join(parts)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def _removal_order(f: CardFacts, order: list[Any]) -> str:
    rows = []
    for step, entry in enumerate(order, 1):
        if not isinstance(entry, dict):
            continue
        layer, sub = entry.get("layer"), str(entry.get("sublayer", "?"))
        applied = "?"
        if isinstance(layer, int) and 0 <= layer < len(f.plan.layers):
            lp = f.plan.layers[layer]
            applied = "yes" if (lp.attn.drop if sub.startswith("att") else lp.mlp.drop) else "no"
        rows.append([str(step), str(layer), sub, num(entry.get("divergence"), ".4g"), applied])
    return ("Greedy removal order (FinerCut): each step removed the sublayer whose removal changed the output "
            "least; *in this model* says whether the step is part of this checkpoint.\n\n"
            + table(["step", "layer", "sublayer", "divergence", "in this model"], rows))


# ---- evaluation ------------------------------------------------------------------------------------
def evaluation_section(f: CardFacts) -> str:
    r = f.report
    ppl = {k: v for k, v in (r.get("perplexity") or {}).items() if isinstance(v, dict) and is_number(v.get("pruned"))}
    tasks = {k: v for k, v in (r.get("tasks") or {}).items() if isinstance(v, dict) and is_number(v.get("pruned"))}
    if not ppl and not tasks:
        return ("## Evaluation\n\n**Not evaluated.** No evaluation results were stored with this checkpoint. "
                f"Measure before use, e.g. `{HOW_TO_EVALUATE}` (results then appear in this card on the next "
                "`llmprune push`).")
    base = r.get("baseline") or f.base_label
    parts = ["## Evaluation", f"Baseline: the dense base model `{base}` under the same settings; *retained* = "
             "100 · pruned / baseline."]
    if ppl:
        rows = [[name, str(v.get("split", "—")), num(v.get("seqlen"), "d"), num(v.get("n_windows"), "d"),
                 num(v.get("pruned"), ".3f"), num(v.get("baseline"), ".3f")]
                for name, v in ppl.items()]
        parts.append("Perplexity (lower is better; values at different sequence lengths are not comparable):\n\n"
                     + table(["text", "split", "seqlen", "windows", "pruned", "baseline"], rows))
    if tasks:
        rows = []
        for name, v in tasks.items():
            metrics = v.get("all_metrics") or {}
            other = ", ".join(f"{k} {num(m, '.4f')}" for k, m in metrics.items() if k != v.get("metric"))
            rows.append([name, str(v.get("metric", "—")), num(v.get("num_fewshot"), "d"), num(v.get("limit"), "d"),
                         num(v.get("pruned"), ".4f") + (f" ± {num(v['stderr'], '.3f')}" if is_number(v.get("stderr"))
                                                        else ""),
                         num(v.get("baseline"), ".4f"), num(v.get("retained_pct"), ".1f"), other or "—"])
        avg = r.get("tasks_average") or {}
        if avg:
            rows.append(["**average**", "", "", "", num(avg.get("pruned"), ".4f"), num(avg.get("baseline"), ".4f"),
                         num(avg.get("retained_pct"), ".1f"), ""])
        parts.append("lm-evaluation-harness tasks (*limit*: only the first N examples were scored; — = all):\n\n"
                     + table(["task", "metric", "shots", "limit", "pruned", "baseline", "retained %", "other metrics"],
                             rows))
    env = r.get("environment") or {}
    if env:
        parts.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
    return "\n\n".join(parts)


def speed_section(f: CardFacts) -> str:
    s = f.report.get("speed")
    figures = [fig for fig in (f.report.get("figures") or []) if isinstance(fig, str) and (f.path / fig).is_file()]
    if not isinstance(s, dict) or not s:
        text = "## Speed and memory\n\nNot measured for this checkpoint."
    else:
        head = (f"Measured on {s.get('device', '?')} in {s.get('dtype', '?')}, prompt {num(s.get('prompt_len'), 'd')} "
                f"tokens, {num(s.get('decode_tokens'), 'd')} decoded tokens; speed-ups are dense / pruned from the "
                "same run (medians of repeats).")
        summary = table(["prefill speed-up", "decode speed-up", "ideal (FLOPs)", "memory saving"],
                        [[_times(s.get("prefill_speedup")), _times(s.get("decode_speedup")),
                          _times(s.get("ideal_speedup")),
                          f"{s['memory_saving']:.1%}" if is_number(s.get("memory_saving")) else "—"]])
        rows = [[num(run.get("batch_size"), "d"), str(run.get("model", "?")),
                 f"{num(run.get('prefill_ms_median'), '.4g')} ± {num(run.get('prefill_ms_iqr'), '.2g')}",
                 f"{num(run.get('decode_tok_s_median'), '.4g')} ± {num(run.get('decode_tok_s_iqr'), '.2g')}",
                 _mib(run.get("peak_mem_bytes")), _mib(run.get("kv_cache_bytes"))]
                for run in s.get("runs") or [] if isinstance(run, dict)]
        text = "## Speed and memory\n\n" + head + "\n\n" + summary
        if rows:
            text += "\n\n" + table(["batch", "model", "prefill ms (median ± IQR)", "decode tok/s (median ± IQR)",
                                    "peak memory", "KV cache"], rows)
    for fig in figures:
        text += f"\n\n![{fig}]({fig})"
    return text


def _times(v: Any) -> str:
    return f"{v:.3g}×" if is_number(v) else "—"


def _mib(v: Any) -> str:
    return f"{v / 2**20:.1f} MiB" if is_number(v) else "—"


# ---- usage and provenance --------------------------------------------------------------------------
def load_section(f: CardFacts) -> str:
    repo = f.repo_id or f"path/to/{f.path.name}"
    repo = json.dumps(repo)  # a double-quoted Python string literal
    rev = f", revision={json.dumps(f.revision)}" if f.revision and f.revision != "main" else ""
    tv = f.config.get("transformers_version", "?")
    if f.custom_code:
        intro = ("This checkpoint is **non-uniform** (layers differ in shape): `config.json` has `model_type: "
                 f"{f.config.get('model_type')}` and ships its architecture in `configuration_llmprune.py` / "
                 "`modeling_llmprune.py` (subclasses of the transformers Llama modules), so loading it needs "
                 f"`trust_remote_code=True`, or llmprune installed. Needs a transformers release with "
                 f"`per_layer_config`; saved with transformers {tv}. Read the two code files before trusting them, "
                 "and pin `revision=` to a commit you reviewed. Serving engines with built-in architectures "
                 "(vLLM, llama.cpp) do not know this model type; vLLM's transformers backend "
                 "(`--trust-remote-code --model-impl transformers`) is the likely path but is untested.")
        extra = ", trust_remote_code=True"
    else:
        intro = (f"This checkpoint is **uniform**: a stock `{f.config.get('model_type')}` config (every layer has the "
                 f"same shape), so any tool that loads {f.config.get('model_type')} models loads it unchanged. "
                 f"Saved with transformers {tv}; serving engines and converters that support the base "
                 "architecture (vLLM, llama.cpp, TGI) should take it as they take the base model.")
        extra = ""
    code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained({repo}{rev}{extra})\n"
            f"model = AutoModelForCausalLM.from_pretrained({repo}{rev}{extra})")
    text = f"## How to load\n\n{intro}\n\n```python\n{code}\n```"
    if f.custom_code:
        text += ("\n\nWith llmprune installed, importing it registers the architecture, so no remote code runs:\n\n"
                 f"```python\nimport llmprune  # registers {f.config.get('model_type')}\n"
                 f"from transformers import AutoModelForCausalLM\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({repo}{rev})\n```")
    return text


def provenance_section(f: CardFacts) -> str:
    prov = f.provenance
    parts = ["## How it was made"]
    facts = [f"- llmprune {f.doc.get('llmprune_version', '?')}, method `{f.method}`, base model `{f.base_label}`"
             + (f" at revision `{f.plan.base_revision}`" if f.plan.base_revision else "")]
    if prov.get("created"):
        facts.append(f"- created {prov['created']}, dtype {prov.get('dtype', '?')}")
    versions = prov.get("versions") or {}
    if versions:
        facts.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    cal = prov.get("calibration")
    if isinstance(cal, dict):
        desc = f"`{cal.get('name', cal.get('spec', '?'))}`"
        if cal.get("config"):
            desc += f" (config `{cal['config']}`)"
        facts.append(f"- calibration text: {desc}, split `{cal.get('split', '?')}`, {cal.get('nsamples', '?')} "
                     f"sequences × {cal.get('seqlen', '?')} tokens, seed {cal.get('seed', prov.get('seed', '?'))}")
    else:
        facts.append("- calibration: none (the method needs no data, or it was not recorded)")
    parts.append("\n".join(facts))
    if f.plan.recipe:
        parts.append("Recipe (also in `llmprune_recipe.yaml`; the full plan with kept indices is in "
                     "`pruning.json`):\n\n```yaml\n" + yaml.safe_dump(f.plan.recipe, sort_keys=False).strip() + "\n```")
    cmd = prov.get("command")
    parts.append("### Reproduce")
    if cmd:
        parts.append(f"With llmprune {f.doc.get('llmprune_version', '?')} installed, the exact command that made "
                     f"this checkpoint was:\n\n```bash\n{cmd}\n```")
    else:
        parts.append("The command line was not recorded (the checkpoint was saved from Python).")
    model_arg = prov.get("model_arg") or f.base_label
    parts.append("To re-apply the exact same plan without calibrating again (it is stored in `pruning.json`):\n\n"
                 f"```bash\nllmprune apply --model {shlex.quote(str(model_arg))} --plan pruning.json -o pruned/\n```")
    return "\n\n".join(parts)
