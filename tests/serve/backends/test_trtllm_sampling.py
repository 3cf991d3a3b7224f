"""Our SamplingParams -> TensorRT-LLM SamplingParams kwargs: every field mapped or refused by name.

The kwargs are also fed to the fake's SamplingParams, whose field names are TensorRT-LLM 1.2's; this
checks names, not TensorRT-LLM's sampling behaviour (verified against the fake only).
"""

import dataclasses
import itertools
import json
import math
from types import ModuleType
from typing import Any

import pytest

from engine_builder.common.trtllm import adapter
from engine_builder.common.types import Guide, GuideKind, ReasoningPrefix, SamplingParams
from engine_builder.serve.backends.trtllm.sampling import (
    FIELD_MAPPINGS,
    EngineTraits,
    UnsupportedRequestError,
    to_trtllm,
)
from engine_builder.serve.server.guides import guide_from_response_format
from engine_builder.serve.server.protocol import ChatCompletionRequest, ResponseFormat
from engine_builder.serve.server.tools import plan_tools

PYTORCH = EngineTraits(is_pytorch_backend=True, has_lookahead=False, vocab_size=8, eos_token_ids=(2, 3))
TENSORRT = EngineTraits(is_pytorch_backend=False, has_lookahead=False, vocab_size=8, eos_token_ids=(2, 3))
TENSORRT_LOOKAHEAD = EngineTraits(
    is_pytorch_backend=False, has_lookahead=True, vocab_size=8, eos_token_ids=(2,)
)
LLGUIDANCE = dataclasses.replace(PYTORCH, guided_decoding_backend="llguidance")
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def _tool_guide(tool_choice: object) -> Guide:
    """The guide the server builds for a forced tool call (tools.plan_tools)."""
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": tool_choice}
    )
    guide = plan_tools(body, None, True)[2]
    assert guide is not None
    return guide


def _server_guides() -> dict[str, Guide]:
    """The JSON guides as the server builds them (compact whitespace: `any_whitespace=False`), not Guide's defaults."""
    guides = {
        "json_schema": guide_from_response_format(
            ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
        ),
        "json_object": guide_from_response_format(ResponseFormat.model_validate({"type": "json_object"})),
        "tool_choice required": _tool_guide("required"),
        "tool_choice named": _tool_guide({"type": "function", "function": {"name": "get"}}),
    }
    assert all(guide is not None and not guide.any_whitespace for guide in guides.values())
    return {name: guide for name, guide in guides.items() if guide is not None}


def test_every_sampling_field_has_a_mapping() -> None:
    assert set(FIELD_MAPPINGS) == {item.name for item in dataclasses.fields(SamplingParams)}


def test_a_field_without_mapping_refuses_the_request() -> None:
    Extended = dataclasses.make_dataclass(
        "Extended", [("typical_p", float, 1.0)], bases=(SamplingParams,), frozen=True
    )
    with pytest.raises(UnsupportedRequestError, match="typical_p") as refused:
        to_trtllm(Extended(max_tokens=4), PYTORCH)
    assert refused.value.param == "typical_p"


def test_sampling_request_maps_field_for_field() -> None:
    """On the TensorRT engine (v1), whose C++ sampler applies every field."""
    params = SamplingParams(
        max_tokens=16,
        temperature=0.7,
        top_p=0.9,
        top_k=4,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=0.3,
        seed=7,
        stop=("###",),
        stop_token_ids=(5,),
        include_stop_str_in_output=False,
        skip_special_tokens=False,
        n=2,
    )
    translated = to_trtllm(params, TENSORRT)
    assert translated.kwargs == {
        "detokenize": False,  # token ids only: the server detokenizes and matches `stop` (not passed)
        "end_id": 2,
        "max_tokens": 16,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 4,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": 0.3,
        "seed": 7,
        "stop_token_ids": [5, 2, 3],
        "include_stop_str_in_output": True,  # stop tokens stay in the ids; the server keeps them out of the text
        "ignore_eos": False,
    }  # no `n`: each choice is its own TensorRT-LLM request, its seed moved on by its index
    assert translated.choice_kwargs(1) == {**translated.kwargs, "seed": 8}
    assert translated.guide is None
    assert translated.added_stop_token_ids == frozenset({2, 3})
    assert translated.end_id == 2


def test_pytorch_backend_passes_only_what_torch_sampler_applies() -> None:
    """TensorRT-LLM 1.2's TorchSampler reads temperature, top_p, top_k (plus embedding_bias); neutral penalties,
    an unset seed and min_p 0 are not passed, and a greedy request may carry a seed or min_p (neither matters)."""
    translated = to_trtllm(SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, top_k=4), PYTORCH)
    assert translated.kwargs == {
        "detokenize": False,
        "end_id": 2,
        "max_tokens": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 4,
        "stop_token_ids": [2, 3],
        "include_stop_str_in_output": True,
        "ignore_eos": False,
    }
    assert translated.choice_kwargs(1) == translated.kwargs  # no seed to move on
    greedy = to_trtllm(SamplingParams(max_tokens=4, temperature=0.0, seed=7, min_p=0.1), PYTORCH)
    assert "seed" not in greedy.kwargs and "min_p" not in greedy.kwargs


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repetition_penalty", 1.1),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
        ("min_p", 0.05),
        ("seed", 7),
        ("min_tokens", 2),
    ],
)
def test_fields_torch_sampler_ignores_are_refused_by_name_on_the_pytorch_backend(field: str, value: Any) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.7, **{field: value})
    with pytest.raises(UnsupportedRequestError, match=rf"{field}.*PyTorch backend") as refused:
        to_trtllm(params, PYTORCH)
    assert refused.value.param == field
    single_eos = dataclasses.replace(TENSORRT, eos_token_ids=(2,))  # min_tokens needs one (see below)
    assert to_trtllm(params, single_eos).kwargs[field] == value  # the TensorRT engine's C++ sampler applies it


def test_pytorch_backend_sends_bans_as_embedding_bias() -> None:
    """TorchSampler ignores bad_token_ids but adds embedding_bias to the logits: a ban is a -inf bias there."""
    params = SamplingParams(max_tokens=1, temperature=0.0, logit_bias={1: 2.5, 6: -math.inf})
    translated = to_trtllm(params, PYTORCH)
    assert "bad_token_ids" not in translated.kwargs
    assert translated.kwargs["embedding_bias"].tolist() == [0.0, 2.5, 0.0, 0.0, 0.0, 0.0, -math.inf, 0.0]


def test_sampled_logprobs_are_refused_on_the_pytorch_backend() -> None:
    """TorchSampler's logprobs are the top-K before sampling: a sampled token outside them would end the stream in
    an error, so logprobs need a greedy request there (whose token is the top one)."""
    for logprobs in (0, 5):
        with pytest.raises(UnsupportedRequestError, match="top_logprobs.*temperature") as refused:
            to_trtllm(SamplingParams(max_tokens=1, temperature=0.8, logprobs=logprobs), PYTORCH)
        assert refused.value.param == "logprobs"
    greedy_by_top_k = SamplingParams(max_tokens=1, temperature=0.8, top_k=1, logprobs=5)
    assert to_trtllm(greedy_by_top_k, PYTORCH).kwargs["logprobs"] == 5


def test_min_tokens_is_refused_where_tensorrt_llm_would_not_hold_back_a_stop_id() -> None:
    """TensorRT-LLM holds back only end_id until min_tokens; the torch engine also every other EOS and stop id."""
    single_eos = dataclasses.replace(TENSORRT, eos_token_ids=(2,))
    assert to_trtllm(SamplingParams(max_tokens=8, min_tokens=3), single_eos).kwargs["min_tokens"] == 3
    for params, traits in (
        (SamplingParams(max_tokens=8, min_tokens=3), TENSORRT),  # EOS id 3 would still end the reply
        (SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(5,)), single_eos),
    ):
        with pytest.raises(UnsupportedRequestError, match=r"min_tokens=3.*end id 2 ") as refused:
            to_trtllm(params, traits)
        assert refused.value.param == "min_tokens"
    # With ignore_eos no EOS id stops the reply, so only the requested stop ids count.
    ignoring = SamplingParams(max_tokens=8, min_tokens=3, ignore_eos=True)
    assert to_trtllm(ignoring, TENSORRT).kwargs["min_tokens"] == 3


def test_without_a_known_eos_id_tensorrt_llm_picks_its_own_end_id() -> None:
    traits = dataclasses.replace(PYTORCH, eos_token_ids=())
    translated = to_trtllm(SamplingParams(max_tokens=1), traits)
    assert "end_id" not in translated.kwargs and translated.kwargs["detokenize"] is False


def test_temperature_zero_is_tensorrt_llm_greedy() -> None:
    translated = to_trtllm(
        SamplingParams(max_tokens=4, temperature=0.0, top_p=0.5, top_k=50, seed=1), PYTORCH
    )
    assert translated.kwargs["top_k"] == 1
    assert "temperature" not in translated.kwargs and "top_p" not in translated.kwargs


@pytest.mark.parametrize(
    ("sampling", "named"), [({"temperature": 0.0}, "temperature=0"), ({"temperature": 0.7, "top_k": 1}, "top_k=1")]
)
def test_greedy_with_n_above_one_is_refused_by_name(sampling: dict[str, Any], named: str) -> None:
    """top_k=1 is greedy for TensorRT-LLM too (probe AS #2): refused here, naming the user's fields, not best_of."""
    with pytest.raises(UnsupportedRequestError, match=f"n=2 with {named}") as refused:
        to_trtllm(SamplingParams(max_tokens=4, n=2, **sampling), PYTORCH)
    assert refused.value.param == "n"
    assert "best_of" not in str(refused.value) and "TLLM_" not in str(refused.value)


def test_n_is_refused_exactly_where_tensorrt_llm_calls_the_request_greedy(fake_trtllm: ModuleType) -> None:
    """Every request the mapping passes, TensorRT-LLM's SamplingParams accepts, and every n > 1 it would refuse as
    greedy the mapping refuses first, by name (the fake's greedy rule is the 1.2 `params_imply_greedy_decoding`)."""
    for temperature, top_k, top_p, n in itertools.product((0.0, 0.7), (None, 1, 5), (0.5, 1.0), (1, 2)):
        params = SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, n=n)
        for traits in (PYTORCH, TENSORRT):
            try:
                translated = to_trtllm(params, traits)
            except UnsupportedRequestError as error:
                assert error.param == "n" and n > 1 and params.is_greedy
                continue
            adapter.sampling_params(translated.kwargs, None)


def test_unset_seed_draws_a_fresh_seed_per_request() -> None:
    seeds = {to_trtllm(SamplingParams(max_tokens=1), TENSORRT).kwargs["seed"] for _ in range(5)}
    assert len(seeds) == 5


def test_logit_bias_becomes_embedding_bias_and_bans_become_bad_token_ids() -> None:
    params = SamplingParams(max_tokens=1, logit_bias={1: 2.5, 4: -1.0, 6: -math.inf}, seed=0)
    translated = to_trtllm(params, TENSORRT)
    assert translated.kwargs["bad_token_ids"] == [6]
    bias = translated.kwargs["embedding_bias"]
    assert str(bias.dtype) == "torch.float32" and tuple(bias.shape) == (8,)
    assert bias.tolist() == [0.0, 2.5, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]


def test_ignore_eos_adds_no_eos_stop_ids() -> None:
    translated = to_trtllm(SamplingParams(max_tokens=1, ignore_eos=True), PYTORCH)
    assert "stop_token_ids" not in translated.kwargs
    assert translated.kwargs["ignore_eos"] is True


def test_logprobs_zero_asks_for_one_and_reports_only_the_chosen_token() -> None:
    translated = to_trtllm(SamplingParams(max_tokens=1, logprobs=0, temperature=0.0), PYTORCH)
    assert translated.kwargs["logprobs"] == 1 and translated.report_logprobs == 0
    translated = to_trtllm(SamplingParams(max_tokens=1, logprobs=3, temperature=0.0), PYTORCH)
    assert translated.kwargs["logprobs"] == 3 and translated.report_logprobs == 3


def test_prompt_logprobs_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedRequestError) as refused:
        to_trtllm(SamplingParams(max_tokens=1, prompt_logprobs=1), PYTORCH)
    assert refused.value.param == "prompt_logprobs"


@pytest.mark.parametrize(
    ("kind", "spec", "expected"),
    [
        (GuideKind.JSON_SCHEMA, '{"type": "object"}', {"json": '{"type": "object"}'}),
        (GuideKind.JSON_OBJECT, "", {"json_object": True}),
        (GuideKind.REGEX, "[a-z]+", {"regex": "[a-z]+"}),
        (GuideKind.GRAMMAR, 'root ::= "a"', {"grammar": 'root ::= "a"'}),
        (GuideKind.STRUCTURAL_TAG, '{"type": "tag"}', {"structural_tag": '{"type": "tag"}'}),
    ],
)
def test_guides_map_to_guided_decoding_params(kind: GuideKind, spec: str, expected: dict) -> None:
    translated = to_trtllm(SamplingParams(max_tokens=1, guide=Guide(kind, spec)), PYTORCH)
    assert translated.guide == expected


def test_structural_tag_needs_the_pytorch_backend() -> None:
    guide = Guide(GuideKind.STRUCTURAL_TAG, "{}")
    with pytest.raises(UnsupportedRequestError, match="PyTorch backend") as refused:
        to_trtllm(SamplingParams(max_tokens=1, guide=guide, use_lookahead=True), TENSORRT_LOOKAHEAD)
    assert refused.value.param == "response_format"


@pytest.mark.parametrize("traits", [PYTORCH, TENSORRT, LLGUIDANCE], ids=["v2", "v1", "v2-llguidance"])
@pytest.mark.parametrize("name", ["json_schema", "json_object", "tool_choice required", "tool_choice named"])
def test_the_servers_compact_json_guides_reach_tensorrt_llm(
    name: str, traits: EngineTraits, fake_trtllm: ModuleType
) -> None:
    """The server asks for compact JSON; TensorRT-LLM has no whitespace setting and compiles with its own (probe
    AS #1: every such request was refused). The schema goes as TensorRT-LLM's OpenAI server sends it."""
    guide = _server_guides()[name]
    translated = to_trtllm(SamplingParams(max_tokens=1, guide=guide), traits)
    if guide.kind == GuideKind.JSON_OBJECT:
        assert translated.guide == {"json_object": True}
    else:
        assert translated.guide == {"json": guide.spec}
        assert (json.loads(guide.spec) == SCHEMA) if name == "json_schema" else ("get" in guide.spec)
    built = adapter.sampling_params(translated.kwargs, translated.guide)
    assert built.guided_decoding is not None


@pytest.mark.parametrize(
    ("kind", "spec"), [(GuideKind.STRUCTURAL_TAG, '{"type": "structural_tag"}'), (GuideKind.GRAMMAR, 'root ::= "a"')]
)
def test_llguidance_refuses_the_guides_it_cannot_honour_by_field(kind: GuideKind, spec: str) -> None:
    """TensorRT-LLM's llguidance backend has no structural tags and reads a grammar as Lark (probe AS #4)."""
    with pytest.raises(UnsupportedRequestError, match="guided_decoding_backend llguidance") as refused:
        to_trtllm(SamplingParams(max_tokens=1, guide=Guide(kind, spec)), LLGUIDANCE)
    assert refused.value.param == "response_format"
    assert to_trtllm(SamplingParams(max_tokens=1, guide=Guide(kind, spec)), PYTORCH).guide is not None
    regex = to_trtllm(SamplingParams(max_tokens=1, guide=Guide(GuideKind.REGEX, "a+")), LLGUIDANCE)
    assert regex.guide == {"regex": "a+"}


def test_without_a_guided_decoding_backend_a_guide_is_refused_naming_its_field() -> None:
    off = dataclasses.replace(PYTORCH, guided_decoding_backend=None)
    with pytest.raises(UnsupportedRequestError, match="guided_decoding_backend is null") as refused:
        to_trtllm(SamplingParams(max_tokens=1, guide=_tool_guide("required")), off)
    assert refused.value.param == "tools"


def test_a_guide_that_waits_for_the_reasoning_block_is_refused_naming_the_fix() -> None:
    """TensorRT-LLM constrains from the first token: it would forbid the block (or constrain the thinking)."""
    guide = Guide(GuideKind.JSON_SCHEMA, "{}", after_reasoning=ReasoningPrefix(start_id=14, end_ids=(15,), opened=True))
    with pytest.raises(UnsupportedRequestError, match="enable_thinking") as refused:
        to_trtllm(SamplingParams(max_tokens=1, guide=guide), PYTORCH)
    assert refused.value.param == "response_format"
    with pytest.raises(UnsupportedRequestError, match="enable_thinking") as refused:
        to_trtllm(SamplingParams(max_tokens=1, guide=dataclasses.replace(guide, param="tools")), PYTORCH)
    assert refused.value.param == "tools"


def test_lookahead_cannot_be_turned_off_per_request_on_a_lookahead_engine() -> None:
    with pytest.raises(UnsupportedRequestError) as refused:
        to_trtllm(SamplingParams(max_tokens=1, use_lookahead=False), TENSORRT_LOOKAHEAD)
    assert refused.value.param == "use_lookahead"
    assert "use_lookahead" not in to_trtllm(SamplingParams(max_tokens=1, use_lookahead=False), PYTORCH).kwargs


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.9},
        {"temperature": 0.9, "top_p": 0.8, "seed": 7, "n": 2},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 0.01, "top_k": 50},
        # a default temperature beside a sampling field still asks for sampling
        {"temperature": 1.0, "temperature_default": True, "top_p": 0.9},
        {"temperature": 1.0, "temperature_default": True, "n": 2},
    ],
    ids=["temperature", "n-seed-top_p", "top_k", "low-temperature", "default-temperature-top_p", "default-temperature-n"],
)
def test_a_lookahead_engine_refuses_sampled_requests_naming_temperature(sampling: dict[str, Any]) -> None:
    """TensorRT-LLM's lookahead layer takes the top-1 token for every request (`maxTopK = 1`), so a sampled request
    would come back greedy, its choices identical (probe KE #1). Without lookahead the same request samples."""
    params = SamplingParams(max_tokens=4, **sampling)
    with pytest.raises(UnsupportedRequestError, match="lookahead") as refused:
        to_trtllm(params, TENSORRT_LOOKAHEAD)
    assert refused.value.param == "temperature"
    assert "temperature to 0" in str(refused.value) and "--backend torch" in str(refused.value)
    assert to_trtllm(params, TENSORRT).kwargs["temperature"] == sampling["temperature"]


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0, "top_p": 0.5, "seed": 3},
        {"temperature": 0.7, "top_k": 1, "top_p": 0.8},
        # no temperature sent (most clients): decoded greedily, as Baseten documents lookahead, not refused
        {"temperature": 1.0, "temperature_default": True, "seed": 3},
    ],
    ids=["temperature-0", "top_k-1", "no-temperature"],
)
def test_a_lookahead_engine_serves_greedy_requests(sampling: dict[str, Any], fake_trtllm: ModuleType) -> None:
    """Greedy as the torch engine's lookahead reads it (`is_greedy`: temperature 0 or top_k 1)."""
    translated = to_trtllm(SamplingParams(max_tokens=4, **sampling), TENSORRT_LOOKAHEAD)
    assert translated.kwargs["top_k"] == 1
    adapter.sampling_params(translated.kwargs, None)


@pytest.mark.parametrize(
    "guide",
    [
        *_server_guides().values(),
        Guide(GuideKind.REGEX, "a+"),
        Guide(GuideKind.GRAMMAR, 'root ::= "a"'),
    ],
    ids=[*_server_guides(), "regex", "grammar"],
)
def test_a_lookahead_engine_refuses_guides_naming_their_field(guide: Guide) -> None:
    """TensorRT-LLM's guided decoder follows one token per step; a lookahead step accepts several (probe KE #2)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, guide=guide)
    with pytest.raises(UnsupportedRequestError, match="lookahead") as refused:
        to_trtllm(params, TENSORRT_LOOKAHEAD)
    assert refused.value.param == guide.param
    assert f"remove {guide.param}" in str(refused.value) and "--backend torch" in str(refused.value)
    assert to_trtllm(params, TENSORRT).guide is not None


def test_translated_kwargs_are_accepted_by_tensorrt_llm_sampling_params(fake_trtllm: ModuleType) -> None:
    params = SamplingParams(
        max_tokens=8,
        temperature=0.5,
        top_k=3,
        logit_bias={1: 1.0, 2: -math.inf},
        stop=("x",),
        seed=3,
        guide=Guide(GuideKind.REGEX, "a+"),
    )
    translated = to_trtllm(params, TENSORRT)
    built = adapter.sampling_params(translated.kwargs, translated.guide)
    assert [call.name for call in fake_trtllm.CALLS] == ["GuidedDecodingParams", "SamplingParams"]
    assert fake_trtllm.calls("GuidedDecodingParams")[0].kwargs == {"regex": "a+"}
    recorded = fake_trtllm.calls("SamplingParams")[0].kwargs
    assert set(recorded) == set(translated.kwargs) | {"guided_decoding"}
    assert built.guided_decoding.regex == "a+" and built.seed == 3 and built.bad_token_ids == [2]


def test_logprobs_are_refused_by_name_on_a_tensorrt_engine() -> None:
    """The real LLM refuses logprobs on the TensorRT engine backend without gather_generation_logits (issue 27,
    point 1): refused here before the call, with the field named and the build flag that provides them."""
    tensorrt = EngineTraits(is_pytorch_backend=False, has_lookahead=False, vocab_size=8, eos_token_ids=(2,))
    with pytest.raises(UnsupportedRequestError, match="gather_all_token_logits") as refused:
        to_trtllm(SamplingParams(max_tokens=1, logprobs=0, seed=0), tensorrt)
    assert refused.value.param == "logprobs"
    assert "logprobs" not in to_trtllm(SamplingParams(max_tokens=1, seed=0), tensorrt).kwargs


def test_a_tensorrt_engine_that_gathers_generation_logits_returns_logprobs_when_sampling() -> None:
    """TensorRT-LLM's TensorRT path adds the sampled token to the top-K (PR #3388), so sampling needs no refusal."""
    gathering = dataclasses.replace(TENSORRT, has_generation_logits=True)
    translated = to_trtllm(SamplingParams(max_tokens=1, temperature=0.8, logprobs=3), gathering)
    assert translated.kwargs["logprobs"] == 3 and translated.report_logprobs == 3
