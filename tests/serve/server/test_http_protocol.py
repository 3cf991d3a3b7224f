"""The request-head limits uvicorn's httptools parser lacks, driven over real sockets (probe T #5/#6)."""

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from engine_builder.serve.server.http_protocol import GuardedHttpToolsProtocol


class _Quick(GuardedHttpToolsProtocol):
    max_head_bytes = 4096
    head_timeout_s = 0.3
    send_timeout_s = 0.5


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the size of the body it read."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"size": size}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _PatientSend(_Quick):
    send_timeout_s = 3.0


def _serve(
    scenario: Callable[[int], Awaitable[Any]],
    keep_alive_s: float = 5.0,
    app: Any = _echo,
    protocol: type[GuardedHttpToolsProtocol] = _Quick,
) -> Any:
    async def main() -> Any:
        config = uvicorn.Config(app, timeout_keep_alive=keep_alive_s, log_level="critical", lifespan="off")
        config.load()
        state = ServerState()
        server = await asyncio.get_running_loop().create_server(
            lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0
        )
        try:
            return await asyncio.wait_for(scenario(server.sockets[0].getsockname()[1]), 20)
        finally:
            server.close()

    return asyncio.run(main())


async def _exchange(port: int, *parts: bytes, pause_s: float = 0.0) -> bytes:
    """Sends the parts (`pause_s` apart) and reads until the server closes or 5 s pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        return await asyncio.wait_for(reader.read(1 << 20), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def _request(body: bytes = b"", headers: str = "") -> bytes:
    return f"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: {len(body)}\r\n{headers}\r\n".encode() + body


def test_headers_past_the_limit_are_a_431_in_the_envelope() -> None:
    answer = _serve(lambda port: _exchange(port, _request(headers=f"x-big: {'a' * 20000}\r\n")))
    assert answer.startswith(b"HTTP/1.1 431 ")
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_header_fields_too_large" and "4096 bytes" in error["message"]


def test_headers_that_never_end_are_cut_at_the_limit_not_buffered() -> None:
    """Header lines sent in pieces, never finished: refused once the limit is passed (httptools buffered 100 MB)."""
    pieces = [b"POST /x HTTP/1.1\r\n"] + [f"x-h{index}: {'b' * 900}\r\n".encode() for index in range(5)]
    answer = _serve(lambda port: _exchange(port, *pieces, pause_s=0.01))
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_a_small_head_with_a_large_body_in_one_write_is_served() -> None:
    """The bytes after the head are the body's: a single write of head and body is not counted as head."""
    answer = _serve(lambda port: _exchange(port, _request(b"z" * 200_000, headers="connection: close\r\n")))
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"size":200000}')


def test_a_head_that_stops_arriving_is_a_408() -> None:
    async def scenario(port: int) -> tuple[bytes, float]:
        began = time.monotonic()
        answer = await _exchange(port, b"POST /x HTTP/1.1\r\nhost: a\r\n")
        return answer, time.monotonic() - began

    answer, seconds = _serve(scenario)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
    assert seconds < 3


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_time() -> None:
    async def scenario(port: int) -> tuple[bytes, float]:
        began = time.monotonic()
        return await _exchange(port), time.monotonic() - began

    answer, seconds = _serve(scenario, keep_alive_s=0.3)
    assert answer == b"" and seconds < 3  # closed, not held until the 5 s read gives up


def test_kept_alive_requests_each_get_a_fresh_head_allowance() -> None:
    """Two requests on one connection, their heads together past the limit and a pause between them longer than the
    head timeout: both are served (the count and the clock start again with each head)."""
    headers = f"x-pad: {'p' * 3000}\r\n"

    async def scenario(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request(b"1", headers=headers))
        first = await asyncio.wait_for(reader.readuntil(b'{"size":1}'), 5)
        await asyncio.sleep(0.5)
        writer.write(_request(b"22", headers=headers + "connection: close\r\n"))
        second = await asyncio.wait_for(reader.read(1 << 20), 5)
        writer.close()
        return first + second

    answer = _serve(scenario)
    assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.endswith(b'{"size":2}')


def test_a_client_that_leaves_with_pipelined_requests_disconnects_the_running_one_too() -> None:
    """Probe AB: uvicorn marked only the queued (newest) request disconnected; the running one never heard, ran to
    max_tokens, then failed writing to the closed socket (a false 500 and a traceback)."""
    heard = asyncio.Event()

    async def waits_for_the_client(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        heard.set()

    async def scenario(port: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request(b"1") + _request(b"2"))  # the second waits behind the first
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        try:
            await asyncio.wait_for(heard.wait(), 3)
        except TimeoutError:
            return False
        return True

    assert _serve(scenario, app=waits_for_the_client)


async def _read_slowly(port: int, chunk: int, pause_s: float, buffer: int) -> int:
    """Asks for a streamed answer over a small receive window and reads it `chunk` bytes every `pause_s`: the bytes
    received."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=raw, limit=buffer)
    writer.write(_request(b"1"))
    await writer.drain()
    received = 0
    while True:
        data = await asyncio.wait_for(reader.read(chunk), 5)
        if not data:
            break
        received += len(data)
        if data.endswith(b"0\r\n\r\n"):
            break  # the chunked body's end
        await asyncio.sleep(pause_s)
    writer.close()
    return received


def _streams(chunks: int, chunk: bytes, ended: list[str]) -> Any:
    """An app that streams `chunks` copies of `chunk`, then notes what receive() says (a disconnect, if the client
    was cut off) in `ended`."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        ended.append((await receive())["type"])

    return app


def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout() -> None:
    """Probe AB: a client that stopped reading held its request (and the engine's slot and blocks) for as long as it
    stayed connected, the server's send waiting on a full buffer forever. Writing paused past the send timeout
    aborts the connection, which its request hears as a disconnect."""
    ended: list[str] = []

    async def scenario(port: int) -> tuple[float, list[str]]:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", port))
        raw.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=raw)
        start = time.monotonic()
        writer.write(_request(b"1"))
        await writer.drain()
        while not ended and time.monotonic() - start < 10:
            await asyncio.sleep(0.05)  # reads nothing
        writer.close()
        return time.monotonic() - start, ended

    took, heard = _serve(scenario, app=_streams(10_000, b"x" * 65536, ended))
    assert heard == ["http.disconnect"]
    assert took < 5  # cut off at about 0.5 s, not after 640 MB


def test_a_client_reading_slowly_but_steadily_is_served_in_full() -> None:
    """Each write that drains resumes the clock: only a stall as long as the send timeout cuts a client off. The
    answer (10 MB at about 1.6 MB/s) takes twice the send timeout; the kernel's buffers take up to a second to
    drain enough at that pace, hence a timeout of 3 s here."""
    ended: list[str] = []

    def scenario(port: int) -> Awaitable[int]:
        return _read_slowly(port, 16384, 0.01, buffer=1 << 16)

    received = _serve(scenario, app=_streams(600, b"y" * 16384, ended), protocol=_PatientSend)
    assert received > 600 * 16384


class _SmallSendBuffer(_Quick):
    """A kernel send buffer of a few KiB: the transport pauses after little, as behind a slow link."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().connection_made(transport)

    send_timeout_s = 0.3


def test_a_client_reading_slower_than_the_buffer_drains_is_not_cut_off() -> None:
    """The timer was reset only when the transport resumed writing, once its buffer was nearly empty: a client
    reading steadily but slowly (here 20 KiB/s, the buffer taking seconds to drain) was logged as reading nothing
    and cut off (probe AZ). Any of the answer taken within the send timeout counts."""
    ended: list[str] = []

    def scenario(port: int) -> Awaitable[int]:
        return _read_slowly(port, 1024, 0.02, buffer=1024)  # a small buffer: the socket is read as it goes

    received = _serve(scenario, app=_streams(20, b"z" * 16384, ended), protocol=_SmallSendBuffer)
    assert received > 20 * 16384
