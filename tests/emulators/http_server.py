"""A threaded HTTP server on 127.0.0.1 for the URL-based sources: files with byte ranges and ETags, JSON
routes (the Baseten training API, a Hugging Face hub API), a log of every request, and injected faults
(a body cut off after N bytes, a slow body, a server that ignores Range or sends no ETag, a fixed error
status)."""

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class FileRoute:
    data: bytes
    etag: str
    cut_after: int | None = None  # send this many body bytes, then drop the connection
    cut_times: int = 0  # how many requests are cut
    ignore_range: bool = False
    status: int | None = None  # answer this error status instead of the file
    required_headers: dict[str, str] = field(default_factory=dict)  # else 401
    extra_headers: dict[str, str] = field(default_factory=dict)
    chunk_delay_s: float = 0.0  # a slow server: the body goes out in 64 KiB chunks this far apart
    validators: bool = True  # False: no ETag, as from a server that sends no validator at all
    replaced_by: bytes | None = None  # after its cut, the file is replaced by this version (a new ETag)
    ignore_if_range: bool = False  # answer a range of whatever version is there, as a server without If-Range does


_SLOW_CHUNK_BYTES = 64 * 1024
JsonHandler = Callable[[Recorded], tuple[int, Any, dict[str, str]]]


class LocalHttpServer:
    def __init__(self) -> None:
        self.files: dict[str, FileRoute] = {}
        self.json_routes: dict[tuple[str, str], JsonHandler] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_file(self, path: str, data: bytes, **options: Any) -> FileRoute:
        route = FileRoute(data=data, etag=f'"{hashlib.md5(data).hexdigest()}"', **options)
        self.files[path] = route
        return route

    def add_json(self, method: str, path: str, handler: JsonHandler) -> None:
        self.json_routes[(method, path)] = handler

    def requests_for(self, path: str) -> list[Recorded]:
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.files.clear()
        self.json_routes.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(owner: LocalHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            return

        def _record(self) -> Recorded:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            # Header names in Title-Case: clients differ in the case they send.
            headers = {name.title(): value for name, value in self.headers.items()}
            recorded = Recorded(self.command, parts.path, parse_qs(parts.query), headers, body)
            with owner._lock:
                owner.requests.append(recorded)
            return recorded

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_HEAD(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            request = self._record()
            handler = owner.json_routes.get((self.command, request.path))
            if handler is not None:
                status, payload, headers = handler(request)
                self._send_json(status, payload, headers)
            elif request.path in owner.files and self.command in ("GET", "HEAD"):
                self._send_file(owner.files[request.path], request)
            else:
                self._send_json(404, {"error": "not found"}, {})

        def _send_json(self, status: int, payload: Any, headers: dict[str, str]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_file(self, route: FileRoute, request: Recorded) -> None:
            if route.status is not None:
                self._send_json(route.status, {"error": "injected"}, route.extra_headers)
                return
            for name, value in route.required_headers.items():
                if request.headers.get(name) != value:
                    self._send_json(401, {"error": "unauthorized"}, {})
                    return
            data, start = route.data, 0
            range_header = request.headers.get("Range")
            if_range = request.headers.get("If-Range")
            if if_range is not None and if_range != route.etag and not route.ignore_if_range:  # RFC 9110: sent whole
                range_header = None
            status = 200
            if range_header and not route.ignore_range:
                first, _, last = range_header.removeprefix("bytes=").partition("-")
                start = int(first)
                end = int(last) if last else len(data) - 1
                if start >= len(data):
                    self._send_json(416, {"error": "range"}, {"Content-Range": f"bytes */{len(data)}"})
                    return
                end = min(end, len(data) - 1)
                status = 206
                body = data[start : end + 1]
            else:
                body = data
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if route.validators:
                self.send_header("ETag", route.etag)
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
            for name, value in route.extra_headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if route.cut_after is not None and route.cut_times > 0 and len(body) > route.cut_after:
                route.cut_times -= 1
                self.wfile.write(body[: route.cut_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                if route.replaced_by is not None:
                    route.data, route.replaced_by = route.replaced_by, None
                    route.etag = f'"{hashlib.md5(route.data).hexdigest()}"'
                return
            if not route.chunk_delay_s:
                self.wfile.write(body)
                return
            for offset in range(0, len(body), _SLOW_CHUNK_BYTES):
                try:
                    self.wfile.write(body[offset : offset + _SLOW_CHUNK_BYTES])
                    self.wfile.flush()
                except OSError:  # the client went away
                    return
                time.sleep(route.chunk_delay_s)

    return Handler
