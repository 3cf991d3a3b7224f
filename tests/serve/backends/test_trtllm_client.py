"""TrtLlmEngineClient against the fake's scripted streams: token ids only (the text is the server's), finish
reasons, n > 1, logprobs, ending a choice, abort, errors and lifecycle. Verified against the fake
`tensorrt_llm` only (no GPU, no TensorRT-LLM).
"""

import asyncio
import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from engine_builder.common.trtllm.specs import LlmBackend, LlmSpec, LookaheadSpec
from engine_builder.common.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    Guide,
    GuideKind,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
)
from engine_builder.serve.backends.trtllm.client import TrtLlmEngineClient, TrtLlmEngineDeadError
from engine_builder.serve.backends.trtllm.sampling import UnsupportedRequestError
from engine_builder.serve.decoding.structured.errors import GuideError
from tests.fakes.trtllm_helpers import write_engine_config

MODEL_INFO = ModelInfo(
    served_model_name="fake",
    max_model_len=4096,
    vocab_size=1000,
    eos_token_ids=(2, 3),
    architecture="LlamaForCausalLM",
    kind="decoder",
)


def _client(tmp_path: Path, backend: LlmBackend = LlmBackend.PYTORCH, **spec: Any) -> TrtLlmEngineClient:
    spec.setdefault("guided_decoding_backend", "xgrammar")  # as the build's mapping sets it
    return TrtLlmEngineClient(LlmSpec(backend=backend, model=str(tmp_path), **spec), MODEL_INFO, warmup=False)


def _request(request_id: str = "r1", **sampling: Any) -> GenerationRequest:
    sampling.setdefault("max_tokens", 8)
    return GenerationRequest(request_id, (11, 12, 13), SamplingParams(**sampling))


async def _collect(client: TrtLlmEngineClient, request: GenerationRequest) -> list[GenerationDelta]:
    return [delta async for delta in client.generate(await client.prepare(request))]


def _run(client: TrtLlmEngineClient, request: GenerationRequest) -> list[GenerationDelta]:
    async def main() -> list[GenerationDelta]:
        await client.start()
        try:
            return await _collect(client, request)
        finally:
            await client.shutdown(0)

    return asyncio.run(main())


def _script(recorder: ModuleType, steps: list[Any]) -> None:
    recorder.SCRIPT = lambda prompt_token_ids, sampling_params: steps


def _script_choices(recorder: ModuleType, *choices: list[Any]) -> None:
    """Each choice is its own TensorRT-LLM request, submitted in index order: the k-th submission gets `choices[k]`."""
    queue = list(choices)
    recorder.SCRIPT = lambda prompt_token_ids, sampling_params: queue.pop(0)


def test_streams_new_token_ids_only(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """TensorRT-LLM is asked for ids only (no detokenization, an explicit end id, no stop strings): the text is
    made by the server's output side, never by a second tokenizer inside TensorRT-LLM."""
    update = fake_trtllm.Update
    _script(
        fake_trtllm,
        [
            [update(text="Hel", token_ids=[5])],
            [update(text="", token_ids=[6])],
            [update(text="lo", token_ids=[7])],
            [update(text="!", token_ids=[8], finish_reason="length")],
        ],
    )
    deltas = _run(_client(tmp_path, guided_decoding_backend=None), _request(stop=("lo",), skip_special_tokens=False))
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [
        ("", [5], None),
        ("", [6], None),
        ("", [7], None),
        ("", [8], FinishReason.LENGTH),
    ]
    assert [d.num_output_tokens for d in deltas] == [1, 2, 3, 4]
    assert all(d.num_prompt_tokens == 3 and d.request_id == "r1" for d in deltas)
    generate = fake_trtllm.calls("LLM.generate_async")[0]
    assert generate.kwargs["inputs"] == [11, 12, 13] and generate.kwargs["streaming"] is True
    params = fake_trtllm.calls("SamplingParams")[0].kwargs
    assert params["detokenize"] is False and params["end_id"] == 2
    assert "stop" not in params and "skip_special_tokens" not in params
    assert fake_trtllm.calls("LLM")[0].kwargs["skip_tokenizer_init"] is True  # no guided decoding: no tokenizer


def test_tensorrt_llm_keeps_its_tokenizer_only_for_xgrammar(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """Its xgrammar backend builds the grammar vocabulary from the tokenizer (LLM._build_model): with guided
    decoding on, TensorRT-LLM loads it, but still makes no text (detokenize=False)."""
    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(text="ignored", token_ids=[5], finish_reason="length")]])
    deltas = _run(_client(tmp_path, guided_decoding_backend="xgrammar"), _request())
    assert "skip_tokenizer_init" not in fake_trtllm.calls("LLM")[0].kwargs
    assert deltas[0].text == "" and fake_trtllm.calls("SamplingParams")[0].kwargs["detokenize"] is False


def test_eos_and_stop_token_finish_reasons(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    update = fake_trtllm.Update
    _script(
        fake_trtllm,
        [[update(text="b", token_ids=[3], finish_reason="stop", stop_reason=3, trim_token_ids=1)]],
    )
    deltas = _run(_client(tmp_path), _request())
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (FinishReason.STOP, None)  # EOS we added
    # the stop token stays in the ids (include_stop_str_in_output=True), as the torch engine returns it
    assert (deltas[-1].token_ids, deltas[-1].num_output_tokens) == ([3], 1)

    _script(fake_trtllm, [[update(text="c", token_ids=[7], finish_reason="stop", stop_reason=7)]])
    deltas = _run(_client(tmp_path), _request(stop_token_ids=(7,)))
    assert deltas[-1].stop_reason == 7  # a stop token the request asked for


def test_n_choices_stream_independently_without_repeating_tokens(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    update = fake_trtllm.Update
    _script_choices(
        fake_trtllm,
        [[update(text="x", token_ids=[5])], [update(text="z", token_ids=[7], finish_reason="length")]],
        [[update(text="y", token_ids=[6])], [update(text="w", token_ids=[8], finish_reason="stop", stop_reason=9)]],
    )
    deltas = _run(_client(tmp_path), _request(n=2, temperature=1.0, stop_token_ids=(9,)))
    by_choice = {index: [d.token_ids for d in deltas if d.index == index] for index in (0, 1)}
    assert by_choice == {0: [[5], [7]], 1: [[6], [8]]}
    finishes = {d.index: (d.finish_reason, d.stop_reason) for d in deltas if d.finish_reason}
    assert finishes == {0: (FinishReason.LENGTH, None), 1: (FinishReason.STOP, 9)}
    submitted = [call.kwargs["sampling_params"] for call in fake_trtllm.calls("LLM.generate_async")]
    assert [params.n for params in submitted] == [1, 1]  # one TensorRT-LLM request per choice


def test_n_above_one_on_tensorrt_llm_s_n_semantics_would_leave_choices_without_a_finish(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """Probe EE #1. With n > 1 in one request, TensorRT-LLM sets a sequence's finish_reason only on the request's
    final response (`_handle_sequence` under `_done`; the C++ `isFinal` is all sequences final), so the choice that
    ends first keeps None and the request was a 500. Each choice is now its own request: both end with their reason,
    each stream read to its end (the fake's n > 1 rule is checked in test_trtllm_fake_rules.py)."""
    update = fake_trtllm.Update
    _script_choices(
        fake_trtllm,
        [[update(token_ids=[5])], [update(token_ids=[7], finish_reason="length")]],
        [[update(token_ids=[6])], [update(token_ids=[8], finish_reason="length")]],
    )
    deltas = _run(_client(tmp_path), _request(n=2, temperature=1.0, max_tokens=2))
    finishes = {d.index: (d.finish_reason, d.error) for d in deltas if d.finish_reason is not None}
    assert finishes == {0: (FinishReason.LENGTH, None), 1: (FinishReason.LENGTH, None)}
    assert fake_trtllm.calls("RequestOutput.abort") == []  # both finished in TensorRT-LLM: nothing to abort


def test_n_choices_are_seeded_as_tensorrt_llm_seeds_child_requests(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """v1 samples with the request's seed plus the choice index (TensorRT-LLM's `randomSeed += sequenceIndex` for the
    child requests, the torch engine's `seed + index`); an unset seed is one random draw, moved on the same way."""
    write_engine_config(tmp_path)
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(n=3, temperature=1.0, seed=40))
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(n=2, temperature=1.0))
    seeds = [call.kwargs["sampling_params"].seed for call in fake_trtllm.calls("_TrtLLM.generate_async")]
    assert seeds[:3] == [40, 41, 42]
    assert seeds[4] == seeds[3] + 1


def test_seeds_and_top_k_fit_the_types_tensorrt_llm_converts_them_to(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """TensorRT-LLM's C++ SamplingConfig takes the seed as uint64 and top_k as int32: a seed of -1 (valid here) or a
    top_k of 2**40 failed the request (probe IE #1). Seeds are taken modulo 2**64 (the last choice's too); a top_k at
    or over the vocabulary keeps every token, so it is sent as off."""
    write_engine_config(tmp_path)
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(n=2, temperature=1.0, seed=-1, top_k=2**40))
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(temperature=1.0, seed=2**63 - 1, top_k=999))
    submitted = [call.kwargs["sampling_params"] for call in fake_trtllm.calls("_TrtLLM.generate_async")]
    assert [params.seed for params in submitted] == [2**64 - 1, 0, 2**63 - 1]
    assert [params.top_k for params in submitted] == [None, None, 999]


def test_logprobs_are_converted_from_tensorrt_llm_entries(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from tensorrt_llm.executor import Logprob

    update = fake_trtllm.Update
    entries = [{5: Logprob(-0.1, 1), 9: Logprob(-2.0, 2)}, {6: Logprob(-0.3, 1), 4: Logprob(-0.5, 2)}]
    _script(fake_trtllm, [[update(text="ab", token_ids=[5, 6], logprobs=entries, finish_reason="length")]])
    deltas = _run(_client(tmp_path), _request(logprobs=2, temperature=0.0))
    assert deltas[0].logprobs == [
        TokenLogprob(5, -0.1, ((5, -0.1), (9, -2.0))),
        TokenLogprob(6, -0.3, ((6, -0.3), (4, -0.5))),
    ]
    _script(fake_trtllm, [[update(text="ab", token_ids=[5, 6], logprobs=entries, finish_reason="length")]])
    deltas = _run(_client(tmp_path), _request(logprobs=0, temperature=0.0))
    assert deltas[0].logprobs == [TokenLogprob(5, -0.1), TokenLogprob(6, -0.3)]
    assert fake_trtllm.calls("SamplingParams")[-1].kwargs["logprobs"] == 1


def test_abort_mid_stream_ends_with_abort(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(text=f"t{i}", token_ids=[i])] for i in range(5, 50)])
    client = _client(tmp_path)

    async def main() -> list[GenerationDelta]:
        await client.start()
        deltas = []
        async for delta in client.generate(await client.prepare(_request("r9"))):
            deltas.append(delta)
            if len(deltas) == 2:
                await client.abort("r9")
        assert client.stats().num_running == 0
        await client.shutdown(0)
        return deltas

    deltas = asyncio.run(main())
    assert len(deltas) == 3 and deltas[-1].finish_reason == FinishReason.ABORT
    assert len(fake_trtllm.calls("RequestOutput.abort")) == 1


def test_abandoning_the_stream_aborts_the_request(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(text=f"t{i}", token_ids=[i])] for i in range(5, 50)])
    client = _client(tmp_path)

    async def main() -> int:
        await client.start()
        stream = client.generate(await client.prepare(_request("r2")))
        await stream.__anext__()
        running = client.stats().num_running
        await stream.aclose()  # what the server does when the client disconnects
        assert client.stats().num_running == 0
        await client.shutdown(0)
        return running

    assert asyncio.run(main()) == 1
    assert len(fake_trtllm.calls("RequestOutput.abort")) == 1


def test_a_request_error_fails_only_that_request(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from tensorrt_llm.llmapi import RequestError

    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(text="a", token_ids=[5])], RequestError("out of KV blocks")])
    client = _client(tmp_path)

    async def main() -> tuple[list[GenerationDelta], list[GenerationDelta]]:
        await client.start()
        failed = await _collect(client, _request("bad"))
        fake_trtllm.SCRIPT = fake_trtllm.default_script
        ok = await _collect(client, _request("good"))
        assert client.is_healthy()
        await client.shutdown(0)
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].finish_reason == FinishReason.ERROR
    assert failed[-1].error == "TensorRT-LLM failed the request: out of KV blocks"
    assert ok[-1].finish_reason == FinishReason.LENGTH


def test_a_fatal_error_mid_stream_marks_the_engine_dead(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """Probe EE #2. Anything but a RequestError from the stream is a "serious error" after which TensorRT-LLM's
    executor shuts itself down (`_handle_background_error`): the request is a TrtLlmEngineDeadError (a 503), health
    turns red at once (it stayed green until the next submission), and later requests are refused."""
    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(token_ids=[5])], RuntimeError("Executor worker process died (MPI abort)")])
    client = _client(tmp_path)

    async def main() -> list[GenerationDelta]:
        await client.start()
        deltas: list[GenerationDelta] = []
        with pytest.raises(TrtLlmEngineDeadError, match="MPI abort"):
            async for delta in client.generate(await client.prepare(_request())):
                deltas.append(delta)
        assert not client.is_healthy()
        assert "MPI abort" in (client.failure() or "")
        assert client.stats().num_running == 0
        with pytest.raises(TrtLlmEngineDeadError, match="MPI abort"):
            await _collect(client, _request("next"))
        return deltas

    deltas = asyncio.run(main())
    assert [d.token_ids for d in deltas] == [[5]]
    assert fake_trtllm.names().count("LLM.executor_shutdown") == 1  # what the real executor does
    assert fake_trtllm.calls("RequestOutput.abort") == []  # a dead executor has no requests to abort


def test_a_request_error_fails_only_its_choice(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """Each choice is its own TensorRT-LLM request: a RequestError ends that choice with an error, the other goes on."""
    from tensorrt_llm.executor import RequestError

    update = fake_trtllm.Update
    _script_choices(
        fake_trtllm,
        [[update(token_ids=[5])], RequestError("out of KV blocks")],
        [[update(token_ids=[6])], [update(token_ids=[8], finish_reason="length")]],
    )
    client = _client(tmp_path)
    deltas = _run(client, _request(n=2, temperature=1.0))
    finishes = {d.index: (d.finish_reason, d.error) for d in deltas if d.finish_reason is not None}
    assert finishes == {
        0: (FinishReason.ERROR, "TensorRT-LLM failed the request: out of KV blocks"),
        1: (FinishReason.LENGTH, None),
    }


def test_the_end_id_tensorrt_llm_leaves_out_is_put_back(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """Probe EE #3. TensorRT-LLM's executor ends on `end_id` (2 here) without putting it in the ids (#2190), while
    the other EOS ids, sent as stop ids, stay in them: the end token is put back, so a reply counts the same whichever
    EOS ended it, as on the torch engine. TensorRT-LLM returns no logprob for it: its entry is missing."""
    from tensorrt_llm.executor import Logprob

    update = fake_trtllm.Update

    def ended_by(last: int, stop_reason: int | None, **sampling: Any) -> list[GenerationDelta]:
        entries = [{token: Logprob(-0.5, 1)} for token in (5, 6, last)]
        _script(
            fake_trtllm,
            [
                [update(token_ids=[5], logprobs=entries[:1])],
                [update(token_ids=[6, last], logprobs=entries[1:], finish_reason="stop", stop_reason=stop_reason)],
            ],
        )
        return _run(_client(tmp_path), _request(**sampling))

    end_id = ended_by(2, None)
    other_eos = ended_by(3, 3)
    assert [d.token_ids for d in end_id] == [[5], [6, 2]]
    assert [d.token_ids for d in other_eos] == [[5], [6, 3]]
    assert end_id[-1].num_output_tokens == other_eos[-1].num_output_tokens == 3
    assert (end_id[-1].finish_reason, end_id[-1].stop_reason) == (FinishReason.STOP, None)
    asked = ended_by(2, None, stop_token_ids=(2,))  # the end id asked for as a stop id: reported as the reason
    assert (asked[-1].token_ids, asked[-1].stop_reason) == ([6, 2], 2)
    with_logprobs = ended_by(2, None, logprobs=0, temperature=0.0)
    assert [entry.token_id for entry in with_logprobs[-1].logprobs or []] == [6]  # none for the end token
    assert with_logprobs[-1].token_ids == [6, 2] and with_logprobs[-1].finish_reason == FinishReason.STOP


def test_an_end_id_already_in_the_ids_is_not_added_twice() -> None:
    """Whether TensorRT-LLM's PyTorch backend (v2) keeps the end token was not read in its source: if it does, it is
    the last id and stays there once; a length finish, or ignore_eos, adds nothing."""
    from types import SimpleNamespace

    from engine_builder.serve.backends.trtllm.outputs import RequestStream
    from engine_builder.serve.backends.trtllm.sampling import TrtSampling

    def last_delta(token_ids: list[int], finish: str, **sampling: Any) -> GenerationDelta | None:
        stream = RequestStream(_request(**sampling), TrtSampling(end_id=2))
        completion = SimpleNamespace(token_ids=token_ids, finish_reason=finish, stop_reason=None, logprobs=[])
        return stream.update(0, SimpleNamespace(outputs=[completion]))

    kept = last_delta([5, 2], "stop")
    assert kept is not None and (kept.token_ids, kept.num_output_tokens) == ([5, 2], 2)
    length = last_delta([5, 6], "length")
    assert length is not None and length.token_ids == [5, 6]
    ignoring = last_delta([5, 6], "stop", ignore_eos=True)
    assert ignoring is not None and ignoring.token_ids == [5, 6]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "ended the stream without a finish reason"),
        ([["timeout"]], "timed the request out"),
        ([["exploded"]], "unknown reason 'exploded'"),
    ],
)
def test_odd_endings_become_error_deltas(
    tmp_path: Path, fake_trtllm: ModuleType, steps: list[Any], message: str
) -> None:
    update = fake_trtllm.Update
    _script(
        fake_trtllm,
        [[update(text="", token_ids=[], finish_reason=reason) for reason in step] for step in steps],
    )
    deltas = _run(_client(tmp_path), _request())
    assert deltas[-1].finish_reason == FinishReason.ERROR
    assert message in (deltas[-1].error or "")


def test_unsupported_sampling_is_refused_before_reaching_tensorrt_llm(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    write_engine_config(tmp_path)  # the TensorRT backend loads a saved engine
    client = _client(tmp_path, backend=LlmBackend.TENSORRT, lookahead=LookaheadSpec(4, 3, 4))

    async def main() -> None:
        await client.start()
        with pytest.raises(GuideError, match="structural_tag"):
            await client.prepare(_request(guide=Guide(GuideKind.STRUCTURAL_TAG, "{}")))
        with pytest.raises(UnsupportedRequestError, match="n=2 with top_k=1") as refused:  # greedy for TensorRT-LLM
            await client.prepare(_request(n=2, temperature=0.7, top_k=1))
        assert refused.value.param == "n"
        # TensorRT-LLM's own SamplingParams check (top_p in [0, 1]; the server's request checks refuse 1.5 first)
        # also refuses at admission, before anything streams (top_k=1: a lookahead engine takes greedy requests only)
        with pytest.raises(UnsupportedRequestError, match="refused the sampling parameters") as refused:
            await client.prepare(_request(temperature=1.0, top_k=1, top_p=1.5))
        assert refused.value.param is None
        await client.shutdown(0)

    asyncio.run(main())
    assert fake_trtllm.calls("_TrtLLM.generate_async") == []


def test_a_lookahead_engine_takes_greedy_unguided_requests_only(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """TensorRT-LLM's lookahead layer decodes top-1 and its guided decoder follows one token per step (probe KE):
    sampled and guided requests are refused at admission, by name; a greedy one is served."""
    write_engine_config(tmp_path)
    client = _client(tmp_path, backend=LlmBackend.TENSORRT, lookahead=LookaheadSpec(4, 3, 4))
    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(text="", token_ids=[5, 6, 7], finish_reason="length")]])

    async def main() -> list[GenerationDelta]:
        await client.start()
        with pytest.raises(UnsupportedRequestError, match="lookahead") as refused:
            await client.prepare(_request(n=2, temperature=0.9, top_p=0.8, seed=7))
        assert refused.value.param == "temperature"
        with pytest.raises(GuideError, match="lookahead") as guide_refused:
            await client.prepare(_request(temperature=0.0, guide=Guide(GuideKind.JSON_SCHEMA, '{"type": "object"}')))
        assert guide_refused.value.param == "response_format"
        assert fake_trtllm.calls("_TrtLLM.generate_async") == []
        try:
            return await _collect(client, _request(temperature=0.0, max_tokens=3))
        finally:
            await client.shutdown(0)

    deltas = asyncio.run(main())
    assert deltas[-1].token_ids == [5, 6, 7] and deltas[-1].finish_reason == FinishReason.LENGTH
    assert len(fake_trtllm.calls("_TrtLLM.generate_async")) == 1
    assert fake_trtllm.calls("SamplingParams")[-1].kwargs["top_k"] == 1


def test_prepare_builds_tensorrt_llms_sampling_params_that_generate_submits(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """TensorRT-LLM's SamplingParams validation runs at admission (probe AS #2: it ran in generate, so a stream had
    already answered 200 when it refused); generate submits the object built there."""
    client = _client(tmp_path)

    async def main() -> None:
        await client.start()
        fake_trtllm.CALLS.clear()
        prepared = await client.prepare(_request(guide=Guide(GuideKind.REGEX, "a+")))
        assert fake_trtllm.names() == ["GuidedDecodingParams", "SamplingParams"]
        async for _ in client.generate(prepared):
            pass
        submitted = fake_trtllm.calls("LLM.generate_async")[0].kwargs["sampling_params"]
        assert [submitted] == prepared.compiled.sampling_params
        assert submitted is prepared.compiled.sampling_params[0]
        assert fake_trtllm.names().count("SamplingParams") == 1
        await client.shutdown(0)

    asyncio.run(main())


def test_a_prompt_over_max_num_tokens_without_chunked_prefill_is_refused_at_admission(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """TensorRT-LLM's PyTorch backend refuses it at submission (`_check_arguments`), its TensorRT engine fails it in
    the executor (the longest input is then min(max_seq_len - 1, max_num_tokens): probe IE #2); the client refuses it
    first on both, so a stream gets a 400 rather than an error event."""
    client = _client(tmp_path, max_num_tokens=2, enable_chunked_prefill=False)
    with pytest.raises(UnsupportedRequestError, match="more than max_num_tokens 2") as refused:
        asyncio.run(client.prepare(_request()))  # a 3-token prompt
    assert refused.value.code == "request_too_large"
    chunked = _client(tmp_path, max_num_tokens=2, enable_chunked_prefill=True)
    asyncio.run(chunked.prepare(_request()))
    v1 = _client(tmp_path, backend=LlmBackend.TENSORRT, max_num_tokens=2)
    with pytest.raises(UnsupportedRequestError, match="more than max_num_tokens 2.*enable_chunked_context: true"):
        asyncio.run(v1.prepare(_request(seed=1)))
    v1_chunked = _client(tmp_path, backend=LlmBackend.TENSORRT, max_num_tokens=2, enable_chunked_prefill=True)
    asyncio.run(v1_chunked.prepare(_request(seed=1)))


def test_guided_request_reaches_tensorrt_llm_as_guided_decoding_params(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    client = _client(tmp_path)
    _run(client, _request(guide=Guide(GuideKind.JSON_SCHEMA, '{"type": "object"}')))
    params = fake_trtllm.calls("LLM.generate_async")[0].kwargs["sampling_params"]
    assert params.guided_decoding.json == '{"type": "object"}'


def test_lifecycle_warmup_health_and_shutdown(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    client = TrtLlmEngineClient(LlmSpec(backend=LlmBackend.PYTORCH, model=str(tmp_path)), MODEL_INFO)
    assert not client.is_healthy()

    async def main() -> None:
        await client.start()
        assert client.is_healthy()
        assert client.model_info == dataclasses.replace(MODEL_INFO, holds_marked_calls=False)  # no TOOL_CALLS guides
        await client.shutdown(0)
        assert not client.is_healthy()
        with pytest.raises(TrtLlmEngineDeadError, match="not running"):
            await _collect(client, _request())

    asyncio.run(main())
    names = [name for name in fake_trtllm.names() if name.startswith("LLM")]  # the LLM's calls (not SamplingParams)
    assert names[0] == "LLM" and names[-1] == "LLM.shutdown"
    warmup = fake_trtllm.calls("SamplingParams")[0].kwargs
    assert warmup["max_tokens"] == 2 and warmup["top_k"] == 1 and warmup["ignore_eos"] is True


def test_an_executor_that_stopped_marks_the_engine_dead(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    client = _client(tmp_path)

    async def main() -> None:
        await client.start()
        client._llm._is_shutdown = True  # the executor went away under us
        with pytest.raises(TrtLlmEngineDeadError, match="LLM is shutting down"):
            await _collect(client, _request())
        assert not client.is_healthy()

    asyncio.run(main())


def test_a_torch_built_v1_engine_is_refused_with_rebuild_advice(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    from engine_builder.build.config import load_config
    from engine_builder.common.artifact import MODEL_DIR, load_engine_dir
    from tests.fakes.trtllm_helpers import CONFIGS_DIR, finish_engine_dir, write_model_dir

    loaded = load_config(CONFIGS_DIR / "llama-3.2-3b-l4.yaml")
    write_model_dir(tmp_path / MODEL_DIR)
    finish_engine_dir(tmp_path, loaded, {"quantization": "no_quant", "kv_cache_dtype": "auto"})
    with pytest.raises(FileNotFoundError, match="rebuild it with --backend trtllm"):
        TrtLlmEngineClient.from_engine_dir(load_engine_dir(tmp_path))


def test_a_guided_request_to_an_llm_without_guided_decoding_is_refused_at_admission(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """`patch_kwargs.guided_decoding_backend: null` overrides the build's xgrammar: TensorRT-LLM then guides nothing."""
    client = _client(tmp_path, extra={"guided_decoding_backend": None})
    with pytest.raises(GuideError, match="guided_decoding_backend is null") as refused:
        asyncio.run(client.prepare(_request(guide=Guide(GuideKind.REGEX, "a+"))))
    assert refused.value.param == "response_format"
    assert fake_trtllm.calls("SamplingParams") == []


def test_the_llm_s_guided_decoding_backend_decides_which_guides_are_served(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """v2's `patch_kwargs.guided_decoding_backend: llguidance` (in `extra`) is what the LLM gets (probe AS #4): its
    tokenizer is kept, guides llguidance cannot honour are refused at admission by field, the others are served."""
    client = _client(tmp_path, extra={"guided_decoding_backend": "llguidance"})

    async def main() -> None:
        await client.start()
        for guide in (Guide(GuideKind.STRUCTURAL_TAG, '{"type": "structural_tag"}'), Guide(GuideKind.GRAMMAR, 'r ::= "a"')):
            with pytest.raises(GuideError, match="guided_decoding_backend llguidance") as refused:
                await client.prepare(_request(guide=guide))
            assert refused.value.param == "response_format"
        deltas = await _collect(client, _request(guide=Guide(GuideKind.JSON_SCHEMA, '{"type": "object"}')))
        assert deltas[-1].finish_reason == FinishReason.LENGTH
        await client.shutdown(0)

    asyncio.run(main())
    llm = fake_trtllm.calls("LLM")[0].kwargs
    assert llm["guided_decoding_backend"] == "llguidance" and "skip_tokenizer_init" not in llm
    assert [call.kwargs for call in fake_trtllm.calls("GrammarMatcherFactory.create")] == [
        {"backend": "llguidance", "guide_type": "JSON_SCHEMA", "compile": "grammar_from_json_schema"}
    ]


def test_prepare_refuses_a_guide_the_backend_cannot_map(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    client = _client(tmp_path, backend=LlmBackend.TENSORRT)

    async def main() -> None:
        prepared = await client.prepare(_request(guide=Guide(GuideKind.JSON_SCHEMA, "{}")))
        assert prepared.compiled.guide == {"json": "{}"}  # translated once, handed to generate as is
        with pytest.raises(GuideError, match="PyTorch backend") as refused:
            await client.prepare(_request(guide=Guide(GuideKind.STRUCTURAL_TAG, "{}")))
        assert refused.value.param == "response_format"
        with pytest.raises(GuideError, match="strict") as refused:  # strict tools in auto mode: not mapped
            await client.prepare(_request(guide=Guide(GuideKind.TOOL_CALLS, "{}")))
        assert refused.value.param == "tools"

    asyncio.run(main())


def test_a_request_error_at_submission_fails_that_request_only(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """TensorRT-LLM's RequestError is a RuntimeError: it must not mark the engine dead (issue 27, point 2)."""
    from tensorrt_llm.executor import RequestError

    client = _client(tmp_path)

    async def main() -> None:
        await client.start()
        submit = client._llm.generate_async

        def refuse(*args: object, **kwargs: object) -> object:
            raise RequestError("the prompt is longer than max_num_tokens with chunked prefill off")

        client._llm.generate_async = refuse
        with pytest.raises(UnsupportedRequestError, match="longer than max_num_tokens") as refused:
            await _collect(client, _request())
        assert refused.value.param is None and client.is_healthy()
        client._llm.generate_async = submit  # the next request is served
        assert await _collect(client, _request())
        await client.shutdown(0)

    asyncio.run(main())


def test_fields_a_tensorrt_engine_cannot_honour_are_refused_at_admission(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """prepare (called before any SSE starts) refuses logprobs on v1 and prompt_logprobs on both, by name."""
    v1 = _client(tmp_path, backend=LlmBackend.TENSORRT)
    with pytest.raises(UnsupportedRequestError, match="gather_generation_logits") as refused:
        asyncio.run(v1.prepare(_request(logprobs=1)))
    assert refused.value.param == "logprobs"
    asyncio.run(v1.prepare(_request()))  # a plain request passes
    v2 = _client(tmp_path)
    asyncio.run(v2.prepare(_request(logprobs=1, temperature=0.0)))
    with pytest.raises(UnsupportedRequestError) as refused:
        asyncio.run(v2.prepare(_request(prompt_logprobs=1)))
    assert refused.value.param == "prompt_logprobs"


def test_finish_choice_drops_the_choice_and_aborts_its_request(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """A stop string matched in the server ends the choice: its TensorRT-LLM request (each choice has its own) is
    aborted at once and what it still sends is dropped; with n = 2 the other choice goes on to its own finish."""
    update = fake_trtllm.Update
    _script(fake_trtllm, [[update(token_ids=[i])] for i in range(5, 50)])
    client = _client(tmp_path)

    async def one_choice() -> list[GenerationDelta]:
        deltas = []
        async for delta in client.generate(await client.prepare(_request("one"))):
            deltas.append(delta)
            if len(deltas) == 2:
                await client.finish_choice("one", 0)
        return deltas

    async def two_choices() -> list[GenerationDelta]:
        _script_choices(
            fake_trtllm,
            [[update(token_ids=[i])] for i in range(5, 10)],
            [[update(token_ids=[i + 100])] for i in range(5, 10)] + [[update(token_ids=[200], finish_reason="length")]],
        )
        deltas = []
        async for delta in client.generate(await client.prepare(_request("two", n=2, temperature=1.0))):
            deltas.append(delta)
            if delta.index == 0:
                await client.finish_choice("two", 0)
        return deltas

    async def main() -> tuple[list[GenerationDelta], list[Any], list[GenerationDelta], list[Any]]:
        await client.start()
        first = await one_choice()
        first_aborts = fake_trtllm.calls("RequestOutput.abort")
        fake_trtllm.CALLS.clear()
        second = await two_choices()
        second_aborts = fake_trtllm.calls("RequestOutput.abort")
        await client.shutdown(0)
        return first, first_aborts, second, second_aborts

    first, first_aborts, second, second_aborts = asyncio.run(main())
    assert [d.token_ids for d in first] == [[5], [6]] and len(first_aborts) == 1
    assert [d.token_ids for d in second if d.index == 0] == [[5]]  # nothing after the choice was ended
    assert [d.token_ids for d in second if d.index == 1][-1] == [200]
    assert second[-1].finish_reason == FinishReason.LENGTH
    # choice 0's own request, aborted once when the server ended it; choice 1's was left to finish
    assert len(second_aborts) == 1


def test_presence_and_frequency_penalties_count_the_output_only(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """TensorRT-LLM counts prompt tokens for these two penalties unless `prompt_ignore_length` skips them; the torch
    engine (like vLLM) counts only the output, so the client skips the whole prompt."""
    write_engine_config(tmp_path)
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(presence_penalty=0.5))
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(frequency_penalty=-0.3))
    _run(_client(tmp_path, backend=LlmBackend.TENSORRT), _request(repetition_penalty=1.2))
    sent = [call.kwargs for call in fake_trtllm.calls("SamplingParams")]
    assert [kwargs.get("prompt_ignore_length") for kwargs in sent] == [3, 3, None]  # the prompt is (11, 12, 13)


def test_no_request_the_v2_client_accepts_reaches_torch_sampler_with_a_field_it_ignores(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """Everything the PyTorch-backend client lets through is applied by TorchSampler (the fake records what it would
    ignore); what it would ignore is refused by name before TensorRT-LLM sees it."""
    accepted = [
        _request(),
        _request(temperature=0.0, seed=7, min_p=0.1, logprobs=2),  # greedy: seed and min_p change nothing
        _request(logit_bias={5: -float("inf"), 6: 1.5}),  # a ban goes as an embedding_bias entry
        _request(temperature=0.5, top_p=0.9, top_k=20, stop_token_ids=(9,)),
    ]
    refused = {
        "repetition_penalty": _request(repetition_penalty=1.2),
        "presence_penalty": _request(presence_penalty=0.5),
        "frequency_penalty": _request(frequency_penalty=0.5),
        "min_p": _request(min_p=0.1),
        "seed": _request(seed=7),
        "min_tokens": _request(min_tokens=2),
        "logprobs": _request(logprobs=1),
    }
    client = _client(tmp_path)

    async def main() -> None:
        await client.start()
        for request in accepted:
            await _collect(client, request)
        for field, request in refused.items():
            with pytest.raises(UnsupportedRequestError) as error:
                await client.prepare(request)
            assert error.value.param == field
        await client.shutdown(0)

    asyncio.run(main())
    assert len(fake_trtllm.calls("LLM.generate_async")) == len(accepted)
    assert fake_trtllm.calls("TorchSampler.ignored") == []
    banned = fake_trtllm.calls("LLM.generate_async")[2].kwargs["sampling_params"]
    assert banned.bad_token_ids is None and banned.embedding_bias[5] == -float("inf")
