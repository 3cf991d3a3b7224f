"""A bare HTTP/1.1 client on a socket, for what httpx will not do: lie in Content-Length, read a response a
few bytes at a time through a tiny receive buffer, or drop the connection mid-body."""

import json
import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def connect(port: int, receive_buffer: int | None = None, timeout_s: float = 120.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # set before connect, so the advertised window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout_s)
    sock.connect(("127.0.0.1", port))
    return sock


def send_request(
    sock: socket.socket,
    path: str,
    body: bytes,
    *,
    content_length: int | None = None,
    extra_headers: str = "",
) -> None:
    length = len(body) if content_length is None else content_length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n{extra_headers}\r\n"
    )
    sock.sendall(head.encode() + body)


def post_json(port: int, path: str, payload: object) -> None:
    """Fire a request on a fresh socket and return without reading (the caller closes nothing: see storms)."""
    sock = connect(port)
    send_request(sock, path, json.dumps(payload).encode())


def read_response(
    sock: socket.socket, chunk_size: int = 65536, pause_s: float = 0.0, already_read: bytes = b""
) -> RawResponse:
    """Read until the server closes; `pause_s` between reads makes a slow reader."""
    data = already_read
    while True:
        piece = sock.recv(chunk_size)
        if not piece:
            break
        data += piece
        if pause_s:
            time.sleep(pause_s)
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = _dechunk(rest) if headers.get("transfer-encoding") == "chunked" else rest
    return RawResponse(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += data[:size]
        data = data[size + 2 :]
    return body
