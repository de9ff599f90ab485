"""Command line: a thin argparse front (one subparser per verb), each verb calls one command function.

    llmprune prune   --model M --recipe R [--sparsity S] -o DIR  the main job (load, calibrate, plan, apply, save)
    llmprune --model M --recipe R ... -o DIR                      the same: `prune` is the default verb
    llmprune plan    --model M --recipe R -o plan.json            decide only; write the Plan
    llmprune apply   --model M --plan plan.json -o DIR            base model + plan -> checkpoint
    llmprune inspect PATH                                         per-layer structure of a checkpoint or plan
    llmprune eval    DIR [--data SRC] [--tasks T,...]             perplexity and lm-eval tasks vs a baseline
    llmprune bench   DIR [--baseline MODEL]                       dense vs pruned speed and memory
    llmprune push    DIR REPO_ID [--private] [--branch B]         upload a checkpoint + model card to the Hub

One flag, one meaning: --revision is always the Hub revision of the *input* model; the branch written
on the Hub is --branch (push) / --hub-branch (prune); --baseline is the dense model to compare with
(an id, a directory, or `base` = the recorded base model) in eval and bench.

Exit codes: 0 success, 1 a run failure, 2 a usage error (see errors.py), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM). Only LlmpruneError is turned into a one-line message; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, LlmpruneError, Terminated

VERBS = {
    "prune": "load, calibrate, plan, apply and save a pruned checkpoint (the default verb)",
    "plan": "decide what to remove and write plan.json (no weights are edited)",
    "apply": "apply a plan.json to its base model and save the checkpoint",
    "inspect": "print a checkpoint's or plan's per-layer structure and parameter counts",
    "eval": "perplexity and lm-eval tasks of a checkpoint (or any model), optionally vs a baseline",
    "bench": "dense vs pruned prefill latency, decode throughput and peak memory on this device",
    "push": "upload a checkpoint and its generated model card to the Hugging Face Hub (one commit)",
}
SUBCOMMANDS = tuple(VERBS)
EPILOG = """`llmprune --model ... --recipe ...` without a verb is `llmprune prune ...`.
Run `llmprune VERB --help` for each verb's flags.

examples:
  llmprune prune --model smollm2-135m --recipe magnitude --sparsity 0.2 -o out/
  llmprune prune --model smollm2-135m --recipe finercut --target-sublayers 0.25 -o out/fc
  llmprune eval out/ --data python-docs --seqlen 256 --tasks quick --baseline base
  llmprune bench out/ --baseline base --prompt-len 256 --batch-sizes 1,4

exit codes: 0 ok, 1 run failure, 2 usage error, 130 interrupted, 143 terminated
"""


class _Deprecated(argparse.Action):
    """An old spelling kept as an alias: stores into the new flag's dest and warns once."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        logging.getLogger("llmprune").warning("%s is deprecated; use %s", option_string, self.new)
        setattr(ns, self.dest, values)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id (org/name), local HF model directory, or the embedded "
                   "offline model 'smollm2-135m'")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model; refused for "
                   "a local directory")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... (default: cuda if available, "
                   "else cpu)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: float32 on CPU, "
                   "bfloat16 on GPU); statistics are always accumulated in float64")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="built-in recipe name (see `recipes/`) or path to a YAML recipe")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of decoder-layer linear parameters to "
                   "remove, in [0, 1) (overrides the recipe)")
    p.add_argument("--target-sublayers", type=float, default=None, metavar="F", help="FinerCut's own target: "
                   "remove floor(F x #candidate sublayers), F in (0, 1), instead of a --sparsity parameter budget")
    p.add_argument("--calibration", default=None, metavar="SRC", help="calibration text: wikitext2, c4, pile, "
                   "python-docs (offline), a Hub dataset id, or a local .txt/.jsonl/.json/.parquet file or folder")
    p.add_argument("--nsamples", type=int, default=None, help="number of calibration sequences")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence (at most the model's "
                   "max_position_embeddings)")
    p.add_argument("--seed", type=int, default=None, help="seed for calibration sampling, >= 0 (same seed, same plan)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward pass")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set pruner.metric=ifv (repeatable)")
    p.add_argument("--offload", action="store_true", help="keep decoder blocks on the CPU and move one at a "
                   "time to the device while calibrating (for models larger than device memory)")


def _add_output_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", required=True, help=f"output {what}; never the input model's directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (atomically: "
                   "the old checkpoint stays until the new one is complete and verified)")


def _add_main_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation after saving (the in-memory pruned model; report written into -o DIR)")
    g.add_argument("--eval-tasks", default=None, metavar="T,...", help="lm-eval tasks or task lists (eval/*.yaml), "
                   "e.g. zero_shot or arc_easy,hellaswag")
    g.add_argument("--eval-data", default=None, metavar="SRC", help="also report perplexity on this text (same "
                   "sources as eval --data)")
    g.add_argument("--eval-limit", type=float, default=None, metavar="N", help="at most N examples per task")
    g.add_argument("--eval-seqlen", type=int, default=512, metavar="L", help="perplexity window (default 512)")
    g.add_argument("--eval-batch-size", type=int, default=1, metavar="B", help="batch size for evaluation")
    g.add_argument("--eval-baseline", action="store_true", help="also evaluate the dense --model for retained %%")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of custom lm-eval task YAMLs (repeatable)")


def _add_push_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("publishing (see `llmprune push --help`)")
    g.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="after a successful save, upload the "
                   "checkpoint and its model card to this Hub repo (token checked before pruning starts)")
    g.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    g.add_argument("--hub-branch", default=None, metavar="BRANCH", help="push to this branch (created if new; "
                   "default main); same as `push --branch`")
    g.add_argument("--hub-revision", dest="hub_branch", action=_Deprecated, new="--hub-branch", metavar="BRANCH",
                   help=argparse.SUPPRESS)
    g.add_argument("--hub-token", default=None, help="Hub token (default: HF_TOKEN, then `hf auth login`); "
                   "never recorded in pruning.json")
    g.add_argument("--hub-endpoint", default=None, metavar="URL", help="Hub URL (default: $HF_ENDPOINT or "
                   "https://huggingface.co)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (llmprune's, lm-eval's, the "
                   "Hub's), warnings only")


def _verb(sub: Any, name: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=VERBS[name], description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _build_prune(sub: Any) -> None:
    p = _verb(sub, "prune", "Structured pruning of a Hugging Face causal LM: load, calibrate, plan, apply, verify "
              "and save a smaller checkpoint. `llmprune --model ...` without a verb is the same.")
    _add_model_args(p)
    _add_recipe_args(p)
    _add_output_args(p, "directory for the pruned checkpoint")
    _add_main_eval_args(p)
    _add_push_args(p)
    _add_common(p)


def _build_plan(sub: Any) -> None:
    p = _verb(sub, "plan", "Decide what to remove; write plan.json (records the base model's identity).")
    _add_model_args(p)
    _add_recipe_args(p)
    p.add_argument("-o", "--output", required=True, help="where to write the plan (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    _add_common(p)


def _build_apply(sub: Any) -> None:
    p = _verb(sub, "apply", "Apply a plan to its base model; save the checkpoint.")
    _add_model_args(p)
    p.add_argument("--plan", required=True, help="plan.json written by `llmprune plan` (or a checkpoint dir)")
    p.add_argument("--force", action="store_true", help="apply even when --model is not the model the plan was "
                   "made for (its recorded config/weights fingerprint differs)")
    _add_output_args(p, "directory for the pruned checkpoint")
    _add_common(p)


def _build_inspect(sub: Any) -> None:
    p = _verb(sub, "inspect", "Per-layer structure and parameter counts of a checkpoint or plan.")
    p.add_argument("path", help="checkpoint directory or plan.json")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    _add_common(p)


def _build_eval(sub: Any) -> None:
    p = _verb(sub, "eval", "Perplexity and lm-eval tasks of a checkpoint or model, optionally against a dense "
              "baseline; writes report.json/md/png into a checkpoint directory.")
    p.add_argument("path", help="pruned checkpoint directory (or any model id / directory)")
    p.add_argument("--data", default=None, help="perplexity text: wikitext2 (default when no --tasks), c4, pile, "
                   "python-docs (offline), a Hub dataset id, or a local file/folder")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--seqlen", type=int, default=512, help="window length for perplexity (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--tasks", default=None, metavar="T,...", help="lm-eval task names and/or task lists from "
                   "eval/ (zero_shot, finercut, quick) or list YAML paths, comma-separated")
    p.add_argument("--limit", type=float, default=None, help="at most N examples per task (a value < 1 is a "
                   "fraction); overrides the task lists")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (overrides the task lists)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of custom lm-eval task YAMLs (repeatable)")
    p.add_argument("--batch-size", type=int, default=1, help="windows / lm-eval requests per forward pass")
    p.add_argument("--baseline", default=None, metavar="MODEL", help="also evaluate this dense model and report "
                   "retained %%: a model id, a directory, or `base` = the model the checkpoint was pruned from "
                   "(as recorded in pruning.json; its identity is checked). Default: none")
    p.add_argument("--no-cache", action="store_true", help="recompute the baseline even when the report "
                   "holds its results for the same settings")
    p.add_argument("--report", default=None, metavar="DIR", help="where to write the report (default: the "
                   "checkpoint directory; models that are not llmprune checkpoints get none unless given)")
    _add_device_args(p)
    _add_common(p)


def _build_bench(sub: Any) -> None:
    p = _verb(sub, "bench", "Dense vs pruned speed and memory on this device: prefill latency, decode tokens/s, "
              "peak memory incl. the KV cache; merged into the checkpoint's report.")
    p.add_argument("path", help="pruned checkpoint directory")
    p.add_argument("--baseline", default="base", metavar="MODEL", help="dense model to compare with: a model id, "
                   "a directory, or `base` = the model the checkpoint was pruned from (as recorded in "
                   "pruning.json; its identity is checked). Default: base")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default 512)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps after the prompt (default 64)")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per model and batch size (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (on CPU it runs "
                   "each model in a fresh subprocess)")
    p.add_argument("--report", default=None, metavar="DIR", help="where to write the report (default: the "
                   "checkpoint directory)")
    _add_device_args(p)
    _add_common(p)


def _build_push(sub: Any) -> None:
    p = _verb(sub, "push", "Upload a pruned checkpoint to the Hugging Face Hub in one commit, with a generated "
              "model card (README.md, also written into DIR). Token: --token, else HF_TOKEN, else the "
              "`hf auth login` cache.")
    p.add_argument("path", help="checkpoint directory (written by `llmprune prune ... -o DIR`)")
    p.add_argument("repo_id", help="Hub repo, NAMESPACE/NAME (a bare NAME goes to your own namespace)")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing public "
                   "repo is refused, not silently published to)")
    p.add_argument("--branch", default=None, metavar="BRANCH", help="branch to commit to (created from main "
                   "if new; default main); same as `prune --hub-branch`")
    p.add_argument("--revision", dest="branch", action=_Deprecated, new="--branch", metavar="BRANCH",
                   help=argparse.SUPPRESS)
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN, then the "
                   "`hf auth login` cache)")
    p.add_argument("--endpoint", default=None, metavar="URL", help="Hub URL (default: $HF_ENDPOINT or "
                   "https://huggingface.co)")
    p.add_argument("--commit-message", default=None, help="commit title (default: method, sparsity, base)")
    p.add_argument("--dry-run", action="store_true", help="write README.md and list what would be uploaded; "
                   "no network")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="llmprune", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Structured pruning of Hugging Face causal LMs: load, calibrate, "
                                "plan, apply and save a smaller checkpoint.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"llmprune {__version__}", help="print the version")
    sub = p.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for build in (_build_prune, _build_plan, _build_apply, _build_inspect, _build_eval, _build_bench, _build_push):
        build(sub)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; without a verb it is the main job (`prune`)."""
    if not argv or argv[0] in ("-h", "--help", "--version"):
        pass
    elif argv[0] not in SUBCOMMANDS:
        argv = ["prune", *argv]
    args = build_parser().parse_args(argv)
    if args.verb is None:
        build_parser().print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _setup_logging(args.quiet)
    from .commands import COMMANDS

    previous = _handle_sigterm()
    try:
        return COMMANDS[args.verb](args, argv)
    except LlmpruneError as e:
        if os.environ.get("LLMPRUNE_DEBUG"):
            raise
        print(f"llmprune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("llmprune: interrupted (exit 130); see docs/errors.md for what a stopped run leaves", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("llmprune: terminated by SIGTERM (exit 143); see docs/errors.md for what a stopped run leaves",
              file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        _restore_sigterm(previous)


def _handle_sigterm() -> Any:
    """SIGTERM raises Terminated in the main thread, so saves clean up exactly as on Ctrl-C."""
    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm in subprocesses (memory probes)
        silence_progress_bars()


def silence_progress_bars() -> None:
    """Turn off every tqdm bar in this process: lm-eval, datasets and the Hub pass their own `disable=`,
    and tqdm reads TQDM_DISABLE only when it is imported, so the flag is forced at construction."""
    import functools

    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "_llmprune_quiet", False):
        return

    @functools.wraps(init)
    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > 10:  # `disable` given positionally (11th parameter of tqdm())
            args = (*args[:10], True, *args[11:])
        else:
            kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet_init._llmprune_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency, but keep -q working without it
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
