"""gpt-oss's harmony replies: detection, the streamed parse (every cut into deltas gives the whole reply's
events), the output a chat response is built from, real token ids through the incremental detokenizer with special
tokens kept, and the grammar gate waiting for the final channel (a multi-token end)."""

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_builder.common.types import FinishReason, Guide, GuideKind, MessageHeaders, ReasoningPrefix
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.decoding.harmony import (
    HarmonyEvent,
    HarmonyFormat,
    HarmonyParser,
    PromptEnd,
    detect_harmony,
    forced_call_tag,
    marked_call_tag,
    prompt_end,
)
from engine_builder.serve.server.harmony import HarmonyOutput
from engine_builder.serve.server.outputs import ChoiceOutput
from tests.serve.decoding.renamed_tokens import smollm2_with_renamed_tokens

# SmolLM2's special tokens 3..9 renamed to harmony's markers (special, as in gpt-oss's tokenizer).
MARKER_IDS = {"<|start|>": 3, "<|channel|>": 4, "<|message|>": 5, "<|end|>": 6, "<|call|>": 7, "<|return|>": 8, "<|constrain|>": 9}
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{% if tools %}<|start|>developer<|message|>{% for t in tools %}{{ t.function.name }};{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|start|>{{ m.role }}"
    "{% if m.role == 'assistant' %}{% if m.thinking %}<|channel|>analysis<|message|>{{ m.thinking }}<|end|>"
    "<|start|>assistant{% endif %}<|channel|>final{% endif %}<|message|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
# What `detect_harmony` finds in that tokenizer (`<|channel|>final` is two tokens there).
FORMAT = HarmonyFormat(4, 5, (3, 6), 7, (4, 17254), (6, 7, 8, 3))


def harmony_model_dir(smollm2_dir: Path, target: Path) -> Path:
    """SmolLM2's weights with a harmony tokenizer and template; <|call|> and <|return|> end a reply."""
    eos = [2, MARKER_IDS["<|call|>"], MARKER_IDS["<|return|>"]]
    renames = {token_id: marker for marker, token_id in MARKER_IDS.items()}
    return smollm2_with_renamed_tokens(smollm2_dir, target, renames, HARMONY_TEMPLATE, special=True, eos_token_ids=eos)


@pytest.fixture(scope="module")
def harmony_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return harmony_model_dir(smollm2_dir, tmp_path_factory.mktemp("harmony") / "model")


@pytest.fixture(scope="module")
def tokenizer(harmony_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(harmony_dir))


def test_detection_needs_channels_in_the_template_and_single_token_markers(tokenizer: Any, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None and (found.channel_id, found.message_id, found.call_id) == (4, 5, 7)
    assert found.header_start_ids == (3, 6) and found.final_ids[0] == 4 and found == FORMAT
    assert tokenizer.decode(list(found.final_ids)) == "<|channel|>final"
    assert detect_harmony(tokenizer, "{{ messages }}") is None
    assert detect_harmony(AutoTokenizer.from_pretrained(str(smollm2_dir)), HARMONY_TEMPLATE) is None


# -- the parse ---------------------------------------------------------------------------------------------------
def summarize(events: list[HarmonyEvent]) -> dict[str, Any]:
    reasoning, content, calls = "", "", []
    for event in events:
        if event.kind == "reasoning":
            reasoning += event.text
        elif event.kind == "content":
            content += event.text
        elif event.kind == "call":
            calls.append([event.text, ""])
        else:
            calls[-1][1] += event.text
    return {"reasoning": reasoning, "content": content, "calls": calls}


def parse_in_pieces(text: str, cuts: list[int], start: PromptEnd = PromptEnd()) -> dict[str, Any]:
    parser = HarmonyParser(start)
    bounds = [0, *sorted(cuts), len(text)]
    events: list[HarmonyEvent] = []
    for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        events += parser.feed(text[start:end], final=index == len(bounds) - 2)
    return summarize(events)


CASES = [
    (
        "<|channel|>analysis<|message|>User asks 2+2. Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.",
        {"reasoning": "User asks 2+2. Easy.", "content": "It is 4.", "calls": []},
    ),
    (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
        {"reasoning": "Need weather.", "content": "", "calls": [["get_weather", '{"city": "Paris"}']]},
    ),
    (  # the recipient after the role, and two calls
        ' to=functions.a<|channel|>commentary json<|message|>{"x": 1}<|call|><|start|>assistant to=functions.b'
        '<|channel|>commentary<|message|>{"y": 2}',
        {"reasoning": "", "content": "", "calls": [["a", '{"x": 1}'], ["b", '{"y": 2}']]},
    ),
    (  # a preamble for the user, then a call
        "<|channel|>commentary<|message|>Checking the weather.<|end|><|start|>assistant<|channel|>commentary "
        "to=functions.w<|message|>{}",
        {"reasoning": "", "content": "Checking the weather.", "calls": [["w", "{}"]]},
    ),
    (  # built-in tools are not run here: their calls stay reasoning
        "<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|end|><|start|>assistant<|channel|>final<|message|>ok",
        {"reasoning": '{"q": 1}', "content": "ok", "calls": []},
    ),
    ("<|channel|>final<|message|>a<|b <|end|>", {"reasoning": "", "content": "a<|b ", "calls": []}),
    ("A model that ignored the format <| says this.", {"reasoning": "", "content": "A model that ignored the format <| says this.", "calls": []}),
    ("<|channel|>analysis<|message|>cut off while thinking <|", {"reasoning": "cut off while thinking <|", "content": "", "calls": []}),
    # Text before `<|message|>` is a header, never content (as openai-harmony reads it): cut short, it is dropped.
    ("<|channel|>analysis", {"reasoning": "", "content": "", "calls": []}),
    ("<|channel|>commentary to=functions.get_weather <|constrain|>json", {"reasoning": "", "content": "", "calls": []}),
    ("<|channel|>final", {"reasoning": "", "content": "", "calls": []}),
    ("<|channel|>final<|message|>Hi<|end|>trailing text", {"reasoning": "", "content": "Hi", "calls": []}),
    ("Preface text<|channel|>final<|message|>x", {"reasoning": "", "content": "x", "calls": []}),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>fin", {"reasoning": "a", "content": "", "calls": []}),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_every_cut_into_deltas_gives_the_whole_replys_parse(text: str, expected: dict[str, Any]) -> None:
    assert parse_in_pieces(text, []) == expected
    for cut in range(len(text) + 1):
        assert parse_in_pieces(text, [cut]) == expected, cut
    assert parse_in_pieces(text, list(range(1, len(text)))) == expected
    rng = random.Random(len(text))
    for _ in range(20):
        assert parse_in_pieces(text, rng.sample(range(1, len(text)), k=rng.randint(1, 6))) == expected


PROMPT_ENDS = [  # (the prompt's end, where it leaves the reply, the reply, its parse)
    ("<|start|>user<|message|>hi<|end|><|start|>assistant", PromptEnd("<|start|>assistant"),
     " to=functions.w<|channel|>commentary json<|message|>{}", {"reasoning": "", "content": "", "calls": [["w", "{}"]]}),
    ("<|start|>assistant", PromptEnd("<|start|>assistant"), "Plain prose.", {"reasoning": "", "content": "Plain prose.", "calls": []}),
    ("<|start|>assistant<|channel|>final<|message|>", PromptEnd("<|start|>assistant<|channel|>final", in_body=True),
     '{"a": 1}<|end|>', {"reasoning": "", "content": '{"a": 1}', "calls": []}),
    ("<|start|>assistant<|channel|>analysis<|message|>Let me", PromptEnd("<|start|>assistant<|channel|>analysis", in_body=True),
     " think.<|end|><|start|>assistant<|channel|>final<|message|>4", {"reasoning": " think.", "content": "4", "calls": []}),
    ("<|start|>assistant<|channel|>final", PromptEnd("<|start|>assistant<|channel|>final"),
     " <|constrain|>json<|message|>{}", {"reasoning": "", "content": "{}", "calls": []}),
    ("<|start|>assistant to=functions.w<|channel|>commentary json<|message|>", PromptEnd("<|start|>assistant to=functions.w<|channel|>commentary json", in_body=True),
     '{"x": 1}', {"reasoning": "", "content": "", "calls": [["w", '{"x": 1}']]}),
    ("<|start|>user<|message|>hi<|end|>", PromptEnd(), "<|channel|>final<|message|>ok", {"reasoning": "", "content": "ok", "calls": []}),
    ("no markers", PromptEnd(), "text", {"reasoning": "", "content": "text", "calls": []}),
]


@pytest.mark.parametrize(("prompt", "expected_end", "reply", "expected"), PROMPT_ENDS)
def test_the_reply_is_read_from_where_the_prompt_leaves_it(prompt: str, expected_end: PromptEnd, reply: str, expected: dict[str, Any]) -> None:
    """A prefill that opened a channel (or a header) is continued: a prompt that opened the final channel makes the
    reply the answer, one that opened analysis makes it reasoning."""
    start = prompt_end(prompt)
    assert start == expected_end
    for cut in range(len(reply) + 1):
        assert parse_in_pieces(reply, [cut], start) == expected, cut


def test_a_cut_marker_is_held_back() -> None:
    parser = HarmonyParser()
    assert parser.feed("<|channel|>final<|mess", final=False) == []
    assert parser.feed("age|>Hello <|e", final=False) == [HarmonyEvent("content", "Hello ")]
    assert parser.feed("nd|>", final=True) == []


# -- the chat output -----------------------------------------------------------------------------------------------
def run_output(text: str, tools: frozenset[str], parallel: bool = True, pieces: int = 7) -> tuple[list[dict[str, Any]], Any]:
    output = HarmonyOutput(FORMAT, ChoiceOutput(), tools, parallel)
    deltas: list[dict[str, Any]] = []
    size = max(1, len(text) // pieces)
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    for index, chunk in enumerate(chunks):
        deltas += output.feed(chunk, final=index == len(chunks) - 1)
    return deltas, output.result(FinishReason.STOP, None)


CALL_REPLY = (
    "<|channel|>analysis<|message|>Two lookups.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.w <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
    '<|start|>assistant<|channel|>commentary to=functions.w <|constrain|>json<|message|>{"city": "Rome"}'
)


def test_a_call_a_stop_string_cut_is_not_finished_as_tool_calls() -> None:
    """Probe CZ: a stop string inside a call's arguments (`{"city": "Os`) finished "tool_calls", where every other
    format's cut call finishes "stop"; ended by its stop token, or cut after the call closed, it is a call."""
    cut = CALL_REPLY.rsplit('"Rome"', 1)[0] + '"Ro'
    for stop, reason in (("me", "stop"), (None, "tool_calls")):
        output = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset({"w"}), True)
        output.feed(cut, final=True)
        assert output.result(FinishReason.STOP, stop).finish_reason == reason
    closed = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset({"w"}), True)
    closed.feed(CALL_REPLY + '<|call|><|start|>assistant<|channel|>analysis<|message|>Do', final=True)
    assert closed.result(FinishReason.STOP, "ne").finish_reason == "tool_calls"


def test_only_the_call_the_reply_ended_inside_is_incomplete() -> None:
    """The Responses API marks a call incomplete only when its own arguments were cut (`complete_call_ids`): one
    closed by `<|call|>`, or followed by another message, is whole; a call not offered leaves the one before whole."""
    cut = CALL_REPLY.rsplit('"Rome"', 1)[0] + '"Ro'
    for text, stop, whole in (
        (cut, None, [True, False]),  # the budget ran out inside Rome's arguments
        (cut, 7, [True, True]),  # <|call|> ended it
        (CALL_REPLY + "<|call|><|start|>assistant<|channel|>analysis<|message|>Do", None, [True, True]),
    ):
        output = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset({"w"}), True)
        output.feed(text, final=True)
        final = output.result(FinishReason.LENGTH if stop is None else FinishReason.STOP, stop)
        assert [call.id in final.complete_call_ids for call in final.tool_calls] == whole, text
    single = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset({"w"}), False)  # Rome's call stays reasoning
    single.feed(cut, final=True)
    final = single.result(FinishReason.LENGTH, None)
    assert len(final.tool_calls) == 1 and final.complete_call_ids == {final.tool_calls[0].id}


def test_offered_calls_become_tool_calls_streamed_as_openai_deltas() -> None:
    deltas, final = run_output(CALL_REPLY, frozenset({"w"}))
    assert final.finish_reason == "tool_calls" and final.content is None and final.reasoning == "Two lookups."
    assert [json.loads(call.function.arguments)["city"] for call in final.tool_calls] == ["Oslo", "Rome"]
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [(h["index"], h["function"]["name"]) for h in heads] == [(0, "w"), (1, "w")]
    assert [h["id"] for h in heads] == [call.id for call in final.tool_calls]
    for index, call in enumerate(final.tool_calls):  # the streamed argument pieces add up to the final arguments
        pieces = [d["tool_calls"][0]["function"].get("arguments", "") for d in deltas
                  if "tool_calls" in d and d["tool_calls"][0]["index"] == index]
        assert "".join(pieces) == call.function.arguments
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two lookups."


def test_calls_that_do_not_become_tool_calls_stay_reasoning_never_the_answer() -> None:
    _, single = run_output(CALL_REPLY, frozenset({"w"}), parallel=False)
    assert [json.loads(call.function.arguments)["city"] for call in single.tool_calls] == ["Oslo"]
    assert single.content is None and single.reasoning == 'Two lookups.{"city": "Rome"}'
    _, unoffered = run_output(CALL_REPLY, frozenset())  # not offered, or tool_choice forcing the answer
    assert unoffered.tool_calls == [] and unoffered.finish_reason == "stop" and unoffered.content is None
    assert unoffered.reasoning == 'Two lookups.{"city": "Oslo"}{"city": "Rome"}'


def test_real_token_ids_through_the_detokenizer_keep_the_markers(tokenizer: Any) -> None:
    """What the server does: ids -> incremental text with special tokens kept -> the harmony output."""
    text = CASES[0][0] + "<|return|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert MARKER_IDS["<|channel|>"] in ids and ids[-1] == MARKER_IDS["<|return|>"]
    prompt = tokenizer.encode("<|start|>assistant", add_special_tokens=False)
    detokenizer = TextDecoder(tokenizer.backend_tokenizer).start(prompt, skip_special_tokens=False)
    output = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset(), True)
    for token in ids[:-1]:  # the stop token is not text
        output.feed(detokenizer.add([token]), final=False, token_ids=[token])
    output.feed(detokenizer.flush(), final=True)
    final = output.result(FinishReason.STOP, None)
    assert (final.reasoning, final.content) == ("User asks 2+2. Easy.", "It is 4.")
    # reasoning tokens: the analysis body and the <|message|> that opened it
    assert final.reasoning_tokens == 1 + len(tokenizer.encode("User asks 2+2. Easy.", add_special_tokens=False))


# -- the gate: free until the final channel's header --------------------------------------------------------------
def final_channel_gate(compiler: Any, found: HarmonyFormat, guide: Guide, *, calls_offered: bool = False) -> Any:
    headers = MessageHeaders(found.message_id, found.header_start_ids)
    prefix = ReasoningPrefix(found.channel_id, found.final_ids, True, headers, (found.call_id,) if calls_offered else ())
    return compiler.matcher(compiler.compile(guide), (2, 7, 8), prefix)


@pytest.fixture(scope="module")
def compiler(harmony_dir: Path, tokenizer: Any) -> Any:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    return GrammarCompiler(harmony_dir, 49152, tokenizer)


def accept_all(matcher: Any, tokenizer: Any, text: str) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert matcher.accept(token), (text, token)


def test_the_gate_waits_for_the_final_header_and_rolls_back_inside_it(compiler: Any, tokenizer: Any) -> None:
    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None
    gate = final_channel_gate(compiler, found, Guide(GuideKind.JSON_OBJECT, ""))
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    accept_all(gate, tokenizer, "<|channel|>analysis<|message|>think <|channel|>final then")  # a body: no header
    assert not gate.in_answer and not gate.accept(7) and not gate.accept(8)  # no call or return before the answer
    header = tokenizer.encode("<|end|><|start|>assistant<|channel|>final<|message|>", add_special_tokens=False)
    for token in header[:-1]:
        assert gate.accept(token)
    assert not gate.in_answer
    gate.rollback(2)  # back inside the header, before `final`
    for token in header[-3:]:
        assert gate.accept(token)
    assert gate.in_answer
    allowed = gate.allowed_tokens()
    assert allowed[brace] and not allowed[tokenizer.encode("think", add_special_tokens=False)[0]]
    assert gate.accept(brace)
    assert torch.equal(gate.allowed_tokens(), gate.inner.allowed_tokens())


@pytest.mark.parametrize(
    "header",
    [
        "<|channel|>final<|message|>",
        "<|channel|>final <|constrain|>json<|message|>",  # what gpt-oss writes under structured output
        "<|channel|>final<|constrain|>JSON<|message|>",
        "<|channel|>final json<|message|>",
    ],
)
def test_the_final_header_opens_the_answer_whatever_it_carries_and_the_answer_can_end(compiler: Any, tokenizer: Any, header: str) -> None:
    """As the parser reads it: the channel named `final`, then anything up to `<|message|>`."""
    from engine_builder.serve.decoding.harmony import classify_header

    assert classify_header(header[: header.index("<|message|>")]) == ("content", "")
    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None
    gate = final_channel_gate(compiler, found, Guide(GuideKind.JSON_OBJECT, ""))
    accept_all(gate, tokenizer, "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant" + header)
    assert gate.in_answer
    hello = tokenizer.encode("hello", add_special_tokens=False)[0]
    assert not gate.allowed_tokens()[hello]  # the grammar's now
    accept_all(gate, tokenizer, '{"a": 1}')
    assert gate.allowed_tokens()[8]  # <|return|> ends the constrained answer
    assert gate.accept(8) and gate.is_terminated


def test_other_channels_do_not_open_the_answer(compiler: Any, tokenizer: Any) -> None:
    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None
    gate = final_channel_gate(compiler, found, Guide(GuideKind.JSON_OBJECT, ""))
    accept_all(gate, tokenizer, "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>analysis<|message|>x")
    assert not gate.in_answer


def test_offered_functions_may_end_the_reply_with_a_call_before_the_answer(compiler: Any, tokenizer: Any) -> None:
    """tools (auto) and response_format: the format constrains the final answer, a call still ends the reply."""
    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None
    gate = final_channel_gate(compiler, found, Guide(GuideKind.JSON_OBJECT, ""), calls_offered=True)
    accept_all(gate, tokenizer, '<|channel|>commentary to=functions.w <|constrain|>json<|message|>{"city": "Oslo"}')
    assert gate.allowed_tokens()[7] and not gate.allowed_tokens()[8]
    assert gate.accept(7)


def test_a_prompt_that_left_the_reply_in_the_final_header_needs_only_its_message_marker(compiler: Any, tokenizer: Any) -> None:
    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None
    headers = MessageHeaders(found.message_id, found.header_start_ids, in_final_header=True)
    gate = compiler.matcher(compiler.compile(Guide(GuideKind.JSON_OBJECT, "")), (2, 7, 8),
                            ReasoningPrefix(found.channel_id, found.final_ids, True, headers))
    accept_all(gate, tokenizer, " <|constrain|>json<|message|>")
    assert gate.in_answer


# -- a forced call: the model's own call format ------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    "call",
    [
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}',
        '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Oslo"}',
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}',  # the recipient after the role
        ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Oslo"}',
    ],
)
def test_a_forced_call_is_the_models_own_and_ends_the_reply(compiler: Any, tokenizer: Any, call: str) -> None:
    """tool_choice required/named: free analysis, then a call of a forced function with valid arguments, and only
    then may `<|call|>` end the reply; the call becomes a tool call."""
    guide = Guide(GuideKind.TOOL_CALLS, json.dumps(forced_call_tag({"get_weather": WEATHER})), param="tools")
    matcher = compiler.matcher(compiler.compile(guide), (2, 7, 8))
    analysis = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
    first = call.startswith(" ")
    accept_all(matcher, tokenizer, "" if first else analysis)
    assert not matcher.allowed_tokens()[7] and not matcher.allowed_tokens()[8]  # no call yet: the reply goes on
    ids = tokenizer.encode(call, add_special_tokens=False)
    for token in ids[:-1]:
        assert matcher.accept(token)
        assert not matcher.allowed_tokens()[7]
    assert matcher.accept(ids[-1]) and matcher.allowed_tokens()[7] and matcher.accept(7)
    output = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset({"get_weather"}), False)
    output.feed(("" if first else analysis) + call + "<|call|>", True)
    final = output.result(FinishReason.STOP, None)
    assert final.finish_reason == "tool_calls" and final.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final.tool_calls] == [("get_weather", {"city": "Oslo"})]


def test_a_forced_call_refuses_other_functions_and_bad_arguments(compiler: Any, tokenizer: Any) -> None:
    guide = Guide(GuideKind.TOOL_CALLS, json.dumps(forced_call_tag({"get_weather": WEATHER})), param="tools")
    matcher = compiler.matcher(compiler.compile(guide), (2, 7, 8))
    accept_all(matcher, tokenizer, "<|channel|>commentary to=functions.")
    assert not matcher.accept(tokenizer.encode("other", add_special_tokens=False)[0])
    accept_all(matcher, tokenizer, "get_weather")
    assert not matcher.accept(tokenizer.encode("json", add_special_tokens=False)[0])  # the content type needs a space
    accept_all(matcher, tokenizer, " <|constrain|>json<|message|>")
    assert not matcher.accept(tokenizer.encode("[", add_special_tokens=False)[0])


# -- strict tools in tool_choice auto: each call the model addresses is held to its function's schema --------------
def test_a_strict_auto_reply_is_free_and_may_end_without_a_call(compiler: Any, tokenizer: Any) -> None:
    guide = Guide(GuideKind.TOOL_CALLS, json.dumps(marked_call_tag({"get_weather": WEATHER}, True)), param="tools")
    matcher = compiler.matcher(compiler.compile(guide), (2, 7, 8))
    accept_all(matcher, tokenizer, "<|channel|>analysis<|message|>No tool needed.<|end|><|start|>assistant"
                                   "<|channel|>final<|message|>It is sunny.")
    assert matcher.accept(8)  # <|return|>: the reply ends without a call


@pytest.mark.parametrize("parallel", [True, False])
def test_a_strict_auto_call_is_held_to_its_schema(compiler: Any, tokenizer: Any, parallel: bool) -> None:
    """Probe EB #3: strict tools in auto mode were refused on gpt-oss ("no single start marker"), so every Responses
    tool that left `strict` unset was served unconstrained; the recipient `to=functions.` is the start marker."""
    guide = Guide(GuideKind.TOOL_CALLS, json.dumps(marked_call_tag({"get_weather": WEATHER}, parallel)), param="tools")
    matcher = compiler.matcher(compiler.compile(guide), (2, 7, 8))
    accept_all(matcher, tokenizer, "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
                                   "<|channel|>commentary to=functions.")
    assert not matcher.accept(tokenizer.encode("other", add_special_tokens=False)[0])  # only offered functions
    accept_all(matcher, tokenizer, "get_weather <|constrain|>json<|message|>")
    assert not matcher.accept(tokenizer.encode("[", add_special_tokens=False)[0])
    accept_all(matcher, tokenizer, '{"city": "Oslo"}')
    assert matcher.accept(7)  # <|call|> ends the reply after the call
    matcher = compiler.matcher(compiler.compile(guide), (2, 7, 8))
    accept_all(matcher, tokenizer, '<|channel|>commentary to=functions.get_weather<|message|>{"city"')
    assert not matcher.accept(tokenizer.encode("}", add_special_tokens=False)[0])  # `city` needs its value


# -- reasoning tokens ------------------------------------------------------------------------------------------------
def test_the_stop_token_ending_a_reasoning_body_is_not_counted(tokenizer: Any) -> None:
    ids = tokenizer.encode("<|channel|>analysis<|message|>cut off", add_special_tokens=False)
    output = HarmonyOutput(FORMAT, ChoiceOutput(), frozenset(), True)
    detokenizer = TextDecoder(tokenizer.backend_tokenizer).start([], skip_special_tokens=False)
    for token in ids:
        output.feed(detokenizer.add([token]), False, [token])
    output.feed(detokenizer.flush(), True, [MARKER_IDS["<|return|>"]])  # its text is not decoded
    final = output.result(FinishReason.STOP, None)
    assert final.reasoning == "cut off"
    assert final.reasoning_tokens == 1 + len(tokenizer.encode("cut off", add_special_tokens=False))


@pytest.mark.parametrize(("tools", "bodies"), [(frozenset(), ["Two lookups.", '{"city": "Oslo"}']), (frozenset({"w"}), ["Two lookups."])])
def test_reasoning_tokens_do_not_depend_on_how_tokens_are_grouped_into_deltas(tokenizer: Any, tools: frozenset[str], bodies: list[str]) -> None:
    """Probe AX: a delta that held any analysis text counted all its tokens, the final channel's too, so with
    several tokens per delta (lookahead) one reply counted 2, 4 or 12. Counted per token: each reasoning body (a
    call not offered stays the model's working) and the `<|message|>` that opened it, however the tokens come."""
    reply = CALL_REPLY.split("<|call|>")[0] + "<|end|><|start|>assistant<|channel|>final<|message|>It is cold."
    ids = tokenizer.encode(reply, add_special_tokens=False)
    expected = sum(1 + len(tokenizer.encode(body, add_special_tokens=False)) for body in bodies)
    rng = random.Random(7)
    groupings = [[1] * len(ids), [3] * len(ids), [len(ids)], *([rng.randint(1, 6) for _ in ids] for _ in range(10))]
    for grouping in groupings:
        output = HarmonyOutput(FORMAT, ChoiceOutput(), tools, True)
        detokenizer = TextDecoder(tokenizer.backend_tokenizer).start([], skip_special_tokens=False)
        start = 0
        for size in grouping:
            group = ids[start : start + size]
            if not group:
                break
            start += len(group)
            output.feed(detokenizer.add(group), False, group)
        output.feed(detokenizer.flush(), True)
        final = output.result(FinishReason.LENGTH, None)
        assert final.reasoning == "".join(bodies) and final.content == "It is cold."
        assert final.reasoning_tokens == expected, grouping


# -- markers spelt in ordinary tokens are text (probe IA #5) ---------------------------------------------------------
def spelt_text(reply: str) -> tuple[str, dict[int, str]]:
    """`reply`'s text, its markers inside `[[...]]` spelt in ordinary tokens, and where its special tokens are."""
    text, real = "", {}
    for index, part in enumerate(re.split(r"\[\[(.*?)\]\]", reply)):
        if index % 2 == 0:
            real |= {len(text) + found.start(): found.group() for found in re.finditer(r"<\|[a-z]+\|>", part)}
        text += part
    return text, real


def test_by_ids_only_the_markers_told_of_split_the_reply_at_every_cut() -> None:
    """The parser reading markers by their tokens' offsets: `<|call|>` and `<|end|>` spelt in an argument or in the
    analysis are text; each marker's offset arrives with the delta its text begins in."""
    text, real = spelt_text(
        "<|channel|>analysis<|message|>a[[<|end|>]] is text<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.w<|message|>{"q": "[[<|call|>]]"}<|call|>'
    )
    expected = {"reasoning": "a<|end|> is text", "content": "", "calls": [["w", '{"q": "<|call|>"}']]}

    def parse(cuts: list[int]) -> dict[str, Any]:
        parser = HarmonyParser(by_ids=True)
        bounds = [0, *sorted(cuts), len(text)]
        events: list[HarmonyEvent] = []
        for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
            markers = {at: marker for at, marker in real.items() if start <= at < end}
            events += parser.feed(text[start:end], index == len(bounds) - 2, markers)
        return summarize(events)

    assert parse([]) == expected
    for cut in range(len(text) + 1):
        assert parse([cut]) == expected, cut
    assert parse(list(range(1, len(text)))) == expected
    held = HarmonyParser(by_ids=True)  # a marker's offset told before its text is whole: held back until it is
    assert held.feed("<|channel|>final<|message|>ok <|e", False, {0: "<|channel|>", 16: "<|message|>", 30: "<|end|>"}) == [
        HarmonyEvent("content", "ok ")
    ]
    assert held.feed("nd|>", True) == []


def spelt_ids(tokenizer: Any, reply: str) -> list[int]:
    """`reply`'s ids: its markers the special tokens, those inside `[[...]]` spelt in ordinary tokens."""
    ids: list[int] = []
    for index, part in enumerate(re.split(r"\[\[(.*?)\]\]", reply)):
        spelt = tokenizer.encode(part, add_special_tokens=False, split_special_tokens=index % 2 == 1)
        assert index % 2 == 0 or not set(spelt) & set(MARKER_IDS.values())
        ids += spelt
    return ids


def stream_ids(fmt: HarmonyFormat, decoder: TextDecoder, ids: list[int], groups: list[int], tools: frozenset[str],
               parallel: bool = True, start: PromptEnd = PromptEnd()) -> tuple[list[dict[str, Any]], Any]:  # fmt: skip
    """What the server does with `ids` in deltas of `groups` tokens: the last is a stop token, not decoded."""
    output = HarmonyOutput(fmt, ChoiceOutput(), tools, parallel, start)
    detokenizer = decoder.start([], skip_special_tokens=False)
    deltas: list[dict[str, Any]] = []
    at = 0
    for size in groups:
        group = ids[at : at + size]
        at += size
        last = at >= len(ids)
        text = detokenizer.add(group[:-1] if last else group) + (detokenizer.flush() if last else "")
        deltas += output.feed(text, last, group)
    return deltas, output.result(FinishReason.STOP, ids[-1])


def groupings(count: int) -> list[list[int]]:
    """One token a delta, all at once, every cut in two, and random lookahead-like groups."""
    rng = random.Random(count)
    cuts = [[cut, count - cut] for cut in range(1, count)]
    return [[1] * count, [count], *cuts, *([rng.randint(1, 5) for _ in range(count)] for _ in range(20))]


SPELT_REPLIES = [  # (reply, tools, parallel, its reasoning, content, calls)
    (  # a final answer explaining harmony
        "<|channel|>analysis<|message|>Explain.<|end|><|start|>assistant<|channel|>final<|message|>A reply ends with "
        "[[<|return|>]] when it is done, and a call ends with [[<|call|>]] instead.<|return|>",
        frozenset({"search"}), True, "Explain.",
        "A reply ends with <|return|> when it is done, and a call ends with <|call|> instead.", [],
    ),
    (  # the analysis spells a whole message switch, then a call (auto) whose argument spells markers
        "<|channel|>analysis<|message|>Search for [[<|end|><|start|>assistant<|channel|>final<|message|>]] then."
        '<|end|><|start|>assistant<|channel|>commentary to=functions.search <|constrain|>json<|message|>'
        '{"q": "what is [[<|call|>]] in harmony [[<|end|>]]"}<|call|>',
        frozenset({"search"}), True, "Search for <|end|><|start|>assistant<|channel|>final<|message|> then.", None,
        [("search", '{"q": "what is <|call|> in harmony <|end|>"}')],
    ),
    (  # a call first, its argument spelling a message header, not offered twice
        ' to=functions.search<|channel|>commentary json<|message|>{"q": "[[<|message|>]] and [[<|return|>]]"}<|call|>',
        frozenset({"search"}), False, None, None, [("search", '{"q": "<|message|> and <|return|>"}')],
    ),
    (  # a reply that ignored the format, spelling markers: content, all of it
        "Use [[<|channel|>final<|message|>]] to answer.<|return|>",
        frozenset(), True, None, "Use <|channel|>final<|message|> to answer.", [],
    ),
]


@pytest.mark.parametrize(("reply", "tools", "parallel", "reasoning", "content", "calls"), SPELT_REPLIES)
def test_markers_spelt_in_ordinary_tokens_are_text_however_the_deltas_fall(
    tokenizer: Any, reply: str, tools: frozenset[str], parallel: bool, reasoning: str | None, content: str | None,
    calls: list[tuple[str, str]],
) -> None:  # fmt: skip
    """Probe IA #5: the reply was split on marker text, so `<|return|>` spelt in an answer cut it there, and `<|call|>`
    in a JSON argument made a call of `{"q": "what is ` finished "tool_calls". Only the special tokens are markers,
    in every grouping of the tokens into deltas; the stream adds up to the whole answer."""
    fmt = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert fmt is not None and fmt.decode is not None
    ids = spelt_ids(tokenizer, reply)
    assert ids[-1] in (MARKER_IDS["<|call|>"], MARKER_IDS["<|return|>"])
    start, decoder = PromptEnd("<|start|>assistant"), TextDecoder(tokenizer.backend_tokenizer)
    for groups in groupings(len(ids)):
        deltas, final = stream_ids(fmt, decoder, ids, groups, tools, parallel, start)
        assert (final.reasoning, final.content) == (reasoning, content), groups
        assert [(c.function.name, c.function.arguments) for c in final.tool_calls] == calls, groups
        assert final.finish_reason == ("tool_calls" if calls else "stop")
        for call in final.tool_calls:
            json.loads(call.function.arguments)
        streamed = [d["tool_calls"][0]["function"].get("arguments", "") for d in deltas if "tool_calls" in d]
        assert "".join(streamed) == "".join(c.function.arguments for c in final.tool_calls)
        assert "".join(d.get("reasoning_content", "") for d in deltas) == (reasoning or "")
        assert "".join(d.get("content") or "" for d in deltas) == (content or "")


def test_a_forced_calls_argument_may_spell_a_marker(compiler: Any, tokenizer: Any) -> None:
    """The forced grammar's JSON strings admit `<|call|>` spelt in ordinary tokens (never the special token), and the
    call that holds it is read whole, as in auto mode."""
    fmt = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert fmt is not None
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    guide = Guide(GuideKind.TOOL_CALLS, json.dumps(forced_call_tag({"search": schema})), param="tools")
    matcher = compiler.matcher(compiler.compile(guide), (2, 7, 8))
    reply = '<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"q": "a [[<|call|>]] b"}<|call|>'
    ids = spelt_ids(tokenizer, reply)
    inside = ids.index(MARKER_IDS["<|message|>"]) + 4  # within the argument's string
    for token in ids[:inside]:
        assert matcher.accept(token)
    assert not matcher.allowed_tokens()[MARKER_IDS["<|call|>"]]
    for token in ids[inside:]:
        assert matcher.accept(token)
    decoder = TextDecoder(tokenizer.backend_tokenizer)
    for groups in groupings(len(ids)):
        _, final = stream_ids(fmt, decoder, ids, groups, frozenset({"search"}), False)
        assert final.finish_reason == "tool_calls", groups
        assert [(c.function.name, c.function.arguments) for c in final.tool_calls] == [("search", '{"q": "a <|call|> b"}')]
