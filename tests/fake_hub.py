"""A small fake Hugging Face Hub on 127.0.0.1 for push tests with the real huggingface_hub client.

It speaks the endpoints `HfApi` uses to publish a model — whoami-v2, repos/create, model info,
preupload (answering `uploadMode: "regular"` for every file, so contents travel base64 inside the
commit's NDJSON and no LFS/Xet protocol is needed), commit, branch, refs, validate-yaml — plus the
`resolve` download route, so transformers can load the pushed model back. It records every call,
keeps repos in memory (owner, visibility, branches, commits, file bytes), enforces write
permissions per token, and can inject failures (HTTP status or a dropped connection).

validate-yaml really checks the card: YAML syntax, huggingface_hub's own metadata parsing
(ModelCardData with errors not ignored, model-index -> EvalResult), and the documented Hub rules for
the fields llmprune writes (base_model ids, base_model_relation vocabulary, license id, lists).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml

RELATIONS = ("adapter", "merge", "quantized", "finetune")  # hf.co/docs/hub/model-cards#specifying-a-base-model
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class User:
    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"


@dataclass
class Repo:
    owner: str  # namespace
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # branch -> path -> bytes
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None
    body: Any


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int | str  # an HTTP status, or "drop" to close the connection without answering
    times: int


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_card(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md, as the Hub's validate-yaml would report them."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    m = re.match(r"^\s*---\n(.*?)\n---\n", content, re.S)
    if not m:
        return [], ["Empty metadata: the README.md has no YAML block"]
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return [f"YAML syntax error: {e}"], []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"], []
    errors: list[str] = []
    try:
        ModelCard(content, ignore_metadata_errors=False)  # huggingface_hub's own parsing, model-index included
    except (ValueError, TypeError, KeyError) as e:
        errors.append(f"huggingface_hub cannot parse the metadata: {e}")
    bases = meta.get("base_model")
    for b in [bases] if isinstance(bases, str) else (bases or []):
        try:
            validate_repo_id(b)
            assert b.count("/") == 1
        except (HFValidationError, AssertionError, TypeError):
            errors.append(f'"base_model" must be Hub model ids, got {b!r}')
    rel = meta.get("base_model_relation")
    if rel is not None and (rel not in RELATIONS or not bases):
        errors.append(f'"base_model_relation" must be one of {RELATIONS} and needs base_model, got {rel!r}')
    lic = meta.get("license")
    if lic is not None and not (isinstance(lic, str) and LICENSE_ID.match(lic)):
        errors.append(f'"license" must be a license id, got {lic!r}')
    if lic == "other" and not meta.get("license_name"):
        errors.append('"license: other" needs "license_name"')
    for key in ("tags", "datasets", "metrics"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) and x for x in v)):
            errors.append(f'"{key}" must be a list of non-empty strings')
    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for entry in meta.get("model-index") or []:
        for result in entry.get("results", []) if isinstance(entry, dict) else []:
            for metric in result.get("metrics", []):
                if not isinstance(metric.get("value"), (int, float, str)) or isinstance(metric.get("value"), bool):
                    errors.append(f"model-index metric {metric.get('type')!r} has no numeric/string value")
    return errors, []


class FakeHub:
    def __init__(self) -> None:
        self.users: dict[str, User] = {"hf_alice": User("alice", ("acme",)), "hf_reader": User("alice", (), "read"),
                                       "hf_bob": User("bob")}
        self.repos: dict[str, Repo] = {}
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- test helpers ----------------------------------------------------------------------------
    def add_repo(self, repo_id: str, owner: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(owner=owner, private=private)
        self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                    **(files or {})}, "initial commit", "")
        self.repos[repo_id] = repo
        return repo

    def fail(self, method: str, path_regex: str, status: int | str, times: int = 1) -> None:
        self.faults.append(Fault(method, re.compile(path_regex), status, times))

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    def endpoints(self) -> list[str]:
        """Calls as 'METHOD /path' with the repo-specific parts kept, for asserting the sequence."""
        return [f"{c.method} {c.path}" for c in self.calls]

    # ---- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _commit(repo: Repo, branch: str, files: dict[str, bytes], summary: str, description: str) -> str:
        tree = repo.branches.setdefault(branch, {})
        tree.update(files)
        oid = hashlib.sha1(f"{len(repo.commits)}:{branch}:{summary}".encode() + b"".join(
            git_oid(v).encode() for v in files.values())).hexdigest()
        repo.commits.append({"oid": oid, "branch": branch, "summary": summary, "description": description,
                             "files": sorted(files), "tree": dict(tree)})
        return oid

    def can_write(self, user: User | None, namespace: str) -> bool:
        return user is not None and user.role == "write" and namespace in (user.name, *user.orgs)

    def can_read(self, user: User | None, repo: Repo) -> bool:
        return not repo.private or (user is not None and repo.owner in (user.name, *user.orgs))

    def head_oid(self, repo: Repo, branch: str) -> str:
        return next((c["oid"] for c in reversed(repo.commits) if c["branch"] == branch), repo.commits[-1]["oid"])


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        # ---- plumbing ------------------------------------------------------------------------------
        def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if "ndjson" in (self.headers.get("Content-Type") or ""):
                body: Any = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw
            with hub._lock:
                hub.calls.append(Call(method, unquote(url.path), parse_qs(url.query), token, body))
                for fault in hub.faults:
                    if fault.times > 0 and fault.method == method and fault.pattern.search(unquote(url.path)):
                        fault.times -= 1
                        if fault.status == "drop":
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                        return self._error(int(fault.status), f"injected failure {fault.status}")
                user = hub.users.get(token) if token else None
                if token and user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                return self._route(method, url.path, body, user)

        # ---- routes ------------------------------------------------------------------------------
        def _route(self, method: str, path: str, body: Any, user: User | None) -> None:
            if method == "GET" and path == "/api/whoami-v2":
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                return self._send(200, {"type": "user", "name": user.name,
                                        "orgs": [{"name": o} for o in user.orgs],
                                        "auth": {"type": "access_token", "accessToken": {"role": user.role}}})
            if method == "POST" and path == "/api/validate-yaml":
                errors, warnings = check_card(body.get("content", ""))
                status = 400 if errors else 200
                return self._send(status, {"errors": [{"message": e} for e in errors],
                                           "warnings": [{"message": w} for w in warnings]})
            if method == "POST" and path == "/api/repos/create":
                return self._create(body, user)
            m = re.fullmatch(rf"/api/models/{REPO}(?:/revision/(?P<rev>.+))?", path)
            if m and method == "GET":
                return self._info(unquote(m["repo"]), unquote(m["rev"] or "main"), user)
            m = re.fullmatch(rf"/api/models/{REPO}/(?P<op>preupload|commit|branch)/(?P<rev>.+)", path)
            if m and method == "POST":
                return self._write(m["op"], unquote(m["repo"]), unquote(m["rev"]), body, user)
            m = re.fullmatch(rf"/api/models/{REPO}/refs", path)
            if m and method == "GET":
                repo = hub.repos.get(unquote(m["repo"]))
                if repo is None or not hub.can_read(user, repo):
                    return self._error(404, "Repository not found", "RepoNotFound")
                return self._send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}",
                                                      "targetCommit": hub.head_oid(repo, b)} for b in repo.branches],
                                        "tags": [], "converts": []})
            m = re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if m and method in ("GET", "HEAD"):
                return self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), user)
            return self._error(404, f"no route for {method} {path}")

        def _create(self, body: dict[str, Any], user: User | None) -> None:
            if user is None:
                return self._error(401, "You must be authenticated to create a repo")
            ns = body.get("organization") or user.name
            repo_id = f"{ns}/{body['name']}"
            if not hub.can_write(user, ns):
                return self._error(403, f"You don't have the rights to create a model under the namespace {ns!r}")
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{hub.url}/{repo_id}"})
            hub.add_repo(repo_id, owner=ns, private=body.get("visibility") == "private")
            return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _info(self, repo_id: str, rev: str, user: User | None) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or not hub.can_read(user, repo):
                return self._error(404, "Repository not found", "RepoNotFound")
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return self._send(200, {"id": repo_id, "private": repo.private, "sha": hub.head_oid(repo, rev),
                                    "siblings": [{"rfilename": p} for p in sorted(repo.branches[rev])]})

        def _write(self, op: str, repo_id: str, rev: str, body: Any, user: User | None) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or not hub.can_read(user, repo):
                return self._error(404, "Repository not found", "RepoNotFound")
            if not hub.can_write(user, repo.owner):
                return self._error(403, f"You don't have the rights to write to {repo_id}")
            if op == "branch":
                if rev in repo.branches:
                    return self._error(409, f"Branch {rev} already exists")
                start = (body or {}).get("startingPoint") or "main"
                repo.branches[rev] = dict(repo.branches[start])
                repo.commits.append({"oid": hub.head_oid(repo, start), "branch": rev, "summary": "(branch)",
                                     "description": "", "files": [], "tree": dict(repo.branches[rev])})
                return self._send(200, {})
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            tree = repo.branches[rev]
            if op == "preupload":
                return self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_oid(tree[f["path"]]) if f["path"] in tree else None} for f in body["files"]]})
            header, files = body[0], {}
            for line in body[1:]:
                if line["key"] != "file" or line["value"].get("encoding") != "base64":
                    return self._error(400, f"fake hub only accepts base64 regular files, got {line['key']}")
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            oid = hub._commit(repo, rev, files, header["value"]["summary"], header["value"].get("description", ""))
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                    "success": True})

        def _resolve(self, repo_id: str, rev: str, file: str, user: User | None) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or not hub.can_read(user, repo):
                return self._error(404, "Repository not found", "RepoNotFound")
            commit = next((c for c in reversed(repo.commits) if rev in (c["oid"], c["branch"])), None)
            if commit is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            data = commit["tree"].get(file)
            if data is None:
                return self._error(404, "Entry not found", "EntryNotFound")
            headers = {"X-Repo-Commit": commit["oid"], "ETag": f'"{git_oid(data)}"'}
            return self._send(200, raw=data, headers=headers)

    return Handler
