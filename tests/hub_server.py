"""A Hugging Face Hub-compatible HTTP server for tests, standard library only.

It speaks the part of the Hub protocol that huggingface_hub 2.4 uses to push and pull model repositories (read from
the installed client: `hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`, `_snapshot_download.py`):

    POST /api/repos/create                              create a repo (409 when it exists)
    POST /api/validate-yaml                             README metadata check
    GET  /api/models/{repo}[/revision/{rev}]            model_info / repo_info: id, sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree (?recursive=true)
    GET  /api/models/{repo}/refs, /commits/{rev}        list_repo_refs, list_repo_commits
    POST /api/models/{repo}/branch/{name}, /tag/{rev}   create_branch, create_tag
    POST /api/models/{repo}/preupload/{rev}             upload mode per file: "regular" or "lfs"
    POST /api/models/{repo}/commit/{rev}                NDJSON commit: header, file (base64), lfsFile, deletedFile
    POST /{repo}.git/info/lfs/objects/batch             classic LFS batch API (Xet disabled by the client)
    POST /{repo}.git/info/lfs/objects/verify            LFS verify step
    HEAD/GET /{repo}/resolve/{rev}/{path}               downloads, with X-Repo-Commit and ETag headers

Large files behave as on the Hub: the resolve endpoint answers an LFS file with a 302 to a second listener (the
"CDN", another port on 127.0.0.1, so another origin) carrying `X-Linked-Etag` / `X-Linked-Size`; the client stops
there, drops its Authorization header and fetches the signed URL. LFS uploads are plain PUTs to signed URLs on the CDN.

Repos live in memory as git-like histories: every commit has a 40-hex id, a parent and a full file table; branches
and tags point at commits; `main` starts with the Hub's initial `.gitattributes` commit. A request that carries a
wrong token gets 401 with the Hub's `Invalid credentials in Authorization header` message; writes need the token.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

# The Hub's default .gitattributes for a new model repo: these patterns are stored in LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip
# The Hub refuses text files above 10 MB and binary files outside LFS; preupload tells the client so.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso_date(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit: regular files keep their bytes, LFS files point into the server's LFS store."""

    size: int
    oid: str  # git blob oid (of the pointer file for LFS files)
    data: bytes | None = None
    lfs_sha256: str | None = None

    @classmethod
    def regular(cls, data: bytes) -> FileEntry:
        return cls(size=len(data), oid=git_blob_oid(data), data=data)

    @classmethod
    def lfs(cls, sha256: str, size: int) -> FileEntry:
        return cls(size=size, oid=git_blob_oid(lfs_pointer(sha256, size)), lfs_sha256=sha256)

    def lfs_json(self) -> dict | None:
        if self.lfs_sha256 is None:
            return None
        return {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.lfs_sha256, self.size))}


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: float
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag, or a commit id (full or an unambiguous prefix of at least 7 hex digits)."""
        for refs in (self.branches, self.tags):
            if revision in refs:
                return self.commits[refs[revision]]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                return self.resolve(revision[len(prefix) :])
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def history(self, commit: Commit) -> list[Commit]:
        out = [commit]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out


class HubState:
    """Everything the server knows: repos and LFS objects, behind one lock."""

    def __init__(self, token: str, user: str, lfs_size_threshold: int) -> None:
        self.token = token
        self.user = user
        self.lfs_size_threshold = lfs_size_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.upload_grants: dict[str, tuple[str, int]] = {}  # signature -> (sha256, size)
        self.download_grants: dict[str, str] = {}  # signature -> sha256
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, int, bool]] = []  # (method, path, status, had Authorization)
        self._clock = 0

    def new_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, FileEntry]) -> str:
        self._clock += 1
        tree = hashlib.sha1("".join(f"{p}\0{f.oid}\n" for p, f in sorted(files.items())).encode()).hexdigest()
        now = time.time()
        body = f"tree {tree}\nparent {parent}\nauthor {self.user} {now} {self._clock}\n\n{title}\n\n{message}"
        oid = hashlib.sha1(f"commit {len(body)}\0{body}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, message, now, dict(files))
        return oid


class HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


def _lfs_patterns(files: dict[str, FileEntry]) -> list[str]:
    entry = files.get(".gitattributes")
    if entry is None or entry.data is None:
        return []
    patterns = []
    for line in entry.data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) > 1 and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if "/" in pattern.rstrip("/"):
            if fnmatch.fnmatch(path, pattern.replace("**/", "*")):
                return True
        elif fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path, pattern.rstrip("/") + "/*"):
            return True
    return False


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops mid-request does not hold a server thread forever
    state: HubState  # set on the subclass made per server
    endpoint: str
    cdn_endpoint: str
    is_cdn: bool

    def log_message(self, format: str, *args) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_length: int | None = None):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        with self.state.lock:
            self.state.requests.append((self.command, self.path, status, "Authorization" in self.headers))

    def _send_json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.status == 401 and err.message == INVALID_CREDENTIALS:
            headers["X-Error-Message"] = INVALID_CREDENTIALS
        self._send_json(err.status, {"error": err.message, **err.extra}, headers)

    def _send_file(self, data: bytes, headers: dict) -> None:
        """Bytes with Range support (`bytes=a-` / `bytes=a-b`), as the client resumes partial downloads."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        if match is None:
            self._send(200, data, headers)
            return
        start = int(match[1])
        end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        if start >= len(data):
            self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            return
        self._send(206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def _authorized(self, write: bool) -> bool:
        """True for the right token; raise 401 for a wrong one (reads too) or for a write without one."""
        auth = self.headers.get("Authorization")
        if auth is None:
            if write:
                raise HubError(401, "You must be authenticated to write to this repo: pass a token.")
            return False
        if auth != f"Bearer {self.state.token}":
            raise HubError(401, INVALID_CREDENTIALS)
        return True

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        authorized = self._authorized(write)
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_id} not found", code="RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # Read the whole body first: an error answered before it would leave bytes on a keep-alive connection.
        self._body = self._read_body() if self.command in ("POST", "PUT") else b""
        try:
            with self.state.lock:
                if self.is_cdn:
                    self._route_cdn(parts, query)
                else:
                    self._route(parts, query)
        except HubError as err:
            self._send_error(err)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routing ---------------------------------------------------------------------------------------------------

    def _route(self, parts: list[str], query: dict) -> None:
        method = self.command
        if parts[:1] == ["api"]:
            if parts[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if parts[1:] == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if parts[1:2] == ["models"] and len(parts) >= 4:
                return self._route_model_api(f"{parts[2]}/{parts[3]}", parts[4:], query)
        elif len(parts) >= 2 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1][:-4]}"
            if parts[5:] == ["batch"] and method == "POST":
                return self._lfs_batch(repo_id)
            if parts[5:] == ["verify"] and method == "POST":
                return self._lfs_verify(repo_id)
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"No route for {method} {self.path} on this test server")

    def _route_model_api(self, repo_id: str, rest: list[str], query: dict) -> None:
        method = self.command
        if method == "GET" and not rest:
            return self._model_info(repo_id, "main")
        if method == "GET" and rest[0] == "revision" and len(rest) == 2:
            return self._model_info(repo_id, rest[1])
        if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            return self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive)
        if method == "GET" and rest == ["refs"]:
            return self._refs(repo_id)
        if method == "GET" and rest[0] == "commits" and len(rest) == 2:
            return self._commits(repo_id, rest[1])
        if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
            return self._preupload(repo_id, rest[1])
        if method == "POST" and rest[0] == "commit" and len(rest) == 2:
            return self._create_commit(repo_id, rest[1], query)
        if method == "POST" and rest[0] == "branch" and len(rest) == 2:
            return self._create_branch(repo_id, rest[1])
        if method == "POST" and rest[0] == "tag" and len(rest) == 2:
            return self._create_tag(repo_id, rest[1])
        raise HubError(404, f"No route for {method} {self.path} on this test server")

    def _route_cdn(self, parts: list[str], query: dict) -> None:
        signature = query.get("sig", "")
        if self.command == "PUT" and parts[:1] == ["upload"] and len(parts) == 2:
            return self._lfs_put(parts[1], signature)
        if self.command in ("GET", "HEAD") and parts[:1] == ["lfs"] and len(parts) == 2:
            if self.state.download_grants.get(signature) != parts[1]:
                raise HubError(403, "Invalid or expired signature")
            data = self.state.lfs_objects[parts[1]]
            return self._send_file(data, {"ETag": f'"{parts[1]}"'})
        raise HubError(404, f"No route for {self.command} {self.path} on the CDN")

    # -- repos -------------------------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        self._authorized(write=True)
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        name, namespace = payload.get("name"), payload.get("organization") or self.state.user
        if not name or not re.fullmatch(r"[\w.-]+", name) or not re.fullmatch(r"[\w.-]+", namespace):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.state.repos:
            # The client reads `url` from this body when exist_ok=True.
            raise HubError(409, "You already created this model repo", url=url)
        repo = Repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")), time.time())
        files = {".gitattributes": FileEntry.regular(DEFAULT_GITATTRIBUTES.encode())}
        repo.branches["main"] = self.state.new_commit(repo, None, "initial commit", "", files)
        self.state.repos[repo_id] = repo
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        self._authorized(write=False)
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---") and not re.search(r"^---\s*$", content[3:], flags=re.M):
            errors.append({"message": "The YAML metadata block is not closed with '---'"})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        siblings = []
        for path, f in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": f.size, "blobId": f.oid}
            if f.lfs_sha256 is not None:  # siblings name the hash `sha256` where the tree API says `oid`
                sibling["lfs"] = {"sha256": f.lfs_sha256, "size": f.size, "pointerSize": f.lfs_json()["pointerSize"]}
            siblings.append(sibling)
        namespace = repo_id.split("/")[0]
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": namespace,
            "sha": commit.oid,
            "lastModified": iso_date(commit.date),
            "createdAt": iso_date(repo.created_at),
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        config = commit.files.get("config.json")
        if config is not None and config.data is not None:
            try:
                parsed = json.loads(config.data)
                info["config"] = {k: parsed[k] for k in ("architectures", "model_type", "auto_map") if k in parsed}
            except json.JSONDecodeError:
                pass
        self._send_json(200, info)

    def _tree(self, repo_id: str, revision: str, path: str, recursive: bool) -> None:
        commit = self._commit(self._repo(repo_id), revision)
        prefix = f"{path}/" if path else ""
        if path and path in commit.files:
            raise HubError(400, f"{path} is a file, not a directory")
        below = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
        if path and not below:
            raise HubError(404, f"{path} does not exist on {revision}", code="EntryNotFound")
        entries, folders = [], set()
        for p, f in sorted(below.items()):
            rel = p[len(prefix) :].split("/")
            for depth in range(1, len(rel)):
                if depth == 1 or recursive:
                    folders.add(prefix + "/".join(rel[:depth]))
            if len(rel) == 1 or recursive:
                entry = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
                if f.lfs_sha256:
                    entry["lfs"] = f.lfs_json()
                entries.append(entry)
        for folder in sorted(folders):
            oid = hashlib.sha1("".join(f"{p}{f.oid}" for p, f in below.items() if p.startswith(folder + "/")).encode())
            entries.append({"type": "directory", "oid": oid.hexdigest(), "size": 0, "path": folder})
        self._send_json(200, sorted(entries, key=lambda e: e["path"]))

    def _refs(self, repo_id: str) -> None:
        repo = self._repo(repo_id)

        def refs(kind: str, table: dict[str, str]) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(table.items())]

        self._send_json(
            200, {"branches": refs("heads", repo.branches), "converts": [], "tags": refs("tags", repo.tags)}
        )

    def _commits(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        history = repo.history(self._commit(repo, revision))
        self._send_json(
            200,
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": self.state.user}],
                    "date": iso_date(c.date),
                }
                for c in history
            ],
        )

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        start = self._json_body().get("startingPoint") or "main"
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = self._commit(repo, start).oid
        self._send_json(200, {})

    def _create_tag(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        tag = self._json_body().get("tag")
        if not tag or tag in repo.tags:
            raise HubError(409, f"Tag {tag!r} is missing or already exists")
        repo.tags[tag] = self._commit(repo, revision).oid
        self._send_json(200, {})

    # -- uploads -----------------------------------------------------------------------------------------------------

    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        payload = self._json_body()
        commit = self._commit(repo, revision)
        lfs_patterns = _lfs_patterns(commit.files)
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.files:
            gitignore = (commit.files[".gitignore"].data or b"").decode(errors="replace")
        ignore_patterns = [line.strip() for line in (gitignore or "").splitlines() if line.strip()[:1] not in ("", "#")]
        answers = []
        for file in payload.get("files", []):
            path, size = _check_path(file["path"]), int(file["size"])
            sample = base64.b64decode(file.get("sample", ""))
            is_lfs = size > self.state.lfs_size_threshold or b"\0" in sample or _matches(path, lfs_patterns)
            remote = commit.files.get(path)
            oid = None if remote is None else (remote.lfs_sha256 or remote.oid)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": _matches(path, ignore_patterns),
                    "oid": oid,
                }
            )
        self._send_json(200, {"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "This test server only implements LFS uploads through the batch API")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in self.state.lfs_objects:
                objects.append({"oid": oid, "size": size})
                continue
            signature = secrets.token_hex(16)
            self.state.upload_grants[signature] = (oid, size)
            actions = {
                "upload": {"href": f"{self.cdn_endpoint}/upload/{oid}?sig={signature}"},
                "verify": {"href": f"{self.endpoint}/{quote(repo_id)}.git/info/lfs/objects/verify"},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str, signature: str) -> None:
        data = self._body
        grant = self.state.upload_grants.pop(signature, None)
        if grant is None or grant[0] != oid:
            raise HubError(403, "Invalid or expired upload signature")
        if len(data) != grant[1] or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {grant[1]}")
        self.state.lfs_objects[oid] = data
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        payload = self._json_body()
        data = self.state.lfs_objects.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} of size {payload.get('size')} was not uploaded")
        self._send_json(200, {"success": True})

    def _create_commit(self, repo_id: str, revision: str, query: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if query.get("create_pr") in ("1", "true"):
            raise HubError(400, "Pull requests are not implemented by this test server")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} is not a branch", code="RevisionNotFound")
        try:
            lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid NDJSON commit payload: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit payload starts with a header line")
        header = lines[0]["value"]
        head = repo.branches[revision]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = _check_path(value.get("path", "").rstrip("/") if key == "deletedFolder" else value.get("path", ""))
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                try:
                    files[path] = FileEntry.regular(base64.b64decode(value["content"], validate=True))
                except binascii.Error as e:
                    raise HubError(400, f"Invalid base64 content for {path}") from e
            elif key == "lfsFile":
                oid, data = value.get("oid"), self.state.lfs_objects.get(value.get("oid", ""))
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise HubError(422, f"Your push was rejected: the LFS object of {path} ({oid}) was not uploaded")
                files[path] = FileEntry.lfs(oid, len(data))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key == "deletedFolder":
                removed = [p for p in files if p.startswith(path + "/")]
                if not removed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in removed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        title = header.get("summary") or "Update files"
        oid = self.state.new_commit(repo, head, title, header.get("description", ""), files)
        repo.branches[revision] = oid
        commit_url = f"{self.endpoint}/{repo_id}/commit/{oid}"
        self._send_json(200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None})

    # -- downloads ---------------------------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        commit = self._commit(self._repo(repo_id), revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry {path} not found on {revision}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid}
        if entry.lfs_sha256 is None:
            return self._send_file(entry.data or b"", {**headers, "ETag": f'"{entry.oid}"'})
        signature = secrets.token_hex(16)
        self.state.download_grants[signature] = entry.lfs_sha256
        headers |= {
            "Location": f"{self.cdn_endpoint}/lfs/{entry.lfs_sha256}?sig={signature}",
            "ETag": f'"{entry.oid}"',
            "X-Linked-Etag": f'"{entry.lfs_sha256}"',
            "X-Linked-Size": entry.size,
        }
        self._send(302, b"", headers)


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # huggingface_hub opens several connections at once (parallel LFS uploads)


class HubServer:
    """The Hub API on 127.0.0.1 (a free port) plus its "CDN" on a second port, each served by a daemon thread.

    Use as a context manager, or call `start()` / `stop()`. `endpoint` is what HF_ENDPOINT must be set to.
    """

    def __init__(
        self, token: str = "hf_test_token", user: str = "test-user", lfs_size_threshold: int = LFS_SIZE_THRESHOLD
    ):
        self.state = HubState(token, user, lfs_size_threshold)
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.endpoint = self.cdn_endpoint = ""

    @property
    def token(self) -> str:
        return self.state.token

    @property
    def requests(self) -> list[tuple[str, str, int, bool]]:
        """(method, path, status, had an Authorization header) for every request answered so far."""
        with self.state.lock:
            return list(self.state.requests)

    def start(self) -> HubServer:
        api = self._serve(is_cdn=False)
        cdn = self._serve(is_cdn=True)
        self.endpoint = f"http://127.0.0.1:{api.server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{cdn.server_address[1]}"
        for server in self._servers:
            server.RequestHandlerClass.endpoint = self.endpoint
            server.RequestHandlerClass.cdn_endpoint = self.cdn_endpoint
        return self

    def _serve(self, is_cdn: bool) -> ThreadingHTTPServer:
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state, "is_cdn": is_cdn})
        server = _ThreadingServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return server

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection helpers for tests ----------------------------------------------------------------------------

    def repo(self, repo_id: str) -> Repo:
        with self.state.lock:
            return self.state.repos[repo_id]

    def commit_ids(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids of `branch`, oldest first (the first is the repo's initial commit)."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            return [c.oid for c in reversed(repo.history(repo.commits[repo.branches[branch]]))]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, FileEntry]:
        with self.state.lock:
            commit = self.state.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return dict(commit.files)

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        entry = self.files(repo_id, revision)[path]
        if entry.lfs_sha256 is not None:
            with self.state.lock:
                return self.state.lfs_objects[entry.lfs_sha256]
        return entry.data or b""

    def corrupt_lfs_object(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace the stored bytes of an LFS file in place (a damaged upload or storage fault)."""
        entry = self.files(repo_id, revision)[path]
        with self.state.lock:
            self.state.lfs_objects[entry.lfs_sha256] = data
