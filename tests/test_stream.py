"""Streaming (stream.py, shards.py): a model pruned block by block from its safetensors files gives the
same plan and the same checkpoint, tensor for tensor, as the in-memory path; bad files fail clearly;
a failed or killed run leaves no output directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmprune import api, stream
from llmprune.checkpoint import CheckpointError
from llmprune.errors import UsageError
from llmprune.loading import resolve_dtype
from llmprune.recipe import load_recipe
from llmprune.shards import ShardError

from .conftest import make_model
from .test_checkpoint import run_without_llmprune

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bf16_dir(tmp_path: Path, tiny_tokenizer) -> Path:  # noqa: ANN001
    """A tiny bf16 llama saved in several shards (index + files), untied head, as big checkpoints are."""
    d = tmp_path / "base"
    make_model("llama", layers=4).to(torch.bfloat16).save_pretrained(d, max_shard_size=40_000)
    tiny_tokenizer.save_pretrained(d)
    assert (d / "model.safetensors.index.json").exists()
    return d


def recipe(method: str, cal: Path, **extra):  # noqa: ANN201
    over = {"sparsity": 0.3, "calibration.source": str(cal), "calibration.nsamples": 4, "calibration.seqlen": 32,
            "calibration.batch_size": 2, **extra}
    return load_recipe(method, over)


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def both_paths(model_dir: Path, tmp_path: Path, method: str, cal: Path, **extra) -> tuple[Path, Path]:
    outs = []
    for s in (False, True):
        res = api.run(str(model_dir), recipe(method, cal, **extra), tmp_path / f"out-{s}", device="cpu", stream=s,
                      progress=False)
        assert res.path_taken.startswith("streamed" if s else "in memory")
        outs.append(res.out)
    return outs[0], outs[1]


@pytest.mark.parametrize("method,extra", [("magnitude", {}), ("wanda-sp", {}), ("flap", {"pruner.structure": "AL-AM"}),
                                          ("cfsp", {}), ("obs", {}), ("wanda-sp", {"pruner.reconstruct": "ls"}),
                                          ("finercut", {"calibration.nsamples": 3}),
                                          ("finercut", {"calibration.nsamples": 3, "pruner.mode": "fast"})])
def test_streamed_equals_in_memory(tmp_path, bf16_dir, text_file, method, extra):
    mem, st = both_paths(bf16_dir, tmp_path, method, text_file, **extra)
    a, b = tensors(mem), tensors(st)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k], b[k]), k
    assert json.loads((mem / "config.json").read_text()) == json.loads((st / "config.json").read_text())
    pa, pb = (json.loads((d / "pruning.json").read_text()) for d in (mem, st))
    for p in (pa, pb):  # wall time and the streamed run's transfer counts are not part of the result
        for k in ("search_seconds", "block_transfers", "bytes_moved"):
            p["plan"].get("extras", {}).get("finercut", {}).pop(k, None)
    assert pa["plan"] == pb["plan"] and pa["params"] == pb["params"]
    assert pa["params"]["sparsity"] > (0.1 if method == "finercut" else 0.2)  # something was pruned
    assert sorted(p.name for p in mem.iterdir()) == sorted(p.name for p in st.iterdir())


def test_tied_embeddings_and_float32_run(tmp_path, tiny_tokenizer, text_file):
    d = tmp_path / "tied"
    make_model("qwen2", tie=True).save_pretrained(d)  # float32, single file, tied head, q/k/v biases
    tiny_tokenizer.save_pretrained(d)
    mem, st = both_paths(d, tmp_path, "flap", text_file)
    a, b = tensors(mem), tensors(st)
    assert "lm_head.weight" not in b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_output_loads_with_and_without_llmprune(tmp_path, bf16_dir, text_file, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(stream, "MAX_SHARD_SIZE", 30_000)
    res = api.run(str(bf16_dir), recipe("flap", text_file), tmp_path / "st", device="cpu", stream=True, progress=False)
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in res.out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors(res.out).values())
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["model_type"] == "llmprune_llama"  # non-uniform: the remote-code path is exercised
    ids = torch.arange(10).unsqueeze(0) * 7 % 300 + 3
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(res.out).eval()(ids).logits
    theirs = run_without_llmprune(res.out, ids)
    assert torch.allclose(ours.float(), torch.tensor(theirs["logits"]), atol=1e-2)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("mode", [True, "auto"])  # auto checks the files before choosing
def test_truncated_shard_names_the_file(tmp_path, bf16_dir, text_file, mode):
    shard = sorted(bf16_dir.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=rf"{shard.name}.*truncated"):
        api.run(str(bf16_dir), recipe("magnitude", text_file), tmp_path / "o", device="cpu", stream=mode,
                progress=False)
    assert not (tmp_path / "o").exists()


def test_corrupt_header_names_the_file(tmp_path, bf16_dir, text_file):
    shard = sorted(bf16_dir.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name}.*corrupt"):
        api.run(str(bf16_dir), recipe("magnitude", text_file), tmp_path / "o", device="cpu", stream=True,
                progress=False)


def test_missing_shard_names_the_file(tmp_path, bf16_dir, text_file):
    shard = sorted(bf16_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ShardError, match=rf"{shard.name}.*missing"):
        stream.choose("auto", str(bf16_dir), "magnitude", torch.device("cpu"), "auto")


def test_failure_while_writing_leaves_nothing(tmp_path, bf16_dir, text_file, monkeypatch):
    calls = {"n": 0}
    real = stream.ShardWriter.put

    def failing(self, name, t):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as Ctrl-C would, after some tensors are on disk
        return real(self, name, t)

    monkeypatch.setattr(stream.ShardWriter, "put", failing)
    with pytest.raises(KeyboardInterrupt):
        api.run(str(bf16_dir), recipe("magnitude", text_file), tmp_path / "o", device="cpu", stream=True,
                progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", text_file.name])  # no out, no partial dir


KILLED = textwrap.dedent("""
    import os, signal, sys
    from llmprune import api, stream
    from llmprune.recipe import load_recipe
    real = stream.ShardWriter.put
    n = [0]
    def put(self, name, t):
        n[0] += 1
        if n[0] == 6:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup can run
        return real(self, name, t)
    stream.ShardWriter.put = put
    r = load_recipe("magnitude", {"sparsity": 0.3})
    api.run(sys.argv[1], r, sys.argv[2], device="cpu", stream=True, progress=False)
""")


def test_killed_run_leaves_no_output_directory(tmp_path, bf16_dir):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(bf16_dir), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()  # only a hidden .killed.partial-<pid> sibling can remain


@pytest.mark.parametrize("method,extra", [("wanda-sp", {}), ("finercut", {"calibration.nsamples": 3})])
def test_only_one_block_is_ever_in_memory(tmp_path, bf16_dir, text_file, monkeypatch, method, extra):
    real_blocks: list[int] = []
    orig = stream.StreamLoader._real

    def spy(self, key, slots):  # noqa: ANN001, ANN202
        real_blocks.append(len({k for k, d in self.depth.items() if d} - {"rest"} | ({key} - {"rest"})))
        return orig(self, key, slots)

    monkeypatch.setattr(stream.StreamLoader, "_real", spy)
    api.run(str(bf16_dir), recipe(method, text_file, **extra), tmp_path / "o", device="cpu", stream=True,
            progress=False)
    assert real_blocks and max(real_blocks) == 1


def test_auto_chooses_by_memory(bf16_dir, monkeypatch):
    cpu = torch.device("cpu")
    assert not stream.choose("auto", str(bf16_dir), "flap", cpu, "auto").stream  # tiny: fits
    monkeypatch.setattr(stream, "available_memory", lambda device: (1000, None))
    choice = stream.choose("auto", str(bf16_dir), "flap", cpu, "auto")
    assert choice.stream and "streamed" in choice.reason
    assert stream.choose("auto", str(bf16_dir), "finercut", cpu, "auto").stream
    searched = "obs (allocation: search)"  # what api.run asks for a searched allocation: no streamed path yet
    assert not stream.choose("auto", str(bf16_dir), searched, cpu, "auto").stream
    with pytest.raises(stream.StreamError, match=r"allocation: search.*drop --stream"):
        stream.choose("on", str(bf16_dir), searched, cpu, "auto")


def test_model_bytes_in_run_dtype(bf16_dir):
    src = stream.ShardedSource(bf16_dir)
    assert stream.model_bytes(src, torch.float32) == 2 * stream.model_bytes(src, torch.bfloat16) == 2 * src.nbytes


def test_dtype_auto_is_the_checkpoint_dtype(bf16_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(bf16_dir)
    assert resolve_dtype("auto", torch.device("cpu"), cfg) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu"), cfg) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), None) == torch.float32  # nothing recorded


def test_cli_prints_the_path_taken(tmp_path, bf16_dir, capsys):
    from llmprune.cli import main

    rc = main(["--model", str(bf16_dir), "--recipe", "magnitude", "--sparsity", "0.2", "-o", str(tmp_path / "c"),
               "--device", "cpu", "--stream", "--quiet"])
    assert rc == 0
    assert "pruning path: streamed" in capsys.readouterr().out


def test_hub_id_downloads_safetensors_then_streams(tmp_path, bf16_dir, monkeypatch):
    import huggingface_hub

    asked = {}

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):  # noqa: ANN001, ANN003, ANN202
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(bf16_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    res = api.run("acme/tiny-llama", load_recipe("magnitude", {"sparsity": 0.2}), tmp_path / "o", device="cpu",
                  stream=True, revision="v1", progress=False)
    assert asked["repo_id"] == "acme/tiny-llama" and asked["revision"] == "v1"
    assert "*.safetensors" in asked["patterns"] and not any("bin" in p for p in asked["patterns"])
    assert json.loads((res.out / "pruning.json").read_text())["plan"]["base_model"] == "acme/tiny-llama"


@pytest.mark.parametrize("family", ["gemma2", "phi3", "olmo2"])
def test_streamed_equals_in_memory_other_families(tmp_path, tiny_tokenizer, text_file, family):
    d = tmp_path / family
    make_model(family, layers=3).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    mem, st = both_paths(d, tmp_path, "flap", text_file)
    a, b = tensors(mem), tensors(st)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((mem / "config.json").read_text()) == json.loads((st / "config.json").read_text())


def test_finercut_with_offloaded_blocks_equals_in_memory(tmp_path, bf16_dir, text_file, caplog):
    """--offload: the search keeps its cached residuals and brings one block at a time (residency.py)."""
    import logging

    plans = []
    for offload in (False, True):
        with caplog.at_level(logging.INFO):
            res = api.run(str(bf16_dir), recipe("finercut", text_file, **{"calibration.nsamples": 3}),
                          tmp_path / f"o{offload}", device="cpu", stream=False, offload=offload, progress=False)
        plans.append(json.loads((res.out / "pruning.json").read_text()))
    a, b = plans
    assert a["plan"]["layers"] == b["plan"]["layers"]
    fa, fb = (p["plan"]["extras"]["finercut"] for p in plans)
    assert fa["final_divergence"] == pytest.approx(fb["final_divergence"], rel=1e-6)
    assert "bytes_moved" not in fa and fb["bytes_moved"] > 0 and fb["block_transfers"] >= 4
    assert "one pass over the blocks moves up to" in caplog.text
    with pytest.raises(UsageError, match="mode: reference"):
        api.run(str(bf16_dir), recipe("finercut", text_file, **{"pruner.mode": "reference"}), tmp_path / "r",
                device="cpu", stream=True, progress=False)


def test_streamed_save_runs_the_written_checkpoint_before_declaring_success(tmp_path, bf16_dir, text_file,
                                                                            monkeypatch):
    """verify_streamed runs what was written, block by block from its own shards: a broken tensor fails the
    save and nothing is left behind."""
    ran = []
    real_verify = stream.verify_streamed
    monkeypatch.setattr(stream, "verify_streamed", lambda *a: ran.append(a[0]) or real_verify(*a))
    api.run(str(bf16_dir), recipe("magnitude", text_file), tmp_path / "ok", device="cpu", stream=True, progress=False)
    assert ran and (tmp_path / "ok" / "config.json").exists()

    real_put = stream.ShardWriter.put

    def nan_put(self, name, t):  # noqa: ANN001, ANN202
        return real_put(self, name, torch.full_like(t, float("nan")) if "layers.1.mlp.down" in name else t)

    monkeypatch.setattr(stream.ShardWriter, "put", nan_put)
    with pytest.raises(CheckpointError, match="non-finite"):
        api.run(str(bf16_dir), recipe("magnitude", text_file), tmp_path / "bad", device="cpu", stream=True,
                progress=False)
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "ok", text_file.name])
