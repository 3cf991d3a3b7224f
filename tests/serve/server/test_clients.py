"""Third-party clients against the real server and the default model (Qwen2.5-Coder-0.5B): langchain-openai and
instructor, for a forced tool call, structured output and streaming (issue 24). No test here may reach the network:
every socket to a host other than this machine is refused, and LangSmith tracing is off."""

from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.serve.server.harness import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline")]
MAX_TOKENS = 40  # every answer here is a short JSON object; CI decodes on one torch thread


class Weather(BaseModel):
    """Get the current weather for a city."""

    city: str = Field(description="The city name")


class Capital(BaseModel):
    country: str
    capital: str


WEATHER_QUESTION = "What is the weather in Paris right now?"
CAPITAL_QUESTION = "Paris is the capital of France. Extract the country and its capital."


def _chat_model(server: ServerProcess, max_tokens: int = MAX_TOKENS) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{server.base_url}/v1",
        api_key="not-required",
        model="not-required",
        temperature=0,
        max_tokens=max_tokens,
        max_retries=0,
        timeout=300,
    )


def _instructor_client(server: ServerProcess, mode: Any) -> Any:
    import instructor
    from openai import OpenAI

    openai_client = OpenAI(base_url=f"{server.base_url}/v1", api_key="not-required", max_retries=0, timeout=300)
    return instructor.from_openai(openai_client, mode=mode)


def test_forced_tool_call(qwen_server: ServerProcess) -> None:
    """LangChain's bind_tools with a named tool_choice, and instructor's tools mode (which names the tool too): the
    grammar makes the model call it, and the arguments parse into the tool's schema."""
    import instructor

    bound = _chat_model(qwen_server).bind_tools([Weather], tool_choice="Weather")
    message = bound.invoke(WEATHER_QUESTION)
    [call] = message.tool_calls
    assert call["name"] == "Weather" and call["id"]
    assert Weather.model_validate(call["args"]).city.startswith("Paris")

    client = _instructor_client(qwen_server, instructor.Mode.TOOLS)
    weather = client.chat.completions.create(
        model="not-required",
        response_model=Weather,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    assert isinstance(weather, Weather) and weather.city.startswith("Paris")


def test_structured_output(qwen_server: ServerProcess) -> None:
    """LangChain's with_structured_output (a strict json_schema response_format) and instructor's JSON-schema mode:
    both get a validated pydantic object back."""
    import instructor

    structured = _chat_model(qwen_server).with_structured_output(Capital)
    answer = structured.invoke(CAPITAL_QUESTION)
    assert isinstance(answer, Capital)
    assert (answer.country, answer.capital) == ("France", "Paris")

    client = _instructor_client(qwen_server, instructor.Mode.JSON_SCHEMA)
    extracted = client.chat.completions.create(
        model="not-required",
        response_model=Capital,
        messages=[{"role": "user", "content": CAPITAL_QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    assert (extracted.country, extracted.capital) == ("France", "Paris"), extracted


def test_streaming(qwen_server: ServerProcess) -> None:
    """LangChain's .stream: the chunks add up to what .invoke answers; instructor's create_partial: a growing object
    streamed from tool-call argument deltas, whose last state is the complete one."""
    import instructor

    chat = _chat_model(qwen_server, max_tokens=12)
    prompt = "Name three colors of the rainbow."
    chunks = list(chat.stream(prompt))
    assert len(chunks) > 2  # streamed, not one block
    assert "".join(str(chunk.content) for chunk in chunks) == chat.invoke(prompt).content

    client = _instructor_client(qwen_server, instructor.Mode.TOOLS)
    partials = list(
        client.chat.completions.create_partial(
            model="not-required",
            response_model=Weather,
            messages=[{"role": "user", "content": WEATHER_QUESTION}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            max_retries=0,
        )
    )
    assert len(partials) > 1
    assert partials[-1].city is not None and partials[-1].city.startswith("Paris")
    seen = [partial.city or "" for partial in partials]
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))


def test_the_offline_guard_refuses_other_hosts() -> None:
    import socket

    with pytest.raises(OSError, match="during an offline test"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with pytest.raises(OSError, match="name lookup of 'api.smith.langchain.com'"):
        socket.getaddrinfo("api.smith.langchain.com", 443)
