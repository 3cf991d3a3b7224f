"""gpt-oss's harmony replies: detection, the streamed parse (every cut into deltas gives the whole reply's
events), the output a chat response is built from, real token ids through the incremental detokenizer with special
tokens kept, and the grammar gate waiting for the final channel (a multi-token end)."""

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_builder.common.types import FinishReason, Guide, GuideKind, ReasoningPrefix
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.decoding.harmony import HarmonyEvent, HarmonyParser, detect_harmony
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
    assert found is not None and found.channel_id == 4
    assert found.final_header_ids[0] == 4 and found.final_header_ids[-1] == 5
    assert tokenizer.decode(list(found.final_header_ids)) == "<|channel|>final<|message|>"
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


def parse_in_pieces(text: str, cuts: list[int]) -> dict[str, Any]:
    parser = HarmonyParser()
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


def test_a_cut_marker_is_held_back() -> None:
    parser = HarmonyParser()
    assert parser.feed("<|channel|>final<|mess", final=False) == []
    assert parser.feed("age|>Hello <|e", final=False) == [HarmonyEvent("content", "Hello ")]
    assert parser.feed("nd|>", final=True) == []


# -- the chat output -----------------------------------------------------------------------------------------------
def run_output(text: str, tools: frozenset[str], parallel: bool = True, pieces: int = 7) -> tuple[list[dict[str, Any]], Any]:
    output = HarmonyOutput(ChoiceOutput(), tools, parallel)
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
    output = HarmonyOutput(ChoiceOutput(), frozenset(), True)
    for token in ids[:-1]:  # the stop token is not text
        output.feed(detokenizer.add([token]), final=False, token_ids=[token])
    output.feed(detokenizer.flush(), final=True)
    final = output.result(FinishReason.STOP, None)
    assert (final.reasoning, final.content) == ("User asks 2+2. Easy.", "It is 4.")
    # reasoning tokens: the analysis body and the <|message|> that opened it
    assert final.reasoning_tokens == 1 + len(tokenizer.encode("User asks 2+2. Easy.", add_special_tokens=False))


# -- the gate: free until the final channel's header --------------------------------------------------------------
def test_the_gate_waits_for_a_multi_token_end_and_rolls_back_inside_it(harmony_dir: Path, tokenizer: Any) -> None:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    found = detect_harmony(tokenizer, HARMONY_TEMPLATE)
    assert found is not None
    compiler = GrammarCompiler(harmony_dir, 49152, tokenizer)
    guide = Guide(GuideKind.JSON_OBJECT, "")
    gate = compiler.matcher(compiler.compile(guide), (2, 7, 8), ReasoningPrefix(found.channel_id, found.final_header_ids, True))
    analysis = tokenizer.encode("<|channel|>analysis<|message|>think", add_special_tokens=False)
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    for token in analysis:
        assert gate.accept(token)
    assert not gate.in_answer and not gate.accept(7)  # no call or return before the answer
    header = list(found.final_header_ids)
    for token in header[:-1]:
        assert gate.accept(token)
    assert not gate.in_answer
    gate.rollback(1)  # back inside the header: one marker short of it again after the next token
    for token in header[1:]:
        assert gate.accept(token)
    assert gate.in_answer
    allowed = gate.allowed_tokens()
    assert allowed[brace] and not allowed[tokenizer.encode("think", add_special_tokens=False)[0]]
    assert gate.accept(brace)
    assert torch.equal(gate.allowed_tokens(), gate.inner.allowed_tokens())
