"""The Responses API (/v1/responses) against the chat path it is built on: the official openai SDK's
`responses.create` (whole and streamed) and `responses.stream` helper (which checks the event order) as the oracles,
chat completions with the same greedy settings as the reference for text, tokens and tool calls."""

import json
import time
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types.responses import Response

from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.protocol import Usage
from engine_builder.serve.server.protocol_responses import ResponsesRequest
from engine_builder.serve.server.response_store import ResponseStore, StoredResponse
from engine_builder.serve.server.responses_input import translate
from engine_builder.serve.server.responses_output import finished, response_object
from engine_builder.serve.server.responses_stream import ResponseEvents
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import ServerProcess, StubEngine

GREEDY: dict[str, Any] = {"model": "x", "temperature": 0}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
COLOUR_FORMAT = {
    "type": "json_schema",
    "name": "pick",
    "schema": {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
               "required": ["colour"], "additionalProperties": False},
    "strict": True,
}
RESPONSE_KEYS = {
    "id", "object", "created_at", "status", "error", "incomplete_details", "instructions", "max_output_tokens", "model",
    "output", "parallel_tool_calls", "previous_response_id", "reasoning", "store", "temperature", "text", "tool_choice",
    "tools", "top_p", "truncation", "usage", "user", "metadata",
}


def metric(server: ServerProcess, name: str) -> float:
    try:
        return server.metric(name)
    except KeyError:  # a labelled series appears with its first sample
        return 0.0


def chat_text(client: OpenAI, messages: list[dict[str, Any]], max_tokens: int, **fields: Any) -> Any:
    return client.chat.completions.create(messages=messages, max_tokens=max_tokens, **GREEDY, **fields)


# -- translation (no model) ---------------------------------------------------------------------------------------
def test_items_become_chat_messages() -> None:
    body = ResponsesRequest.model_validate(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Call it."}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Lyon"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
                {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "19 C"}]},
            ],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 7,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        }
    )
    translation = translate(body, ResponseStore())
    chat = translation.chat.model_dump(exclude_none=True)
    roles = [(m["role"], m.get("tool_call_id")) for m in chat["messages"]]
    assert roles == [("system", None), ("user", None), ("assistant", None), ("tool", "call_1"), ("tool", "call_2")]
    assistant = chat["messages"][2]
    assert assistant["reasoning_content"] == "Call it." and assistant["content"][0]["text"] == "Let me look."
    assert [call["id"] for call in assistant["tool_calls"]] == ["call_1", "call_2"]
    assert chat["tools"][0]["function"]["name"] == "get_weather" and chat["tools"][0]["function"]["strict"] is True
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["max_completion_tokens"] == 7 and chat["response_format"]["json_schema"]["name"] == "w"
    assert translation.sources == ["instructions", "input[0]", "input[2]", "input[5]", "input[6]"]
    assert all(item["id"] for item in translation.input_items) and len(translation.input_items) == 7
    error = translation.rename(APIError("x", param="messages[3].content"))
    assert error.param == "input[5].output"  # a function_call_output: its content is the item's output
    assert translation.rename(APIError("x", param="tools[0].function.parameters")).param == "tools[0].parameters"
    assert translation.rename(APIError("x", param="response_format")).param == "text.format"


def test_previous_response_items_come_first_and_instructions_are_not_inherited() -> None:
    store = ResponseStore(capacity=2)
    earlier = {"id": "resp_a", "output": [{"type": "message", "id": "msg_b", "role": "assistant", "status": "completed",
                                             "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]}]}
    store.put(StoredResponse(earlier, [{"type": "message", "id": "msg_a", "role": "user",
                                        "content": [{"type": "input_text", "text": "Hi"}]}]))
    body = ResponsesRequest.model_validate({"previous_response_id": "resp_a", "input": "And you?"})
    chat = translate(body, store).chat
    assert [(m.role, m.content[0].text) for m in chat.messages] == [  # type: ignore[index, union-attr]
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "And you?")
    ]
    for name in ("resp_b", "resp_c"):  # the oldest goes first
        store.put(StoredResponse({"id": name, "output": []}, []))
    assert store.get("resp_a") is None and len(store) == 2


def test_the_store_keeps_within_a_byte_budget_and_always_the_newest() -> None:
    """Probe CE: the store bounded the count only: 1000 large requests could hold tens of GB (one 24 MB input kept
    93 MB). It is bounded in JSON bytes too, oldest out first; one response over the budget is kept alone."""
    store = ResponseStore(capacity=100, max_bytes=10_000)

    def put(name: str, text_bytes: int) -> None:
        item = {"type": "message", "id": f"msg_{name}", "role": "user", "content": [{"type": "input_text", "text": "x" * text_bytes}]}
        store.put(StoredResponse({"id": name, "output": []}, [item]))

    for name in ("a", "b", "c", "d"):
        put(name, 3000)
    assert [name for name in "abcd" if store.get(name)] == ["b", "c", "d"] and store.num_bytes <= 10_000
    put("huge", 50_000)
    assert len(store) == 1 and store.get("huge") is not None
    put("e", 100)
    assert store.get("huge") is None and store.get("e") is not None and 100 < store.num_bytes < 300
    assert store.delete("e") and store.num_bytes == 0 and not store.delete("e")


def test_a_continued_conversation_counts_its_shared_items_once() -> None:
    """Probe CZ: a continued response's input items are its predecessor's own objects; counted per response, one
    conversation over a 1 MB document was counted at 255 MB after 250 turns (1 MB held) and pushed out every other
    user's responses."""
    store = ResponseStore(max_bytes=4 << 20)
    store.put(StoredResponse({"id": "other", "output": []}, [{"type": "message", "id": "m", "content": "hi"}]))
    document = {"type": "message", "id": "doc", "role": "user", "content": [{"type": "input_text", "text": "x" * (1 << 20)}]}
    items: list[dict[str, Any]] = [document]
    for turn in range(300):
        reply = {"type": "message", "id": f"r{turn}", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}
        store.put(StoredResponse({"id": f"resp_{turn}", "output": [reply]}, list(items)))
        items = [*items, reply, {"type": "message", "id": f"q{turn}", "role": "user", "content": "next?"}]
    assert store.get("other") is not None and store.get("resp_0") is not None and len(store) == 301
    assert (1 << 20) < store.num_bytes < (1 << 20) + 200_000
    for turn in range(300):
        store.delete(f"resp_{turn}")
    assert store.num_bytes == len(json.dumps({"id": "other", "output": []})) + len(
        json.dumps({"type": "message", "id": "m", "content": "hi"})
    )


def test_stream_events_open_and_close_items_in_order() -> None:
    events = ResponseEvents()
    frames = events.feed([{"reasoning_content": "Hmm."}], [])
    frames += events.feed([{"content": "Hi"}], [])
    frames += events.feed([{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "f", "arguments": ""}}]}], [])
    frames += events.feed([{"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}], [])
    frames += events.end("completed")
    kinds = [json.loads(frame.decode().split("data: ", 1)[1])["type"] for frame in frames]
    assert kinds == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
    ]
    assert [frame.decode().split("\n", 1)[0] for frame in frames] == [f"event: {kind}" for kind in kinds]
    assert [item["type"] for item in events.output] == ["reasoning", "message", "function_call"]
    assert events.output[2]["arguments"] == "{}" and events.sequence_number == len(kinds)


def test_a_reply_with_reasoning_and_a_call_as_the_sdk_reads_it() -> None:
    """Reasoning, text and a call (the pieces an OutputProcessor gives) read by the SDK: the whole response by its
    Response model, the stream by its accumulator, which refuses events out of order."""
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    body = ResponsesRequest.model_validate({"input": "hi", "tools": [WEATHER]})
    usage = Usage.of(5, 9, 0, 4)
    events = ResponseEvents()
    start = response_object(body, "resp_1", "m", 0)
    frames = [events.lifecycle("response.created", start), events.lifecycle("response.in_progress", start)]
    for pieces in ([{"reasoning_content": "Rome, then."}], [{"content": "Sure."}],
                   [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]}],
                   [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Rome"}'}}]}]):
        frames += events.feed(pieces, [])
    frames += events.end("completed")
    final = finished(start, events.output, False, usage)
    frames.append(events.lifecycle("response.completed", final))
    whole = Response.model_validate(final)
    assert [item.type for item in whole.output] == ["reasoning", "message", "function_call"]
    assert whole.output_text == "Sure." and whole.status == "completed" and whole.tools[0].strict is True
    assert whole.usage is not None and whole.usage.output_tokens_details.reasoning_tokens == 4
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[WEATHER], text_format=openai.omit)  # type: ignore[list-item]
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for frame in frames:
        state.handle_event(adapter.validate_python(json.loads(frame.decode().split("data: ", 1)[1])))
    streamed = state._completed_response
    assert streamed is not None and streamed.output_text == "Sure."
    assert [(item.type, getattr(item, "arguments", None)) for item in streamed.output] == [
        ("reasoning", None), ("message", None), ("function_call", '{"city":"Rome"}')
    ]


def test_a_failure_after_the_stream_began_is_an_error_event_then_response_failed() -> None:
    from engine_builder.serve.server.serving_responses import _failure

    events = ResponseEvents()
    start = response_object(ResponsesRequest.model_validate({"input": "hi"}), "resp_1", "m", 0)
    frames = [events.lifecycle("response.created", start), *events.feed([{"content": "Hel"}], [])]
    frames += _failure(events, start, APIError("The engine failed.", status=500, type="server_error"))[0]
    error, failure = (json.loads(frame.decode().split("data: ", 1)[1]) for frame in frames[-2:])
    assert error["type"] == "error" and error["code"] == "server_error" and error["message"] == "The engine failed."
    assert failure["type"] == "response.failed" and failure["sequence_number"] == error["sequence_number"] + 1
    failed = Response.model_validate(failure["response"])
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"


def _frame_data(frame: bytes) -> dict[str, Any]:
    return json.loads(frame.decode().split("data: ", 1)[1])


def test_response_failed_carries_one_of_openais_error_codes() -> None:
    """Probe AX: a backend's refusal after the stream began (a 400 `unsupported_parameter`) went into
    `response.error.code`, a closed set in OpenAI's API; the `error` event keeps the detailed code."""
    from openai.types.responses import ResponseErrorEvent, ResponseFailedEvent

    from engine_builder.serve.server.serving_responses import _failure

    start = response_object(ResponsesRequest.model_validate({"input": "hi"}), "resp_1", "m", 0)
    for error, code, response_code in (
        (APIError("temperature refused", status=400, param="temperature", code="unsupported_parameter"),
         "unsupported_parameter", "invalid_prompt"),
        (APIError("Too many requests.", status=429), "rate_limit_exceeded", "rate_limit_exceeded"),
        (APIError("The server is shutting down.", status=503, code="draining"), "server_error", "server_error"),
    ):
        frames = _failure(ResponseEvents(), start, error)[0]
        event, failure = (_frame_data(frame) for frame in frames[-2:])
        ResponseErrorEvent.model_validate(event, strict=True)
        ResponseFailedEvent.model_validate(failure)
        assert (event["code"], failure["response"]["error"]["code"]) == (code, response_code)


def test_a_failed_stream_closes_the_streamed_item_and_keeps_its_text() -> None:
    """The drain timeout (or any failure) ending a stream mid-reply: the open item's done events, status
    incomplete, then `error` and `response.failed`, whose output holds the text streamed; the SDK's accumulator
    reads it all."""
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from engine_builder.serve.server.serving_responses import _failure

    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    body = ResponsesRequest.model_validate({"input": "hi", "tools": [WEATHER]})
    for pieces, kind in (
        ([{"content": "Hel"}, {"content": "lo"}], "message"),
        ([{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city":'}}]}], "function_call"),
    ):
        events = ResponseEvents()
        start = response_object(body, "resp_1", "m", 0)
        frames = [events.lifecycle("response.created", start)]
        frames += events.feed(pieces, [])
        frames += _failure(events, start, APIError("The server is shutting down.", status=503, code="draining"))[0]
        kinds = [_frame_data(frame)["type"] for frame in frames]
        assert kinds[-3:] == ["response.output_item.done", "error", "response.failed"], kinds
        done, failure = _frame_data(frames[-3])["item"], _frame_data(frames[-1])["response"]
        assert done["status"] == "incomplete" and failure["output"] == [done]
        failed = Response.model_validate(failure)
        assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
        if kind == "message":
            assert kinds[-5:-3] == ["response.output_text.done", "response.content_part.done"]
            assert failed.output_text == "Hello"
        else:
            assert kinds[-4] == "response.function_call_arguments.done"
            assert failed.output[0].arguments == '{"city":'  # type: ignore[union-attr]
        state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[WEATHER], text_format=openai.omit)  # type: ignore[list-item]
        for frame in frames:
            state.handle_event(adapter.validate_python(_frame_data(frame)))


@pytest.mark.parametrize("store", [True, False])
def test_a_stream_that_failed_is_stored_with_status_failed(store: bool) -> None:
    """Probe CE: a streamed response that failed after it began was not stored: retrieving it was a 404, continuing
    from it a 400, where OpenAI keeps it with status failed. `store: false` still keeps nothing."""
    import asyncio
    from types import SimpleNamespace

    from engine_builder.serve.server.serving_responses import stream_response

    class FailsAfterOnePiece:
        events = ResponseEvents()
        cut = False

        async def frames(self) -> Any:
            for frame in self.events.feed([{"content": "Hel"}], []):
                yield frame
            raise APIError("The engine failed this request.", status=500, type="server_error")

    responses = ResponseStore()
    state = SimpleNamespace(responses=responses, metrics=SimpleNamespace(record_error=lambda status: None))
    body = ResponsesRequest.model_validate({"input": "hi", "stream": True, "store": store})
    translation = translate(body, responses)

    async def stream() -> list[bytes]:
        generation = FailsAfterOnePiece()
        start = response_object(body, "resp_f", "m", 0)
        return [frame async for frame in stream_response(state, translation, generation, start, store)]  # type: ignore[arg-type]

    assert _frame_data(asyncio.run(stream())[-1])["type"] == "response.failed"
    kept = responses.get("resp_f")
    if not store:
        assert kept is None
        return
    assert kept is not None and kept.response["status"] == "failed" and kept.response["error"]["code"] == "server_error"
    assert Response.model_validate(kept.response).output_text == "Hel"
    follow_up = ResponsesRequest.model_validate({"previous_response_id": "resp_f", "input": "go on"})
    assert translate(follow_up, responses).chat.messages[0].role == "user"


def _stored(store: ResponseStore, response_id: str, output: list[dict[str, Any]]) -> None:
    question = {"type": "message", "id": "msg_q", "role": "user", "content": [{"type": "input_text", "text": "Rome?"}]}
    store.put(StoredResponse({"id": response_id, "output": output}, [question]))


@pytest.mark.parametrize("arguments", ['{"city":', ""])
def test_a_call_cut_by_max_output_tokens_is_left_out_of_the_next_turn(arguments: str) -> None:
    """A response that max_output_tokens cut inside a function call (its item incomplete, arguments unfinished or
    not begun) still continues: the call was never made, so the next turn does not see it (chat would refuse its
    arguments, and the client could not repair a stored response); an output sent for it is refused by name."""
    from engine_builder.serve.server.chat_template import to_template_message

    store = ResponseStore()
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "status": "completed",
                 "content": [{"type": "reasoning_text", "text": "Call it."}]}
    cut = {"type": "function_call", "id": "fc_1", "status": "incomplete", "call_id": "call_cut",
           "name": "get_weather", "arguments": arguments}
    _stored(store, "resp_cut", [reasoning, cut])
    body = ResponsesRequest.model_validate({"previous_response_id": "resp_cut", "input": "Never mind. Say hi.",
                                            "tools": [WEATHER]})
    chat = translate(body, store).chat
    assert [(m.role, m.tool_calls, m.reasoning_content) for m in chat.messages] == [
        ("user", None, None), ("user", None, None)
    ]
    for index, message in enumerate(chat.messages):  # as the server renders them: nothing refused
        to_template_message(message, index)

    output = {"type": "function_call_output", "call_id": "call_cut", "output": "sunny"}
    for fields in ({"previous_response_id": "resp_cut", "input": [output]},
                   {"input": [{"role": "user", "content": "Rome?"}, cut, output]}):  # sent back whole (store false)
        with pytest.raises(APIError) as refused:
            translate(ResponsesRequest.model_validate({**fields, "tools": [WEATHER]}), store)
        source = "previous_response_id" if "previous_response_id" in fields else "input[1]"
        param = "input[0].call_id" if "previous_response_id" in fields else "input[2].call_id"
        assert (refused.value.status, refused.value.param) == (400, param)
        assert "call_cut" in refused.value.message and "incomplete" in refused.value.message
        assert source in refused.value.message

    done = {**cut, "id": "fc_2", "status": "completed", "call_id": "call_ok", "arguments": '{"city":"Rome"}'}
    _stored(store, "resp_ok", [done])  # a finished call is still fed back, and its output with it
    chained = translate(ResponsesRequest.model_validate(
        {"previous_response_id": "resp_ok", "input": [{**output, "call_id": "call_ok"}], "tools": [WEATHER]}
    ), store).chat
    assert [m.role for m in chained.messages] == ["user", "assistant", "tool"]


def test_reasoning_no_assistant_turn_followed_is_not_carried_past_the_next_user_message() -> None:
    """Probe GE #3: a reasoning item ending its reply (cut by max_output_tokens inside the thinking) stayed pending
    past the next user message and became the reasoning_content of a later reply's call turn, which templates that
    render reasoning after the last user query (Qwen3's) showed as that turn's thinking."""
    stale = {"type": "reasoning", "id": "rs_1", "status": "incomplete", "summary": [],
             "content": [{"type": "reasoning_text", "text": "Reply 1's thought."}]}
    call = {"type": "function_call", "id": "fc_2", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Oslo"}'}
    for role in ("user", "system", "developer"):
        body = ResponsesRequest.model_validate({"tools": [WEATHER], "input": [
            {"role": "user", "content": "Weather in Oslo?"}, stale, {"role": role, "content": "Just call the tool."},
            call, {"type": "function_call_output", "call_id": "c2", "output": "-5 C"},
        ]})
        messages = translate(body, ResponseStore()).chat.messages
        assert [(m.role, m.reasoning_content) for m in messages][2] == ("assistant", None), role
    kept = ResponsesRequest.model_validate({"tools": [WEATHER], "input": [
        {"role": "user", "content": "Weather in Oslo?"}, stale, call,
        {"type": "function_call_output", "call_id": "c2", "output": "-5 C"},
    ]})
    assert translate(kept, ResponseStore()).chat.messages[1].reasoning_content == "Reply 1's thought."


def test_a_stored_call_whose_arguments_are_not_json_is_named_by_its_item() -> None:
    """Probe EB #2: the refusal said `previous_response_id is not valid JSON.`; a refusal names the stored item it is
    about (the field stays previous_response_id, the one in the request). Arguments that are not JSON are no longer
    refused (probe GD): they reach the template as written."""
    from engine_builder.serve.server.chat_template import to_template_message

    store = ResponseStore()
    call = {"type": "function_call", "id": "fc_bad", "status": "completed", "call_id": "call_bad",
            "name": "get_weather", "arguments": '{"city": "Paris",}'}
    _stored(store, "resp_bad", [call])
    output = {"type": "function_call_output", "call_id": "call_bad", "output": "sunny"}
    translation = translate(ResponsesRequest.model_validate(
        {"previous_response_id": "resp_bad", "input": [output], "tools": [WEATHER]}
    ), store)
    rendered = [to_template_message(message, index) for index, message in enumerate(translation.chat.messages)]
    (index,) = [index for index, message in enumerate(rendered) if message.get("tool_calls")]
    assert rendered[index]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris",}'  # as written (probe GD)
    path = f"messages[{index}].tool_calls[0].function.arguments"
    error = translation.rename(APIError(f"{path} is not valid JSON.", param=path))
    assert error.param == "previous_response_id"
    assert error.message == "the stored function_call 'fc_bad'.arguments (from previous_response_id) is not valid JSON."


ITERATES_ARGUMENTS = (  # as Qwen3-Coder's template does (`arguments|items`)
    "{% for m in messages %}{% for c in m.tool_calls or [] %}{% for k, v in c.function.arguments|items %}"
    "{{ k }}={{ v }};{% endfor %}{% endfor %}{% endfor %}"
)


def test_arguments_a_template_cannot_render_are_named_by_their_item(smollm2_dir: Any) -> None:
    """Probe GZ #2: arguments that are not JSON, on a template that needs an object, are refused by the field they
    came from (`input[3].arguments`, a stored call by its item under previous_response_id), not as `messages`; a call
    cut short is closed into the object it was writing and renders."""
    from engine_builder.serve.server.chat_template import PromptRenderer

    renderer = PromptRenderer(smollm2_dir)
    calls = [{"type": "function_call", "call_id": "c0", "name": "get_weather", "arguments": '{"city": "Par'},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "not json"}]
    outputs = [{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"} for call in calls]
    body = {"instructions": "Be brief.", "input": [{"role": "user", "content": "x"}, *calls, *outputs], "tools": [WEATHER]}
    translation = translate(ResponsesRequest.model_validate(body), ResponseStore())
    with pytest.raises(APIError) as refused:
        renderer.render(translation.chat.messages, chat_template=ITERATES_ARGUMENTS)
    error = translation.rename(refused.value)
    assert error.param == "input[2].arguments" and error.message.startswith("input[2].arguments is not JSON, and "), error.message
    assert "messages" not in error.message
    body["input"] = [{"role": "user", "content": "x"}, calls[0], outputs[0]]
    cut = translate(ResponsesRequest.model_validate(body), ResponseStore()).chat.messages
    assert renderer.render(cut, chat_template=ITERATES_ARGUMENTS) == "city=Par;"

    store = ResponseStore()
    _stored(store, "resp_bad", [{**calls[1], "id": "fc_bad", "status": "completed"}])
    translation = translate(ResponsesRequest.model_validate(
        {"previous_response_id": "resp_bad", "input": [outputs[1]], "tools": [WEATHER]}), store)
    with pytest.raises(APIError) as refused:
        renderer.render(translation.chat.messages, chat_template=ITERATES_ARGUMENTS)
    error = translation.rename(refused.value)
    assert error.param == "previous_response_id"
    assert error.message.startswith("the stored function_call 'fc_bad'.arguments (from previous_response_id) is not JSON, and ")


def test_an_item_id_already_in_the_conversation_is_refused() -> None:
    """Probe AX: an earlier output sent again beside its previous_response_id (or two items with one id) was
    accepted: the prompt repeated the turn, and the input item list's cursor (`after` an id held twice) never
    ended. OpenAI refuses the duplicate; the stored conversation's ids stay unique."""
    store = ResponseStore()
    reply = {"type": "message", "id": "msg_r", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello Bob.", "annotations": []}]}
    _stored(store, "resp_1", [reply])
    question = {"role": "user", "content": "Who am I?"}
    for fields, param, first in (
        ({"previous_response_id": "resp_1", "input": [reply, question]}, "input[0].id", "previous_response_id"),
        ({"input": [{**question, "id": "msg_1"}, {**question, "id": "msg_1"}]}, "input[1].id", "input[0]"),
    ):
        with pytest.raises(APIError) as refused:
            translate(ResponsesRequest.model_validate(fields), store)
        assert (refused.value.status, refused.value.param) == (400, param)
        assert "duplicate" in refused.value.message and first in refused.value.message
    translation = translate(ResponsesRequest.model_validate({"previous_response_id": "resp_1", "input": [question]}), store)
    ids = [item["id"] for item in translation.input_items]
    assert len(set(ids)) == len(ids) == 3


@pytest.mark.parametrize("reference", [{"type": "item_reference", "id": "msg_r"}, {"id": "msg_r"}])
def test_an_item_reference_reads_as_the_stored_item_it_names(reference: dict[str, Any]) -> None:
    """An `item_reference` (the SDK's ItemReference, its type optional) names an item a stored response holds, input
    or output: it is read as that item, the stored object itself (its bytes counted once); one no stored response
    holds, or no longer holds, is refused by its path, and one the conversation already holds is a duplicate."""
    store = ResponseStore()
    reply = {"type": "message", "id": "msg_r", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello Bob.", "annotations": []}]}
    _stored(store, "resp_1", [reply])
    question = {"role": "user", "content": "Who am I?"}
    body = ResponsesRequest.model_validate({"input": [{"type": "item_reference", "id": "msg_q"}, reference, question]})
    translation = translate(body, store)
    assert translation.input_items[0] is store.find_item("msg_q") and translation.input_items[1] is reply
    messages = translation.chat.model_dump(exclude_none=True)["messages"]
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"]) for m in messages]
    assert list(zip([m["role"] for m in messages], texts, strict=True)) == [
        ("user", "Rome?"), ("assistant", "Hello Bob."), ("user", "Who am I?")]
    before = store.num_bytes
    store.put(StoredResponse({"id": "resp_2", "output": []}, translation.input_items))
    fresh_question = len(json.dumps(translation.input_items[2]))
    assert store.num_bytes - before == fresh_question + len(json.dumps({"id": "resp_2", "output": []}))
    with pytest.raises(APIError) as duplicate:
        translate(ResponsesRequest.model_validate({"previous_response_id": "resp_1", "input": [reference]}), store)
    assert (duplicate.value.param, "duplicate" in duplicate.value.message) == ("input[0].id", True)
    for response_id in ("resp_1", "resp_2"):
        store.delete(response_id)
    with pytest.raises(APIError) as missing:
        translate(ResponsesRequest.model_validate({"input": [question, reference]}), store)
    assert (missing.value.status, missing.value.param) == (400, "input[1].id")
    assert "'msg_r' not found" in missing.value.message


def test_an_id_two_conversations_hold_is_found_while_either_holds_it() -> None:
    store = ResponseStore()
    first = {"type": "message", "id": "msg_1", "role": "user", "content": [{"type": "input_text", "text": "one"}]}
    second = {**first, "content": [{"type": "input_text", "text": "two"}]}
    store.put(StoredResponse({"id": "resp_a", "output": []}, [first]))
    store.put(StoredResponse({"id": "resp_b", "output": []}, [second]))
    assert store.find_item("msg_1") is second
    store.delete("resp_b")
    assert store.find_item("msg_1") is first
    store.delete("resp_a")
    assert store.find_item("msg_1") is None and store.num_bytes == 0


def test_listed_input_items_are_what_the_sdk_types_require() -> None:
    """Probe AX: function_call and function_call_output items were listed without the `status` the SDK's item
    types require (a strict client refused the page)."""
    from openai.types.responses import (
        ResponseFunctionToolCallItem,
        ResponseFunctionToolCallOutputItem,
        ResponseInputMessageItem,
        ResponseReasoningItem,
    )

    body = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Call it."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]})
    types: dict[str, Any] = {"message": ResponseInputMessageItem, "reasoning": ResponseReasoningItem,
                             "function_call": ResponseFunctionToolCallItem,
                             "function_call_output": ResponseFunctionToolCallOutputItem}
    for item in translate(body, ResponseStore()).input_items:
        assert item["status"] == "completed"
        types[item["type"]].model_validate(item, strict=True)


def test_a_tool_output_needs_its_call_and_a_call_its_output() -> None:
    """Probe AX: an output for a call never made, and a call left without its output, were accepted (the model saw
    a result that answered nothing, or a call never answered); OpenAI refuses both, naming the call_id."""
    store = ResponseStore()
    question = {"role": "user", "content": "Weather in Rome?"}
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Rome"}'}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    _stored(store, "resp_call", [{**call, "id": "fc_1", "status": "completed"}])
    for fields, param, says in (
        ({"input": [question, output]}, "input[1].call_id", "no function call found"),
        ({"input": [question, output, call]}, "input[1].call_id", "no function call found"),  # the call comes first
        ({"input": [question, call, {"role": "user", "content": "And?"}]}, "input[1].call_id", "no tool output"),
        ({"previous_response_id": "resp_call", "input": [question]}, "input", "no tool output"),
    ):
        with pytest.raises(APIError) as refused:
            translate(ResponsesRequest.model_validate({**fields, "tools": [WEATHER]}), store)
        assert (refused.value.status, refused.value.param) == (400, param), fields
        assert says in refused.value.message and "call_1" in refused.value.message
    chained = translate(ResponsesRequest.model_validate(
        {"previous_response_id": "resp_call", "input": [output], "tools": [WEATHER]}), store).chat
    assert [m.role for m in chained.messages] == ["user", "assistant", "tool"]


def test_a_budget_over_the_context_is_named_max_output_tokens() -> None:
    """Probe AX: chat's refusal named `input` as its param and spoke of messages and the completion, although the
    input fitted and only max_output_tokens was too large."""
    from engine_builder.serve.server.sampling import ContextLengthError

    translation = translate(ResponsesRequest.model_validate({"input": "hi"}), ResponseStore())
    for chat_error, param in (
        (ContextLengthError(8192, 31, 100000, "messages"), "max_output_tokens"),
        (ContextLengthError(8192, 9000, 16, "messages"), "input"),
        (ContextLengthError(8192, 9000, None, "messages"), "input"),
        (ContextLengthError(8192, None, None, "messages"), "input"),
    ):
        error = translation.rename(chat_error)
        assert (error.status, error.code, error.param) == (400, "context_length_exceeded", param)
        assert "messages" not in error.message and "completion" not in error.message and "input" in error.message
    assert "100000 for max_output_tokens" in translation.rename(ContextLengthError(8192, 31, 100000, "messages")).message


def test_chat_refusals_name_the_responses_fields_in_the_message_too() -> None:
    """A refusal from the chat path is named by the Responses field it came from, in `param` and in the message:
    the item's own index (not chat's, which `instructions` shifts) and field, and advice for this route."""
    from engine_builder.serve.server.chat_template import to_template_message
    from engine_builder.serve.server.errors import unsupported
    from engine_builder.serve.server.serving_chat import reasoning_effort

    body = ResponsesRequest.model_validate({
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "x"},
            {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Hmm."}]},
            {"type": "function_call", "call_id": "c0", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "not json"},
            {"type": "function_call_output", "call_id": "c0", "output": [{"type": "input_text", "text": "1"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "2"},
        ],
    })
    translation = translate(body, ResponseStore())
    # arguments that are not JSON reach the template as written (probe GD: a cut call chat returned was a 400 when
    # sent back); a refusal about them is still named by the item
    rendered = to_template_message(translation.chat.messages[2], 2)
    assert [call["function"]["arguments"] for call in rendered["tool_calls"]] == [{}, "not json"]
    for chat_param, param in (
        ("messages[2].tool_calls[1].function.arguments", "input[3].arguments"),
        ("messages[2].tool_calls[0].id", "input[2].call_id"),
        ("messages[2].reasoning_content", "input[1].content"),
        ("messages.3.content.0.text", "input[4].output[0].text"),
        ("messages[3].tool_call_id", "input[4].call_id"),
        ("messages[0].content", "instructions"),
        ("tools.0.function.parameters", "tools[0].parameters"),
        ("max_completion_tokens", "max_output_tokens"),
    ):
        renamed = translation.rename(APIError(f"{chat_param}: wrong.", param=chat_param))
        assert (renamed.param, renamed.message) == (param, f"{param}: wrong."), chat_param

    state = _state()
    with pytest.raises(APIError) as effort:
        reasoning_effort(state, translation.chat.model_copy(update={"reasoning_effort": "low"}))
    refused = translation.rename(effort.value)
    assert refused.param == "reasoning.effort" and "reasoning.effort" in refused.message
    assert "chat_template_kwargs" not in refused.message and "reasoning_effort" not in refused.message
    assert translation.rename(unsupported("response_format")).message.startswith("`text.format` is not supported")
    with pytest.raises(APIError) as empty:
        translate(ResponsesRequest.model_validate({"input": []}), ResponseStore())
    assert empty.value.param == "input" and "messages" not in empty.value.message


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice", '"none", "auto", "required" or {"type": "function"'),
        ({"input": [None]}, "input[0]", "function_call_output"),
        ({"input": [{"role": "user", "content": [None]}]}, "input[0].content[0]", "input_text"),
        ({"tools": [None]}, "tools[0]", '"function"'),
        ({"text": {"format": "json"}}, "text.format", "json_schema"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "'user'"),
        ({"tools": [{"type": "function"}]}, "tools[0].name", "required"),
        ({"metadata": {str(key): "v" for key in range(17)}}, "metadata", "at most 16 keys"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "at most 64"),  # OpenAI's bounds on keys and values (probe AX)
        ({"metadata": {"k": "v" * 513}}, "metadata", "at most 512"),
    ],
)
def test_schema_errors_name_the_field_as_the_refusals_do(fields: dict[str, Any], param: str, says: str) -> None:
    """A body that does not fit the schema: the field in the style of this API's own refusals (`input[0].role`),
    what it must be (never the catch-all branch's class name), `metadata` named."""
    client = TestClient(create_app(_state()), raise_server_exceptions=False)
    response = client.post("/v1/responses", json={"input": "hi", **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: ") and says in error["message"], error
    assert "OtherKind" not in error["message"] and "Value error" not in error["message"]


def _state(api_keys: tuple[str, ...] = ()) -> ServerState:
    return ServerState(settings=ServerSettings("m", api_keys=api_keys), engine=StubEngine(), renderer=None)


def test_the_routes_need_the_api_key() -> None:
    client = TestClient(create_app(_state(("secret",))), raise_server_exceptions=False)
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
                         ("GET", "/v1/responses/resp_1/input_items"), ("POST", "/v1/responses/resp_1/cancel")):
        assert client.request(method, path, json={"input": "hi"}).status_code == 401, path
    found = client.get("/v1/responses/resp_1", headers={"Authorization": "Bearer secret"})
    assert found.status_code == 404 and found.json()["error"]["param"] == "response_id"


# -- through a server ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_usage_and_instructions_match_chat(server: ServerProcess, client: OpenAI) -> None:
    before = metric(server, "engine_builder:e2e_request_latency_seconds_count")
    raw = httpx.post(
        f"{server.base_url}/v1/responses",
        json={"input": "Name a colour.", "instructions": "Answer in one word.", "max_output_tokens": 12, **GREEDY},
        timeout=120,
    )
    assert raw.status_code == 200, raw.text
    data = raw.json()
    assert RESPONSE_KEYS <= set(data) and data["object"] == "response" and data["id"].startswith("resp_")
    response = Response.model_validate(data)
    assert metric(server, "engine_builder:e2e_request_latency_seconds_count") == before + 1
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]
    chat = chat_text(client, messages, 12)
    assert response.output_text == chat.choices[0].message.content and response.output_text
    usage = response.usage
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens
    )
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert (response.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert response.instructions == "Answer in one word." and response.store is True and response.tool_choice == "auto"

    cut = client.responses.create(input="Count from one to twenty.", max_output_tokens=3, **GREEDY)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.output[0].status == "incomplete"
    assert cut.usage is not None and cut.usage.output_tokens == 3
    assert cut.completed_at is None and response.completed_at  # set on a completed response only (probe CE)


@pytest.mark.slow
def test_previous_response_id_get_delete_and_store(client: OpenAI) -> None:
    first = client.responses.create(input="My name is Ada.", max_output_tokens=8, **GREEDY)
    second = client.responses.create(
        previous_response_id=first.id, input="What is my name?", max_output_tokens=8, **GREEDY
    )
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    chat = chat_text(client, history, 8)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage is not None and second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.previous_response_id == first.id

    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    items = client.responses.input_items.list(second.id, order="asc")
    assert [item.type for item in items.data] == ["message", "message", "message"]
    assert items.data[1].id == first.output[0].id  # the first reply, inherited
    newest = client.responses.input_items.list(second.id, limit=1)
    assert newest.data[0].content[0].text == "What is my name?" and newest.has_more  # type: ignore[union-attr]
    referenced = client.responses.create(  # the same conversation, its items named by id
        input=[{"type": "item_reference", "id": item.id} for item in items.data], max_output_tokens=8, **GREEDY
    )
    assert referenced.output_text == second.output_text
    assert referenced.usage is not None and referenced.usage.input_tokens == second.usage.input_tokens
    assert [item.id for item in client.responses.input_items.list(referenced.id, order="asc").data] == [
        item.id for item in items.data]

    client.responses.delete(first.id)
    for call in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert first.id in missing.value.message
    with pytest.raises(openai.BadRequestError) as gone:
        client.responses.create(previous_response_id=first.id, input="Hi", max_output_tokens=2, **GREEDY)
    assert gone.value.body["code"] == "previous_response_not_found"  # type: ignore[index]

    unstored = client.responses.create(input="Hi", max_output_tokens=2, store=False, **GREEDY)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(second.id)  # nothing runs in the background


@pytest.mark.slow
def test_forced_function_call_and_its_output_fed_back(client: OpenAI) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    called = client.responses.create(
        input=[question], tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},  # type: ignore[list-item]
        max_output_tokens=40, **GREEDY,
    )
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id  # type: ignore[union-attr]
    assert isinstance(json.loads(call.arguments)["city"], str)
    chat = chat_text(client, [question], 40, tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21}'}
    fed = client.responses.create(
        input=[question, call.model_dump(exclude_none=True), result],  # type: ignore[list-item]
        tools=[WEATHER], tool_choice="none", max_output_tokens=10, **GREEDY,  # type: ignore[list-item]
    )
    chained = client.responses.create(
        previous_response_id=called.id, input=[result], tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
        max_output_tokens=10, **GREEDY,
    )
    history = [
        question,
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                              "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature_c": 21}'},
    ]
    expected = chat_text(client, history, 10)
    assert fed.output_text == chained.output_text == expected.choices[0].message.content
    assert fed.usage is not None and fed.usage.input_tokens == expected.usage.prompt_tokens


@pytest.mark.slow
def test_json_schema_format(client: OpenAI) -> None:
    response = client.responses.create(
        input="Pick a colour.", max_output_tokens=30, text={"format": COLOUR_FORMAT}, **GREEDY,  # type: ignore[typeddict-item]
    )
    assert json.loads(response.output_text)["colour"] in ("red", "green", "blue")
    assert response.text is not None and response.text.format.type == "json_schema"  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                 {"type": "input_image", "image_url": "https://x/y.png"}]}]},
         "input[0].content[1].type"),
        ({"input": [{"type": "file_search_call", "id": "fs_1", "queries": [], "status": "completed"}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_missing"}]}, "input[0].id"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),  # chat's refusal, renamed: SmolLM2 has no effort dial
        ({"conversation": "conv_1"}, "conversation"),
        ({"previous_response_id": "resp_missing"}, "previous_response_id"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "string", "minLength": 1,
                                                                           "pattern": "a"}}}}, "text.format.schema.minLength"),
        ({"input": [{"role": "user", "content": []}]}, "input[0].content"),
    ],
)
def test_refusals_name_the_field(server: ServerProcess, fields: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/responses", json={"input": "hi", **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, response.text
    for chat_name in ("messages[", "messages.", "messages:", "reasoning_effort", "response_format", "chat_template_kwargs",
                      "max_completion_tokens"):
        assert chat_name not in error["message"], response.text


@pytest.mark.slow
def test_streamed_events_match_the_whole_response(client: OpenAI) -> None:
    body: dict[str, Any] = {"input": "Write a short greeting.", "max_output_tokens": 10,
                            "include": ["message.output_text.logprobs"], "top_logprobs": 2, **GREEDY}
    whole = client.responses.create(**body)
    events = list(client.responses.create(stream=True, **body))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    final = events[-1]
    assert kinds[-1] == ("response.incomplete" if whole.status == "incomplete" else "response.completed")
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.response.output_text == whole.output_text and deltas  # type: ignore[union-attr]
    streamed_message, whole_message = final.response.output[0], whole.output[0]  # type: ignore[union-attr]
    streamed_logprobs, whole_logprobs = streamed_message.content[0].logprobs, whole_message.content[0].logprobs  # type: ignore[union-attr]
    assert [entry.token for entry in streamed_logprobs] == [entry.token for entry in whole_logprobs]
    # bfloat16: the second run's prompt comes from the prefix cache, which moves logprobs a little
    assert [entry.logprob for entry in streamed_logprobs] == pytest.approx([e.logprob for e in whole_logprobs], abs=0.05)
    assert all(len(entry.top_logprobs) == 2 for entry in whole_logprobs)
    assert len(whole_message.content[0].logprobs) >= whole.usage.output_tokens - 1  # type: ignore[union-attr]
    streamed_usage, whole_usage = final.response.usage, whole.usage  # type: ignore[union-attr]
    assert (streamed_usage.input_tokens, streamed_usage.output_tokens) == (whole_usage.input_tokens, whole_usage.output_tokens)
    assert streamed_usage.input_tokens_details.cached_tokens > 0  # the same prompt again: read from the prefix cache

    pick = {"input": "Pick a colour.", "max_output_tokens": 30, "text": {"format": COLOUR_FORMAT}, **GREEDY}
    with client.responses.stream(**pick) as stream:  # the SDK's helper: it checks the events' order and identities
        for _ in stream:
            pass
        helper = stream.get_final_response()
    assert helper.status == "completed" and helper.output_text == client.responses.create(**pick).output_text

    tool_body: dict[str, Any] = {"input": "Weather in Rome?", "tools": [WEATHER], "max_output_tokens": 40,
                                 "tool_choice": {"type": "function", "name": "get_weather"}, **GREEDY}
    with client.responses.stream(**tool_body) as stream:
        arguments = "".join(event.delta for event in stream if event.type == "response.function_call_arguments.delta")
        called = stream.get_final_response()
    whole_call = client.responses.create(**tool_body).output[0]
    assert arguments == called.output[0].arguments == whole_call.arguments  # type: ignore[union-attr]
    assert json.loads(arguments)["city"]


@pytest.mark.slow
def test_the_raw_stream_is_openais_framing_and_a_disconnect_aborts(server: ServerProcess) -> None:
    body = {"input": "Tell me a long story.", "max_output_tokens": 300, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as response:
        frames = []
        for frame in response.iter_text():
            frames.append(frame)
            if sum(text.count("response.output_text.delta") for text in frames) >= 4:
                break
    text = "".join(frames)
    blocks = [block for block in text.split("\n\n") if block.strip()]
    first_event, first_data = blocks[0].split("\n")[:2]
    assert first_event == "event: response.created" and json.loads(first_data[len("data: "):])["sequence_number"] == 0
    assert "[DONE]" not in text
    deadline = time.monotonic() + 30
    while server.metric("engine_builder:num_requests_running") != 0:  # the client left: the request was aborted
        assert time.monotonic() < deadline, "the abandoned stream kept running"
        time.sleep(0.2)


def test_streamed_text_deltas_carry_every_token_logprob_the_done_event_has() -> None:
    """Probe AD: a token holding part of a character (byte-level BPE on CJK text) has no text of its own; once the
    message had opened, its logprob went only to the done event, so the deltas of a Japanese reply carried 17 of 30."""
    def logprob(token: str) -> dict[str, Any]:
        return {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": []}

    events = ResponseEvents()
    frames = events.feed([{"content": "東"}], [logprob("東")])
    for token in ("\\xe4", "\\xba"):  # two tokens that complete no character
        frames += events.feed([], [logprob(token)])
    frames += events.feed([{"content": "京"}], [logprob("京")])
    frames += events.feed([], [logprob("<|im_end|>")])  # a textless token after the last text
    frames += events.end("completed")
    data = [_frame_data(frame) for frame in frames]
    streamed = [entry["token"] for d in data if d["type"] == "response.output_text.delta" for entry in d["logprobs"]]
    done = next(d for d in data if d["type"] == "response.output_text.done")
    assert streamed == [entry["token"] for entry in done["logprobs"]] == ["東", "\\xe4", "\\xba", "京", "<|im_end|>"]
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == done["text"] == "東京"
