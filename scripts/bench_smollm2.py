"""Dense vs pruned SmolLM2-135M on this machine: measured vs ideal (FLOP) speed-ups, and where time goes.

    python scripts/bench_smollm2.py [--prompt-len 256] [--batch-sizes 1,4] [--repeats 5] [--threads 2]

Builds (once, under bench_out/) two pruned checkpoints with the existing tools:
  attn-drop  `llmprune apply` of a plan that removes the attention sublayer of the deepest K layers
             (non-uniform, llmprune_llama; what FinerCut mostly removes)
  mag20      `llmprune --recipe magnitude --sparsity 0.2` (uniform: KV groups and FFN channels; stock config)
  mag20-r8   the same plan with FFN widths rounded down to a multiple of 8 (1297 -> 1296), applied with
             `llmprune apply`: isolates the cost of a GEMM-unfriendly width
then runs `llmprune bench` on each against the dense model and prints the speed tables, plus a
breakdown of the dense model's prefill time by component (attention / FFN sublayers / rest), measured
with forward hooks, next to the FLOP model's shares: the gap between the two explains why removing a
sublayer saves more or less time than its FLOPs suggest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import llmprune as lp  # noqa: E402
from llmprune.evaluate.bench import BenchSettings, random_prompts  # noqa: E402
from llmprune.evaluate.flops import attention_flops, linear_flops, lm_head_flops  # noqa: E402
from llmprune.evaluate.speed import model_shape, speed_table  # noqa: E402
from llmprune.plan import AttnPlan, Plan  # noqa: E402

MODEL = "smollm2-135m"


def cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "llmprune", *args, "-q"], check=True, env=env, cwd=REPO)


def build_checkpoints(out: Path, attn_layers: int, round_ffn: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    ckpts = {f"attn-drop{attn_layers}": out / f"smol-attn{attn_layers}", "mag20": out / "smol-mag20"}
    attn = ckpts[f"attn-drop{attn_layers}"]
    if not (attn / "pruning.json").exists():
        loaded = lp.load(MODEL, device="cpu", dtype="float32")
        geo = loaded.family.geometry(loaded.model)
        plan = Plan.identity(geo, method="manual", base_model=loaded.base_model)
        for i in range(len(geo) - attn_layers, len(geo)):
            plan.layers[i].attn = AttnPlan(drop=True)
        plan_file = out / f"plan-attn{attn_layers}.json"
        plan.save(plan_file)
        del loaded
        cli("apply", "--model", MODEL, "--plan", str(plan_file), "-o", str(attn), "--overwrite")
    if not (ckpts["mag20"] / "pruning.json").exists():
        cli("--model", MODEL, "--recipe", "magnitude", "--sparsity", "0.2", "-o", str(ckpts["mag20"]), "--overwrite")
    if round_ffn > 1:  # the same plan with every FFN width rounded down to a multiple (lowest-norm channels go)
        name = f"mag20-r{round_ffn}"
        ckpts[name] = out / f"smol-mag20-r{round_ffn}"
        if not (ckpts[name] / "pruning.json").exists():
            from llmprune.prune.width.magnitude import ffn_channel_norms

            loaded = lp.load(MODEL, device="cpu", dtype="float32")
            plan = Plan.load(ckpts["mag20"])
            for i, lp_ in enumerate(plan.layers):
                keep = lp_.mlp.keep_channels
                if keep and len(keep) % round_ffn:
                    norms = ffn_channel_norms(loaded.family.block(loaded.model, i))[keep]
                    top = norms.argsort(descending=True)[: len(keep) - len(keep) % round_ffn]
                    lp_.mlp.keep_channels = sorted(keep[j] for j in top.tolist())
            plan_file = out / f"plan-mag20-r{round_ffn}.json"
            plan.save(plan_file)
            del loaded
            cli("apply", "--model", MODEL, "--plan", str(plan_file), "-o", str(ckpts[name]), "--overwrite")
    return ckpts


@torch.inference_mode()
def breakdown(model: torch.nn.Module, prompt_len: int, batch: int, repeats: int) -> dict[str, float]:
    """Median share of prefill wall time in attention sublayers, FFN sublayers and everything else."""
    fam = lp.family_for(model.config)
    spent = {"attn": 0.0, "mlp": 0.0}
    hooks = []

    def timer(kind: str):  # noqa: ANN202
        def pre(_m, _a):  # noqa: ANN001, ANN202
            _m._t0 = time.perf_counter()

        def post(_m, _a, _o):  # noqa: ANN001, ANN202
            spent[kind] += time.perf_counter() - _m._t0
        return pre, post

    for i in range(len(fam.layers(model))):
        b = fam.block(model, i)
        for kind, view in (("attn", b.attn), ("mlp", b.mlp)):
            if view is not None:
                pre, post = timer(kind)
                hooks += [view.module.register_forward_pre_hook(pre), view.module.register_forward_hook(post)]
    ids = random_prompts(model.config.vocab_size, batch, prompt_len, 0)
    shares: dict[str, list[float]] = {"attn": [], "mlp": [], "rest": [], "total_ms": []}
    try:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            spent.update(attn=0.0, mlp=0.0)
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            total = time.perf_counter() - t
            shares["attn"].append(spent["attn"] / total)
            shares["mlp"].append(spent["mlp"] / total)
            shares["rest"].append(1 - (spent["attn"] + spent["mlp"]) / total)
            shares["total_ms"].append(total * 1e3)
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(v) for k, v in shares.items()}


def flop_shares(model: torch.nn.Module, prompt_len: int) -> dict[str, float]:
    geo, hidden, vocab = model_shape(model)
    attended = prompt_len * (prompt_len + 1) / 2
    attn = sum(prompt_len * 2 * g.attn_params() for g in geo) + attention_flops(geo, attended)
    mlp = sum(prompt_len * 2 * g.mlp_params() for g in geo)
    rest = lm_head_flops(hidden, vocab)
    total = attn + mlp + rest
    assert abs(total - (prompt_len * linear_flops(geo) + attention_flops(geo, attended) + rest)) < 1
    return {"attn": attn / total, "mlp": mlp / total, "rest": rest / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench_out"))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attn-layers", type=int, default=10, help="deepest layers whose attention is removed")
    ap.add_argument("--round-ffn", type=int, default=8, help="also bench mag20 with FFN widths rounded down to "
                    "this multiple (0: skip); odd widths such as 1297 run the gate/up GEMMs slowly on CPU")
    ap.add_argument("--only", default=None, help="comma-separated subset of checkpoints to bench")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time the dense model's components")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = BenchSettings(prompt_len=a.prompt_len, decode_tokens=a.decode_tokens, repeats=a.repeats,
                             warmup=a.warmup, threads=a.threads,
                             batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")))
    ckpts = build_checkpoints(Path(a.out), a.attn_layers, a.round_ffn)
    summary = []
    for name, path in ckpts.items():
        if a.only and name not in a.only.split(","):
            continue
        t = time.perf_counter()
        report = lp.api.run_bench(str(path), MODEL, settings, device="cpu", dtype="float32", memory=not a.no_memory,
                                  progress=False)
        sp = report["speed"]
        print(f"\n== {name} ({path}) [{time.perf_counter() - t:.0f} s]\n{speed_table(sp)}")
        summary.append((name, sp))
    print(f"\n{'checkpoint':<12} {'ideal':>6} {'prefill':>8} {'meas/ideal':>10} {'gain/ideal gain':>15} "
          f"{'decode':>7} {'ideal dec':>9} {'mem saved':>9} {'KV saved':>8}")
    for name, sp in summary:
        def f(k: str, fmt: str = "{:.3f}") -> str:
            return "-" if sp.get(k) is None else fmt.format(sp[k])
        print(f"{name:<12} {f('ideal_speedup'):>6} {f('prefill_speedup'):>8} {f('prefill_vs_ideal', '{:.0%}'):>10} "
              f"{f('prefill_gain_vs_ideal', '{:.0%}'):>15} {f('decode_speedup'):>7} {f('ideal_decode_speedup'):>9} "
              f"{f('memory_saving', '{:.1%}'):>9} {f('kv_cache_saving', '{:.1%}'):>8}")
    if a.breakdown:
        dense = lp.load(MODEL, device="cpu", dtype="float32").model
        for bs in settings.batch_sizes:
            m = breakdown(dense, a.prompt_len, bs, a.repeats)
            fl = flop_shares(dense, a.prompt_len)
            print(f"\ndense prefill, batch {bs}, prompt {a.prompt_len}: {m['total_ms']:.0f} ms; share of time vs "
                  f"share of FLOPs")
            for k in ("attn", "mlp", "rest"):
                print(f"  {k:<5} time {m[k]:6.1%}   FLOPs {fl[k]:6.1%}")
    print(json.dumps({"threads": torch.get_num_threads(), "settings": vars(a)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
