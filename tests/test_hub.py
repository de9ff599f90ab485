"""`llmprune push`: the real huggingface_hub client against a fake Hub on 127.0.0.1 (tests/fake_hub.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.repocard_data import model_index_to_eval_results

from llmprune import modelcard
from llmprune.cli import main
from llmprune.hub import PushError, push_to_hub

from .fake_hub import FakeHub
from .hub_helpers import SMOL, front_matter, nonuniform_checkpoint, uniform_checkpoint
from .test_checkpoint import NO_LLMPRUNE

NONUNIFORM_FILES = {"README.md", "config.json", "configuration_llmprune.py", "modeling_llmprune.py",
                    "generation_config.json", "model.safetensors", "pruning.json", "llmprune_recipe.yaml",
                    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "report.json", "report.md",
                    "report.png",
                    "finercut_removed_sublayers.png"}  # the FinerCut plan's depth figure


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running fake Hub; huggingface_hub allowed online in-process, and no ambient token anywhere."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for everything else
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer):
    return nonuniform_checkpoint(tmp_path / "ckpt", tiny_tokenizer)[0]


def commits(hub: FakeHub, repo_id: str) -> list[dict]:
    return [c for c in hub.repos[repo_id].commits if c["summary"] not in ("initial commit", "(branch)")]


def test_push_uploads_the_checkpoint_in_one_commit(fake_hub, ckpt):
    for junk in ("notes.txt", "plan.json", "pytorch_model.bin", ".pruning.json.tmp"):
        (ckpt / junk).write_text("not for the Hub")
    (ckpt / ".cache").mkdir()
    (ckpt / ".cache" / "x.safetensors").write_bytes(b"temp")
    res = push_to_hub(ckpt, "alice/tiny-pruned", token="hf_alice", endpoint=fake_hub.url)

    assert fake_hub.endpoints() == ["GET /api/whoami-v2", "GET /api/models/alice/tiny-pruned",
                                    "POST /api/repos/create", "POST /api/validate-yaml",
                                    "POST /api/models/alice/tiny-pruned/preupload/main",
                                    "POST /api/models/alice/tiny-pruned/commit/main"]
    assert {c.token for c in fake_hub.calls} == {"hf_alice"}
    create = fake_hub.calls[2].body
    assert create == {"name": "tiny-pruned", "organization": "alice", "visibility": "public"}
    (commit,) = commits(fake_hub, "alice/tiny-pruned")
    assert set(commit["files"]) == NONUNIFORM_FILES == set(res.files)
    assert commit["summary"] == "llmprune 0.1.0: finercut, " \
        f"{json.loads((ckpt / 'pruning.json').read_text())['params']['sparsity']:.1%} of decoder-linear parameters " \
        f"removed from {SMOL}"
    stored = fake_hub.files("alice/tiny-pruned")
    assert stored["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()  # byte-identical weights
    for name in NONUNIFORM_FILES:
        assert stored[name] == (ckpt / name).read_bytes(), name
    assert res.commit_oid == commit["oid"] and res.revision == "main" and res.card_written

    meta = front_matter(stored["README.md"].decode())
    assert meta["base_model"] == SMOL and meta["base_model_relation"] == "finetune"
    assert "(finercut_removed_sublayers.png)" in stored["README.md"].decode()  # the depth figure is shown
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["Salesforce/wikitext"]
    assert {"llmprune", "pruned", "structured-pruning", "finercut", "custom_code"} <= set(meta["tags"])
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-pruned" and 31.2 in [r.metric_value for r in results]


def test_private_push_to_a_new_branch(fake_hub, tmp_path, tiny_tokenizer):
    d, _ = uniform_checkpoint(tmp_path / "u", tiny_tokenizer)
    res = push_to_hub(d, "acme/u-pruned", private=True, revision="pruned-v1", token="hf_alice", endpoint=fake_hub.url)
    assert fake_hub.calls[2].body["visibility"] == "private" and fake_hub.repos["acme/u-pruned"].private
    assert "POST /api/models/acme/u-pruned/branch/pruned-v1" in fake_hub.endpoints()
    assert "POST /api/models/acme/u-pruned/commit/pruned-v1" in fake_hub.endpoints()
    assert set(fake_hub.files("acme/u-pruned")) == {".gitattributes"}  # main untouched
    on_branch = fake_hub.files("acme/u-pruned", "pruned-v1")
    assert set(res.files) == set(on_branch) - {".gitattributes"}
    assert "modeling_llmprune.py" not in on_branch and "report.json" not in on_branch
    card = on_branch["README.md"].decode()
    assert "revision=\"pruned-v1\"" in card and "trust_remote_code" not in card
    assert "**Not evaluated.**" in card and "model-index" not in front_matter(card)


def test_second_identical_push_makes_no_commit(fake_hub, ckpt):
    push_to_hub(ckpt, "alice/again", token="hf_alice", endpoint=fake_hub.url)
    again = push_to_hub(ckpt, "alice/again", token="hf_alice", endpoint=fake_hub.url)
    assert len(commits(fake_hub, "alice/again")) == 1  # every file unchanged -> no empty commit
    assert again.commit_oid == commits(fake_hub, "alice/again")[0]["oid"]


def test_bare_name_goes_to_the_users_namespace(fake_hub, ckpt):
    assert push_to_hub(ckpt, "tiny", token="hf_alice", endpoint=fake_hub.url).repo_id == "alice/tiny"
    assert "alice/tiny" in fake_hub.repos


def test_invalid_repo_id(fake_hub, ckpt):
    with pytest.raises(PushError, match="invalid repo id 'alice/bad name!'"):
        push_to_hub(ckpt, "alice/bad name!", token="hf_alice", endpoint=fake_hub.url)
    assert fake_hub.endpoints() == []  # refused before any network call


def test_token_from_the_environment(fake_hub, ckpt, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    push_to_hub(ckpt, "bob/env", endpoint=fake_hub.url)
    assert {c.token for c in fake_hub.calls} == {"hf_bob"}


# Same import blocker as test_checkpoint (llmprune impossible to import), then load from the (fake) Hub.
LOAD_FROM_HUB = NO_LLMPRUNE.split("from transformers import")[0] + textwrap.dedent("""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    repo, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        logits = model(ids).logits
    print("RESULT" + json.dumps({"logits": logits.tolist(), "vocab": len(tok), "chat": tok.chat_template}))
""")


def test_pushed_model_loads_from_the_hub_without_llmprune(fake_hub, tmp_path, tiny_tokenizer, tokens):
    d, pruned = nonuniform_checkpoint(tmp_path / "ckpt", tiny_tokenizer)
    push_to_hub(d, "alice/loadable", private=True, token="hf_alice", endpoint=fake_hub.url)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "hf_alice",
           "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": "", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, "alice/loadable", json.dumps(tokens.tolist())],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    torch.testing.assert_close(torch.tensor(out["logits"]), pruned(tokens).logits, rtol=1e-4, atol=1e-4)
    assert out["vocab"] == len(tiny_tokenizer) and out["chat"] == (d / "chat_template.jinja").read_text()


# ---- errors -----------------------------------------------------------------------------------------
def test_no_token_fails_before_any_request(fake_hub, ckpt):
    with pytest.raises(PushError, match="no Hugging Face token") as e:
        push_to_hub(ckpt, "alice/x", endpoint=fake_hub.url)
    assert "hf auth login" in str(e.value) and "HF_TOKEN" in str(e.value) and "--token" in str(e.value)
    assert fake_hub.calls == []


def test_invalid_token(fake_hub, ckpt):
    with pytest.raises(PushError, match=r"rejected the token \(401") as e:
        push_to_hub(ckpt, "alice/x", token="hf_wrong", endpoint=fake_hub.url)
    assert "hf auth login" in str(e.value)
    assert fake_hub.endpoints() == ["GET /api/whoami-v2"]


def test_read_only_token(fake_hub, ckpt):
    with pytest.raises(PushError, match="read-only"):
        push_to_hub(ckpt, "alice/x", token="hf_reader", endpoint=fake_hub.url)
    assert fake_hub.endpoints() == ["GET /api/whoami-v2"]


def test_repo_that_exists_and_is_not_ours(fake_hub, ckpt):
    fake_hub.add_repo("bob/taken", owner="bob", files={"model.safetensors": b"bob's weights"})
    with pytest.raises(PushError) as e:
        push_to_hub(ckpt, "bob/taken", token="hf_alice", endpoint=fake_hub.url)
    msg = str(e.value)
    assert "no write access to bob/taken" in msg and "403" in msg and "'alice'" in msg
    assert "alice/taken" in msg and "Nothing was committed" in msg
    assert fake_hub.files("bob/taken") == {".gitattributes": fake_hub.files("bob/taken")[".gitattributes"],
                                           "model.safetensors": b"bob's weights"}
    assert "POST /api/models/bob/taken/commit/main" not in fake_hub.endpoints()


def test_namespace_that_is_not_ours(fake_hub, ckpt):
    with pytest.raises(PushError, match="no write access to carol/new"):
        push_to_hub(ckpt, "carol/new", token="hf_alice", endpoint=fake_hub.url)
    assert "carol/new" not in fake_hub.repos


@pytest.mark.parametrize("fault, expected", [(500, "the Hub failed (500"), (409, "conflict (409"),
                                             ("drop", "connection failed while committing")])
def test_failed_commit_changes_nothing_and_retry_succeeds(fake_hub, ckpt, fault, expected):
    fake_hub.fail("POST", r"/commit/", fault)
    with pytest.raises(PushError) as e:
        push_to_hub(ckpt, "alice/flaky", token="hf_alice", endpoint=fake_hub.url)
    assert expected in str(e.value) and "safe" in str(e.value)
    assert commits(fake_hub, "alice/flaky") == [] and set(fake_hub.files("alice/flaky")) == {".gitattributes"}
    res = push_to_hub(ckpt, "alice/flaky", token="hf_alice", endpoint=fake_hub.url)  # the retry
    assert set(fake_hub.files("alice/flaky")) == NONUNIFORM_FILES | {".gitattributes"} and res.commit_oid


def test_connection_refused(fake_hub, ckpt):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PushError, match="network failure while trying to check the token") as e:
        push_to_hub(ckpt, "alice/x", token="hf_alice", endpoint=f"http://127.0.0.1:{port}")
    assert "Nothing was committed" in str(e.value)


def test_existing_public_repo_is_not_silently_used_for_a_private_push(fake_hub, ckpt):
    fake_hub.add_repo("alice/public", owner="alice", private=False)
    with pytest.raises(PushError, match="already exists and is public"):
        push_to_hub(ckpt, "alice/public", private=True, token="hf_alice", endpoint=fake_hub.url)
    assert commits(fake_hub, "alice/public") == []


def test_offline_mode_is_reported(fake_hub, ckpt, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_to_hub(ckpt, "alice/x", token="hf_alice", endpoint=fake_hub.url)
    assert fake_hub.calls == []


def test_hub_rejects_an_invalid_card_before_upload(fake_hub, ckpt, monkeypatch):
    monkeypatch.setattr(modelcard, "BASE_RELATION", "pruned")  # not in the Hub's vocabulary
    with pytest.raises(PushError, match="(?s)rejected the model card.*base_model_relation"):
        push_to_hub(ckpt, "alice/badcard", token="hf_alice", endpoint=fake_hub.url)
    assert not any("/preupload/" in c or "/commit/" in c for c in fake_hub.endpoints())


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "pruning.json").unlink(), "not an llmprune checkpoint: no pruning.json"),
    (lambda d: (d / "config.json").unlink(), "not an llmprune checkpoint: no config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "modeling_llmprune.py").unlink(), "without its architecture files modeling_llmprune.py"),
    (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}})), "shards listed in the index are missing"),
    (lambda d: (d / "pruning.json").write_text('{"format": "other"}'), "not an llmprune checkpoint file"),
])
def test_invalid_checkpoint_dir(fake_hub, ckpt, breakage, message):
    breakage(ckpt)
    with pytest.raises(PushError, match=message):
        push_to_hub(ckpt, "alice/x", token="hf_alice", endpoint=fake_hub.url)
    assert fake_hub.calls == []


def test_not_a_directory(tmp_path):
    with pytest.raises(PushError, match="is not a directory"):
        push_to_hub(tmp_path / "missing", "alice/x", token="t")


@pytest.mark.parametrize("exists", [False, True])
def test_exact_api_calls_with_an_autospec_client(ckpt, monkeypatch, exists):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = mock.create_autospec(HfApi, instance=True)
    api.token, api.endpoint = "hf_x", "https://hub.example"
    api.whoami.return_value = {"name": "alice", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
    if exists:
        api.repo_info.return_value = mock.Mock(private=True)
    else:
        api.repo_info.side_effect = RepositoryNotFoundError("404", response=mock.Mock(headers={}, status_code=404))
    api.create_repo.return_value = "https://hub.example/alice/m"
    api.create_commit.return_value = mock.Mock(commit_url="https://hub.example/alice/m/commit/1", oid="1")
    res = push_to_hub(ckpt, "alice/m", private=True, revision="v2", api=api, commit_message="my message")
    api.whoami.assert_called_once_with(token="hf_x")
    api.repo_info.assert_called_once_with("alice/m", token="hf_x")
    if exists:
        api.create_repo.assert_not_called()
    else:
        api.create_repo.assert_called_once_with("alice/m", private=True, exist_ok=True, token="hf_x")
    api.create_branch.assert_called_once_with("alice/m", branch="v2", exist_ok=True, token="hf_x")
    (args, kwargs), = api.create_commit.call_args_list
    assert args[0] == "alice/m" and kwargs["commit_message"] == "my message" and kwargs["revision"] == "v2"
    assert sorted(op.path_in_repo for op in args[1]) == sorted(NONUNIFORM_FILES) == res.files
    api.upload_folder.assert_not_called()  # multi-commit in huggingface_hub 2.x with hf_xet


# ---- CLI ----------------------------------------------------------------------------------------------
def test_cli_push_and_dry_run(fake_hub, ckpt, capsys):
    (ckpt / "README.md").unlink(missing_ok=True)
    assert main(["push", str(ckpt), "alice/cli", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: README.md written" in out and "model.safetensors" in out and fake_hub.calls == []
    assert ModelCard.load(ckpt / "README.md").data.base_model == SMOL
    assert main(["push", str(ckpt), "alice/cli", "--token", "hf_alice", "--endpoint", fake_hub.url,
                 "--private", "--branch", "v1", "-q"]) == 0
    assert "pushed 15 files to" in capsys.readouterr().out
    assert fake_hub.repos["alice/cli"].private and "README.md" in fake_hub.files("alice/cli", "v1")


def test_cli_push_errors_exit_2(fake_hub, ckpt, capsys):
    assert main(["push", str(ckpt), "alice/cli", "--endpoint", fake_hub.url]) == 2
    assert "llmprune: error: no Hugging Face token found" in capsys.readouterr().err


@pytest.mark.parametrize("family_name", ["llama"])
def test_main_job_pushes_after_saving(fake_hub, tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--recipe", "magnitude", "--sparsity", "0.3", "-o", str(out), "-q",
            "--push-to-hub", "alice/job", "--hub-token", "hf_alice", "--hub-endpoint", fake_hub.url]
    assert main(argv) == 0
    assert "pushed" in capsys.readouterr().out
    stored = fake_hub.files("alice/job")
    assert stored["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert stored["README.md"] == (out / "README.md").read_bytes()
    for name, data in stored.items():  # the token never lands in pruning.json or the card
        assert b"hf_alice" not in data, name
    assert "--hub-token '***'" in stored["README.md"].decode() or "--hub-token ***" in stored["README.md"].decode()


@pytest.mark.parametrize("family_name", ["llama"])
def test_main_job_keeps_the_checkpoint_when_the_push_fails(fake_hub, tmp_path, model_dir, capsys):
    fake_hub.fail("POST", r"/commit/", 503)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--recipe", "magnitude", "-o", str(out), "-q", "--push-to-hub",
                 "alice/job", "--hub-token", "hf_alice", "--hub-endpoint", fake_hub.url]) == 1  # a run failure
    err = capsys.readouterr().err
    assert "the Hub failed (503" in err and f"llmprune push {out} alice/job" in err
    assert (out / "model.safetensors").exists() and commits(fake_hub, "alice/job") == []


@pytest.mark.parametrize("family_name", ["llama"])
def test_main_job_checks_the_token_before_pruning(fake_hub, tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--recipe", "magnitude", "-o", str(out), "--push-to-hub", "alice/job",
                 "--hub-endpoint", fake_hub.url]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not out.exists()

