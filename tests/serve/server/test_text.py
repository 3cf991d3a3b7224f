"""RequestText: the output side's token ids -> text for every backend (SmolLM2's tokenizer, no engine)."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engine_builder.common.types import FinishReason, GenerationDelta, GenerationRequest, SamplingParams
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.text import RequestText

EOS = 2


@pytest.fixture(scope="module")
def decoder(smollm2_dir: Path) -> TextDecoder:
    return TextDecoder(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")))


def _request(**sampling: object) -> GenerationRequest:
    return GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=64, **sampling))  # type: ignore[arg-type]


def _delta(token_ids: list[int], index: int = 0, finish: FinishReason | None = None, **fields: object) -> GenerationDelta:
    return GenerationDelta("r", index, token_ids, "", finish_reason=finish, **fields)  # type: ignore[arg-type]


def _split_stop(decoder: TextDecoder, ids: list[int]) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next, and the index of that next token."""
    texts = [decoder.token_text(token) for token in ids]
    for position in range(1, len(ids)):
        if len(texts[position - 1].strip()) >= 2 and len(texts[position].strip()) >= 2:
            return texts[position - 1][-2:] + texts[position][:2], position
    raise AssertionError("no two neighbouring tokens of two characters or more")


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_token_boundaries_ends_the_choice_in_the_engine(decoder: TextDecoder, include: bool) -> None:
    ids = decoder.tokenizer.encode("The storyteller finished the chapter and closed the book.", add_special_tokens=False).ids
    stop, ending = _split_stop(decoder, ids)
    text = RequestText(decoder, _request(stop=(stop,), include_stop_str_in_output=include), (EOS,))
    completed = [text.complete(_delta([token])) for token in ids]
    emitted = [c for c in completed if c is not None]
    assert len(emitted) == ending + 1  # the delta that completed the stop string is the last one passed on
    last = emitted[-1]
    assert (last.delta.finish_reason, last.delta.stop_reason, last.stops_engine) == (FinishReason.STOP, stop, True)
    full = decoder.decode(ids, skip_special_tokens=True)
    cut = full.index(stop) + (len(stop) if include else 0)
    assert "".join(c.delta.text for c in emitted) == full[:cut]
    assert not any(c.stops_engine for c in emitted[:-1]) and text.is_finished


def test_eos_and_stop_token_ids_are_kept_out_of_the_text(decoder: TextDecoder) -> None:
    hello = decoder.tokenizer.encode("Hello", add_special_tokens=False).ids
    text = RequestText(decoder, _request(skip_special_tokens=False), (EOS,))
    completed = text.complete(_delta([*hello, EOS], finish=FinishReason.STOP))
    assert completed is not None and completed.delta.text == "Hello" and not completed.stops_engine

    text = RequestText(decoder, _request(skip_special_tokens=False, stop_token_ids=(EOS,)), (0,))
    completed = text.complete(_delta([*hello, EOS], finish=FinishReason.STOP, stop_reason=EOS))
    assert completed is not None and completed.delta.text == "Hello" and completed.delta.stop_reason == EOS

    text = RequestText(decoder, _request(skip_special_tokens=False, include_stop_str_in_output=True), (EOS,))
    completed = text.complete(_delta([*hello, EOS], finish=FinishReason.STOP))
    assert completed is not None and completed.delta.text == "Hello" + decoder.token_text(EOS)


def test_choices_are_independent_and_a_stopped_one_drops_what_follows(decoder: TextDecoder) -> None:
    ids = decoder.tokenizer.encode(" one two three", add_special_tokens=False).ids
    text = RequestText(decoder, _request(n=2, stop=("two",), temperature=1.0), (EOS,))
    seen: dict[int, str] = {0: "", 1: ""}
    for token in ids:
        for index in (0, 1):
            completed = text.complete(_delta([token], index=index))
            if completed is not None:
                seen[index] += completed.delta.text
    assert seen == {0: " one ", 1: " one "}
    assert text.complete(_delta([ids[0]], index=0, finish=FinishReason.ABORT)) is None  # ended here already
    assert text.is_finished


@pytest.mark.parametrize("one_delta", [False, True])
def test_stop_strings_wait_for_min_tokens(decoder: TextDecoder, one_delta: bool) -> None:
    """As EOS and stop token ids, a stop string cannot end a choice within its first min_tokens tokens (vLLM's rule)."""
    ids = decoder.tokenizer.encode(" Paris. It is big. Yes.", add_special_tokens=False).ids
    assert [decoder.token_text(token) for token in ids[:3]] == [" Paris", ".", " It"]
    text = RequestText(decoder, _request(stop=(".",), min_tokens=3), (EOS,))
    deltas = [_delta(ids)] if one_delta else [_delta([token]) for token in ids]
    emitted = [c for c in (text.complete(delta) for delta in deltas) if c is not None]
    assert "".join(c.delta.text for c in emitted) == " Paris. It is big"
    assert emitted[-1].delta.finish_reason == FinishReason.STOP and emitted[-1].delta.stop_reason == "."
    # Without min_tokens, the first "." ends it.
    text = RequestText(decoder, _request(stop=(".",)), (EOS,))
    emitted = [c for c in (text.complete(delta) for delta in deltas) if c is not None]
    assert "".join(c.delta.text for c in emitted) == " Paris"


@pytest.mark.parametrize("one_delta", [False, True])
def test_a_stop_string_begun_inside_min_tokens_and_completed_after_them_ends_the_choice(
    decoder: TextDecoder, one_delta: bool
) -> None:
    """vLLM looks back a stop string's length from the first token that may stop: "answer is" begun in the protected
    tokens ends the choice at " is", the first free token (probe P: it ran on to the length limit)."""
    ids = decoder.tokenizer.encode(" Paris.\n\nThe answer is: yes. The answer is no.", add_special_tokens=False).ids
    texts = [decoder.token_text(token) for token in ids]
    protected = texts.index(" is")  # " answer" is the last protected token, " is" the first free one

    def run(min_tokens: int) -> list:
        text = RequestText(decoder, _request(stop=("answer is",), min_tokens=min_tokens), (EOS,))
        deltas = [_delta(ids)] if one_delta else [_delta([token]) for token in ids]
        return [c for c in (text.complete(delta) for delta in deltas) if c is not None]

    emitted = run(protected)
    assert "".join(c.delta.text for c in emitted) == " Paris.\n\nThe "
    assert (emitted[-1].delta.finish_reason, emitted[-1].delta.stop_reason) == (FinishReason.STOP, "answer is")
    # one more protected token and the first "answer is" lies wholly inside them: the second one stops it
    emitted = run(protected + 1)
    assert "".join(c.delta.text for c in emitted) == " Paris.\n\nThe answer is: yes. The "
    assert emitted[-1].delta.stop_reason == "answer is"


def test_text_held_back_within_min_tokens_is_not_matched_at_the_finish(decoder: TextDecoder) -> None:
    """The first byte of an emoji is held back until the finish flushes it; it belongs to a protected token."""
    first_byte = decoder.tokenizer.encode(" 🍕", add_special_tokens=False).ids[:1]
    for min_tokens, finish in ((0, FinishReason.STOP), (1, FinishReason.LENGTH)):
        text = RequestText(decoder, _request(stop=("\ufffd",), min_tokens=min_tokens), (EOS,))
        completed = text.complete(_delta(first_byte, finish=FinishReason.LENGTH))
        assert completed is not None and completed.delta.finish_reason == finish, min_tokens


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_inside_a_multi_token_delta_keeps_only_the_tokens_up_to_it(
    decoder: TextDecoder, include: bool
) -> None:
    """A lookahead step hands over several tokens at once: the reply, its token count (usage) and its logprobs end
    at the token that completed the stop string, exactly as when the same tokens come one per step."""
    from engine_builder.common.types import TokenLogprob

    ids = decoder.tokenizer.encode("The storyteller finished the chapter and closed the book.", add_special_tokens=False).ids
    stop, ending = _split_stop(decoder, ids)
    one_by_one = RequestText(decoder, _request(stop=(stop,), include_stop_str_in_output=include), (EOS,))
    singles = [c for c in (one_by_one.complete(_delta([t], num_output_tokens=i + 1)) for i, t in enumerate(ids)) if c]
    at_once = RequestText(decoder, _request(stop=(stop,), include_stop_str_in_output=include), (EOS,))
    logprobs = [TokenLogprob(token, -1.0, ()) for token in ids]
    delta = _delta(ids[:1], num_output_tokens=1)
    first = at_once.complete(delta)
    assert first is not None
    rest = _delta(ids[1:], num_output_tokens=len(ids), logprobs=logprobs[1:])
    completed = at_once.complete(rest)
    assert completed is not None and completed.stops_engine
    assert first.delta.text + completed.delta.text == "".join(c.delta.text for c in singles)
    assert completed.delta.token_ids == ids[1 : ending + 1] and len(completed.delta.logprobs) == ending
    assert completed.delta.num_output_tokens == ending + 1 == singles[-1].delta.num_output_tokens
    assert (completed.delta.finish_reason, completed.delta.stop_reason) == (FinishReason.STOP, stop)


def test_a_step_of_the_stop_strings_last_token_and_eos_drops_the_eos_from_usage_and_logprobs(
    decoder: TextDecoder,
) -> None:
    """A lookahead step can end a choice on EOS right after the token that completed a stop string: the EOS was
    kept in the reply's tokens, usage and logprobs (the two-token step took the one-token path, the EOS not being
    decoded), where a step with any other token after the stop string drops it (probe AI)."""
    from engine_builder.common.types import TokenLogprob

    hello, world = decoder.tokenizer.encode("Hello world", add_special_tokens=False).ids
    for tail, finish in (([world, EOS], FinishReason.STOP), ([world, EOS, world], FinishReason.LENGTH)):
        text = RequestText(decoder, _request(stop=("world",)), (EOS,))
        text.complete(_delta([hello], num_output_tokens=1))
        logprobs = [TokenLogprob(token, -1.0, ()) for token in tail]
        completed = text.complete(_delta(tail, finish=finish, num_output_tokens=1 + len(tail), logprobs=logprobs))
        assert completed is not None
        assert completed.delta.token_ids == [world] and len(completed.delta.logprobs) == 1
        assert completed.delta.num_output_tokens == 2
        assert (completed.delta.finish_reason, completed.delta.stop_reason) == (FinishReason.STOP, "world")
