"""SmolLM2 with some of its added tokens renamed (its weights linked, not copied): how the tests get a real model
whose tokenizer has reasoning tags or harmony markers as single tokens, none such installing offline."""

import json
import shutil
from pathlib import Path


def smollm2_with_renamed_tokens(
    smollm2_dir: Path,
    target: Path,
    renames: dict[int, str],
    chat_template: str,
    *,
    special: bool,
    eos_token_ids: list[int] | None = None,
) -> Path:
    """`renames`: added-token id -> its new text; `special`: whether decoding may skip them."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(smollm2_dir / "config.json", target / "config.json")
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    if eos_token_ids is not None:
        generation["eos_token_id"] = eos_token_ids
    (target / "generation_config.json").write_text(json.dumps(generation))
    (target / "model.safetensors").symlink_to(smollm2_dir / "model.safetensors")
    tokenizer = json.loads((smollm2_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for token_id, content in renames.items():
        entry = tokenizer["added_tokens"][token_id]
        assert entry["id"] == token_id
        del vocab[entry["content"]]
        vocab[content] = token_id
        entry.update(content=content, special=special)
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = chat_template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target
