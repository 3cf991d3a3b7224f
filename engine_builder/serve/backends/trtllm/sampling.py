"""Our SamplingParams -> TensorRT-LLM `SamplingParams` keyword arguments, field by field, failing closed.

Every field of `engine_builder.common.types.SamplingParams` has an entry in `FIELD_MAPPINGS`; a field without
one (say, added later) makes every request fail with its name, so nothing is ignored silently. A value
TensorRT-LLM cannot honour raises `UnsupportedRequestError` naming the field. TensorRT-LLM returns token ids
only (`detokenize=False`, `end_id` given, so it never needs its tokenizer per request): the server detokenizes
and matches stop strings itself, so `stop` and `skip_special_tokens` are not passed, and stop tokens stay in
the returned ids (`include_stop_str_in_output=True`) as the torch engine returns them.

TensorRT-LLM 1.2's PyTorch backend (v2) samples with TorchSampler, which reads only temperature, top_p and top_k and
applies only `embedding_bias` and a `min_tokens` that counts the prompt: penalties, min_p, a seed, min_tokens and
sampled logprobs are refused there by name, and bans go as `-inf` entries of `embedding_bias` instead of
`bad_token_ids`. Guides go to `GuidedDecodingParams` as TensorRT-LLM's own OpenAI server sends them, compiled by
the guided-decoding backend the `LLM` was given (see `guide_kwargs`). A TensorRT engine built with lookahead decoding
decodes every request greedily and cannot keep a guide in step, so sampled and guided requests are refused there by
name (`temperature`, the guide's field). Verified only against the fake `tensorrt_llm`
in tests/fakes and TensorRT-LLM's source, never against a real install.
"""

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine_builder.common.trtllm.specs import GuidedDecodingBackend
from engine_builder.common.types import Guide, GuideKind, SamplingParams


class UnsupportedRequestError(ValueError):
    """The request asks for something the TensorRT-LLM backend cannot do; the server answers 400 with `param`
    (None where no single request field is at fault) and `code`."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class EngineTraits:
    """What the mapping needs to know about the loaded engine."""

    is_pytorch_backend: bool  # TorchSampler (TensorRT-LLM 1.2's default there) samples: see the module docstring
    has_lookahead: bool
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_generation_logits: bool = False  # a v1 engine built and loaded with gather_generation_logits
    guided_decoding_backend: str | None = GuidedDecodingBackend.XGRAMMAR.value  # the LLM's; None: guided decoding off


@dataclass
class TrtSampling:
    """The translated request: one choice's SamplingParams kwargs (each choice is its own TensorRT-LLM request), the
    guide, and what to report back."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    guide: dict[str, Any] | None = None
    report_logprobs: int | None = None  # top alternatives per token to report; 0 = only the chosen token
    added_stop_token_ids: frozenset[int] = frozenset()  # EOS ids we added; a stop on them is a plain EOS
    end_id: int | None = None  # the id TensorRT-LLM ends on (and leaves out of the ids); None: its tokenizer's
    sampling_params: list[Any] = field(default_factory=list)  # TensorRT-LLM's, one per choice, built at admission

    def choice_kwargs(self, index: int) -> dict[str, Any]:
        """Choice `index`'s kwargs: a seed moves on by the index, as TensorRT-LLM seeds the child requests of an n > 1
        request (`randomSeed += sequenceIndex`) and the torch engine its choices (`seed + index`)."""
        if index == 0 or "seed" not in self.kwargs:
            return self.kwargs
        return {**self.kwargs, "seed": (self.kwargs["seed"] + index) % SEED_RANGE}


# TensorRT-LLM's C++ SamplingConfig takes the seed as uint64 and top_k as int32: a request's -1 or 2**40 failed the
# binding's conversion when the worker enqueued it (probe IE #1).
SEED_RANGE = 2**64

Mapper = Callable[[SamplingParams, EngineTraits, TrtSampling], None]

# Same name and meaning on both sides.
SAME_NAME_FIELDS = ("max_tokens", "ignore_eos")
# Penalties and their neutral values: TorchSampler (v2) ignores them, so anything else is refused there.
PENALTY_FIELDS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
# Text-side fields: the server's output side applies them to the token ids (engine_builder/serve/server/text.py).
TEXT_FIELDS = ("stop", "skip_special_tokens")

GUIDE_KEYS: dict[GuideKind, str] = {
    GuideKind.JSON_SCHEMA: "json",
    GuideKind.JSON_OBJECT: "json_object",
    GuideKind.REGEX: "regex",
    GuideKind.GRAMMAR: "grammar",
    GuideKind.STRUCTURAL_TAG: "structural_tag",
}
# What each guided-decoding backend of TensorRT-LLM's PyTorch executor cannot honour (its GrammarMatcherFactory
# classes, _torch/pyexecutor/grammar_matcher.py), and why. llguidance has no structural tags, and reads `grammar` as
# Lark, while our grammar guides are xgrammar's EBNF (as on the torch engine).
GUIDES_NOT_HONOURED: dict[str, dict[GuideKind, str]] = {
    GuidedDecodingBackend.XGRAMMAR.value: {},
    GuidedDecodingBackend.LLGUIDANCE.value: {
        GuideKind.STRUCTURAL_TAG: "TensorRT-LLM's llguidance backend has no structural tags",
        GuideKind.GRAMMAR: (
            "TensorRT-LLM's llguidance backend reads a grammar as Lark, not the EBNF (xgrammar's) this server's "
            "grammar guides are written in"
        ),
    },
}


def _same_name(name: str) -> Mapper:
    def mapper(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
        out.kwargs[name] = getattr(params, name)

    return mapper


def _ignored_by_torch_sampler(name: str, value: Any) -> UnsupportedRequestError:
    return UnsupportedRequestError(
        f"{name}={value!r} is ignored by TensorRT-LLM's PyTorch backend (inference_stack v2: TensorRT-LLM 1.2's "
        f"TorchSampler reads only temperature, top_p and top_k): remove {name}, or serve with the torch backend "
        "or a v1 engine",
        param=name,
    )


def _penalty(name: str) -> Mapper:
    def mapper(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
        value = getattr(params, name)
        if not traits.is_pytorch_backend:
            out.kwargs[name] = value
        elif value != PENALTY_FIELDS[name]:
            raise _ignored_by_torch_sampler(name, value)

    return mapper


def _min_p(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if not traits.is_pytorch_backend:
        out.kwargs["min_p"] = params.min_p
    elif params.min_p > 0.0 and not params.is_greedy:  # greedy keeps the top token, which min_p never drops
        raise _ignored_by_torch_sampler("min_p", params.min_p)


def _min_tokens(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if params.min_tokens <= 0:
        return
    if traits.is_pytorch_backend:
        # TorchSampler before TensorRT-LLM PRs #12166 and #12358 (March 2026; not known to be in 1.2.x) counts the
        # prompt toward min_tokens and, with ignore_eos, holds back the wrong token.
        raise UnsupportedRequestError(
            f"min_tokens={params.min_tokens} is not reliable on TensorRT-LLM's PyTorch backend (inference_stack v2: "
            "TensorRT-LLM 1.2's TorchSampler counts the prompt toward it); remove min_tokens, or serve with the "
            "torch backend or a v1 engine",
            param="min_tokens",
        )
    # TensorRT-LLM holds back only `end_id` until min_tokens, while stop ids still end the request; the torch engine
    # holds back every EOS and stop id. Refused where the two differ.
    end_id = traits.eos_token_ids[0] if traits.eos_token_ids else None
    eos_ids = () if params.ignore_eos else traits.eos_token_ids
    unmasked = sorted({*params.stop_token_ids, *eos_ids} - {end_id})
    if unmasked:
        raise UnsupportedRequestError(
            f"min_tokens={params.min_tokens}: TensorRT-LLM holds back only its end id "
            f"{'(its tokenizer EOS)' if end_id is None else end_id} until min_tokens, not the other stop/EOS ids "
            f"{unmasked} (this model's EOS ids and the request's stop_token_ids), so a reply could end earlier; "
            "remove min_tokens, or serve with the torch backend",
            param="min_tokens",
        )
    out.kwargs["min_tokens"] = params.min_tokens


def _temperature(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    # TensorRT-LLM's greedy decoding is top_k=1 (its temperature must be > 0); 0 means greedy for us.
    if params.temperature == 0.0:
        out.kwargs["top_k"] = 1
    else:
        out.kwargs["temperature"] = params.temperature


def _top_k(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    # k at or over the vocabulary keeps every token: off, as unset is (int32 could not hold 2**40)
    if params.temperature != 0.0 and params.top_k is not None and params.top_k < traits.vocab_size:
        out.kwargs["top_k"] = params.top_k


def _top_p(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if params.temperature != 0.0:
        out.kwargs["top_p"] = params.top_p


def _n(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    # Not passed: the client submits each choice as its own request (n = 1), because with n > 1 TensorRT-LLM gives a
    # sequence its finish reason only on the request's final response (`_handle_sequence` under `_done`), so the
    # choices that end first would never get one. TensorRT-LLM's SamplingParams refuses several returns of a greedy
    # request, greedy being top_k == 1, top_p == 0, temperature == 0 or none of the three set
    # (`params_imply_greedy_decoding`); that refusal is kept (our top_p is never 0 and temperature or top_k is always
    # passed, so that is `is_greedy` here).
    if params.n > 1 and params.is_greedy:
        chosen = "temperature=0" if params.temperature == 0.0 else "top_k=1"
        raise UnsupportedRequestError(
            f"n={params.n} with {chosen}: TensorRT-LLM's LLM API returns a single sequence for a greedy request "
            "(temperature 0 or top_k 1); set n to 1, or sample with temperature > 0 and top_k unset or above 1",
            param="n",
        )


def _logit_bias(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    bans = sorted(token_id for token_id, bias in params.logit_bias.items() if bias == -math.inf)
    finite = {token_id: bias for token_id, bias in params.logit_bias.items() if math.isfinite(bias)}
    if len(bans) + len(finite) != len(params.logit_bias):
        raise UnsupportedRequestError("logit_bias values must be finite (or -inf for a ban)", "logit_bias")
    if traits.is_pytorch_backend:  # TorchSampler ignores bad_token_ids but adds embedding_bias: a ban is a -inf bias
        finite.update(dict.fromkeys(bans, -math.inf))
    elif bans:
        out.kwargs["bad_token_ids"] = bans
    if finite:
        import torch

        bias = torch.zeros(traits.vocab_size, dtype=torch.float32)
        for token_id, value in finite.items():
            bias[token_id] = value
        out.kwargs["embedding_bias"] = bias


def _seed(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if traits.is_pytorch_backend:
        # TorchSampler draws from one generator for all requests: a seed cannot be honoured (nor is it needed
        # for a greedy request).
        if params.seed is not None and not params.is_greedy:
            raise _ignored_by_torch_sampler("seed", params.seed)
        return
    # TensorRT-LLM uses seed 0 for every request that sets none; unset means random for us.
    # Seeds run over [-2**63, 2**63) here: taken modulo 2**64, distinct ones stay distinct.
    out.kwargs["seed"] = params.seed % SEED_RANGE if params.seed is not None else random.getrandbits(63)


def _text_side(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    """Not passed: TensorRT-LLM would need its tokenizer for it, and the server applies it to the ids."""


def _include_stop_str_in_output(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    # TensorRT-LLM cuts a matched stop token off `token_ids` unless this is set; the server keeps it out of the
    # text (or in, as the request asks) and counts it, as with the torch engine.
    out.kwargs["include_stop_str_in_output"] = True


def _stop_token_ids(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    # TensorRT-LLM ends on the tokenizer's single eos_token_id; the model's other EOS ids stop it too.
    requested = list(params.stop_token_ids)
    added = [] if params.ignore_eos else [t for t in traits.eos_token_ids if t not in requested]
    if requested or added:
        out.kwargs["stop_token_ids"] = requested + added
    out.added_stop_token_ids = frozenset(added)


def _logprobs(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if params.logprobs is None:
        return
    if not traits.is_pytorch_backend and not traits.has_generation_logits:
        # TensorRT-LLM's LLM._check_arguments refuses logprobs on the TensorRT engine backend unless the LLM was
        # created with gather_generation_logits (and the engine built to gather them): refuse here, by name.
        raise UnsupportedRequestError(
            "logprobs are not available on this TensorRT engine (v1): TensorRT-LLM needs the engine built and "
            "loaded with gather_generation_logits; rebuild with trt_llm.build.gather_all_token_logits: true",
            param="logprobs",
        )
    if traits.is_pytorch_backend and not params.is_greedy:
        # TorchSampler returns the top-K of the distribution before sampling, without the sampled token unless it
        # ranks there; greedy picks the top one, so it is always included.
        raise UnsupportedRequestError(
            "logprobs/top_logprobs need a greedy request (temperature 0) on TensorRT-LLM's PyTorch backend "
            "(inference_stack v2): TensorRT-LLM 1.2 may leave the sampled token out of them; set temperature to 0, "
            "remove logprobs, or serve with the torch backend",
            param="logprobs",
        )
    # TensorRT-LLM reads logprobs=0 as "off"; 1 returns the top token, which is the chosen one when greedy (the
    # TensorRT engine adds the sampled token to its top-K).
    out.kwargs["logprobs"] = max(params.logprobs, 1)
    out.report_logprobs = params.logprobs


def _prompt_logprobs(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if params.prompt_logprobs is not None:
        raise UnsupportedRequestError(
            "prompt logprobs (echo with logprobs) are not mapped on the TensorRT-LLM backend yet",
            param="prompt_logprobs",
        )


def guide_kwargs(guide: Guide, traits: EngineTraits) -> dict[str, Any]:
    """`GuidedDecodingParams` keyword arguments for one guide, or UnsupportedRequestError naming the guide's field.

    `GuidedDecodingParams` has no whitespace setting: TensorRT-LLM compiles a JSON schema with its backend's defaults
    (xgrammar's `compile_json_schema(schema)`: any whitespace between tokens), and `json_object` with xgrammar's
    built-in JSON grammar, which also admits a top-level array. So the server's compact-JSON guides
    (`any_whitespace=False`) are sent as TensorRT-LLM's OpenAI server sends them: the reply matches the schema, its
    whitespace is TensorRT-LLM's."""
    if guide.kind == GuideKind.TOOL_CALLS:
        raise UnsupportedRequestError(
            "`strict` tools with tool_choice auto, and gpt-oss's forced tool calls, are not enforced on TensorRT-LLM "
            "(its guided decoding is not mapped to start at the model's tool-call marker); use the torch backend, "
            "or set `strict: false`",
            param="tools",
        )
    if guide.after_reasoning is not None:
        raise UnsupportedRequestError(
            "TensorRT-LLM applies a guide from the first token, which would constrain this model's reasoning; "
            'a guide needs thinking switched off for the request (Qwen3: chat_template_kwargs {"enable_thinking": '
            'false}), or the torch backend for models that always reason (DeepSeek-R1, gpt-oss)',
            param=guide.param,
        )
    backend = traits.guided_decoding_backend
    if backend is None:
        raise UnsupportedRequestError(
            f"{guide.param} needs guided decoding, which this TensorRT-LLM server runs without (its LLM has no "
            "guided_decoding_backend: trt_llm.runtime.patch_kwargs.guided_decoding_backend is null); remove "
            f"{guide.param}, or rebuild without that patch_kwargs key",
            param=guide.param,
        )
    if guide.kind == GuideKind.STRUCTURAL_TAG and not traits.is_pytorch_backend:
        raise UnsupportedRequestError(
            "structural_tag guides need TensorRT-LLM's PyTorch backend (inference_stack: v2)",
            param=guide.param,
        )
    if traits.has_lookahead:
        # TensorRT-LLM's guided decoder advances a request's grammar by its last token once per step and masks one
        # logits row per sequence (guidedDecoder.cpp); a lookahead step accepts several tokens from unmasked draft
        # positions, so the grammar would fall out of step with the reply.
        raise UnsupportedRequestError(
            f"{guide.param} needs guided decoding, which TensorRT-LLM does not enforce on this engine: it was built "
            "with lookahead decoding, which accepts several tokens per step while the guided decoder follows one "
            f"token per step; remove {guide.param}, or rebuild without trt_llm.build.speculator, or build with "
            "--backend torch, whose lookahead verifies drafts against the grammar",
            param=guide.param,
        )
    reason = GUIDES_NOT_HONOURED.get(backend, {}).get(guide.kind)
    if reason is not None:
        raise UnsupportedRequestError(
            f"{guide.kind.value} guides are not served with guided_decoding_backend {backend}: {reason}. Use a "
            "json_schema, json_object or regex response_format, or rebuild without "
            "trt_llm.runtime.patch_kwargs.guided_decoding_backend (xgrammar serves them)",
            param=guide.param,
        )
    key = GUIDE_KEYS[guide.kind]
    return {key: True} if guide.kind == GuideKind.JSON_OBJECT else {key: guide.spec}


def _guide(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if params.guide is not None:
        out.guide = guide_kwargs(params.guide, traits)


def _use_lookahead(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    if not params.use_lookahead and traits.has_lookahead:
        raise UnsupportedRequestError(
            "this TensorRT engine decodes every request with lookahead; it cannot be turned off per request",
            param="use_lookahead",
        )
    if traits.has_lookahead and not params.is_greedy and not _greedy_by_default(params):
        # TensorRT-LLM's lookahead layer takes the top-1 token at every position (`maxTopK = 1` in
        # lookaheadDecodingLayer.cpp) and reads no per-request top_k/top_p, temperature or seed, for every request of
        # the engine: a sampled request would come back greedy, its n choices identical. Checked here, after the
        # other fields, so that a field refused on any v1 engine (logprobs) is named first.
        raise UnsupportedRequestError(
            f"temperature={params.temperature} (with top_p, top_k, min_p or n > 1 sent, 1.0 where the request sets "
            "none) asks for sampling, but this "
            "TensorRT engine was built with lookahead decoding, under which TensorRT-LLM decodes every request "
            "greedily (its lookahead layer takes the top token and ignores temperature, top_p, top_k and seed); set "
            "temperature to 0 (or top_k to 1), or, to sample, rebuild without trt_llm.build.speculator or build with "
            "--backend torch, whose lookahead speculates greedy requests only and samples the rest",
            param="temperature",
        )


def _greedy_by_default(params: SamplingParams) -> bool:
    """A request that asks for nothing but a default temperature: on a lookahead engine it is decoded greedily, as
    Baseten documents (sampling off, temperature 0 under lookahead), not refused (most clients send no temperature).
    A sampling field sent (top_p, top_k, min_p, n > 1) still asks for sampling, and is refused."""
    return (
        params.temperature_default and params.n == 1 and params.top_p == 1.0 and params.top_k is None
        and params.min_p == 0.0
    )  # fmt: skip


def _temperature_default(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    """Nothing to send: `to_trtllm` reads it (a lookahead engine decodes a default temperature greedily)."""


def _max_tokens_default(params: SamplingParams, traits: EngineTraits, out: TrtSampling) -> None:
    """Nothing to send: the torch engine lowers a default max_tokens to what its KV cache holds for n choices;
    TensorRT-LLM takes max_tokens as given, its capacity its own (verified against the fake seam only)."""


FIELD_MAPPINGS: dict[str, Mapper] = {
    **{name: _same_name(name) for name in SAME_NAME_FIELDS},
    **{name: _penalty(name) for name in PENALTY_FIELDS},
    "min_p": _min_p,
    "min_tokens": _min_tokens,
    **{name: _text_side for name in TEXT_FIELDS},
    "include_stop_str_in_output": _include_stop_str_in_output,
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "n": _n,
    "logit_bias": _logit_bias,
    "seed": _seed,
    "stop_token_ids": _stop_token_ids,
    "logprobs": _logprobs,
    "prompt_logprobs": _prompt_logprobs,
    "guide": _guide,
    "use_lookahead": _use_lookahead,
    "max_tokens_default": _max_tokens_default,
    "temperature_default": _temperature_default,
}


def to_trtllm(params: SamplingParams, traits: EngineTraits) -> TrtSampling:
    # Token ids only: no detokenization, and an explicit end id, without which TensorRT-LLM calls its tokenizer
    # (`SamplingParams._setup`) for every request. Without a known EOS id its own tokenizer's is used.
    if traits.has_lookahead and _greedy_by_default(params):
        params = dataclasses.replace(params, temperature=0.0)  # what the engine does anyway, said rather than implied
    out = TrtSampling(kwargs={"detokenize": False})
    if traits.eos_token_ids:
        out.end_id = out.kwargs["end_id"] = traits.eos_token_ids[0]
    for item in dataclasses.fields(params):
        mapper = FIELD_MAPPINGS.get(item.name)
        if mapper is None:
            raise UnsupportedRequestError(
                f"sampling field {item.name!r} has no TensorRT-LLM mapping; the request is refused",
                param=item.name,
            )
        mapper(params, traits, out)
    return out
