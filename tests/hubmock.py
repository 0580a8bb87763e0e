"""A loopback stand-in for the Hugging Face Hub's HTTP endpoints, for tests.

Serves local directories as Hub model repos on http://127.0.0.1:PORT, speaking just enough of the Hub's protocol
for huggingface_hub (``get_hf_file_metadata``, ``hf_hub_download``, ``HfApi.model_info`` / ``file_exists``) and for
plain ``Range`` GETs on resolve URLs:

* ``HEAD|GET /{repo_id}/resolve/{revision}/{path}``: 200, or 206 for ``Range: bytes=a-b`` / ``bytes=a-`` /
  ``bytes=-n`` (416 when unsatisfiable or malformed).  Headers: X-Repo-Commit, quoted ETag (sha256 for LFS-type
  files, else the git blob sha1), Content-Length, Accept-Ranges; LFS-type files also get X-Linked-Etag and
  X-Linked-Size, as on the real Hub.  With ``lfs_redirect=True`` LFS-type files answer 302 to a "CDN" URL on
  ``http://localhost:PORT/cdn/...`` (another origin, so huggingface_hub treats it like the real CDN).
* ``GET /api/models/{repo_id}[/revision/{rev}]``: model info JSON (id, sha, siblings, gated); ``?blobs=true`` adds
  size / blobId / lfs to each sibling.  Like the real Hub, gated repos' metadata is readable without a token.
* Errors carry X-Error-Code / X-Error-Message like the Hub: unknown repo 401 RepoNotFound, gated repo 401 (no
  token) or 403 (wrong token) GatedRepo, 404 RevisionNotFound, 404 EntryNotFound.

``bytes_served`` counts file-content bytes sent in GET bodies (200/206 on resolve and cdn URLs), not error or JSON
bodies; ``requests`` logs every request (method, path, range, status, body_bytes, auth).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".model")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{40})/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?$")
_CHUNK = 1 << 20


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):  # skip HTTPServer's getfqdn() reverse lookup, which can hang in sandboxes
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):  # clients hanging up mid-response are expected; bugs are not
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every response carries Content-Length
    timeout = 60  # idle keep-alive connections eventually end their thread

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        self.server.hub._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.hub._track(self.connection, add=False)

    def do_GET(self):
        self.server.hub._handle(self)

    do_HEAD = do_GET


class MockHub:
    def __init__(
        self,
        repos: dict[str, pathlib.Path],
        *,
        gated=frozenset(),
        token: str = "hf_test_token",
        lfs_redirect: bool = False,
    ):
        self.repos = {repo_id: pathlib.Path(d).resolve() for repo_id, d in repos.items()}
        self.gated, self.token, self.lfs_redirect = set(gated), token, lfs_redirect
        self.url, self.port = "", 0
        self.bytes_served = 0
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._fail: dict[str, list] = {}  # filename -> [status, times left]
        self._truncate: dict[str, list] = {}  # filename -> [True, times left]
        self._conns: set = set()
        self._hashes: dict = {}
        self._by_sha = {self.commit(r): r for r in self.repos}

    # ---- public API --------------------------------------------------------------------------------------------
    @staticmethod
    def commit(repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def resolve_url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        return f"{self.url}/{repo_id}/resolve/{revision}/{filename}"

    def fail_next(self, filename: str, status: int = 500, times: int = 1) -> None:
        with self._lock:
            self._fail[filename.lstrip("/")] = [status, times]

    def truncate_next(self, filename: str, times: int = 1) -> None:
        with self._lock:
            self._truncate[filename.lstrip("/")] = [True, times]

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.requests.clear()

    def __enter__(self) -> MockHub:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="MockHub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wake handler threads blocked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- internals -----------------------------------------------------------------------------------------------
    def _track(self, conn, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _take(self, table: dict, filename: str):
        """Consume one use of an injected fault for `filename`; returns its value or None."""
        with self._lock:
            entry = table.get(filename)
            if entry is None:
                return None
            entry[1] -= 1
            if entry[1] <= 0:
                del table[filename]
            return entry[0]

    def _file_info(self, fpath: pathlib.Path, relpath: str) -> dict:
        st = fpath.stat()
        key = (str(fpath), st.st_size, st.st_mtime_ns)
        with self._lock:
            info = self._hashes.get(key)
        if info is None:
            lfs = relpath.endswith(LFS_SUFFIXES)
            h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % st.st_size)
            with open(fpath, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            info = {"size": st.st_size, "lfs": lfs, "etag": h.hexdigest()}
            if lfs:  # git stores a pointer file; its sha1 is the blob id
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{info['etag']}\nsize {st.st_size}\n"
                info["pointer_size"] = len(pointer)
                info["blob_id"] = hashlib.sha1(b"blob %d\0%s" % (len(pointer), pointer.encode())).hexdigest()
            else:
                info["blob_id"] = info["etag"]
            with self._lock:
                self._hashes[key] = info
        return info

    def _find(self, repo_id: str, relpath: str) -> pathlib.Path | None:
        root = self.repos[repo_id]
        fpath = (root / relpath).resolve()
        return fpath if fpath.is_file() and fpath.is_relative_to(root) else None

    def _handle(self, h: _Handler) -> None:
        # Logged up front and updated before each write, so the log and counters are complete by the time the
        # client has the response (no race with a test that reads them right after).
        h.log = {
            "method": h.command,
            "path": h.path,
            "range": h.headers.get("Range"),
            "status": None,
            "body_bytes": 0,
            "auth": h.headers.get("Authorization"),
        }
        with self._lock:
            self.requests.append(h.log)
        self._route(h)

    def _route(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        path = url.path
        if m := _API.match(path):
            if h.command != "GET":
                return self._error(h, 405, None, "Method not allowed")
            return self._api(h, unquote(m["repo"]), unquote(m["rev"] or "main"), parse_qs(url.query))
        cdn = m if (m := _CDN.match(path)) and m["sha"] in self._by_sha else None
        resolve = None if cdn else _RESOLVE.match(path)
        if not (cdn or resolve):
            return self._error(h, 404, None, "Not found")
        relpath = unquote((cdn or resolve)["path"])
        if (status := self._take(self._fail, relpath)) is not None:
            return self._error(h, status, None, f"Injected failure ({status}) for {relpath}")
        if cdn:  # the "CDN" URL is pre-authorized, like the Hub's signed URLs
            return self._file(h, self._by_sha[cdn["sha"]], cdn["sha"], relpath, cdn=True)
        repo_id, rev = unquote(resolve["repo"]), unquote(resolve["rev"])
        if repo_id not in self.repos:
            return self._error(h, 401, "RepoNotFound", "Repository not found")
        if repo_id in self.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            if h.headers.get("Authorization") is None:
                msg = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                    "to access it. Please log in."
                )
                return self._error(h, 401, "GatedRepo", msg)
            msg = (
                f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                f"Visit https://huggingface.co/{repo_id} to ask for access."
            )
            return self._error(h, 403, "GatedRepo", msg)
        sha = self.commit(repo_id)
        if rev not in ("main", sha):
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return self._file(h, repo_id, sha, relpath, cdn=False)

    def _file(self, h: _Handler, repo_id: str, sha: str, relpath: str, cdn: bool) -> None:
        fpath = self._find(repo_id, relpath)
        if fpath is None:
            return self._error(h, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        info = self._file_info(fpath, relpath)
        size = info["size"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{info["etag"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if info["lfs"]:
            headers.update({"X-Linked-Etag": f'"{info["etag"]}"', "X-Linked-Size": str(size)})
            if self.lfs_redirect and not cdn:
                headers["Location"] = f"http://localhost:{self.port}/cdn/{sha}/{relpath}"
                return self._reply(h, 302, headers)
        start, end, status = 0, size - 1, 200
        if (rng := h.headers.get("Range")) is not None:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            elif m and m[2]:
                start = max(size - int(m[2]), 0)
            if not m or not (m[1] or m[2]) or start >= size or start > end or (not m[1] and int(m[2]) == 0):
                return self._error(h, 416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        truncate = h.command == "GET" and self._take(self._truncate, relpath) is not None
        h.log["status"] = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if h.command == "HEAD":
            return
        todo, sent = (length // 2 if truncate else length), 0
        with open(fpath, "rb") as f:
            f.seek(start)
            while sent < todo and (chunk := f.read(min(_CHUNK, todo - sent))):
                self._count(h, len(chunk))
                try:
                    h.wfile.write(chunk)
                except OSError:  # client went away: uncount the chunk (may have been partly sent)
                    self._count(h, -len(chunk))
                    h.close_connection = True
                    return
                sent += len(chunk)
        if truncate:
            h.close_connection = True  # the peer sees EOF before Content-Length bytes

    def _api(self, h: _Handler, repo_id: str, rev: str, query: dict) -> None:
        if repo_id not in self.repos:
            return self._error(h, 401, "RepoNotFound", "Repository not found")
        sha = self.commit(repo_id)
        if rev not in ("main", sha):
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        root = self.repos[repo_id]
        siblings = []
        for fpath in sorted(p for p in root.rglob("*") if p.is_file()):
            sib = {"rfilename": fpath.relative_to(root).as_posix()}
            if query.get("blobs", ["false"])[0].lower() == "true":
                info = self._file_info(fpath, sib["rfilename"])
                sib.update(size=info["size"], blobId=info["blob_id"])
                if info["lfs"]:
                    sib["lfs"] = {"size": info["size"], "sha256": info["etag"], "pointerSize": info["pointer_size"]}
            siblings.append(sib)
        body = {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": False,
            "gated": "manual" if repo_id in self.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        self._reply(h, 200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _error(self, h, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._reply(h, status, headers, json.dumps({"error": message}).encode())

    def _reply(self, h, status: int, headers: dict, body: bytes = b"") -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.log["status"] = status
        if h.command != "HEAD":
            h.log["body_bytes"] = len(body)
        h.end_headers()
        if h.command != "HEAD" and body:
            try:
                h.wfile.write(body)
            except OSError:
                h.close_connection = True

    def _count(self, h, n: int) -> None:
        with self._lock:
            h.log["body_bytes"] += n
            self.bytes_served += n
