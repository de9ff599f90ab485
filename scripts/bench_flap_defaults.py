#!/usr/bin/env python
"""Which FLAP choices should be the default? Perplexity of each variant on a GQA and an MHA model.

    nice -n 10 python scripts/bench_flap_defaults.py                       # both models, 20 % and 50 %
    python scripts/bench_flap_defaults.py --models gqa --sparsities 0.2 --nsamples 4 --eval-windows 2

Models: `smollm2-135m` (GQA, 9 query / 3 KV heads) and the same network made multi-head by repeating
each KV head for every query head that reads it (`--mha-dir`, built on first use) — exactly the same
function, so any difference between the two columns comes from how the pruner sees the heads.
Variants (recipe `flap`, overrides):
    default            the recipe as shipped
    square             + square_attention: true  (the released code's extra squaring of attention scores;
                       the default since 2026-12-03)
    nosquare           + square_attention: false (the default before)
    faithful           faithful: true            (squaring + released budget arithmetic)
    faithful-nosquare  faithful: true, square_attention: false
Calibration: python-docs train split; evaluation: its test split (disjoint). Each run is a fresh
process (scripts/bench_width.py's worker).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_width  # noqa: E402  (sibling script: its worker runs one measurement per process)

VARIANTS = {
    "default": {},
    "square": {"pruner.square_attention": True},
    "nosquare": {"pruner.square_attention": False},
    "faithful": {"pruner.faithful": True},
    "faithful-nosquare": {"pruner.faithful": True, "pruner.square_attention": False},
}


def build_mha(out: Path, source: str = "smollm2-135m") -> Path:
    """Save `source` with every KV head repeated per query head (num_key_value_heads = num_attention_heads)."""
    if (out / "config.json").exists():
        return out
    import torch

    import llmprune as lp

    loaded = lp.load(source, device="cpu", dtype="float32")
    model, cfg = loaded.model, loaded.model.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    g = n_q // n_kv
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = lin.weight.view(n_kv, hd, -1).repeat_interleave(g, dim=0).reshape(n_q * hd, -1)  # [n_q·hd, d]
                new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
                new.weight.copy_(w)
                if lin.bias is not None:
                    new.bias.copy_(lin.bias.view(n_kv, hd).repeat_interleave(g, dim=0).reshape(-1))
                setattr(layer.self_attn, "k_proj" if lin is layer.self_attn.k_proj else "v_proj", new)
            layer.self_attn.num_key_value_groups = 1
    cfg.num_key_value_heads = n_q
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gqa", "mha"], choices=["gqa", "mha"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--mha-dir", type=Path, default=Path.home() / ".cache" / "llmprune" / "models" / "smollm2-135m-mha")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense rows")
    ap.add_argument("--in-process", action="store_true", help="run every measurement in this process (less overhead)")
    args = ap.parse_args(argv)
    run = bench_width.measure if args.in_process else bench_width.run_worker
    models = {"gqa": "smollm2-135m"}
    if "mha" in args.models:
        models["mha"] = str(build_mha(args.mha_dir))
    base = {"device": "cpu", "dtype": "float32", "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": 8,
            "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen, "calib_data": "python-docs",
            "eval_data": "python-docs"}
    print(f"calibration python-docs train {args.nsamples}x{args.seqlen}; evaluation python-docs test "
          f"{args.eval_windows}x{args.eval_seqlen}; cpu float32", flush=True)
    results = []
    if not args.no_dense:
        for m in args.models:
            dense = run({**base, "model": models[m], "name": f"{m}/dense"})
            results.append(dense)
            print(f"{m} dense ppl {dense.get('ppl', dense.get('error'))}", flush=True)
    for s in args.sparsities:  # sparsity-major: the first complete table row arrives soonest
        for m in args.models:
            for v in args.variants:
                r = run({**base, "model": models[m], "name": f"{m}/{v}", "recipe": "flap",
                         "overrides": VARIANTS[v], "sparsity": s})
                results.append(r)
                val = f"{r['ppl']:.2f} (linear sparsity {r['linear_sparsity']:.2%})" if "ppl" in r else r["error"]
                print(f"{m} {v:18s} {s:.0%}: {val}", flush=True)
    print("\n| model | sparsity | " + " | ".join(args.variants) + " |")
    print("|---|---|" + "---|" * len(args.variants))
    for m in args.models:
        for s in args.sparsities:
            cells = []
            for v in args.variants:
                r = next((r for r in results if r["name"] == f"{m}/{v}" and r.get("sparsity_target") == s), {})
                cells.append(f"{r['ppl']:.2f}" if "ppl" in r else "error")
            print(f"| {m} | {s:.0%} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": base, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
