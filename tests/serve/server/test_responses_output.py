"""The Responses API's output items from real replies: a scripted engine streams chosen token ids, and everything
after it is the server's own (the detokenizer, the chat template, the reasoning, harmony and tool-call parsers,
the Responses layer). The same request whole and streamed gives the same items, in the order they were generated,
with the same statuses, text and logprobs; the SDK's models read both."""

import json
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from engine_builder.common.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    PreparedRequest,
    TokenLogprob,
)
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.decoding.harmony import detect_harmony
from engine_builder.serve.decoding.reasoning import detect_reasoning_format
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.chat_template import PromptRenderer
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.decoding.test_harmony import harmony_model_dir
from tests.serve.decoding.test_reasoning import thinking_tokenizer_dir
from tests.serve.server.harness import StubEngine

WEATHER = {"type": "function", "name": "get_weather", "strict": False,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
LOGPROBS = {"include": ["message.output_text.logprobs"]}


@dataclass
class Script:
    """The reply the engine gives every request: these tokens, `group` per delta, cut at the request's max_tokens
    (finish length), else ended by `eos` (finish stop)."""

    token_ids: list[int] = field(default_factory=list)
    eos: int = 0
    group: int = 1


class ScriptedEngine(StubEngine):
    def __init__(self, info: ModelInfo, script: Script) -> None:
        self.model_info = info
        self.script = script

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return PreparedRequest(request, None)

    async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        request = prepared.request
        params = request.sampling
        tokens, finish = list(self.script.token_ids), FinishReason.STOP
        if len(tokens) >= params.max_tokens:
            tokens, finish = tokens[: params.max_tokens], FinishReason.LENGTH
        else:
            tokens.append(self.script.eos)
        for start in range(0, len(tokens), self.script.group):
            group = tokens[start : start + self.script.group]
            last = start + len(group) == len(tokens)
            logprobs = [TokenLogprob(token, -0.5, ()) for token in group] if params.logprobs is not None else None
            yield GenerationDelta(
                request.request_id, 0, group, "", logprobs,
                finish_reason=finish if last else None,
                stop_reason=self.script.eos if last and finish is FinishReason.STOP else None,
                num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=start + len(group),
            )

    async def finish_choice(self, request_id: str, index: int) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        return None


@dataclass
class Served:
    client: TestClient
    script: Script
    tokenizer: Any

    def say(self, text: str, group: int = 1) -> None:
        self.script.token_ids, self.script.group = self.tokenizer.encode(text, add_special_tokens=False), group

    def both(self, **body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The response whole, and as the stream's last event carries it (every event read by the SDK's types)."""
        body = {"model": "m", "input": "What is the weather in Paris?", **body}
        whole = self.client.post("/v1/responses", json=body)
        assert whole.status_code == 200, whole.text
        Response.model_validate(whole.json())
        adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
        events = []
        with self.client.stream("POST", "/v1/responses", json={**body, "stream": True}) as streamed:
            for line in streamed.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
                    adapter.validate_python(events[-1])
        return whole.json(), events[-1]["response"]


def serve(model_dir: Path, tool_parser: str | None = None) -> Iterator[Served]:
    renderer = PromptRenderer(model_dir)
    tokenizer = renderer.tokenizer
    template = tokenizer.chat_template
    harmony = detect_harmony(tokenizer, template)
    reasoning = None if harmony is not None else detect_reasoning_format(tokenizer, template)
    script = Script(eos=tokenizer.eos_token_id)
    info = ModelInfo("m", 4096, len(tokenizer), (tokenizer.eos_token_id,), "LlamaForCausalLM", "decoder", tool_parser)
    state = ServerState(ServerSettings("m"), ScriptedEngine(info, script), renderer=renderer,
                        decoder=TextDecoder(tokenizer.backend_tokenizer), reasoning=reasoning, harmony=harmony)
    state.ready = state.engine_ready = True
    yield Served(TestClient(create_app(state)), script, tokenizer)


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> Iterator[Served]:
    yield from serve(qwen_dir, "hermes")


@pytest.fixture(scope="module")
def thinking(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve(thinking_tokenizer_dir(smollm2_dir, tmp_path_factory.mktemp("thinking") / "model"))


@pytest.fixture(scope="module")
def harmony(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve(harmony_model_dir(smollm2_dir, tmp_path_factory.mktemp("harmony") / "model"))


def items(response: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Each output item's kind, status and text (a call's arguments)."""
    def text(item: dict[str, Any]) -> str:
        return item["arguments"] if item["type"] == "function_call" else "".join(part["text"] for part in item["content"])

    return [(item["type"], item["status"], text(item)) for item in response["output"]]


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_finished_call_stays_completed_when_the_text_after_it_is_cut(qwen: Served) -> None:
    """Probe AX: the whole response listed the call last and marked it incomplete, so the next turn refused its
    output as that of a call never made; the text being written when max_output_tokens ran out is what was cut."""
    qwen.say(CALL + "\nI have called the tool and will now wait for the result to come back.")
    budget = len(qwen.script.token_ids) - 5
    for response in qwen.both(tools=[WEATHER], max_output_tokens=budget):
        assert response["status"] == "incomplete"
        assert [(kind, status) for kind, status, _ in items(response)] == [
            ("function_call", "completed"), ("message", "incomplete")
        ]
        qwen.say("It is sunny.")
        call = response["output"][0]
        answered = qwen.client.post("/v1/responses", json={
            "model": "m", "tools": [WEATHER], "previous_response_id": response["id"],
            "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}],
        })
        assert answered.status_code == 200, answered.text
        qwen.say(CALL + "\nI have called the tool and will now wait for the result to come back.")


def _streamed_call_statuses(served: Served, body: dict[str, Any]) -> list[str]:
    """The status each function_call's `response.output_item.done` event gave it."""
    body = {"model": "m", "input": "What is the weather in Paris?", **body, "stream": True}
    with served.client.stream("POST", "/v1/responses", json=body) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    return [event["item"]["status"] for event in events
            if event["type"] == "response.output_item.done" and event["item"]["type"] == "function_call"]


def test_a_call_whose_arguments_ended_is_completed_when_only_the_end_of_turn_is_cut(qwen: Served) -> None:
    """Probe GE #1: a call whose `</tool_call>` was the last token max_output_tokens allowed was marked incomplete
    (the reply's cut), though chat returns it as a call; sending its output was then refused as that of a call
    max_output_tokens cut. The response is still incomplete; a call cut inside its arguments still is too."""
    qwen.say(CALL)
    budget = len(qwen.script.token_ids)  # the whole call: only the end of turn is cut
    for response in qwen.both(tools=[WEATHER], max_output_tokens=budget):
        assert response["status"] == "incomplete"
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        assert items(response) == [("function_call", "completed", '{"city": "Paris"}')]
        answered = qwen.client.post("/v1/responses", json={
            "model": "m", "tools": [WEATHER], "previous_response_id": response["id"],
            "input": [{"type": "function_call_output", "call_id": response["output"][0]["call_id"], "output": "sunny"}],
        })
        assert answered.status_code == 200, answered.text
    assert _streamed_call_statuses(qwen, {"tools": [WEATHER], "max_output_tokens": budget}) == ["completed"]
    for response in qwen.both(tools=[WEATHER], max_output_tokens=budget - 4):  # inside the arguments
        assert [(kind, status) for kind, status, _ in items(response)] == [("function_call", "incomplete")]
    assert _streamed_call_statuses(qwen, {"tools": [WEATHER], "max_output_tokens": budget - 4}) == ["incomplete"]


FORCED_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'


def test_forced_calls_are_cut_only_where_their_own_arguments_are(qwen: Served) -> None:
    """Probe GE #1: with tool_choice required, the budget running out on the array's `]`, or on the `, {"name` of a
    call the parser had not opened yet, marked the last call made incomplete (about 8 budgets of every 17 per call
    on Qwen2.5-Coder). A call is incomplete exactly when the budget ended before its object did."""
    qwen.say(FORCED_CALLS)
    ends = [FORCED_CALLS.index("}}") + 2, FORCED_CALLS.rindex("}}") + 2]  # where each call's object ends
    body = {"tools": [WEATHER], "tool_choice": "required"}
    checked = set()
    for budget in range(1, len(qwen.script.token_ids) + 1):
        generated = len(qwen.tokenizer.decode(qwen.script.token_ids[:budget]))
        whole, streamed = qwen.both(**body, max_output_tokens=budget)
        statuses = [status for kind, status, _ in items(whole) if kind == "function_call"]
        assert items(whole) == items(streamed), budget
        expected = ["completed" if generated >= end else "incomplete" for end in ends][: len(statuses)]
        assert statuses == expected, (budget, qwen.tokenizer.decode(qwen.script.token_ids[:budget]))
        assert _streamed_call_statuses(qwen, {**body, "max_output_tokens": budget}) == statuses
        checked.add(tuple(statuses))
    assert ("completed", "completed") in checked and ("completed", "incomplete") in checked
    cut_after_both = qwen.both(**body, max_output_tokens=len(qwen.script.token_ids) - 1)[0]
    answered = qwen.client.post("/v1/responses", json={
        "model": "m", "tools": [WEATHER], "previous_response_id": cut_after_both["id"],
        "input": [{"type": "function_call_output", "call_id": item["call_id"], "output": "sunny"}
                  for item in cut_after_both["output"]],
    })
    assert answered.status_code == 200, answered.text


ANSWER_FORMAT = {"type": "json_schema", "name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"], "additionalProperties": False,
}}


def test_tools_beside_a_json_text_format_can_be_called(qwen: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe GE #2: tools beside a JSON `text.format` were echoed (unset strict as false) and rendered, but the
    format's schema was the reply's only grammar, so no call could ever be made. The reply's grammar admits the
    JSON answer or the calls (strict ones held to their schemas); the reply is read either way."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    guides = []
    generate = ScriptedEngine.generate

    def recording(self: ScriptedEngine, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        guides.append(prepared.request.sampling.guide)
        return generate(self, prepared)

    monkeypatch.setattr(ScriptedEngine, "generate", recording)
    tools = [{**WEATHER, "strict": None}]  # unset: strict on this API
    qwen.say(CALL)
    for response in qwen.both(tools=tools, text={"format": ANSWER_FORMAT}):
        assert items(response) == [("function_call", "completed", '{"city": "Paris"}')]
        assert response["tools"][0]["strict"] is True and response["tool_choice"] == "auto"
    grammar = xgrammar.Grammar.from_structural_tag(guides[-1].spec)
    assert _is_grammar_accept_string(grammar, CALL) and _is_grammar_accept_string(grammar, '{"summary": "sunny"}')
    qwen.say('{"summary": "sunny"}')
    for response in qwen.both(tools=tools, text={"format": ANSWER_FORMAT}):
        assert items(response) == [("message", "completed", '{"summary": "sunny"}')]


def test_items_come_in_the_order_generated_whole_and_streamed(qwen: Served, harmony: Served) -> None:
    """Probe AX: the whole response listed reasoning, then the message, then the calls, and joined separate
    reasoning into one item; the stream kept the order. The stored conversation depended on `stream`."""
    qwen.say(CALL + "\nDone.")
    whole, streamed = qwen.both(tools=[WEATHER])
    assert items(whole) == items(streamed) == [
        ("function_call", "completed", '{"city": "Paris"}'), ("message", "completed", "\nDone.")
    ]
    harmony.script.eos = harmony.tokenizer.convert_tokens_to_ids("<|call|>")
    harmony.say("<|channel|>analysis<|message|>A<|end|><|start|>assistant<|channel|>commentary<|message|>Let me check."
                "<|end|><|start|>assistant<|channel|>analysis<|message|>B<|end|><|start|>assistant<|channel|>commentary "
                'to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}')
    whole, streamed = harmony.both(tools=[WEATHER])
    assert items(whole) == items(streamed) == [
        ("reasoning", "completed", "A"), ("message", "completed", "Let me check."), ("reasoning", "completed", "B"),
        ("function_call", "completed", '{"city":"Oslo"}'),
    ]
    assert whole["usage"] == streamed["usage"]


def test_a_gpt_oss_answer_or_call_spelling_a_marker_is_read_whole(harmony: Served) -> None:
    """Probe IA #5: `<|call|>` spelt in ordinary tokens inside an argument cut the call there (`{"city": "a `), and
    `<|return|>` spelt in an answer cut the answer; only the special tokens are markers, whole and streamed."""
    from tests.serve.decoding.test_harmony import spelt_ids

    harmony.script.eos = harmony.tokenizer.convert_tokens_to_ids("<|call|>")
    for group in (1, 4):
        harmony.script.token_ids, harmony.script.group = spelt_ids(harmony.tokenizer, (
            "<|channel|>analysis<|message|>Quote [[<|end|>]].<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "a [[<|call|>]] b"}'
        )), group  # fmt: skip
        for response in harmony.both(tools=[WEATHER]):
            assert items(response) == [("reasoning", "completed", "Quote <|end|>."),
                                       ("function_call", "completed", '{"city": "a <|call|> b"}')]
    harmony.script.eos = harmony.tokenizer.convert_tokens_to_ids("<|return|>")
    harmony.script.token_ids, harmony.script.group = spelt_ids(
        harmony.tokenizer, "<|channel|>final<|message|>Answers end with [[<|return|>]], calls with [[<|call|>]]."
    ), 3
    for response in harmony.both():
        assert items(response) == [("message", "completed", "Answers end with <|return|>, calls with <|call|>.")]


def logprob_tokens(response: dict[str, Any]) -> list[list[str]]:
    return [[entry["token"] for entry in item["content"][0]["logprobs"]]
            for item in response["output"] if item["type"] == "message"]


def test_a_messages_logprobs_are_its_own_tokens(thinking: Served, qwen: Served) -> None:
    """Probe AX: the reasoning's tokens (its tags too) came first in the message's logprobs, and a whole response
    gave the message every token's, the call's included. A message's logprobs spell its text (and the end of the
    turn), the same whole and streamed."""
    thinking.say("<think>I should add.</think>\n\nThe answer is 4.")
    whole, streamed = thinking.both(**LOGPROBS)
    assert [kind for kind, _, _ in items(whole)] == ["reasoning", "message"]
    assert logprob_tokens(whole) == logprob_tokens(streamed)
    [tokens] = logprob_tokens(whole)
    assert "".join(tokens) == "The answer is 4." + thinking.tokenizer.eos_token

    qwen.say("Sure, checking.\n" + CALL)
    whole, streamed = qwen.both(tools=[WEATHER], **LOGPROBS)
    assert [kind for kind, _, _ in items(whole)] == ["message", "function_call"]
    assert logprob_tokens(whole) == logprob_tokens(streamed)
    [tokens] = logprob_tokens(whole)
    assert "".join(tokens) == whole["output"][0]["content"][0]["text"] == "Sure, checking.\n"


def test_an_empty_reply_is_an_empty_message_whole_and_streamed(thinking: Served) -> None:
    """Probe AX: whole, an empty message; streamed, no item at all (so the stored conversation had two user turns
    in a row). OpenAI answers an empty reply with a message of empty text."""
    thinking.say("")
    for response in thinking.both():
        assert items(response) == [("message", "completed", "")]


MALFORMED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'


def test_a_call_whose_arguments_are_not_json_is_text_and_the_conversation_goes_on(qwen: Served) -> None:
    """Probe EB #2: a closed call with a trailing comma came back as a call (finish_reason tool_calls), and sending
    it back, as every agent loop does, was a 400 (chat), or named previous_response_id (Responses): the
    conversation could not go on. It is text, as vLLM reads it, whole and streamed."""
    qwen.say(MALFORMED_CALL)
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"]}}]
    messages = [{"role": "user", "content": "weather in Paris?"}]
    body = {"model": "m", "messages": messages, "tools": chat_tools}
    choice = qwen.client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and not choice["message"]["tool_calls"]
    assert choice["message"]["content"] == MALFORMED_CALL
    with qwen.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert not any(delta.get("tool_calls") for delta in deltas)
    assert "".join(delta.get("content") or "" for delta in deltas) == MALFORMED_CALL
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    qwen.say("Which city?")
    answered = qwen.client.post("/v1/chat/completions", json={**body, "messages": [*messages, choice["message"]]})
    assert answered.status_code == 200, answered.text

    qwen.say(MALFORMED_CALL)
    for response in qwen.both(tools=[WEATHER]):
        assert items(response) == [("message", "completed", MALFORMED_CALL)]
        qwen.say("Which city?")
        answered = qwen.client.post("/v1/responses", json={
            "model": "m", "tools": [WEATHER], "previous_response_id": response["id"], "input": "Paris, France.",
        })
        assert answered.status_code == 200, answered.text
        qwen.say(MALFORMED_CALL)


def test_a_gpt_oss_strict_tool_in_auto_mode_is_served(harmony: Served) -> None:
    """Probe EB #3: `strict: true` in tool_choice auto was a 400 on gpt-oss ("no single start marker"); harmony's calls
    start with their recipient, which the grammar waits for."""
    harmony.script.eos = harmony.tokenizer.convert_tokens_to_ids("<|call|>")
    harmony.say('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}')
    for response in harmony.both(tools=[{**WEATHER, "strict": True}]):
        assert items(response) == [("function_call", "completed", '{"city":"Oslo"}')]
        assert response["tools"][0]["strict"] is True


def test_an_unset_strict_tool_gets_the_unmarked_call_qwen_writes(qwen: Served) -> None:
    """Probe IF #1: an unset `strict` is true on this API, and beside a strict tool only `<tool_call>`-marked calls
    were read; Qwen2.5-Coder-0.5B writes the bare object, so auto mode never gave a function_call. One that breaks the
    strict tool's schema (no grammar held it) is still the message's text."""
    tools = [{**WEATHER, "strict": None}]
    qwen.say('{"name": "get_weather", "arguments": {"city": "Tokyo"}}', group=3)
    for response in qwen.both(tools=tools):
        assert items(response) == [("function_call", "completed", '{"city": "Tokyo"}')]
        assert response["tools"][0]["strict"] is True
    qwen.say('{"name": "get_weather", "arguments": {"town": "Tokyo"}}', group=3)
    for response in qwen.both(tools=tools):
        assert items(response) == [("message", "completed", '{"name": "get_weather", "arguments": {"town": "Tokyo"}}')]
