"""A tiny scripted OpenAI-compatible server (raw asyncio HTTP/1.1) with known delays, for harness tests.

Streams `num_tokens` tokens as chunks of `tokens_per_chunk`, the first after `ttft_s` and the
rest `gap_s` apart, optionally followed by a usage chunk. Also answers /v1/embeddings, /rerank,
/v1/models and /health. It records every request body it received.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Script:
    ttft_s: float = 0.05
    gap_s: float = 0.02
    tokens_per_chunk: int = 1
    send_usage: bool = True
    reject_fields: tuple[str, ...] = ()
    prompt_tokens: int = 7
    encode_delay_s: float = 0.01
    token_text: str = "ab"  # the text of each streamed token
    api_key: str | None = None  # POSTs without `Authorization: Bearer <api_key>` get a 401
    cut_after: int | None = None  # the body ends cleanly after this many tokens: no usage, no `[DONE]`
    natural_length: int | None = None  # tokens before an EOS that `ignore_eos` does not stop (`logit_bias` does)
    odd_event: bool = False  # an SSE event that is JSON but not an object (`data: "ping"`) before the tokens
    reject_message: str | None = None  # the 400's message for `reject_fields`, e.g. one that names no field
    max_prompt_chars: int | None = None  # a longer prompt gets a 400 naming no field (vLLM's context-length wording)
    # ... or this server's: OpenAI's error envelope, code context_length_exceeded, a message naming min_tokens
    context_error_names_min_tokens: bool = False


@dataclass
class FakeServer:
    script: Script = field(default_factory=Script)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0  # the most streams open at once
    connections: int = 0  # TCP connections accepted

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        # Cancel open connection handlers inside the loop so their transports close cleanly.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                length = int(headers.get("content-length", "0"))
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self._route(method, path, body, writer, headers.get("authorization"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # stop() cancels idle keep-alive handlers; ending quietly keeps asyncio from logging each one as an error
            pass
        finally:
            writer.close()

    async def _route(
        self, method: str, path: str, body: dict[str, Any], writer: asyncio.StreamWriter, authorization: str | None
    ) -> None:
        if method == "GET":
            await _send_json(writer, 200, {"data": [{"id": "fake-model"}]} if path == "/v1/models" else {})
            return
        self.bodies.append(body)
        script = self.script
        if script.api_key is not None and authorization != f"Bearer {script.api_key}":
            await _send_json(writer, 401, {"error": {"message": "invalid api key", "code": "invalid_api_key"}})
            return
        rejected = [name for name in script.reject_fields if name in body]
        if rejected:
            message = script.reject_message or f"unsupported field {rejected[0]}"
            await _send_json(writer, 400, {"error": {"message": message}})
            return
        prompt = body.get("prompt") or "".join(m["content"] for m in body.get("messages", ()))
        if script.max_prompt_chars is not None and len(prompt) > script.max_prompt_chars and script.context_error_names_min_tokens:
            message = (
                f"This model's maximum context length is {script.max_prompt_chars} tokens. However, your messages "
                f"resulted in {len(prompt)} tokens, and min_tokens asks for at least 4 more after them, which do not fit."
            )
            error = {"message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}
            await _send_json(writer, 400, {"error": error})
            return
        if script.max_prompt_chars is not None and len(prompt) > script.max_prompt_chars:
            message = (
                f"This model's maximum context length is {script.max_prompt_chars} tokens. However, you requested "
                f"{len(prompt)} tokens. Please reduce the length of the messages or completion."
            )
            await _send_json(writer, 400, {"object": "error", "message": message, "code": 400})
            return
        if path == "/v1/embeddings":
            await asyncio.sleep(script.encode_delay_s)
            data = [{"index": i, "embedding": [0.0, 1.0]} for i in range(len(body["input"]))]
            await _send_json(writer, 200, {"data": data, "usage": {"prompt_tokens": 3 * len(data)}})
        elif path == "/rerank":
            await asyncio.sleep(script.encode_delay_s)
            await _send_json(writer, 200, [{"index": i, "score": 0.5} for i in range(len(body["texts"]))])
        else:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await self._stream(path, body, writer)
            finally:
                self.in_flight -= 1

    async def _stream(self, path: str, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        script = self.script
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        is_chat = path.endswith("chat/completions")
        if is_chat:
            await _send_event(
                writer, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            )
        num_tokens = int(body["max_tokens"])
        if script.natural_length is not None and not body.get("logit_bias"):
            num_tokens = min(num_tokens, script.natural_length)
        if script.cut_after is not None:
            num_tokens = min(num_tokens, script.cut_after)
        sent = 0
        if script.odd_event:
            writer.write(_chunk(b'data: "ping"\n\n'))
        await asyncio.sleep(script.ttft_s)
        while sent < num_tokens:
            count = min(script.tokens_per_chunk, num_tokens - sent)
            text = script.token_text * count
            choice = {"index": 0, "delta": {"content": text}} if is_chat else {"index": 0, "text": text}
            await _send_event(writer, {"choices": [choice], "usage": None})
            sent += count
            if sent < num_tokens:
                await asyncio.sleep(script.gap_s)
        if script.cut_after is not None:
            writer.write(b"0\r\n\r\n")  # the body ends here, as a proxy that gave up would end it
            await writer.drain()
            return
        if script.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": script.prompt_tokens, "completion_tokens": num_tokens}
            await _send_event(writer, {"choices": [], "usage": usage})
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _send_event(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    writer.write(_chunk(f"data: {json.dumps(payload)}\n\n".encode()))
    await writer.drain()


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    reason = "OK" if status == 200 else "Bad Request"
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
