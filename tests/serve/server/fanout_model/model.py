"""A user model for the engine-control tests: fan-out over `suffix_messages`, and SSE post-processing."""

import asyncio
import copy
import json
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse


class Model:
    def __init__(self, trt_llm: dict[str, Any], **kwargs: Any) -> None:
        self._engine = trt_llm["engine"]
        self._secrets = kwargs["secrets"]
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    async def chat_completions(self, model_input: dict[str, Any], request: Request) -> Any:
        suffixes = model_input.pop("suffix_messages", None)
        if not suffixes:
            return await self._engine.chat_completions(model_input=model_input, request=request)
        if model_input.get("stream"):
            raise HTTPException(status_code=400, detail="stream=true is not supported with suffix_messages")

        async def generate(suffix: list[dict[str, str]]) -> Any:
            body = copy.deepcopy(model_input)
            body["messages"] = body["messages"] + suffix
            return await self._engine.chat_completions(model_input=body, request=request)

        first = await generate(suffixes[0])  # fills the prefix cache for the shared messages
        rest = await asyncio.gather(*(generate(s) for s in suffixes[1:]))
        merged = first
        choices = []
        for index, response in enumerate([first, *rest]):
            choice = response.choices[0]
            choice.index = index
            choices.append(choice)
            if index:
                merged.usage.completion_tokens += response.usage.completion_tokens
                merged.usage.prompt_tokens += response.usage.prompt_tokens
                merged.usage.total_tokens += response.usage.total_tokens
        merged.choices = choices
        return JSONResponse(merged.model_dump())

    async def predict(self, model_input: dict[str, Any]) -> Any:
        response = await self._engine.predict(model_input)
        if not isinstance(response, StreamingResponse):
            return response

        async def tagged() -> Any:
            async for chunk in response.body_iterator:
                text = chunk.decode() if isinstance(chunk, bytes) else chunk
                if text.startswith("data: {"):
                    payload = json.loads(text[len("data: ") :])
                    payload["loaded"] = self.loaded
                    yield f"data: {json.dumps(payload)}\n\n"
                else:
                    yield text

        return StreamingResponse(tagged(), media_type="text/event-stream")
