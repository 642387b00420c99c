"""A stand-in for the Hugging Face Hub on loopback, so the real huggingface_hub download code runs in tests.

It serves folders (tiny twins made with `save_pretrained`) as model repositories at the routes
huggingface_hub 2.4 calls, with the headers it reads (file_download.py, hf_api.py, utils/_http.py):

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model info: `sha`, `siblings` (sizes, LFS)
    GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=  the file list snapshot_download walks
    HEAD /{repo}/resolve/{rev}/{path}                       X-Repo-Commit, ETag, X-Linked-Etag/-Size
    GET  /{repo}/resolve/{rev}/{path}                       the bytes; `Range: bytes=N-` answers 206

Errors are the hub's: 401 `X-Error-Code: RepoNotFound` for an unknown repo, 401/403 `GatedRepo` for a gated
one without an accepted token, 404 `EntryNotFound` / `RevisionNotFound`. Xet is off: no `X-Xet-*` header and
no `xetHash`, so every file goes through huggingface_hub's plain HTTP download.

Faults for the tests, on a file's GET: `cut_once` (send N bytes, then drop the connection), `fail` (an
HTTP error each time), `hold` (send N bytes, then wait until released). Every response is recorded
(`served`), so a test asserts on the bytes that actually went out.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".gguf", ".mp4", ".gif", ".png")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class Served:
    """One answered request: what was asked (with the Range's first byte) and how many body bytes went out."""

    method: str
    repo: str
    path: str
    status: int
    range_start: int | None
    sent: int


@dataclass
class Hold:
    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class Repo:
    id: str
    files: dict[str, bytes]
    gated: bool = False
    sha: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.id.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path])
        self.sha = digest.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def git_oid(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def etag(self, path: str) -> str:
        """The hub's: a file's git blob id, or the sha256 of an LFS file's content."""
        return hashlib.sha256(self.files[path]).hexdigest() if self.is_lfs(path) else self.git_oid(path)

    def lfs(self, path: str) -> dict[str, object] | None:
        if not self.is_lfs(path):
            return None
        return {"oid": self.etag(path), "size": len(self.files[path]), "pointerSize": 134}


class HubStandIn:
    """`with HubStandIn() as hub: hub.add_repo(...)`; point huggingface_hub at it with HF_ENDPOINT=hub.url."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = set()  # tokens that accepted the gated repos' licence
        self.served: list[Served] = []
        self.unknown_routes: list[str] = []
        self._cuts: dict[tuple[str, str], int] = {}
        self._failures: dict[tuple[str, str], int] = {}
        self._holds: dict[tuple[str, str], Hold] = {}
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="hub-standin", daemon=True).start()

    def __enter__(self) -> HubStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for hold in self._holds.values():
            hold.release()
        self.server.shutdown()
        self.server.server_close()

    # the repositories

    def add_repo(
        self,
        repo_id: str,
        folder: Path | None = None,
        *,
        extra: dict[str, bytes] | None = None,
        gated: bool = False,
    ) -> Repo:
        """Serve `folder`'s files (and `extra` ones, e.g. decoys a backend must not fetch) as `repo_id`."""
        files = {}
        if folder is not None:
            files = {
                p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            }
        files |= {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", **(extra or {})}
        repo = Repo(repo_id, files, gated=gated)
        self.repos[repo_id] = repo
        return repo

    # faults

    def cut_once(self, repo: str, path: str, after: int) -> None:
        """The next GET of the file sends `after` bytes of its body, then the connection drops."""
        self._cuts[(repo, path)] = after

    def fail(self, repo: str, path: str, status: int = 500) -> None:
        """Every GET of the file answers `status` (0: stop failing)."""
        self._failures[(repo, path)] = status

    def hold(self, repo: str, path: str, after: int) -> Hold:
        """The next GET of the file sends `after` bytes, then waits for `release()`."""
        self._holds[(repo, path)] = hold = Hold(after)
        return hold

    # what went out

    def bytes_served(self, repo: str, path: str | None = None) -> int:
        return sum(s.sent for s in self.gets(repo, path))

    def gets(self, repo: str, path: str | None = None) -> list[Served]:
        with self._lock:
            return [
                s
                for s in self.served
                if s.method == "GET" and s.repo == repo and (path is None or s.path == path)
            ]

    def _record(self, served: Served) -> None:
        with self._lock:
            self.served.append(served)

    # HTTP

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client pool expects

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._route(self, head=True)

            def do_GET(self) -> None:
                hub._route(self, head=False)

        return Handler

    def _route(self, request: http.server.BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if match := _TREE.match(url.path):
            self._tree(request, match["repo"], unquote(match["rev"]), unquote(match["path"] or ""), query)
        elif match := _INFO.match(url.path):
            self._info(request, match["repo"], unquote(match["rev"] or "main"), query)
        elif match := _RESOLVE.match(url.path):
            self._resolve(request, match["repo"], unquote(match["rev"]), unquote(match["path"]), head=head)
        else:
            self.unknown_routes.append(f"{request.command} {request.path}")
            self._json(request, 404, {"error": "Not Found"})

    def _repo(self, request: http.server.BaseHTTPRequestHandler, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:  # the hub answers 401 for a repo it does not show the caller, missing or private
            self._error(request, 401, "RepoNotFound", "Repository not found")
            return None
        if rev not in ("main", repo.sha):
            self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {rev}", repo)
            return None
        return repo

    def _info(self, request: http.server.BaseHTTPRequestHandler, repo_id: str, rev: str, query: dict) -> None:
        if (repo := self._repo(request, repo_id, rev)) is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, data in sorted(repo.files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling |= {"size": len(data), "blobId": repo.git_oid(path)}
                if lfs := repo.lfs(path):
                    sibling["lfs"] = {
                        "size": lfs["size"],
                        "sha256": lfs["oid"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        body = {
            "_id": repo.sha[:24], "id": repo.id, "modelId": repo.id, "sha": repo.sha, "private": False,
            "gated": "auto" if repo.gated else False, "disabled": False, "library_name": "diffusers",
            "tags": ["diffusers"], "siblings": siblings,
        }  # fmt: skip
        self._json(request, 200, body)

    def _tree(
        self, request: http.server.BaseHTTPRequestHandler, repo_id: str, rev: str, under: str, query: dict
    ) -> None:
        if (repo := self._repo(request, repo_id, rev)) is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(repo.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts) - 1))
            entry: dict[str, object] = {
                "type": "file",
                "oid": repo.git_oid(path),
                "size": len(repo.files[path]),
                "path": path,
            }
            if lfs := repo.lfs(path):
                entry["lfs"] = lfs
            entries.append(entry)
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self._json(request, 200, dirs + entries)

    def _resolve(
        self, request: http.server.BaseHTTPRequestHandler, repo_id: str, rev: str, path: str, *, head: bool
    ) -> None:
        if (repo := self._repo(request, repo_id, rev)) is None:
            return
        if repo.gated:
            token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if token not in self.tokens:
                status = 403 if token else 401
                self._error(
                    request, status, "GatedRepo",
                    f"Access to model {repo.id} is restricted. You must have access to it and be authenticated to access it. Please log in.",
                    repo,
                )  # fmt: skip
                return
        if path not in repo.files:
            self._error(request, 404, "EntryNotFound", f'{path} does not exist on "{rev}"', repo)
            return
        data = repo.files[path]
        key = (repo_id, path)
        headers = {
            "X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(path)}"', "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }  # fmt: skip
        if repo.is_lfs(path):
            headers |= {"X-Linked-Etag": f'"{repo.etag(path)}"', "X-Linked-Size": str(len(data))}
        if head:
            self._send(request, 200, headers | {"Content-Length": str(len(data))})
            self._record(Served("HEAD", repo_id, path, 200, None, 0))
            return
        if status := self._failures.get(key):
            self._error(
                request,
                status,
                None,
                "Internal Error - We're working hard to fix this as soon as possible!",
                repo,
            )
            self._record(Served("GET", repo_id, path, status, None, 0))
            return
        start = _range_start(request.headers.get("range"))
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(request, status, headers | {"Content-Length": str(len(body))})
        cut, hold = self._cuts.pop(key, None), self._holds.pop(key, None)
        sent = 0
        try:
            if cut is not None:  # part of the body, then the connection goes, as a dropped link does
                request.wfile.write(body[:cut])
                request.wfile.flush()
                sent = min(cut, len(body))
                request.close_connection = True
                request.connection.shutdown(socket.SHUT_RDWR)
                return
            if hold is not None:
                request.wfile.write(body[: hold.after])
                request.wfile.flush()
                sent = min(hold.after, len(body))
                hold.reached.set()
                hold.released.wait()
                body = body[hold.after :]
            request.wfile.write(body)
            sent += len(body)
        except OSError:
            request.close_connection = True
        finally:
            self._record(Served("GET", repo_id, path, status, start or None, sent))

    # replies

    def _send(
        self, request: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str]
    ) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.end_headers()

    def _json(
        self,
        request: http.server.BaseHTTPRequestHandler,
        status: int,
        body: object,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        self._send(
            request,
            status,
            {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})},
        )
        if request.command != "HEAD":
            request.wfile.write(data)

    def _error(
        self,
        request: http.server.BaseHTTPRequestHandler,
        status: int,
        code: str | None,
        message: str,
        repo: Repo | None = None,
    ) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._json(request, status, {"error": message}, headers)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up (as huggingface_hub does after a cut) is no error of the stand-in's


def _range_start(header: str | None) -> int:
    """The first byte of `Range: bytes=N-` (what huggingface_hub sends to resume), else 0."""
    match = re.match(r"^bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else 0
