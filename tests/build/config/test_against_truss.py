"""Differential test: our schema accepts and rejects exactly what Truss's own validator (truss==0.18.36) does."""

import re

import pytest
import yaml

from engine_builder.build.config import ConfigError, parse_config
from tests.build.config.cases import CASES

truss_config = pytest.importorskip("truss.base.truss_config")


def _normalize(text: str) -> str:
    # Truss formats the enum member into one message ("TrussTRTLLMModel.LLAMA has been renamed"); we print the value.
    text = re.sub(r"TrussTRTLLMModel\.([A-Z_]+)", lambda match: match.group(1).lower(), text)
    # Truss prints a set (python_version's choices) in hash order; compare the members sorted.
    text = re.sub(
        r"\{('[^']*'(?:, '[^']*')*)\}",
        lambda match: "{" + ", ".join(sorted(match.group(1).split(", "))) + "}",
        text,
    )
    return re.sub(r"\s+", " ", text).strip()


def _truss_error(config: dict) -> str | None:
    try:
        truss_config.TrussConfig.model_validate(config)
    except Exception as error:  # Truss raises ValidationError, or ValueError from its discriminator
        return _normalize(str(error))
    return None


def _our_errors(config: dict) -> list[str] | None:
    try:
        parse_config(yaml.safe_dump(config))
    except ConfigError as error:
        return [_normalize(issue.message) for issue in error.issues]
    return None


@pytest.mark.parametrize(("name", "config", "expected"), CASES, ids=[case[0] for case in CASES])
def test_same_verdict_as_truss(name: str, config: dict, expected: str | None) -> None:
    truss_error = _truss_error(config)
    ours = _our_errors(config)
    if expected is None:
        assert truss_error is None, f"Truss rejects a case we expect valid: {truss_error}"
        assert ours is None, f"we reject a config Truss accepts: {ours}"
        # Resolved the same way: `resources` as Truss dumps it (use_gpu computed, unset Truss fields left out).
        truss_resources = truss_config.TrussConfig.model_validate(config).model_dump(mode="json")["resources"]
        assert parse_config(yaml.safe_dump(config)).resolved()["resources"] == truss_resources
        return
    assert truss_error is not None, "Truss accepts a case we expect invalid"
    assert ours is not None, f"we accept a config Truss rejects: {truss_error}"
    assert _normalize(expected) in truss_error
    assert any(_normalize(expected) in message for message in ours), ours
    # Every message we print for a field error also appears in Truss's error text (same wording).
    first = ours[0].split(" (num_draft_tokens computed")[0]
    assert first[:60] in truss_error, (first, truss_error)
