#!/usr/bin/env python
"""Decode speed of non-uniform pruned models (`llmprune_llama`) against the dense stock model.

    python scripts/bench_decode.py                                   # smollm2-135m, 20 % and 50 %, batch 1 and 4
    python scripts/bench_decode.py --tiny --repeats 2 --decode-tokens 4 --prompt-len 16   # seconds; smoke test
    python scripts/bench_decode.py --count-calls                      # Python calls per decode step (no timing)

Rows:
- `overhead`: the dense weights in the llmprune_llama class (zero o_proj biases make it non-uniform),
  so its ideal ratio is 1.00: what the heterogeneous class costs by itself;
- `prune XX%`: a non-uniform plan (KV groups and FFN channels removed, widths varying by layer).
Columns: dense and pruned decode tok/s (median), their ratio with a 95 % bootstrap interval of the
paired per-repeat ratios (models alternate ABBA), the ideal ratio from decode FLOPs and from bytes
read per step (weights + KV cache: decode at small batch is memory-bound), and measured / ideal.
`--count-calls` counts Python function calls in one decode step per model (deterministic, meaningful
even on a busy machine): the per-layer Python overhead of the class.
Timing numbers only mean something on a quiet machine with a fixed thread count (`--threads`).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune import surgery  # noqa: E402
from llmprune.evaluate.bench import (BenchSettings, cache_bytes, cache_keyword, output_cache, prefill,  # noqa: E402
                                     random_prompts, ratio_ci, time_models, time_once, weight_bytes)
from llmprune.evaluate.flops import ideal_speedups  # noqa: E402
from llmprune.evaluate.speed import model_shape  # noqa: E402
from llmprune.families import family_for  # noqa: E402
from llmprune.plan import AttnPlan, MlpPlan, Plan  # noqa: E402


def tiny_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def overhead_plan(model: torch.nn.Module) -> Plan:
    """Nothing removed, but zero-mean compensation adds o_proj biases: same work, llmprune_llama class."""
    plan = Plan.identity(family_for(model.config).geometry(model))
    for lp in plan.layers:
        lp.attn = AttnPlan(compensate=[])
    return plan


def pruned_plan(model: torch.nn.Module, sparsity: float) -> Plan:
    """A non-uniform plan: per layer, a share of KV groups and FFN channels around `sparsity`."""
    geo = family_for(model.config).geometry(model)
    plan = Plan.identity(geo)
    for i, (g, lp) in enumerate(zip(geo, plan.layers)):
        s = min(0.9, max(0.0, sparsity * (0.6 + 0.8 * i / max(1, len(geo) - 1))))  # deeper layers lose more
        n_kv = max(1, round(g.n_kv_heads * (1 - s)))
        if n_kv < g.n_kv_heads:
            lp.attn = AttnPlan(keep_kv_groups=list(range(n_kv)))
        width = max(1, round(g.intermediate * (1 - s)))
        lp.mlp = MlpPlan(keep_channels=list(range(width)))
    plan.validate()
    return plan


def bytes_per_step(model: torch.nn.Module, vocab: int, bs: int, prompt_len: int, steps: int) -> float:
    """Bytes a decode step reads: all weights + the KV cache at mid-decode (approximately)."""
    ids = random_prompts(vocab, bs, prompt_len, 0)
    _, _, cache = time_once(model, ids, max(1, steps // 2))
    return weight_bytes(model) + cache_bytes(cache)


def count_calls(model: torch.nn.Module, vocab: int, prompt_len: int = 8) -> int:
    """Python function calls made by one decode step (after a prefill), via sys.setprofile."""
    ids = random_prompts(vocab, 1, prompt_len, 0)
    cache, token = prefill(model, ids)
    n = 0

    def prof(_frame, event, _arg):  # noqa: ANN001, ANN202
        nonlocal n
        if event == "call":
            n += 1

    kw = cache_keyword(model)
    with torch.inference_mode():
        sys.setprofile(prof)
        try:
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kw: cache})
        finally:
            sys.setprofile(None)
    assert output_cache(out) is not None
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a random 4-layer model instead (smoke test)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--count-calls", action="store_true", help="only count Python calls per decode step")
    args = ap.parse_args(argv)
    if args.tiny:
        dense = tiny_model()
    else:
        import llmprune as lp

        dense = lp.load(args.model, device="cpu", dtype="float32").model
    fam = family_for(dense.config)
    variants = {"overhead": surgery.apply(dense, overhead_plan(dense), fam)}
    for s in args.sparsities:
        variants[f"prune {s:.0%}"] = surgery.apply(dense, pruned_plan(dense, s), fam)
    _, hidden, vocab = model_shape(dense)
    if args.count_calls:
        base = count_calls(dense, vocab)
        print(f"| model | Python calls per decode step | vs dense ({type(dense).__name__}) |\n|---|---|---|")
        print(f"| dense | {base} | 1.00 |")
        for name, m in variants.items():
            c = count_calls(m, vocab)
            print(f"| {name} ({type(m).__name__}) | {c} | {c / base:.2f} |")
        return 0
    settings = BenchSettings(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                             batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, warmup=args.warmup,
                             threads=args.threads)
    g_dense = model_shape(dense)[0]
    print(f"{args.model if not args.tiny else 'tiny'}; prompt {args.prompt_len}, {args.decode_tokens} decode steps, "
          f"{args.repeats} repeats (ABBA), {torch.get_num_threads()} threads")
    print("| variant | batch | dense tok/s | pruned tok/s | ratio [95% CI] | ideal (FLOPs) | ideal (bytes) "
          "| measured/ideal(bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in variants.items():
        flops = ideal_speedups(g_dense, model_shape(m)[0], hidden, vocab, args.prompt_len, args.decode_tokens)
        samples = time_models({"dense": dense, "pruned": m}, vocab, settings, progress=False)
        for bs in args.batch_sizes:
            d = [bs * args.decode_tokens / t for t in samples[("dense", bs)].decode_s]
            p = [bs * args.decode_tokens / t for t in samples[("pruned", bs)].decode_s]
            ci = ratio_ci(p, d)
            ratio = statistics.fmean(a / b for a, b in zip(p, d))
            ideal_b = (bytes_per_step(dense, vocab, bs, args.prompt_len, args.decode_tokens)
                       / bytes_per_step(m, vocab, bs, args.prompt_len, args.decode_tokens))
            ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[-]"
            ideal_f = flops.get("ideal_decode_speedup", math.nan)
            print(f"| {name} | {bs} | {statistics.median(d):.1f} | {statistics.median(p):.1f} | {ratio:.3f} {ci_s} "
                  f"| {ideal_f:.3f} | {ideal_b:.3f} | {ratio / ideal_b:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
