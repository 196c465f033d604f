"""A minimal Hugging Face Hub HTTP server for tests: local folders served as model repos.

Enough of the Hub protocol for `huggingface_hub` (2.4) to run `snapshot_download` and
`hf_hub_download` against it (point `huggingface_hub.constants.ENDPOINT` at `url`):

- `GET /api/models/{repo_id}[/revision/{revision}]`: model info (`id`, `sha`, `siblings`)
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]`: the file listing (`type`, `path`, `size`, `oid`)
- `HEAD`/`GET /{repo_id}/resolve/{revision}/{filename}`: a file, with `ETag` (its git blob id),
  `X-Repo-Commit` and `Content-Length`

Files are plain git files (no LFS, no xet). `revision` is `main` or the repo's commit id (a hash of
its files). Unknown repos, revisions and files answer 404 with the Hub's `X-Error-Code`. Every request
is recorded (`requests`), so a test can assert which files a client downloaded.

>>> import tempfile, pathlib, urllib.request
>>> root = pathlib.Path(tempfile.mkdtemp()); _ = (root / "config.json").write_text("{}")
>>> with HubServer({"org/x": root}) as hub:
...     body = urllib.request.urlopen(hub.url + "/org/x/resolve/main/config.json").read()
>>> body, hub.downloaded("org/x")
(b'{}', ['config.json'])
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (the Hub's ETag for a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, folder: Path):
        self.files = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        self.oids = {name: git_blob_id(p.read_bytes()) for name, p in self.files.items()}
        listing = "".join(f"{name}\0{oid}\n" for name, oid in self.oids.items()).encode()
        self.sha = hashlib.sha1(listing).hexdigest()  # a stand-in commit id: changes with any file

    def knows(self, revision: str) -> bool:
        return revision in ("main", self.sha)


class HubServer:
    """Serve `{repo_id: folder}` on 127.0.0.1 (a free port) until `stop()` or the end of a `with`."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: _Repo(Path(folder)) for repo_id, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo_id: str) -> str:
        return self.repos[repo_id].sha

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloaded(self, repo_id: str) -> list[str]:
        """The files whose content was sent (GET of a resolve URL), in order, repeats kept."""
        out = []
        with self._lock:
            requests = list(self.requests)
        for method, path in requests:
            m = _RESOLVE.match(path)
            if method == "GET" and m and m["repo"] == repo_id:
                out.append(unquote(m["file"]))
        return out

    # ------------------------------------------------------------------ HTTP

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the request log is `server.requests`
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests.append((self.command, path))
                if m := _RESOLVE.match(path):
                    return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["file"]), body)
                if self.command == "GET" and (m := _TREE.match(path)):
                    return self._tree(m["repo"], unquote(m["rev"]), unquote(m["path"] or ""))
                if self.command == "GET" and (m := _INFO.match(path)):
                    return self._info(m["repo"], unquote(m["rev"] or "main"))
                self._error(404, "EntryNotFound", f"no route for {path}", body=body)

            def _repo(self, repo_id: str, revision: str, body: bool = True) -> _Repo | None:
                repo = server.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body=body)
                    return None
                if not repo.knows(revision):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body,
                                commit=None)
                    return None
                return repo

            def _resolve(self, repo_id: str, revision: str, filename: str, body: bool):
                repo = self._repo(repo_id, revision, body)
                if repo is None:
                    return
                if filename not in repo.files:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist", body=body,
                                       commit=repo.sha)
                data = repo.files[filename].read_bytes()
                self._send(200, data if body else b"", "application/octet-stream", length=len(data), headers={
                    "ETag": f'"{repo.oids[filename]}"',
                    "X-Repo-Commit": repo.sha,
                    "Accept-Ranges": "none",
                })

            def _tree(self, repo_id: str, revision: str, under: str):
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                prefix = under.strip("/") + "/" if under.strip("/") else ""
                entries = [
                    {"type": "file", "path": name, "size": repo.files[name].stat().st_size, "oid": oid}
                    for name, oid in repo.oids.items() if name.startswith(prefix)
                ]
                self._json(entries, repo.sha)

            def _info(self, repo_id: str, revision: str):
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                self._json({
                    "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "disabled": False,
                    "gated": False, "tags": [], "siblings": [{"rfilename": name} for name in repo.files],
                }, repo.sha)

            def _json(self, payload, commit: str):
                self._send(200, json.dumps(payload).encode(), "application/json",
                           headers={"X-Repo-Commit": commit})

            def _error(self, status: int, code: str, message: str, *, body: bool = True, commit: str | None = None):
                data = json.dumps({"error": message}).encode()
                headers = {"X-Error-Code": code, "X-Error-Message": message}
                if commit:
                    headers["X-Repo-Commit"] = commit
                self._send(status, data if body else b"", "application/json", length=len(data), headers=headers)

            def _send(self, status: int, data: bytes, content_type: str, *, length: int | None = None,
                      headers: dict[str, str] | None = None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if data:
                    self.wfile.write(data)

        return Handler
