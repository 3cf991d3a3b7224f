"""response_format -> Guide, and the 400 for a guide the backend refuses when it prepares the request."""

import json
from typing import Any

from engine_builder.common.types import Guide, GuideKind
from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.server.errors import APIError, bad_request
from engine_builder.serve.server.limits import check_schema_size
from engine_builder.serve.server.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
)

# The fields each response_format type reads; another type's field set beside them would be ignored.
_FIELDS_OF_TYPE = {
    "text": set(),
    "json_object": set(),
    "json_schema": {"json_schema"},
    "regex": {"regex"},
    "grammar": {"grammar"},
    "structural_tag": {"structural_tag", "format", "structures", "triggers"},
}


def guide_from_response_format(response_format: ResponseFormat | None) -> Guide | None:
    if response_format is None:
        return None
    kind = response_format.type
    foreign = sorted(response_format.model_fields_set - {"type"} - _FIELDS_OF_TYPE.get(kind, set()))
    foreign = [name for name in foreign if getattr(response_format, name) is not None]
    if foreign:
        raise bad_request(
            f"response_format.{foreign[0]} does not apply to type {kind!r} (it would be ignored); "
            f"remove it or set the matching type.",
            param=f"response_format.{foreign[0]}",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return Guide(GuideKind.JSON_OBJECT, "", any_whitespace=False)
    if kind == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.schema_ is None:
            raise bad_request("response_format.json_schema.schema is required for type json_schema.", param="response_format.json_schema")
        check_schema_size(spec.schema_, "response_format.json_schema.schema")
        return Guide(GuideKind.JSON_SCHEMA, json.dumps(spec.schema_), any_whitespace=False)
    if kind == "regex":
        if not response_format.regex:
            raise bad_request("response_format.regex is required for type regex.", param="response_format.regex")
        return Guide(GuideKind.REGEX, response_format.regex)
    if kind == "grammar":
        if not response_format.grammar:
            raise bad_request("response_format.grammar is required for type grammar.", param="response_format.grammar")
        return Guide(GuideKind.GRAMMAR, response_format.grammar)
    if kind == "structural_tag":
        return Guide(GuideKind.STRUCTURAL_TAG, _structural_tag_spec(response_format))
    raise bad_request(f"Unknown response_format type {kind!r}.", param="response_format.type")


def _structural_tag_spec(response_format: ResponseFormat) -> str:
    """Accept Baseten's string form, xgrammar's `format` object, or the older structures/triggers pair (beside the
    type, or inside `structural_tag`)."""
    tag = response_format.structural_tag
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError:
            raise bad_request("response_format.structural_tag is not valid JSON.", param="response_format.structural_tag") from None
    if isinstance(tag, dict) and "format" not in tag and "structures" in tag and "triggers" in tag:
        return _legacy_tag(tag["structures"], tag["triggers"], "response_format.structural_tag")
    if isinstance(tag, dict):
        return json.dumps(tag if tag.get("type") == "structural_tag" else {"type": "structural_tag", **tag})
    if response_format.format is not None:
        return json.dumps({"type": "structural_tag", "format": response_format.format})
    if response_format.structures is not None and response_format.triggers is not None:
        return _legacy_tag(response_format.structures, response_format.triggers, "response_format")
    raise bad_request("response_format.structural_tag needs `structural_tag`, `format`, or `structures` and `triggers`.", param="response_format")


def _legacy_tag(structures: Any, triggers: Any, path: str) -> str:
    """xgrammar's older structures/triggers pair as a `triggered_tags` format (`path`: where the pair was sent)."""
    if not isinstance(structures, list) or not isinstance(triggers, list):
        raise bad_request(f"{path}: `structures` and `triggers` must be lists.", param=f"{path}.structures")
    for index, structure in enumerate(structures):
        for key in ("begin", "end"):
            if not isinstance(structure, dict) or not isinstance(structure.get(key), str):
                raise bad_request(
                    f"{path}.structures[{index}] needs a string `{key}`.", param=f"{path}.structures[{index}].{key}"
                )
    tags = [
        {"type": "tag", "begin": s["begin"], "content": {"type": "json_schema", "json_schema": s.get("schema", {})}, "end": s["end"]}
        for s in structures
    ]
    return json.dumps({"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}})


def check_guide_compatible(request: SamplingFields, guide: Guide | None, eos_token_ids: tuple[int, ...] = ()) -> None:
    if guide is None:
        return
    held_by = _what_holds_the_reply(request, guide)
    if request.ignore_eos:
        raise bad_request(f"ignore_eos cannot be combined with {held_by} (the grammar ends the output).", param="ignore_eos")
    banned_ends = sorted(set(request.bad_token_ids or ()) & set(eos_token_ids))
    if banned_ends:  # the grammar's end is an end-of-sequence token: banned, no token would be left to sample (AF)
        raise bad_request(
            f"bad_token_ids bans the end-of-sequence token {banned_ends[0]}, which {held_by} needs to end the output.",
            param="bad_token_ids",
        )
    if request.min_tokens:
        raise bad_request(f"min_tokens cannot be combined with {held_by}.", param="min_tokens")


def _what_holds_the_reply(request: SamplingFields, guide: Guide) -> str:
    """The request's field that put the reply under a grammar, as a refusal names it: a guide made from the tools
    was called "a structured response_format" the client never sent (probe IA #6)."""
    if guide.param != "tools":
        return "a structured response_format"
    choice = request.tool_choice if isinstance(request, ChatCompletionRequest) else None
    if choice == "required":
        return "tool_choice `required`"
    if isinstance(choice, NamedToolChoice):
        return f"tool_choice naming {choice.function.name!r}"
    return "a `strict` tool"  # tool_choice auto: its calls are held to its parameters


def guide_refused(error: GuideError) -> APIError:
    """The 400 for a guide the backend cannot compile or enforce (raised by its `prepare`)."""
    return APIError(str(error), status=400, param=error.param, code="invalid_response_format")
