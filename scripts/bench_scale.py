"""Peak memory and wall time of pruning in memory vs streamed (--stream), on random-weight Llama models
of real shapes built on the fly and saved as bf16 safetensors shards.

    python scripts/bench_scale.py --sizes 0.3B,1.2B --method wanda-sp --out bench_scale/
    python scripts/bench_scale.py --sizes 0.3B,1.2B,3B --modes stream          # streaming only

Every (size, mode) runs in a fresh subprocess; its peak resident memory is the high-water mark of that
process's own address space (`VmHWM` in /proc/self/status). Not `ru_maxrss`: Linux carries a parent's
peak across fork + exec into the child's `ru_maxrss`, so a child of a process that just built a 2 GB
model would report at least 2 GB. Models are built in a subprocess of their own for the same reason.
Results go to `OUT/results.json` (merged with earlier runs) and `OUT/memory_vs_size.png`. Models are written once to `OUT/models/` (delete to rebuild);
the random weights are built one tensor at a time, so building a model needs little memory either.
Times measured on a shared or busy machine are not meaningful; peak memory is.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# hidden, layers, FFN, query heads, KV heads (vocabulary 49152: SmolLM2's tokenizer; head untied)
SHAPES = {
    "0.3B": (1024, 24, 2816, 16, 4),
    "0.3B-12L": (1024, 12, 2816, 16, 4),  # same width, half the layers: streamed memory must not change
    "1.2B": (2048, 22, 5632, 32, 4),  # TinyLlama's shape: 1.17B parameters with this vocabulary
    "3B": (3072, 28, 8192, 24, 8),  # Llama-3.2-3B's shape
    "8B": (4096, 32, 14336, 32, 8),  # Llama-3-8B's shape (needs ~16 GB of disk)
}
VOCAB = 49152
TOKENIZER = "smollm2-135m"


def build(name: str, root: Path) -> Path:
    """Write a random bf16 model of shape `name` (config, tokenizer, ~1 GB shards) unless it exists."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from llmprune.embedded import resolve_embedded
    from llmprune.stream import skeleton

    d = root / name
    if (d / "config.json").exists():
        return d
    tmp = root / f".{name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hidden, layers, ffn, nq, nkv = SHAPES[name]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=nq, num_key_value_heads=nkv, tie_word_embeddings=False,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_embedded(TOKENIZER)).save_pretrained(tmp)
    meta = skeleton(cfg, torch.bfloat16).state_dict()
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in meta.items():  # one tensor at a time; a shard is written when it reaches ~1 GB
        if "norm" in key:
            val = 1 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            scale = 0.02 if "embed" in key or "lm_head" in key else t.shape[-1] ** -0.5
            val = torch.randn(t.shape, generator=g) * scale
        shards[-1][key] = val.to(torch.bfloat16)
        size += shards[-1][key].numel() * 2
        if size >= 1 << 30:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map, total = {}, 0
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in s})
        total += sum(v.numel() * 2 for v in s.values())
        s.clear()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    tmp.rename(d)
    return d


def child(args: argparse.Namespace) -> None:
    """One measured run (in its own process): prune `args.model` and print a JSON line."""
    from llmprune import api
    from llmprune.recipe import load_recipe

    recipe = load_recipe(args.method, {"sparsity": args.sparsity, "calibration.source": "python-docs",
                                       "calibration.nsamples": args.nsamples, "calibration.seqlen": args.seqlen})
    t0 = time.perf_counter()
    res = api.run(args.model, recipe, args.output, device=args.device, stream=args.mode == "stream",
                  overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # includes the parent's peak; for reference
    print(json.dumps({"peak_rss_bytes": peak_rss(), "ru_maxrss_bytes": maxrss, "wall_s": wall, "timings": res.timings,
                      "path": res.path_taken,
                      "params_before": res.params["total_before"], "params_after": res.params["total_after"]}))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: since its exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(model: Path, mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--mode", mode, "--output", str(out),
           "--method", args.method, "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run on {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same tensors, compared one at a time."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        return {k: f for f in d.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        return False
    for k in wa:
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("memory", "o-"), ("stream", "s-")):
        pts = sorted((r["params_before"] / 1e9, r["peak_rss_bytes"] / 2**30, name)
                     for name, r in ((n, v.get(mode)) for n, v in results.items()) if r)
        if pts:
            label = "in memory" if mode == "memory" else "streamed"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("model parameters (billions, bf16)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("llmprune: peak host memory while pruning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.3B,1.2B", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--modes", default="stream,memory", choices=("stream", "memory", "stream,memory", "memory,stream"), help="comma-separated: stream, memory or stream,memory (default)")
    p.add_argument("--method", default="wanda-sp")
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_scale", help="directory for models, checkpoints, results and the figure")
    p.add_argument("--keep-outputs", action="store_true", help="keep the pruned checkpoints (else deleted after "
                   "checking that both paths wrote the same tensors)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.build:
        build(args.build, Path(args.out) / "models")
        return
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    res_path = root / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    for name in args.sizes.split(","):
        subprocess.run([sys.executable, __file__, "--build", name, "--out", str(root)], check=True)
        model = root / "models" / name
        outs = {}
        for mode in args.modes.split(","):
            outs[mode] = root / "outputs" / f"{name}-{mode}"
            r = measure(model, mode, args, outs[mode])
            results.setdefault(name, {})[mode] = r
            print(f"{name:9s} {mode:6s} peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB  wall {r['wall_s']:7.1f} s  "
                  f"({r['path']})", flush=True)
            res_path.write_text(json.dumps(results, indent=1) + "\n")
        if len(outs) == 2:
            same = same_tensors(outs["memory"], outs["stream"])
            results[name]["same_tensors"] = same
            print(f"{name:9s} streamed checkpoint equals in-memory one: {same}", flush=True)
        if not args.keep_outputs:
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
        res_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, root / "memory_vs_size.png")
    print(f"results: {res_path}; figure: {root / 'memory_vs_size.png'}")


if __name__ == "__main__":
    main()
