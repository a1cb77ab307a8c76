"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for offline tests.

`LocalHub` serves, on 127.0.0.1 and a free port, just enough of the Hub's HTTP API for
`huggingface_hub` (2.x) and `transformers` to create repos, push files and download them again:

    HfApi.create_repo / upload_folder / upload_file / create_commit / model_info / list_repo_tree
    PreTrainedModel.push_to_hub, ModelCard/RepoCard validation
    from_pretrained(repo_id), AutoTokenizer.from_pretrained(repo_id), hf_hub_download, snapshot_download

Files are always committed as "regular" git blobs (the preupload answer is `uploadMode: "regular"`),
so no LFS or Xet transfer is ever attempted. Repositories live in memory; every commit gets a new sha.
Anything the stub does not know is answered with `501` and logged loudly (see `LocalHub.unhandled`).

Pointing clients at it:
  * another process: run it with ``env=hub.subprocess_env(hf_home)`` (sets ``HF_ENDPOINT``, ``HF_HOME``, ...;
    huggingface_hub reads them once, at import) -- the most reliable way;
  * this process: ``hub.patch_in_process(monkeypatch, cache_dir)`` patches the module attributes that
    huggingface_hub/transformers copied from the environment at import time;
  * explicit: ``HfApi(endpoint=hub.endpoint)``, ``hf_hub_download(..., endpoint=hub.endpoint)``.

Only the standard library is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger("hub_stub")

# /api/{type}s/{repo_id}[/{action}[/{rest}]]  (repo_id is "user/name", or a legacy single "name")
_API_REPO_RE = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+|[^/]+)"
    r"(?:/(preupload|commit|revision|tree|paths-info|refs)(?:/(.*))?)?$"
)
# /[{type}s/]{repo_id}/resolve/{revision}/{path}
_RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+|[^/]+)/resolve/([^/]+)/(.+)$")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports it (`oid`, `blobId`, ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]
    summary: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    created_at: str = field(default_factory=_now_iso)
    commits: list[_Commit] = field(default_factory=list)  # oldest first; commits[-1] is the head of "main"

    def commit(self, revision: str) -> _Commit | None:
        """Resolve a branch name ("main") or a full commit sha to a commit."""
        if revision in ("main", "refs/heads/main"):
            return self.commits[-1]
        return next((c for c in self.commits if c.sha == revision), None)


class HubError(Exception):
    """An error answered the way the Hub does: a status, an `X-Error-Code` header and a JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.extra, self.headers = extra or {}, headers or {}


class LocalHub:
    """Context manager running the in-memory Hub on a daemon thread (see the module docstring).

    Attributes:
        endpoint: base URL, e.g. ``"http://127.0.0.1:12345"`` (set once entered).
        requests: ``"METHOD /path"`` of every request received, for debugging.
        unhandled: ``"METHOD /path"`` of the requests the stub could not answer (501).
    """

    def __init__(self) -> None:
        self.endpoint: str = ""
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalHub":
        hub = self

        class Handler(_HubRequestHandler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    # ------------------------------------------------------------------ public helpers
    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """Files of `repo_id` at the head of `main` (empty dict if the repo has no commit)."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the LocalHub (have: {sorted(self._repos)})")
            return dict(repo.commits[-1].files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit shas of `repo_id`, oldest first (the first one is the empty initial commit)."""
        with self._lock:
            return [c.sha for c in self._repos[(repo_type, repo_id)].commits]

    def subprocess_env(self, hf_home: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child Python process whose huggingface_hub/transformers talk to this hub.

        The reliable way: `huggingface_hub` reads these variables once, when it is imported.
        `hf_home` should be a fresh directory, so that nothing cached elsewhere is picked up.
        """
        env = dict(os.environ if base is None else base)
        for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN", "HF_TOKEN_PATH",
                    "HUGGINGFACE_CO_STAGING", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                    "http_proxy", "https_proxy", "all_proxy"):
            env.pop(key, None)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_XET="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env

    def patch_in_process(self, monkeypatch, hf_hub_cache: str | os.PathLike) -> None:
        """Point the already-imported huggingface_hub (and transformers) of *this* process at the hub.

        `monkeypatch` is pytest's fixture (it undoes everything at teardown). Setting `HF_ENDPOINT` after
        import does nothing: huggingface_hub has copied it into these module attributes at import time.
        """
        from huggingface_hub import constants, hf_api

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_hub_cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)  # behind huggingface_hub.create_repo & co.
        if "transformers.utils.hub" in sys.modules:  # transformers caches one HfApi, made on first use
            monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)

    # ------------------------------------------------------------------ repo state
    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, "You already created this repo", extra={"url": self._repo_url(repo_type, repo_id)})
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            repo.commits.append(_Commit(self._new_sha(repo_id, "init"), {}, "initial commit", _now_iso()))
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.commit(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"

    @staticmethod
    def _new_sha(*parts: str) -> str:
        return hashlib.sha1("\0".join((*parts, repr(time.time_ns()))).encode()).hexdigest()


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to the handler that emulates the matching Hub endpoint."""

    hub: LocalHub
    query: dict[str, str]  # the request's query parameters (last value of each)
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries a Content-Length
    timeout = 30  # an idle keep-alive connection is closed after this many seconds

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence the default stderr access log
        logger.debug("LocalHub: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bool:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        return True

    def _json(self, obj, status: int = 200, headers: dict[str, str] | None = None) -> bool:
        return self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        body = self._read_body()
        self.hub.requests.append(f"{method} {self.path}")
        try:
            with self.hub._lock:
                handled = self._route(method, path, body)
            if not handled:
                msg = f"LocalHub: UNHANDLED {method} {self.path} -- add a route to tests/hub_stub.py"
                self.hub.unhandled.append(f"{method} {self.path}")
                logger.error(msg)
                print(msg, file=sys.stderr, flush=True)
                self._json({"error": msg}, 501, {"X-Error-Message": msg})
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message, **err.extra}, err.status, headers)
        except Exception as err:  # a bug in the stub: answer 500 and say so loudly
            logger.exception("LocalHub: error while handling %s %s", method, self.path)
            print(f"LocalHub: 500 on {method} {self.path}: {err!r}", file=sys.stderr, flush=True)
            self._json({"error": f"LocalHub internal error: {err!r}"}, 500)

    def _route(self, method: str, path: str, body: bytes) -> bool:
        """Call the emulating method for `method path`; return False if no route matches."""
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            return self._whoami()
        if method == "POST" and path.startswith("/api/telemetry/"):
            return self._json({})
        if method == "GET" and path == "/api/agent-harnesses":
            # huggingface_hub asks for this registry when it thinks an AI agent drives it; none here.
            return self._json({"error": "no agent-harness registry on the LocalHub"}, 404)

        if m := _API_REPO_RE.match(path):
            repo_type, repo_id, action, rest = m.group(1)[:-1], m.group(2), m.group(3), m.group(4) or ""
            repo = self.hub._get_repo(repo_type, repo_id)
            if action is None and method == "GET":
                return self._repo_info(repo, "main")
            if action == "revision" and method == "GET":
                return self._repo_info(repo, rest)
            if action == "preupload" and method == "POST":
                return self._preupload(repo, rest, json.loads(body))
            if action == "commit" and method == "POST":
                return self._commit(repo, rest, body)
            if action == "tree" and method == "GET":
                revision, _, sub = rest.partition("/")
                return self._tree(repo, revision, unquote(sub))
            if action == "paths-info" and method == "POST":
                return self._paths_info(repo, rest, body)
            if action == "refs" and method == "GET":
                sha = repo.commits[-1].sha
                return self._json({"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": sha}],
                                   "converts": [], "tags": []})
            return False

        if method in ("GET", "HEAD") and (m := _RESOLVE_RE.match(path)):
            repo_type = (m.group(1) or "models")[:-1]
            return self._resolve(self.hub._get_repo(repo_type, m.group(2)), m.group(3), unquote(m.group(4)))
        return False

    # ------------------------------------------------------------------ emulated endpoints
    def _create_repo(self, payload: dict) -> bool:
        """POST /api/repos/create  {"name", "organization", "type", "visibility"} -> {"url", "name", "id"}."""
        name, org = payload["name"], payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = payload.get("type") or "model"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub._create_repo(repo_type, repo_id, private)
        return self._json({"url": self.hub._repo_url(repo_type, repo_id), "name": repo_id, "id": repo_id})

    def _whoami(self) -> bool:
        """GET /api/whoami-v2: any token is accepted and belongs to user "user"."""
        return self._json({"type": "user", "id": "0", "name": "user", "fullname": "Local User", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})

    def _repo_info(self, repo: _Repo, revision: str) -> bool:
        """GET /api/{type}s/{repo_id}[/revision/{rev}] -> ModelInfo-like JSON with `sha` and `siblings`."""
        commit = self.hub._get_commit(repo, revision)
        info = {
            "_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": p, "size": len(c), "blobId": git_blob_sha1(c)}
                         for p, c in sorted(commit.files.items())],
        }
        if repo.repo_type == "model":
            info["library_name"] = "transformers"
        return self._json(info)

    def _preupload(self, repo: _Repo, revision: str, payload: dict) -> bool:
        """POST /api/{type}s/{repo_id}/preupload/{rev}: every file is uploaded "regular" (inline base64)."""
        files = self.hub._get_commit(repo, revision).files
        return self._json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
            for f in payload.get("files", [])
        ], "commitOid": repo.commits[-1].sha})

    def _commit(self, repo: _Repo, revision: str, body: bytes) -> bool:
        """POST /api/{type}s/{repo_id}/commit/{rev}: NDJSON lines `{"key": header|file|deletedFile|deletedFolder}`."""
        if unquote(revision) not in ("main", "refs/heads/main"):
            raise HubError(400, f"LocalHub only commits to 'main', not {revision!r}")
        if self.query.get("create_pr"):
            raise HubError(400, "LocalHub does not support create_pr")
        files = dict(repo.commits[-1].files)
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repo.commits[-1].sha:
                    raise HubError(412, f"parentCommit {parent} is not the head of main")
            elif key == "file":
                content = value["content"]
                files[value["path"]] = (base64.b64decode(content) if value.get("encoding") == "base64"
                                        else content.encode())
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"File not found: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:  # "lfsFile": the preupload answer never asks for LFS, so the client should not send it
                raise HubError(400, f"LocalHub does not support commit operation {key!r}")
        commit = _Commit(self.hub._new_sha(repo.repo_id, summary), files, summary, _now_iso())
        repo.commits.append(commit)
        url = self.hub._repo_url(repo.repo_type, repo.repo_id)
        return self._json({"success": True, "commitOid": commit.sha, "commitUrl": f"{url}/commit/{commit.sha}",
                    "pullRequestUrl": None, "hookOutput": ""})

    @staticmethod
    def _entries(files: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
        """Tree entries (files and directories) below folder `under` ("" for the root)."""
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        out: dict[str, dict] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # intermediate folders
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    out.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                out[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
        return list(out.values())

    def _tree(self, repo: _Repo, revision: str, sub: str) -> bool:
        """GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]?recursive=...: one page, no `Link` header."""
        files = self.hub._get_commit(repo, revision).files
        if sub and sub not in files and not any(p.startswith(sub.rstrip("/") + "/") for p in files):
            raise HubError(404, f"Path {sub} not found", "EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        return self._json(self._entries(files, sub, recursive))

    def _paths_info(self, repo: _Repo, revision: str, body: bytes) -> bool:
        """POST /api/{type}s/{repo_id}/paths-info/{rev} (form data `paths=...`): info of the existing paths."""
        files = self.hub._get_commit(repo, revision).files
        form = parse_qs(body.decode())
        entries = {e["path"]: e for e in self._entries(files, "", recursive=True)}
        return self._json([entries[p] for p in form.get("paths", []) if p in entries])

    def _resolve(self, repo: _Repo, revision: str, path: str) -> bool:
        """GET/HEAD /[{type}s/]{repo_id}/resolve/{rev}/{path}: file content with ETag + X-Repo-Commit."""
        commit = self.hub._get_commit(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng and int(rng.group(1)) < len(content):
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        return self._send(status, content, headers)

