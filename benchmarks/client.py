"""HTTP client for one benchmark request: builds the payload per endpoint, times the stream.

Chat and completions always stream (TTFT needs it) and ask for `stream_options.include_usage`
so output tokens come from the server's usage; without usage they are counted by re-tokenizing the
streamed text (`tokenizer_dir`), else taken from the length control, else one per output chunk; the
record says which (`TokenSource`). Embeddings and rerank are plain JSON calls.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from benchmarks.records import Endpoint, RequestRecord, TokenSource
from benchmarks.workloads import WorkItem
from benchmarks.workloads.synthetic import TokenCounter, token_counter

PATHS = {
    Endpoint.CHAT: "/v1/chat/completions",
    Endpoint.COMPLETIONS: "/v1/completions",
    Endpoint.EMBEDDINGS: "/v1/embeddings",
    Endpoint.RERANK: "/rerank",
}


class LengthControl(str, Enum):
    """How the client forces each response to exactly `max_tokens` tokens."""

    IGNORE_EOS = "ignore_eos"  # vLLM-style extras: ignore_eos + min_tokens
    LOGIT_BIAS = "logit_bias"  # OpenAI-standard: bias every EOS id to -100
    NONE = "none"  # natural stopping; output lengths then differ between engines


class RerankStyle(str, Enum):
    """Request/response shape of /rerank."""

    TEI = "tei"  # {query, texts} -> [{index, score}]
    COHERE = "cohere"  # {model, query, documents} -> {results: [{index, relevance_score}]} (Infinity)


@dataclass(frozen=True)
class ClientOptions:
    base_url: str
    endpoint: Endpoint
    model: str
    length_control: LengthControl = LengthControl.IGNORE_EOS
    eos_token_ids: tuple[int, ...] = ()
    include_usage: bool = True
    temperature: float = 0.0
    rerank_style: RerankStyle = RerankStyle.TEI
    api_key: str | None = None
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # the model's tokenizer.json, to count tokens when usage is absent


def eos_token_ids(model_dir: Path | None) -> tuple[int, ...]:
    """EOS ids from a Hugging Face folder's generation_config.json and config.json."""
    ids: set[int] = set()
    if model_dir is None:
        return ()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if not path.exists():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


class BenchClient:
    """Sends WorkItems to one server and returns timed RequestRecords (never raises per request)."""

    def __init__(self, options: ClientOptions, max_connections: int = 256) -> None:
        self.options = options
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.http = httpx.AsyncClient(
            base_url=options.base_url.rstrip("/").removesuffix("/v1"),
            headers=headers,
            timeout=httpx.Timeout(options.timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def close(self) -> None:
        await self.http.aclose()

    def with_options(self, **changes: Any) -> None:
        self.options = replace(self.options, **changes)

    def payload(self, item: WorkItem) -> dict[str, Any]:
        options = self.options
        endpoint = options.endpoint
        if endpoint is Endpoint.EMBEDDINGS:
            return {"model": options.model, "input": list(item.texts), **options.extra_body}
        if endpoint is Endpoint.RERANK:
            if options.rerank_style is RerankStyle.COHERE:
                return {"model": options.model, "query": item.prompt, "documents": list(item.texts)}
            return {"query": item.prompt, "texts": list(item.texts), **options.extra_body}
        body: dict[str, Any] = {
            "model": options.model,
            "max_tokens": item.max_tokens,
            "temperature": options.temperature,
            "stream": True,
        }
        if endpoint is Endpoint.CHAT:
            body["messages"] = [{"role": "user", "content": item.prompt}]
        else:
            body["prompt"] = item.prompt
        if options.include_usage:
            body["stream_options"] = {"include_usage": True}
        if options.length_control is LengthControl.IGNORE_EOS:
            body["ignore_eos"] = True
            body["min_tokens"] = item.max_tokens
        elif options.length_control is LengthControl.LOGIT_BIAS and options.eos_token_ids:
            body["logit_bias"] = {str(token_id): -100 for token_id in options.eos_token_ids}
        body.update(options.extra_body)
        return body

    async def send(self, item: WorkItem, index: int) -> RequestRecord:
        record = RequestRecord(index=index, start=time.perf_counter())
        if self.options.endpoint.is_generative:
            record.expected_output_tokens = (
                item.max_tokens if self.options.length_control is not LengthControl.NONE else None
            )
        try:
            if self.options.endpoint.is_generative:
                await self._stream(item, record)
            else:
                await self._encode(item, record)
        except HttpError as error:
            record.error = str(error)
        except Exception as error:  # any failure is this request's, never its worker's (cancellation passes)
            root: BaseException = error
            while (deeper := root.__cause__ or root.__context__) is not None and deeper is not root:
                root = deeper
            detail = f" ({type(root).__name__}: {root})" if root is not error else ""
            record.error = f"{type(error).__name__}: {error}{detail}"[:300]
        record.end = record.end or time.perf_counter()
        return record

    async def _stream(self, item: WorkItem, record: RequestRecord) -> None:
        path = PATHS[self.options.endpoint]
        usage: dict[str, Any] | None = None
        pieces: list[str] = []
        ended = False  # `[DONE]`, or a chunk with a finish_reason: a body that stops before either was cut off
        async with self.http.stream("POST", path, json=self.payload(item)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise HttpError(response.status_code, body)
            async for line in response.aiter_lines():
                if not line.startswith("data:") or record.end:
                    continue  # after [DONE], read on to the body's end so the connection goes back to the pool
                data = line[5:].strip()
                if data == "[DONE]":
                    ended = True
                    record.end = time.perf_counter()  # E2E ends here, not after the body's terminator
                    continue
                now = time.perf_counter()
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"stream event is not a JSON object: {data[:100]}")
                if "error" in chunk:
                    raise ValueError(f"error in stream: {json.dumps(chunk['error'])[:200]}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                ended = ended or _finished(chunk)
                text = _chunk_text(chunk)
                if text:
                    record.chunk_times.append(now)
                    record.chunk_chars.append(len(text))
                    pieces.append(text)
        record.end = record.end or time.perf_counter()
        record.text = "".join(pieces)
        if usage and usage.get("completion_tokens") is not None:
            record.output_tokens = int(usage["completion_tokens"])
            record.prompt_tokens = usage.get("prompt_tokens")
            record.token_source = TokenSource.USAGE
        else:
            self._count_without_usage(record)
        if not record.chunk_times:
            raise ValueError("stream ended without output text")
        if not ended:
            raise ValueError(
                f"stream ended before [DONE] or a finish_reason, after {len(record.chunk_times)} text chunk(s)"
            )

    def _count_without_usage(self, record: RequestRecord) -> None:
        counter = self._tokenizer()
        if counter is not None:
            record.output_tokens = counter.count(record.text)
            record.token_source = TokenSource.TOKENIZER
        elif record.expected_output_tokens is not None:
            record.output_tokens = record.expected_output_tokens
            record.token_source = TokenSource.FORCED
        else:
            record.output_tokens = len(record.chunk_times)
            record.token_source = TokenSource.CHUNKS

    def _tokenizer(self) -> TokenCounter | None:
        directory = self.options.tokenizer_dir
        if directory is None or not (directory / "tokenizer.json").exists():
            return None
        return token_counter(directory)

    async def _encode(self, item: WorkItem, record: RequestRecord) -> None:
        response = await self.http.post(PATHS[self.options.endpoint], json=self.payload(item))
        record.end = time.perf_counter()
        if response.status_code != 200:
            raise HttpError(response.status_code, response.text)
        body = response.json()
        if self.options.endpoint is Endpoint.EMBEDDINGS:
            results = body["data"]
            usage = body.get("usage") or {}
            record.prompt_tokens = usage.get("prompt_tokens")
        elif isinstance(body, dict):
            results = body["results"]
        else:
            results = body
        if len(results) != len(item.texts):
            raise ValueError(f"{len(results)} results for {len(item.texts)} inputs")
        record.items = len(results)


def _chunk_text(chunk: dict[str, Any]) -> str:
    """Output text of one streamed chunk (content, reasoning or tool-call arguments), or ""."""
    text = ""
    for choice in chunk.get("choices") or ():
        if "text" in choice:
            text += choice.get("text") or ""
        delta = choice.get("delta") or {}
        text += delta.get("content") or ""
        text += delta.get("reasoning_content") or delta.get("reasoning") or ""
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            text += (function.get("name") or "") + (function.get("arguments") or "")
    return text


async def served_model(base_url: str, timeout_s: float = 10.0, api_key: str | None = None) -> str:
    """The first model id a server lists at /v1/models."""
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/").removesuffix("/v1"),
        timeout=timeout_s,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
    ) as http:
        response = await http.get("/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


def _finished(chunk: dict[str, Any]) -> bool:
    """Whether a chunk ends its choice (a finish_reason), as a server that sends no `[DONE]` ends a stream."""
    return any(choice.get("finish_reason") for choice in chunk.get("choices") or () if isinstance(choice, dict))
