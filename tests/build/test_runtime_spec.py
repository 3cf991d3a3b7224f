"""What the build reads into the engine's runtime spec from the checkpoint folder."""

from pathlib import Path

import pytest

from engine_builder.build.errors import BuildError
from engine_builder.build.runtime_spec import _eos_token_ids


def test_stop_tokens_come_from_generation_config_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    """A generation_config.json that did not parse was read as "no stop tokens": the engine served every reply to
    max_tokens (probe W)."""
    (tmp_path / "config.json").write_text('{"vocab_size": 100, "eos_token_id": 1}')
    assert _eos_token_ids(tmp_path) == (1,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 3]}')
    assert _eos_token_ids(tmp_path) == (2, 3)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(BuildError, match=r"generation_config\.json is not valid JSON"):
        _eos_token_ids(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # an encoder: nothing to stop on
    assert _eos_token_ids(tmp_path) == ()
