"""Reasoning blocks: detection, the prompt's phase, the streamed split (every way of cutting the reply into
deltas gives the whole reply's answer), token counting, and the grammar gate over a real xgrammar matcher."""

import json
import random
from pathlib import Path

import pytest
import torch

from engine_builder.common.types import Guide, GuideKind, ReasoningPrefix
from engine_builder.serve.decoding.reasoning import (
    Phase,
    PromptPhase,
    ReasoningFormat,
    ReasoningSplitter,
    ReasoningTokenCounter,
    detect_reasoning_format,
    prompt_phase,
)
from engine_builder.serve.decoding.structured.gate import ReasoningGate, _set_bit
from tests.serve.decoding.renamed_tokens import smollm2_with_renamed_tokens

FMT = ReasoningFormat("<think>", "</think>", 14, 15)


def tags(fmt: ReasoningFormat | None) -> tuple[str, str, int, int] | None:
    return None if fmt is None else (fmt.start, fmt.end, fmt.start_id, fmt.end_id)


QWEN3_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% elif open_think is defined and open_think %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)


def thinking_tokenizer_dir(smollm2_dir: Path, target: Path) -> Path:
    """SmolLM2 whose ids 14 and 15 are the plain (non-special) tokens `<think>` and `</think>`, with a
    Qwen3-style template (`enable_thinking`, and `open_think` for DeepSeek-R1's always-open block)."""
    return smollm2_with_renamed_tokens(
        smollm2_dir, target, {14: "<think>", 15: "</think>"}, QWEN3_TEMPLATE, special=False
    )


@pytest.fixture(scope="module")
def thinking_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thinking_tokenizer_dir(smollm2_dir, tmp_path_factory.mktemp("thinking") / "model")


# -- detection and the prompt's phase -------------------------------------------------------------------------
def test_detection_needs_single_kept_tokens_and_a_template_that_names_them(thinking_dir: Path, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    thinking = AutoTokenizer.from_pretrained(str(thinking_dir))
    assert tags(detect_reasoning_format(thinking, thinking.chat_template)) == tags(FMT)
    assert detect_reasoning_format(thinking, "{{ messages }}") is None  # the template never names the block
    assert detect_reasoning_format(thinking, None) is None
    plain = AutoTokenizer.from_pretrained(str(smollm2_dir))  # "<think>" is several tokens there
    assert detect_reasoning_format(plain, QWEN3_TEMPLATE) is None
    thinking.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})  # decoding would drop them
    assert detect_reasoning_format(thinking, QWEN3_TEMPLATE) is None


def test_prompt_phase_follows_the_templates_ending(thinking_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(thinking_dir))
    fmt = detect_reasoning_format(tokenizer, tokenizer.chat_template)
    assert fmt is not None and "<|im_start|>" in fmt.turn_markers and "<think>" not in fmt.turn_markers
    messages = [{"role": "user", "content": "2+2?"}]

    def render(**kwargs: object) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    assert prompt_phase(fmt, render()).phase is Phase.BEFORE  # Qwen3 thinking on: the model opens the block
    assert prompt_phase(fmt, render(enable_thinking=False)).phase is Phase.ANSWER
    assert prompt_phase(fmt, render(open_think=True)) == PromptPhase(Phase.REASONING)  # DeepSeek-R1
    # An earlier turn's closed block does not count; the final turn decides.
    history = "<|im_start|>assistant\n<think>x</think>\n\nok<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_phase(fmt, history).phase is Phase.BEFORE
    quoted = "<|im_start|>user\nWhat does the <think> tag do?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_phase(fmt, quoted).phase is Phase.BEFORE  # a tag quoted in a message opens nothing


@pytest.mark.parametrize(
    ("prefill", "expected"),
    [
        ("<think>The user asks", PromptPhase(Phase.REASONING, continued=True)),  # budget forcing: "...Wait,"
        ("<think>\n", PromptPhase(Phase.REASONING)),
        ("<think>a</think>\n\nThe answer is", PromptPhase(Phase.ANSWER, continued=True)),
        ("<think>a</think>", PromptPhase(Phase.ANSWER)),
        ("<think>a</think>b<think>c", PromptPhase(Phase.REASONING, continued=True)),
        ("The answer is", PromptPhase(Phase.BEFORE)),
    ],
)
def test_a_prefill_continues_the_phase_its_last_tag_leaves(thinking_dir: Path, prefill: str, expected: PromptPhase) -> None:
    """continue_final_message: the assistant's prefill is the final turn; an open block there is the reasoning."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(thinking_dir))
    fmt = detect_reasoning_format(tokenizer, tokenizer.chat_template)
    assert fmt is not None
    messages = [{"role": "user", "content": "What is <think>?"}, {"role": "assistant", "content": prefill}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert prompt.rstrip().endswith(prefill.rstrip())
    assert prompt_phase(fmt, prompt) == expected


# -- the split --------------------------------------------------------------------------------------------------
def split_whole(phase: Phase, text: str) -> tuple[str, str]:
    return ReasoningSplitter(FMT, phase).feed(text, final=True)


def split_in_pieces(phase: Phase, text: str, cuts: list[int]) -> tuple[str, str]:
    splitter = ReasoningSplitter(FMT, phase)
    reasoning, answer = "", ""
    bounds = [0, *sorted(cuts), len(text)]
    for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        r, a = splitter.feed(text[start:end], final=index == len(bounds) - 2)
        reasoning, answer = reasoning + r, answer + a
    return reasoning, answer


CASES = [
    (Phase.BEFORE, "<think>\nI add 2 and 2.\n\n</think>\n\nIt is 4.", ("I add 2 and 2.", "It is 4.")),
    (Phase.BEFORE, "  <think>a < b\n</think>x", ("a < b", "x")),
    (Phase.BEFORE, "It is 4.", ("", "It is 4.")),
    (Phase.BEFORE, "<thinking> is not the tag", ("", "<thinking> is not the tag")),
    (Phase.BEFORE, "<think>cut off while thinking ", ("cut off while thinking ", "")),
    (Phase.REASONING, "\nSo 4.\n</think>\n\n{\"a\": 4}", ("So 4.", '{"a": 4}')),
    (Phase.REASONING, "no end </thin", ("no end </thin", "")),
    (Phase.ANSWER, "\n  4 </think> stays", ("", "\n  4 </think> stays")),
    (Phase.BEFORE, "<think></think>", ("", "")),
]


@pytest.mark.parametrize(("phase", "text", "expected"), CASES)
def test_every_cut_into_deltas_gives_the_whole_replys_split(phase: Phase, text: str, expected: tuple[str, str]) -> None:
    assert split_whole(phase, text) == expected
    for cut in range(len(text) + 1):  # every single cut, the tags' insides included
        assert split_in_pieces(phase, text, [cut]) == expected, cut
    assert split_in_pieces(phase, text, list(range(1, len(text)))) == expected  # a character at a time
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 5))) if len(text) > 1 else []
        assert split_in_pieces(phase, text, cuts) == expected, cuts


def test_a_cut_tag_is_held_back_then_released() -> None:
    splitter = ReasoningSplitter(FMT, Phase.REASONING)
    assert splitter.feed("thinking</th", final=False) == ("thinking", "")
    assert splitter.feed("ink>answer", final=False) == ("", "answer")
    before = ReasoningSplitter(FMT, Phase.BEFORE)
    assert before.feed("<thi", final=False) == ("", "")  # could still be the start tag
    assert before.feed("s is text", final=False) == ("", "<this is text")


def count(phase: Phase, tokens: list[tuple[int, str]], *, stopped: bool = False, fmt: ReasoningFormat = FMT) -> tuple[int, str, str]:
    """(reasoning tokens, reasoning, answer) of a reply fed a token at a time, as `ReasoningOutput` feeds them;
    `stopped`: its last token is EOS or a stop token (no text)."""
    splitter, counter = ReasoningSplitter(fmt, phase), ReasoningTokenCounter(fmt, phase)
    reasoning, answer = "", ""
    for index, (token, text) in enumerate(tokens):
        r, a = splitter.feed(text, final=index == len(tokens) - 1)
        counter.feed([token], splitter)
        reasoning, answer = reasoning + r, answer + a
    counter.finish(stopped)
    return counter.count, reasoning, answer


def test_token_counter_counts_the_block_and_its_tags() -> None:
    words = {100: "a", 101: "b", 102: "c", 200: "x", 201: "y", 300: "z"}
    tokens = [(token, {14: "<think>", 15: "</think>"}.get(token) or words[token]) for token in (14, 100, 101, 102, 15, 200, 14, 15, 201)]
    assert count(Phase.BEFORE, tokens)[0] == 5
    assert count(Phase.REASONING, [(100, "a"), (15, "</think>"), (300, "z")])[0] == 2
    assert count(Phase.BEFORE, [(100, "a"), (14, "<think>"), (15, "</think>")])[0] == 0  # the block must open the reply


def test_a_tag_spelt_in_several_tokens_is_counted_as_the_splitter_reads_it() -> None:
    tokens = [(1, "<th"), (2, "ink>"), (3, "plan"), (4, "</"), (5, "think>"), (6, "ok")]
    assert count(Phase.BEFORE, tokens) == (5, "plan", "ok")


def real_count(tokenizer: object, fmt: ReasoningFormat, phase: Phase, reply: str, stop_id: int | None = None) -> tuple[int, str, str, list[int]]:
    """What the server does: real ids, their text from the incremental detokenizer, then the reasoning output."""
    from engine_builder.common.types import FinishReason
    from engine_builder.serve.decoding.detokenizer import TextDecoder
    from engine_builder.serve.server.outputs import ChoiceOutput, ReasoningOutput

    ids = tokenizer.encode(reply, add_special_tokens=False)  # type: ignore[attr-defined]
    prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)  # type: ignore[attr-defined]
    detokenizer = TextDecoder(tokenizer.backend_tokenizer).start(prompt, skip_special_tokens=True)  # type: ignore[attr-defined]
    output = ReasoningOutput(fmt, PromptPhase(phase), ChoiceOutput())
    for token in ids:
        output.feed(detokenizer.add([token]), False, [token])
    if stop_id is not None:  # the stop token's text is not decoded (RequestText drops it)
        ids.append(stop_id)
    output.feed(detokenizer.flush(), True, [stop_id] if stop_id is not None else [])
    final = output.result(FinishReason.STOP, None)
    assert final.reasoning_tokens is not None
    return final.reasoning_tokens, final.reasoning or "", final.content or "", ids


@pytest.mark.parametrize("blank", ["\n", "   ", "\n\n\n\n", " \n\n", "\t\t", "\u00a0", "\u3000"])
def test_token_counter_and_splitter_agree_on_whitespace_before_the_start_tag(thinking_dir: Path, blank: str) -> None:
    """Any whitespace the splitter drops before `<think>` (not a fixed list of blank tokens) leaves the block open."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(thinking_dir))
    fmt = detect_reasoning_format(tokenizer, tokenizer.chat_template)
    assert fmt is not None
    reasoning_tokens, reasoning, answer, ids = real_count(tokenizer, fmt, Phase.BEFORE, blank + "<think>plan</think>answer")
    assert (reasoning, answer) == ("plan", "answer")
    assert reasoning_tokens == ids.index(fmt.end_id) + 1
    reasoning_tokens, reasoning, answer, _ = real_count(tokenizer, fmt, Phase.BEFORE, blank + "answer <think>x</think>")
    assert (reasoning, reasoning_tokens) == ("", 0) and answer.endswith("answer <think>x</think>")


def test_the_stop_token_is_no_reasoning(thinking_dir: Path) -> None:
    """EOS ending an open block has no text: reasoning_content does not hold it, nor does the count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(thinking_dir))
    fmt = detect_reasoning_format(tokenizer, tokenizer.chat_template)
    assert fmt is not None
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert real_count(tokenizer, fmt, Phase.REASONING, "", stop_id=eos)[:3] == (0, "", "")
    reasoning_tokens, reasoning, _, ids = real_count(tokenizer, fmt, Phase.REASONING, "still thinking", stop_id=eos)
    assert reasoning == "still thinking" and reasoning_tokens == len(ids) - 1
    reasoning_tokens, _, answer, ids = real_count(tokenizer, fmt, Phase.BEFORE, "<think>a</think>b", stop_id=eos)
    assert answer == "b" and reasoning_tokens == ids.index(fmt.end_id) + 1


@pytest.mark.parametrize("spelt", ["<th|ink>|plan|</|think>", "<think>|plan|</think>"])
def test_the_count_does_not_depend_on_how_tokens_are_grouped_into_deltas(thinking_dir: Path, spelt: str) -> None:
    """Probe AX: where a tag is spelt in several tokens, the delta in which the text left (or entered) the block
    counted all its tokens, the answer's too: 3 tokens one at a time, 5 in one delta (lookahead). Read a token at a
    time where their texts spell the delta's, it counts as plain decoding does, the stop token in the last delta
    included (it has no text)."""
    from transformers import AutoTokenizer

    from engine_builder.common.types import FinishReason
    from engine_builder.serve.decoding.detokenizer import TextDecoder
    from engine_builder.serve.server.outputs import ChoiceOutput, ReasoningOutput

    tokenizer = AutoTokenizer.from_pretrained(str(thinking_dir))
    fmt = detect_reasoning_format(tokenizer, tokenizer.chat_template)
    assert fmt is not None
    block = [token for piece in spelt.split("|") for token in tokenizer.encode(piece, add_special_tokens=False)]
    eos = tokenizer.eos_token_id
    ids = [*block, *tokenizer.encode("The answer", add_special_tokens=False), eos]
    decoder = TextDecoder(tokenizer.backend_tokenizer)
    rng = random.Random(len(spelt))
    for grouping in ([1] * len(ids), [len(ids)], [2] * len(ids), *([rng.randint(1, 5) for _ in ids] for _ in range(20))):
        output = ReasoningOutput(fmt, PromptPhase(Phase.BEFORE), ChoiceOutput(), decoder.token_text)
        detokenizer = decoder.start([], skip_special_tokens=True)
        start = 0
        for size in grouping:
            group = ids[start : start + size]
            start += len(group)
            final = start >= len(ids)
            text = detokenizer.add([token for token in group if token != eos])  # the stop token is not text
            output.feed(text + (detokenizer.flush() if final else ""), final, group)
            if final:
                break
        result = output.result(FinishReason.STOP, eos)
        assert (result.reasoning, result.content) == ("plan", "The answer")
        assert result.reasoning_tokens == len(block), grouping


# -- the grammar gate -------------------------------------------------------------------------------------------
EOS = (2,)
SCHEMA = Guide(GuideKind.JSON_SCHEMA, json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))


@pytest.fixture(scope="module")
def compiler(thinking_dir: Path) -> object:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    return GrammarCompiler(thinking_dir, 49152)


@pytest.fixture(scope="module")
def tokens(thinking_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(thinking_dir))
    return {text: tokenizer.encode(text, add_special_tokens=False)[0] for text in ("{", "hello", " x")}


def allowed_of(words: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


def gate(compiler: object, opened: bool) -> ReasoningGate:
    compiled = compiler.compile(SCHEMA)  # type: ignore[attr-defined]
    matcher = compiler.matcher(compiled, EOS, ReasoningPrefix(14, (15,), opened))  # type: ignore[attr-defined]
    assert isinstance(matcher, ReasoningGate)
    return matcher


def test_an_opened_block_is_free_but_for_stop_tokens_then_the_grammar_applies(compiler: object, tokens: dict[str, int]) -> None:
    matcher = gate(compiler, opened=True)
    free = allowed_of(matcher.token_bitmask(), 49152)
    assert free.sum() == 49152 - 1 and not free[2]
    assert torch.equal(matcher.allowed_tokens(), free)
    assert matcher.accept(tokens["hello"]) and matcher.accept(tokens[" x"]) and matcher.accept(14)
    assert not matcher.accept(2)  # the reply may not end inside the block
    assert matcher.accept(15)
    grammar = allowed_of(matcher.token_bitmask(), 49152)
    assert grammar[tokens["{"]] and not grammar[tokens["hello"]] and not grammar[15]
    assert not matcher.accept(tokens["hello"])
    assert matcher.accept(tokens["{"]) and not matcher.is_terminated


def test_before_the_block_the_first_token_opens_it_or_answers(compiler: object, tokens: dict[str, int]) -> None:
    matcher = gate(compiler, opened=False)
    first = allowed_of(matcher.token_bitmask(), 49152)
    plain = compiler.matcher(compiler.compile(SCHEMA), EOS)  # type: ignore[attr-defined]
    expected = allowed_of(plain.token_bitmask(), 49152).clone()
    expected[14] = True
    assert torch.equal(first, expected) and torch.equal(matcher.allowed_tokens(), expected)
    assert matcher.accept(tokens["{"])  # answered at once: the grammar from here on
    assert not matcher.accept(14) and not matcher.accept(15)
    opened = gate(compiler, opened=False)
    assert opened.accept(14) and opened.accept(tokens["hello"]) and opened.accept(15) and opened.accept(tokens["{"])


def test_rollback_restores_the_phase_and_the_grammars_state(compiler: object, tokens: dict[str, int]) -> None:
    matcher = gate(compiler, opened=False)
    for token in (14, tokens["hello"], 15, tokens["{"]):
        assert matcher.accept(token)
    matcher.rollback(2)  # back inside the block: the end tag and the "{" are undone
    assert not matcher.in_answer
    assert allowed_of(matcher.token_bitmask(), 49152)[tokens["hello"]]
    assert matcher.accept(15) and matcher.accept(tokens["{"])  # the grammar is at its start again
    matcher.rollback(4)
    assert torch.equal(allowed_of(matcher.token_bitmask(), 49152)[14:15], torch.tensor([True]))


@pytest.mark.parametrize("token", [0, 31, 32, 63, 49151])
def test_set_bit_handles_the_sign_bit_of_int32_words(token: int) -> None:
    words = torch.zeros(49152 // 32, dtype=torch.int32)
    _set_bit(words, token)
    allowed = allowed_of(words, 49152)
    assert allowed.sum() == 1 and allowed[token]
