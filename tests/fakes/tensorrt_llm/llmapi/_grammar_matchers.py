"""What the PyTorch executor's guided-decoding backends compile a guide with (exists only in the fake as a module).

Restates `XGrammarMatcherFactory.create` and `LLGuidanceMatcherFactory.create`
(tensorrt_llm/_torch/pyexecutor/grammar_matcher.py): the guide's type, taken from `GuidedDecodingParams` in the
order of `SamplingParams._get_guided_decoding_params` (json_object, json, regex, grammar, structural_tag), picks
the compile call. llguidance has no STRUCTURAL_TAG case and compiles EBNF_GRAMMAR with `grammar_from_lark`.
"""

from typing import Any

from tensorrt_llm._fake import record

# GuidedDecodingParams field -> the executor's GuideType
GUIDE_TYPES = {
    "json_object": "JSON",
    "json": "JSON_SCHEMA",
    "regex": "REGEX",
    "grammar": "EBNF_GRAMMAR",
    "structural_tag": "STRUCTURAL_TAG",
}
COMPILE_CALLS: dict[str, dict[str, str]] = {
    "xgrammar": {
        "JSON": "compile_builtin_json_grammar",
        "JSON_SCHEMA": "compile_json_schema",
        "REGEX": "compile_regex",
        "EBNF_GRAMMAR": "compile_grammar",
        "STRUCTURAL_TAG": "compile_structural_tag",
    },
    "llguidance": {
        "JSON": "grammar_from_json_schema",  # of '{"type": "object"}'
        "JSON_SCHEMA": "grammar_from_json_schema",
        "REGEX": "grammar_from_regex",
        "EBNF_GRAMMAR": "grammar_from_lark",
    },
}


def create_matcher(backend: str, guided: Any) -> None:
    """Record `GrammarMatcherFactory.create` with the compile call the guide gets; ValueError (the real wording)
    where the backend has none."""
    name = next((name for name in GUIDE_TYPES if getattr(guided, name)), None)
    if name is None:  # an empty GuidedDecodingParams guides nothing
        return
    guide_type = GUIDE_TYPES[name]
    compile_call = COMPILE_CALLS[backend].get(guide_type)
    record("GrammarMatcherFactory.create", {"backend": backend, "guide_type": guide_type, "compile": compile_call})
    if compile_call is None:
        raise ValueError(f"Unsupported guide type: GuideType.{guide_type}.")
