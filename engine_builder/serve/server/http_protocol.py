"""uvicorn's httptools protocol with the two limits on a request's head that its parser lacks (probe T).

- Size: httptools buffers a request line and headers for as long as they keep coming (100 MB was accepted, before
  auth). A head still incomplete after MAX_HEAD_BYTES is a 431 and the connection closes.
- Time: a connection that has begun a request's head but not finished it had no deadline (data cancels uvicorn's
  keep-alive timer), and a connection that never sent a byte had none either. A head must complete within
  HEAD_TIMEOUT_S of its first byte (a 408, then close); a connection that sends nothing is closed after the
  keep-alive idle time, as one idle between requests is.

The limits are nginx's kind (client_header_timeout 60 s; its large header buffers, 32 KB by default, are lower);
64 KiB leaves room for large cookies and tokens. Bodies have their own limits (body_limit.py).

A third limit, on the answer: a client that stops reading (its socket's receive window full, the connection still
open) held its request's place, its slot in the engine's batch and its KV blocks for as long as it stayed connected:
the server's send waits while the transport's buffer is full, with no deadline (probe AB). A connection whose
writing is paused and whose client takes none of the answer for SEND_TIMEOUT_S (nginx's send_timeout, 60 s: the
time between two successful writes) is aborted, which is a disconnect for its requests: their streams end and the
engine frees what they held. A client that reads, however slowly, is served: what it took is the drop in the bytes
still to send, the transport's buffer and the kernel's send queue (Linux's SIOCOUTQ) together; the transport's own
resume comes only once its buffer is nearly empty, which a slow reader could take minutes to reach (probe AZ).

And one fix: a client that leaves with pipelined requests queued behind a running one is a disconnect for all of
them, not only for the newest.
"""

import asyncio
import fcntl
import json
import logging
import sys
import termios
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine_builder.serve.server.errors import APIError

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 60.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    send_timeout_s = SEND_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True  # the next bytes begin (or continue) a request's head
        self._head_bytes = 0  # the bytes of the head received so far
        self._head_tail = b""  # the last bytes received, where the head's blank line may have begun
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None  # armed while writing is paused
        self._unsent_at_check = 0  # the bytes the client had not taken when the timer was armed
        self._cycles: list[Any] = []  # this connection's requests not yet answered (pipelining queues several)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Before its first request a connection is idle as a kept-alive one is, and closes after as long.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_send_timer()
        # uvicorn tells only its newest request (a pipelined one, still queued) that the client left: the one
        # running would go on to max_tokens and fail writing to the closed socket (probe AB). Tell every one.
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._awaiting_head:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
            # Only the bytes up to the blank line that ends the head count: a single write of a small head and a
            # large body is not a large head. Judged before the parser buffers any of it.
            end = (self._head_tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(end + 4 - len(self._head_tail), 0)
            self._head_tail = (self._head_tail + data)[-3:]
            if self._head_bytes > self.max_head_bytes:
                self._refuse(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"The request line and headers exceed {self.max_head_bytes} bytes.",
                    "request_header_fields_too_large",
                )
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._head_tail = b""
        self._stop_head_timer()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not previous:
            self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete] + [self.cycle]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._unsent_at_check = self._unsent()
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def _unsent(self) -> int:
        """Bytes of the answer the client has not taken: the transport's buffer and the kernel's send queue."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = bytearray(4)
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued)
                unsent += int.from_bytes(queued, sys.byteorder, signed=True)
            except (OSError, ValueError):  # not Linux, or the socket closed: the transport's buffer alone
                pass
        return unsent

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self.transport.is_closing():
            return
        unsent = self._unsent()
        if unsent < self._unsent_at_check:  # the client took some: it reads, slowly
            self._unsent_at_check = unsent
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.warning(
            "%s read nothing of its answer for %g s; closing the connection (its requests are aborted)",
            client,
            self.send_timeout_s,
        )
        self.transport.abort()  # connection_lost follows: every request on it hears of the disconnect

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The next (pipelined) request's head arrived while the last response still runs: uvicorn stopped
            # reading, so the head cannot complete yet. Its time counts from when that response ends.
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
            return
        self._refuse(
            HTTPStatus.REQUEST_TIMEOUT,
            f"The request line and headers did not arrive within {self.head_timeout_s:g} s.",
            "request_timeout",
        )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: HTTPStatus, message: str, code: str) -> None:
        """Answers in OpenAI's envelope (no route was chosen yet) and closes: the rest of the head is not read."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.warning("%s: %d %s", client, status, message)
        self._stop_head_timer()
        body = json.dumps(APIError(message, status=int(status), code=code).body()).encode()
        head = (
            f"HTTP/1.1 {int(status)} {status.phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode("ascii")
        self.transport.write(head + body)
        self.transport.close()
