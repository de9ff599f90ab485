"""Publish a pruned checkpoint to the Hugging Face Hub: one repo, one commit, a complete model card.

    push_to_hub("out/smol-20", "alice/SmolLM2-135M-Instruct-pruned-20")

Steps: check the checkpoint folder and select what travels (weights + index, config, remote code,
tokenizer, chat template, generation config, pruning.json, recipe, report and figures, README.md);
resolve the token (argument, else huggingface_hub's own resolution: HF_TOKEN, then the `hf auth
login` cache) and check it with whoami; create the repo (exist_ok) and, for `revision`, the branch;
write the model card into the folder; upload everything in a **single** `create_commit`. That commit
is atomic on the Hub: a failure at any step leaves the repo's files as they were, and re-running is
safe (unchanged files are skipped). `upload_folder` is not used because huggingface_hub 2.x splits
large folders into several commits when hf_xet is installed, which would break that guarantee.

The endpoint is passed explicitly (huggingface_hub reads HF_ENDPOINT once, at import time).
"""
from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, get_token, validate_repo_id

from . import __version__
from .card_facts import CUSTOM_MODEL_TYPE
from .checkpoint import CHECKPOINT_FORMAT, PRUNING_FILE, RECIPE_FILE
from .evaluate.report import REPORT_JSON, REPORT_MD
from .modelcard import CARD_FILE, build_model_card, write_model_card
from .modeling import REMOTE_CODE_FILES

log = logging.getLogger(__name__)

# What travels: exact names, then patterns; everything else in the folder (temp files, plans,
# notes, other weight formats) stays local. Subfolders only for extra chat templates.
UPLOAD_NAMES = ("config.json", "generation_config.json", PRUNING_FILE, RECIPE_FILE,
                "model.safetensors.index.json", *REMOTE_CODE_FILES, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                "vocab.txt", "chat_template.jinja", "chat_template.json", REPORT_JSON, REPORT_MD, CARD_FILE)
UPLOAD_PATTERNS = ("*.safetensors", "*.png", "additional_chat_templates/*.jinja")
LOGIN_HELP = "log in with `hf auth login`, or set HF_TOKEN, or pass --token (a token with write access)"
TOKENS_URL = "https://huggingface.co/settings/tokens"


class PushError(RuntimeError):
    """Publishing failed; the message says what happened, whether anything changed, and the fix."""


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    revision: str
    commit_url: str | None
    commit_oid: str | None
    files: list[str] = field(default_factory=list)
    card_written: bool = False
    dry_run: bool = False


# ---- the checkpoint --------------------------------------------------------------------------------
def check_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Raise PushError unless the folder is a complete llmprune checkpoint; return its pruning.json."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise PushError(f"{d} is not a directory; pass the folder written by `llmprune ... -o DIR`")
    missing = [n for n in ("config.json", PRUNING_FILE) if not (d / n).is_file()]
    if missing:
        raise PushError(f"{d} is not an llmprune checkpoint: no {' or '.join(missing)}. Push the folder written by "
                        "`llmprune --model M --recipe R -o DIR` (or `llmprune apply`)")
    try:
        doc = json.loads((d / PRUNING_FILE).read_text())
        json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise PushError(f"{d}: a JSON file is corrupt ({e}); re-create the checkpoint") from None
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise PushError(f"{d / PRUNING_FILE} is not an llmprune checkpoint file (format={doc.get('format')!r})")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        absent = [s for s in shards if not (d / s).is_file()]
        if absent:
            raise PushError(f"{d}: weight shards listed in the index are missing: {', '.join(absent)}")
    elif not (d / "model.safetensors").is_file():
        raise PushError(f"{d} has no model.safetensors (nor a sharded index): the weights are missing")
    if json.loads((d / "config.json").read_text()).get("model_type") == CUSTOM_MODEL_TYPE:
        absent = [f for f in REMOTE_CODE_FILES if not (d / f).is_file()]
        if absent:
            raise PushError(f"{d}: non-uniform checkpoint without its architecture files {', '.join(absent)}; "
                            "re-save it with llmprune")
    if not (d / "tokenizer_config.json").is_file():
        log.warning("%s has no tokenizer files; the Hub model will need a tokenizer from elsewhere", d)
    return doc


def upload_files(checkpoint_dir: str | Path) -> list[str]:
    """Relative paths of the files that go to the Hub, sorted (hidden and unlisted files stay local)."""
    d = Path(checkpoint_dir)
    chosen, skipped = [], []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        (chosen if _travels(rel) else skipped).append(rel)
    if skipped:
        log.info("not uploaded (not part of a checkpoint): %s", ", ".join(skipped))
    return chosen


def _travels(rel: str) -> bool:
    if rel in UPLOAD_NAMES:
        return True
    # fnmatch's * also matches "/", so compare depths: top-level patterns only match top-level files
    return any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in UPLOAD_PATTERNS)


# ---- token and repo --------------------------------------------------------------------------------
def resolve_token(token: str | None = None, api: HfApi | None = None) -> str:
    """--token, else the HfApi's own token, else huggingface_hub's resolution (HF_TOKEN, login cache)."""
    resolved = token or (api.token if api is not None and isinstance(api.token, str) else None) or get_token()
    if not resolved:
        raise PushError(f"no Hugging Face token found: {LOGIN_HELP}; create one at {TOKENS_URL}")
    return resolved


def preflight(repo_id: str, token: str | None = None, api: HfApi | None = None,
              endpoint: str | None = None) -> tuple[HfApi, str, str, dict[str, Any]]:
    """Cheap checks before any work: offline mode, token, whoami, repo id. Returns (api, token, repo_id, whoami)."""
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub refuses all network "
                        "access; unset it to push (the checkpoint stays on disk, push later with `llmprune push`)")
    tok = resolve_token(token, api)
    api = api or HfApi(endpoint=endpoint, token=tok)
    who = _call("check the token (whoami)", repo_id, api, lambda: api.whoami(token=tok))
    if "/" not in repo_id:  # `name` -> `<user>/name`, like the Hub does for create_repo
        repo_id = f"{who.get('name')}/{repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"invalid repo id {repo_id!r}: {e}. Use NAMESPACE/NAME, e.g. "
                        f"{who.get('name', 'your-name')}/my-pruned-model") from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(f"the token of {who.get('name')!r} is read-only and cannot create or write {repo_id}; "
                        f"create a write token at {TOKENS_URL}, then {LOGIN_HELP}")
    return api, tok, repo_id, who


def push_to_hub(checkpoint_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                token: str | None = None, api: HfApi | None = None, endpoint: str | None = None,
                commit_message: str | None = None, dry_run: bool = False) -> PushResult:
    """Upload a pruned checkpoint and its model card to `repo_id` in one commit (see the module docstring).

    dry_run: write README.md and report what would be uploaded, without touching the network.
    """
    d = Path(checkpoint_dir)
    doc = check_checkpoint(d)
    branch = revision or constants.DEFAULT_REVISION
    if dry_run:
        card = build_model_card(d, repo_id=repo_id, revision=branch)
        written = write_model_card(d, card)
        return PushResult(repo_id, f"(dry run) {repo_id}", branch, None, None, upload_files(d), written, True)
    api, tok, repo_id, who = preflight(repo_id, token, api, endpoint)
    card = build_model_card(d, repo_id=repo_id, revision=branch)  # before any remote change: fails on bad data
    url = _ensure_repo(api, tok, repo_id, private, who)
    if branch != constants.DEFAULT_REVISION and not branch.startswith("refs/pr/"):
        _call(f"create branch {branch!r}", repo_id, api,
              lambda: api.create_branch(repo_id, branch=branch, exist_ok=True, token=tok), who)
    written = write_model_card(d, card)
    files = upload_files(d)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(d / rel)) for rel in files]
    message = commit_message or _commit_message(doc)
    info = _call("upload (one commit)", repo_id, api, lambda: api.create_commit(
        repo_id, ops, commit_message=message, commit_description=_commit_description(doc, files), revision=branch,
        token=tok), who, commit_stage=True)
    log.info("pushed %d files to %s@%s: %s", len(files), repo_id, branch, info.commit_url)
    return PushResult(repo_id, str(url), branch, info.commit_url, info.oid, files, written)


def _ensure_repo(api: HfApi, tok: str, repo_id: str, private: bool, who: dict[str, Any]) -> str:
    """Create the repo unless it exists. Existing repos are looked up first (rather than relying on
    create_repo(exist_ok=True)'s 403 fallback, which in huggingface_hub 2.4 builds its RepoUrl with the
    default endpoint and fails for any other `endpoint=`), which also tells whether it is private."""
    try:
        info = api.repo_info(repo_id, token=tok)
    except RepositoryNotFoundError:  # absent, or private and not ours: creating it says which
        return str(_call("create the repository", repo_id, api,
                         lambda: api.create_repo(repo_id, private=private, exist_ok=True, token=tok), who))
    except Exception as e:  # noqa: BLE001 - same classification as every other call
        raise _translate(e, "read the repository", repo_id, api.endpoint, who, False) from e
    if private and info.private is False:
        raise PushError(f"{repo_id} already exists and is public; --private cannot change an existing repo. "
                        "Nothing was uploaded. Make it private in its settings on the Hub, or push elsewhere")
    return f"{api.endpoint}/{repo_id}"


def _commit_message(doc: dict[str, Any]) -> str:
    plan, params = doc.get("plan") or {}, doc.get("params") or {}
    sparsity = params.get("sparsity", (plan.get("params") or {}).get("sparsity"))
    what = f"{sparsity:.1%} of decoder-linear parameters removed" if isinstance(sparsity, float) else "pruned"
    return f"llmprune {__version__}: {plan.get('method', 'unknown method')}, {what} from {plan.get('base_model')}"


def _commit_description(doc: dict[str, Any], files: list[str]) -> str:
    cmd = (doc.get("provenance") or {}).get("command")
    return (f"Uploaded with llmprune {__version__} (`llmprune push`): {len(files)} files in one commit."
            + (f"\n\nMade with: `{cmd}`" if cmd else ""))


# ---- errors ----------------------------------------------------------------------------------------
def _call(stage: str, repo_id: str, api: HfApi, fn: Any, who: dict[str, Any] | None = None,
          commit_stage: bool = False) -> Any:
    """Run one Hub call; turn any failure into a PushError that says what changed and how to fix it."""
    try:
        return fn()
    except PushError:
        raise
    except OfflineModeIsEnabled:
        raise PushError("HF_HUB_OFFLINE is set; unset it to push") from None
    except Exception as e:  # noqa: BLE001 - classified below, the original stays chained
        raise _translate(e, stage, repo_id, api.endpoint, who, commit_stage) from e


def _translate(e: Exception, stage: str, repo_id: str, endpoint: str, who: dict[str, Any] | None,
               commit_stage: bool) -> PushError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    user = (who or {}).get("name")
    orgs = [o.get("name") for o in (who or {}).get("orgs") or [] if isinstance(o, dict)]
    safe = (f"Nothing was committed: the upload is a single commit, so {repo_id} is unchanged (at most an empty "
            f"repo or branch was created). Re-running the same push is safe.")
    if commit_stage and not isinstance(e, HfHubHTTPError):
        safe = (f"The connection failed while committing, so the commit most likely did not land. The upload is "
                f"a single commit: {repo_id} either has all files or none of them. Re-running the same push is "
                f"safe (files already on the Hub are skipped).")
    where = f"while trying to {stage} at {endpoint}"
    if status == 401:
        return PushError(f"the Hub rejected the token (401 Unauthorized) {where}: it is invalid or expired. "
                         f"Fix: {LOGIN_HELP}; HF_TOKEN takes precedence over the login cache")
    if status == 403:
        ns = repo_id.split("/")[0]
        mine = f"your token belongs to {user!r}" + (f" (organizations: {', '.join(orgs)})" if orgs else "") \
            if user else "your token"
        return PushError(f"no write access to {repo_id} (403 Forbidden {where}): the repo exists and is not "
                         f"yours, or {mine} cannot write to the namespace {ns!r}. {safe} Fix: push to a repo you own "
                         f"(e.g. {user or 'your-name'}/{repo_id.split('/')[-1]}), ask an admin of {ns!r} for write "
                         f"access, or use a token with write permission ({TOKENS_URL})")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return PushError(f"{repo_id} was not found or is not visible to your token (404 {where}). {safe} "
                         f"Fix: check the repo id and that the token's user can write to it")
    if status == 409:
        return PushError(f"conflict (409 {where}): {_server_says(e)}. Another upload may have committed to the same "
                         f"branch at the same time. {safe}")
    if status is not None and status >= 500 or status == 429:
        return PushError(f"the Hub failed ({status} {where}): {_server_says(e)}. {safe} Try again later")
    if _is_network_error(e):
        return PushError(f"network failure {where}: {e}. {safe} Check your connection (and HF_ENDPOINT/--endpoint)")
    if isinstance(e, ValueError) and "metadata" in str(e):
        return PushError(f"the Hub rejected the model card {where}: {e}. Nothing was uploaded. This is an llmprune "
                         "bug; please report it with the checkpoint's pruning.json")
    if isinstance(e, HfHubHTTPError):
        return PushError(f"the Hub refused {where} ({status}): {_server_says(e)}. {safe}")
    return PushError(f"unexpected error {where}: {type(e).__name__}: {e}. {safe}")


def _server_says(e: Exception) -> str:
    msg = getattr(e, "server_message", None) or str(e)
    return msg.strip().splitlines()[0] if msg and msg.strip() else type(e).__name__


def _is_network_error(e: BaseException) -> bool:
    """Transport failures (refused, reset, timeout) of huggingface_hub's HTTP client, or plain OS errors."""
    if isinstance(e, (OSError, TimeoutError)):
        return True
    return any(c.__name__ in ("TransportError", "RequestError") and c.__module__.startswith("httpx")
               for c in type(e).__mro__)


__all__ = ["PushError", "PushResult", "UPLOAD_NAMES", "UPLOAD_PATTERNS", "check_checkpoint", "preflight",
           "push_to_hub", "resolve_token", "upload_files"]
