"""Loopback HTTP server for tests: serves a directory on 127.0.0.1 (free port).

Features, so download code is exercised for real rather than mocked:

* optional HTTP basic auth (401 + ``WWW-Authenticate`` when missing or wrong);
* single-range ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` requests (206 with
  ``Content-Range``; 416 past the end), ``If-Range`` against the ``ETag``;
* fault injection: ``cut_after={"/path": n}`` sends the full ``Content-Length`` header but
  only ``n`` body bytes, then drops the connection (once per path), like a network failure;
* ``server.log``: one :class:`Hit` per request (method, path, Range header, status,
  whether it was authorised). The Authorization header itself is never stored or printed.

Usage::

    with serve_directory(tmp_path / "srv", auth=("alice", "s3cret")) as srv:
        requests.get(srv.url + "/file.bin", auth=("alice", "s3cret"))
        assert srv.log[-1].status == 200
"""
from __future__ import annotations

import base64
import contextlib
import email.utils
import hmac
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote, urlsplit


@dataclass
class Hit:
    method: str
    path: str
    range: Optional[str]
    status: int
    authorized: bool


@dataclass
class LoopbackServer:
    root: Path
    url: str
    log: list[Hit] = field(default_factory=list)

    def hits(self, path_suffix: str = "", method: str = "GET") -> list[Hit]:
        return [h for h in self.log if h.method == method and h.path.endswith(path_suffix)]


def _handler(root: Path, auth: Optional[tuple[str, str]], cut_after: dict[str, int], server: LoopbackServer, lock: threading.Lock):
    expected = None
    if auth is not None:
        expected = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    cut_done: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def _record(self, path: str, status: int, authorized: bool) -> None:
            with lock:
                server.log.append(Hit(self.command, path, self.headers.get("Range"), status, authorized))

        def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            authorized = expected is None or hmac.compare_digest(self.headers.get("Authorization", ""), expected)
            if not authorized:
                self._record(path, 401, False)
                return self._send_empty(401, {"WWW-Authenticate": 'Basic realm="loopback"'})
            target = (root / path.lstrip("/")).resolve()
            if root not in target.parents or not target.is_file():
                self._record(path, 404, True)
                return self._send_empty(404)
            data_size = target.stat().st_size
            st = target.stat()
            etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
            headers = {
                "ETag": etag,
                "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            start, end, status = 0, data_size - 1, 200
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and (if_range is None or if_range == etag):
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
                if not m or (m.group(1) == "" and m.group(2) == ""):
                    self._record(path, 416, True)
                    return self._send_empty(416, {"Content-Range": f"bytes */{data_size}"})
                if m.group(1) == "":  # suffix range: last n bytes
                    start = max(0, data_size - int(m.group(2)))
                else:
                    start = int(m.group(1))
                    if m.group(2):
                        end = min(end, int(m.group(2)))
                if start >= data_size or start > end:
                    self._record(path, 416, True)
                    return self._send_empty(416, {"Content-Range": f"bytes */{data_size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{data_size}"
            length = end - start + 1
            self._record(path, status, True)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not body:
                return
            with open(target, "rb") as f:
                f.seek(start)
                payload = f.read(length)
            limit = cut_after.get(path)
            if limit is not None and path not in cut_done:
                cut_done.add(path)
                self.wfile.write(payload[:limit])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@contextlib.contextmanager
def serve_directory(
    root: str | Path,
    *,
    auth: Optional[tuple[str, str]] = None,
    cut_after: Optional[dict[str, int]] = None,
) -> Iterator[LoopbackServer]:
    """Serve ``root`` on http://127.0.0.1:<free port> for the duration of the block."""
    root = Path(root).resolve()
    lock = threading.Lock()
    handle = LoopbackServer(root=root, url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, auth, dict(cut_after or {}), handle, lock))
    httpd.daemon_threads = True
    handle.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield handle
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
