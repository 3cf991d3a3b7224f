"""The fake `tensorrt_llm` refuses what TensorRT-LLM 1.2 refuses, in its words (sources in
tests/fakes/tensorrt_llm/README.md). If one of these starts passing the wrong way, the fake went lax and the
other trtllm tests prove less."""

from pathlib import Path
from types import ModuleType

import pytest

from tests.fakes.trtllm_helpers import write_engine_config


def test_config_models_forbid_unknown_fields_and_accept_the_real_ones(fake_trtllm: ModuleType) -> None:
    from tensorrt_llm.llmapi import KvCacheConfig, SchedulerConfig

    KvCacheConfig(max_util_for_resume=0.9, attention_dp_events_gather_period_ms=10)
    SchedulerConfig(waiting_queue_policy="fcfs", dynamic_batch_config={"enable_batch_size_tuning": False})
    with pytest.raises(ValueError, match=r"KvCacheConfig\nfree_gpu_memory_ratio\n  Extra inputs"):
        KvCacheConfig(free_gpu_memory_ratio=0.5)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        KvCacheConfig(free_gpu_memory_fraction=1.5)


def test_plugin_config_takes_real_plugin_names_only(fake_trtllm: ModuleType) -> None:
    from tensorrt_llm.llmapi import BuildConfig

    build_config = BuildConfig(max_input_len=8192, max_seq_len=4096)  # the build clips it; no error here
    build_config.plugin_config.fuse_fp4_quant = True
    with pytest.raises(ValueError, match='no field "use_fp8_fmha"'):
        build_config.plugin_config.use_fp8_fmha = True


def test_pytorch_llm_refuses_tensorrt_only_arguments(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from tensorrt_llm import LLM

    with pytest.raises(ValueError, match=r"specific to TensorRT backend .*\['build_config'\]"):
        LLM(model=str(tmp_path), build_config=None)
    with pytest.raises(ValueError, match=r"TorchLlmArgs\ncuda_graph_config.padding\n  Extra inputs"):
        LLM(model=str(tmp_path), cuda_graph_config={"max_batch_size": 8, "padding": True})
    LLM(model=str(tmp_path), cuda_graph_config={"enable_padding": True}, moe_config={"backend": "CUTLASS"})


def test_sampling_params_ranges_and_the_greedy_rule(fake_trtllm: ModuleType) -> None:
    from tensorrt_llm.llmapi import SamplingParams

    with pytest.raises(ValueError, match="require 0 <= top_p <= 1"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="require temperature >= 0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="Greedy decoding in the LLM API does not allow multiple returns"):
        SamplingParams(n=2, temperature=0.0)  # temperature 0 alone is greedy in 1.2
    assert SamplingParams(n=2, temperature=0.7).best_of == 2


def test_tensorrt_engine_checks_at_submission(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import SamplingParams

    engine = write_engine_config(tmp_path / "engine", max_seq_len=64, max_batch_size=4)
    llm = LLM(model=str(engine), max_batch_size=16)  # clamped to the engine's 4
    with pytest.raises(ValueError, match=r"logprobs=1` requires `gather_generation_logits=True"):
        llm.generate_async([1, 2], SamplingParams(max_tokens=4, logprobs=1))
    with pytest.raises(ValueError, match=r"sampling_params.n \(8\) cannot exceed max_batch_size \(4\)"):
        llm.generate_async([1, 2], SamplingParams(max_tokens=4, n=8, temperature=1.0))
    with pytest.raises(ValueError, match=r"should not exceed max_seq_len \(64\)"):
        llm.generate_async(list(range(60)), SamplingParams(max_tokens=8))
    chunked = LLM(model=str(engine), enable_chunked_prefill=True)
    chunked.generate_async(list(range(60)), SamplingParams(max_tokens=8))  # max_tokens is capped, not refused


def test_tensorrt_llm_needs_a_config_json_and_a_matching_tp(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from tensorrt_llm._tensorrt_engine import LLM

    with pytest.raises(ValueError, match="no config.json exists in"):
        LLM(model=str(tmp_path))
    engine = write_engine_config(tmp_path / "engine", tp=2)
    with pytest.raises(ValueError, match="tp_size 4 is not consistent with the engine's tp_size 2"):
        LLM(model=str(engine), tensor_parallel_size=4)
    with pytest.raises(ValueError, match="Unsupported guided decoding backend llguidance"):
        LLM(model=str(engine), guided_decoding_backend="llguidance")


def test_pytorch_prompt_over_max_num_tokens_is_a_request_error(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from tensorrt_llm import LLM
    from tensorrt_llm.executor import RequestError
    from tensorrt_llm.llmapi import SamplingParams

    llm = LLM(model=str(tmp_path), max_num_tokens=16, max_seq_len=64)
    with pytest.raises(RequestError, match=r"should not exceed max_num_tokens \(16\)"):
        llm.generate_async(list(range(20)), SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="must be greater than 0"):
        LLM(model=str(tmp_path), max_seq_len=8, enable_chunked_prefill=True).generate_async(
            list(range(8)), SamplingParams(max_tokens=4)
        )


def test_without_a_tokenizer_requests_need_an_end_id_and_get_no_text(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """skip_tokenizer_init: no end_id is refused, `stop` strings are never encoded (refused when the worker reads
    them), guided decoding cannot be configured; with detokenize=False there is no text either way."""
    import asyncio

    from tensorrt_llm import LLM
    from tensorrt_llm.executor import RequestError
    from tensorrt_llm.llmapi import SamplingParams

    with pytest.raises(ValueError, match="needs the tokenizer"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, guided_decoding_backend="xgrammar")
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="tokenizer is required to reset end_id"):
        llm.generate_async([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="is not processed by tokenizer"):
        llm.generate_async([1, 2], SamplingParams(max_tokens=2, end_id=2, stop=["x"]))
    update = fake_trtllm.Update
    step = update(text="x", token_ids=[5, 2], finish_reason="stop", stop_reason=2, trim_token_ids=1)
    fake_trtllm.SCRIPT = lambda prompt, params: [[step]]

    async def final(llm: LLM, params: SamplingParams) -> tuple[str, list[int]]:
        output = (await llm.generate_async([1, 2], params, streaming=True).aresult()).outputs[0]
        return output.text, output.token_ids

    ids_only = SamplingParams(max_tokens=2, end_id=2, detokenize=False, stop_token_ids=[2])
    assert asyncio.run(final(llm, ids_only)) == ("", [5])  # the stop token cut off: include_stop_str_in_output off
    kept = SamplingParams(max_tokens=2, end_id=2, stop_token_ids=[2], include_stop_str_in_output=True)
    assert asyncio.run(final(llm, kept)) == ("", [5, 2])  # no tokenizer: no text even with detokenize
    with_tokenizer = LLM(model=str(tmp_path))
    assert asyncio.run(final(with_tokenizer, SamplingParams(max_tokens=2, stop_token_ids=[2]))) == ("x", [5])


def test_torch_sampler_records_the_fields_it_would_ignore(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """TensorRT-LLM 1.2's TorchSampler accepts penalties, min_p, a seed and bans and does nothing with them: the fake
    refuses nothing either, but records them, so tests can prove the server never sends them there."""
    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi import SamplingParams

    llm = LLM(model=str(tmp_path), max_seq_len=64)
    neutral = SamplingParams(max_tokens=2, end_id=2, repetition_penalty=1.0, presence_penalty=0.0, min_p=0.0)
    llm.generate_async([1, 2], sampling_params=neutral)
    assert fake_trtllm.calls("TorchSampler.ignored") == []
    params = SamplingParams(
        max_tokens=2, end_id=2, presence_penalty=0.5, prompt_ignore_length=2, seed=7, bad_token_ids=[5]
    )
    llm.generate_async([1, 2], sampling_params=params)
    assert fake_trtllm.calls("TorchSampler.ignored")[0].kwargs == {
        "presence_penalty": 0.5,
        "prompt_ignore_length": 2,
        "seed": 7,
        "bad_token_ids": [5],
    }
    LLM(model=str(tmp_path), max_seq_len=64, sampler_type="TRTLLMSampler").generate_async(
        [1, 2], sampling_params=params
    )
    assert len(fake_trtllm.calls("TorchSampler.ignored")) == 1, "the C++ sampler applies them"


def test_with_n_above_one_only_the_request_s_final_response_carries_a_finish_reason(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """TensorRT-LLM's `_handle_sequence` sets finish_reason only `if self._done` (the response's `is_final`, true once
    every sequence of the request is final, `LlmRequest::createResult`), for that response's sequence only: the
    sequence that ends first keeps None for good (probe EE #1)."""
    import asyncio

    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi import SamplingParams

    update = fake_trtllm.Update
    fake_trtllm.SCRIPT = lambda prompt, params: [
        [update(index=0, token_ids=[5]), update(index=1, token_ids=[6])],
        [update(index=0, token_ids=[7], finish_reason="length"), update(index=1, token_ids=[8])],
        [update(index=1, token_ids=[9], finish_reason="stop", stop_reason=9)],
    ]
    params = SamplingParams(max_tokens=3, end_id=2, n=2, temperature=1.0, stop_token_ids=[9])

    async def steps() -> list[tuple[bool, list[str | None]]]:
        result = LLM(model=str(tmp_path)).generate_async([1, 2], params, streaming=True)
        return [(output.finished, [o.finish_reason for o in output.outputs]) async for output in result]

    assert asyncio.run(steps()) == [(False, [None, None]), (False, [None, None]), (True, [None, "stop"])]


def test_the_executor_leaves_end_id_out_of_the_output(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """"The generation will stop at the endId, but not include it in the output" (NVIDIA/TensorRT-LLM#2190), its
    logprob with it (`_handle_sequence` keeps the two aligned); a stop token id stays with include_stop_str_in_output
    (probe EE #3)."""
    import asyncio

    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi import SamplingParams

    update = fake_trtllm.Update
    llm = LLM(model=str(tmp_path))

    async def final(last: int, stop_reason: int | None) -> tuple[list[int], int, int | None]:
        step = update(token_ids=[5, last], logprobs=[-0.1, -0.2], finish_reason="stop", stop_reason=stop_reason)
        fake_trtllm.SCRIPT = lambda prompt, params: [[step]]
        params = SamplingParams(max_tokens=4, end_id=2, stop_token_ids=[3], include_stop_str_in_output=True)
        output = (await llm.generate_async([1], params, streaming=True).aresult()).outputs[0]
        return output.token_ids, len(output.logprobs), output.stop_reason

    assert asyncio.run(final(2, None)) == ([5], 1, None)
    assert asyncio.run(final(3, 3)) == ([5, 3], 2, 3)


def test_an_error_other_than_request_error_shuts_the_executor_down(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """`GenerationExecutor._handle_background_error`: a RequestError fails one request; any other exception is a
    "serious error": the executor shuts down, then raises it through the result (probe EE #2)."""
    import asyncio

    from tensorrt_llm import LLM
    from tensorrt_llm.executor import RequestError
    from tensorrt_llm.llmapi import SamplingParams

    llm = LLM(model=str(tmp_path))
    params = SamplingParams(max_tokens=4, end_id=2)

    async def drain(error: BaseException) -> None:
        fake_trtllm.SCRIPT = lambda prompt, params: [error]
        with pytest.raises(type(error)):
            await llm.generate_async([1], params, streaming=True).aresult()

    asyncio.run(drain(RequestError("one request")))
    llm.generate_async([1], params, streaming=True)  # still accepts requests
    asyncio.run(drain(RuntimeError("worker died")))
    with pytest.raises(RuntimeError, match="LLM is shutting down"):
        llm.generate_async([1], params, streaming=True)
