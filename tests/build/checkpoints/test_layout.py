"""Repository layout checks: what passes, and that each refusal names the file and the fix."""

import json
import re
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import CheckpointLayoutError, check_repository_layout
from engine_builder.build.config import BaseModelKind
from tests.build.checkpoints.factory import make_checkpoint, write_json

DECODER = BaseModelKind.DECODER
ENCODER = BaseModelKind.ENCODER_BERT


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_real_minilm_is_a_sentence_transformers_encoder(minilm_dir: Path) -> None:
    info = check_repository_layout(minilm_dir, ENCODER)
    assert info.architecture == "BertModel"
    assert info.is_sentence_transformers and info.pooling_mode == "mean"
    assert info.max_position_embeddings == 512 and info.torch_dtype is None
    assert info.weight_files == ("model.safetensors",)


def test_decoder_with_shards(tmp_path: Path) -> None:
    info = check_repository_layout(make_checkpoint(tmp_path / "m", shards=3), DECODER)
    assert info.has_chat_template and info.torch_dtype == "bfloat16"
    assert len(info.weight_files) == 3 and info.id2label is None


def test_classifier_labels(tmp_path: Path) -> None:
    info = check_repository_layout(make_checkpoint(tmp_path / "m", "classifier"), ENCODER)
    assert info.is_classifier and info.id2label == {0: "negative", 1: "positive"}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: (m / "config.json").unlink(), "config.json is missing"),
        (lambda m: (m / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda m: edit_json(m / "config.json", architectures=None), "`architectures`"),
        (lambda m: edit_json(m / "config.json", torch_dtype="int8"), "torch_dtype 'int8'"),
        (lambda m: edit_json(m / "config.json", max_position_embeddings="long"), "max_position_embeddings"),
        (lambda m: edit_json(m / "config.json", architectures=["BertForSequenceClassification"]), "not a causal"),
        (lambda m: (m / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda m: edit_json(m / "tokenizer_config.json", chat_template=None), "chat template"),
        (lambda m: (m / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda m: (m / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}"), "model.safetensors"),
    ],
    ids=["no-config", "bad-json", "no-arch", "int8", "positions", "not-decoder", "no-tokenizer", "no-template",
         "no-weights", "bad-weights"],
)  # fmt: skip
def test_decoder_refusals_name_the_file(tmp_path: Path, mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    folder = make_checkpoint(tmp_path / "m")
    mutate(folder)
    with pytest.raises(CheckpointLayoutError, match=expected):
        check_repository_layout(folder, DECODER)


def test_truncated_safetensors_is_caught(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointLayoutError, match="truncated"):
        check_repository_layout(folder, DECODER)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_gzip_compressed_file_is_named_as_such(tmp_path: Path, name: str) -> None:
    """Azure and GCS objects stored `Content-Encoding: gzip` are fetched as stored: the layout check says what they
    are, not "not valid JSON" or "bad header length" (probe KA #2, review)."""
    import gzip

    folder = make_checkpoint(tmp_path / "m")
    (folder / name).write_bytes(gzip.compress((folder / name).read_bytes()))
    with pytest.raises(CheckpointLayoutError, match=f"{re.escape(name)} is gzip-compressed: .*upload it uncompressed"):
        check_repository_layout(folder, DECODER)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointLayoutError, match="model-00002-of-00002.safetensors"):
        check_repository_layout(folder, DECODER)


def test_pytorch_bin_only_asks_for_conversion(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointLayoutError, match=r"found only pytorch_model\.bin.*safetensors"):
        check_repository_layout(folder, DECODER)


def test_chat_template_jinja_file_counts(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", chat_template=False)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert check_repository_layout(folder, DECODER).has_chat_template


def test_chat_template_can_be_optional(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", chat_template=False)
    info = check_repository_layout(folder, DECODER, require_chat_template=False)
    assert not info.has_chat_template


def test_prequantized_is_a_parameter(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", config={"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(CheckpointLayoutError, match=r"quant_method=fp8\).*pre-quantized.*quantization_type"):
        check_repository_layout(folder, DECODER)
    assert check_repository_layout(folder, DECODER, allow_prequantized=True).quantization == "fp8"


def test_hf_quant_config_file_marks_prequantized(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    write_json(folder / "hf_quant_config.json", {"quantization": {"quant_algo": "FP8"}})
    with pytest.raises(CheckpointLayoutError, match="hf_quant_config.json"):
        check_repository_layout(folder, DECODER)


def test_custom_code_is_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(
        tmp_path / "m",
        config={
            "model_type": "my_secret_arch",
            "auto_map": {"AutoModelForCausalLM": "modeling_mine.MyModel"},
        },
    )
    with pytest.raises(CheckpointLayoutError, match=r"modeling_mine\.MyModel.*trust_remote_code"):
        check_repository_layout(folder, DECODER)


def test_auto_map_on_a_native_model_type_is_ignored(tmp_path: Path) -> None:
    folder = make_checkpoint(
        tmp_path / "m", config={"auto_map": {"AutoConfig": "configuration_llama.LlamaConfig"}}
    )
    assert check_repository_layout(folder, DECODER).model_type == "llama"


def test_embedding_needs_sentence_transformers_files(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", "embedding")
    (folder / "1_Pooling" / "config.json").unlink()
    with pytest.raises(CheckpointLayoutError, match="1_Pooling/config.json is missing"):
        check_repository_layout(folder, ENCODER)
    (folder / "modules.json").unlink()
    with pytest.raises(CheckpointLayoutError, match="modules.json is missing"):
        check_repository_layout(folder, ENCODER)


def test_classifier_needs_id2label(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", "classifier")
    edit_json(folder / "config.json", id2label=None)
    with pytest.raises(CheckpointLayoutError, match="id2label"):
        check_repository_layout(folder, ENCODER)


def test_present_files_stand_in_for_weights_not_yet_downloaded(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", shards=2)
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    present = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert len(check_repository_layout(folder, DECODER, present_files=present).weight_files) == 2
    with pytest.raises(CheckpointLayoutError, match="00002-of-00002"):
        check_repository_layout(folder, DECODER, present_files={"model-00001-of-00002.safetensors"})


def _add_module(folder: Path, kind: str, path: str, config: dict[str, object] | None = None) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": path, "type": f"sentence_transformers.models.{kind}"})  # fmt: skip
    write_json(folder / "modules.json", modules)
    if config is not None:
        write_json(folder / path / "config.json", config)


def _serving_refusal(folder: Path, kind: str) -> str:
    """The message serving's loader gives for `folder`, without its folder prefix (it refuses before any weights)."""
    from engine_builder.serve.encoders.errors import ModelLoadError
    from engine_builder.serve.encoders.loader import load_encoder

    with pytest.raises(ModelLoadError) as refusal:
        load_encoder(folder, kind=kind, max_num_tokens=512, max_batch_size=4)
    return str(refusal.value).removeprefix(f"{folder}: ")


@pytest.mark.parametrize(
    ("mutate", "kind", "expected"),
    [
        (lambda m: write_json(m / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}),
         "encoder_bert", r"selects pooling modes \['max', 'mean'\]; exactly one"),
        (lambda m: write_json(m / "1_Pooling" / "config.json", {"pooling_mode": "attention"}), "encoder_bert",
         "unknown pooling mode 'attention'"),
        (lambda m: _add_module(m, "Dense", "2_Dense", {"in_features": 8, "out_features": 4, "activation_function": "torch.nn.modules.activation.LeakyReLU"}),
         "encoder_bert", "Dense activation 'LeakyReLU' is not supported"),
        (lambda m: _add_module(m, "LayerNorm", "2_LayerNorm", {"dimension": 8}), "encoder_bert",
         "module 'sentence_transformers.models.LayerNorm' is not supported"),
        (lambda m: write_json(m / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]),
         "encoder_bert", "no sentence-transformers pooling config"),
        (lambda m: edit_json(m / "config.json", architectures=["Qwen2Model"], model_type="qwen2"), "encoder_bert",
         "Qwen2Model is a causal decoder .*use `base_model: encoder`"),
        (lambda m: edit_json(m / "config.json", architectures=["Gemma3TextModel"], model_type="gemma3_text"),
         "encoder_bert", "`use_bidirectional_attention` off"),
    ],
    ids=["two-poolings", "unknown-pooling", "leaky-relu", "layernorm", "no-pooling", "qwen-bert", "causal-gemma-bert"],
)  # fmt: skip
def test_encoder_checkpoints_serving_refuses_are_refused_with_its_message(
    tmp_path: Path, mutate, kind: str, expected: str  # type: ignore[no-untyped-def]
) -> None:
    """Probe DG #1: these built (exit 0), and the server then refused them at load; the build now runs serving's own
    checks and gives its message, before any engine is written."""
    folder = make_checkpoint(tmp_path / "m", "embedding")
    mutate(folder)
    serving = _serving_refusal(folder, kind)
    assert re.search(expected, serving)
    with pytest.raises(CheckpointLayoutError) as refusal:
        check_repository_layout(folder, BaseModelKind(kind))
    assert serving in str(refusal.value)


def test_the_recorded_pooling_mode_is_the_one_serving_runs(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", "embedding")
    write_json(folder / "1_Pooling" / "config.json", {"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False})  # fmt: skip
    assert check_repository_layout(folder, ENCODER).pooling_mode == "mean_sqrt_len_tokens"
    write_json(folder / "1_Pooling" / "config.json", {"pooling_mode": "lasttoken"})
    assert check_repository_layout(folder, ENCODER).pooling_mode == "lasttoken"
    assert check_repository_layout(make_checkpoint(tmp_path / "c", "classifier"), ENCODER).pooling_mode is None


def test_a_decoder_config_without_max_position_embeddings_takes_its_model_types_default(tmp_path: Path) -> None:
    """The build read no key as "unknown" and fell back to 4096; transformers' default is per model type (Qwen2's
    32768, Llama's 2048), and the engine loads with that."""
    model = make_checkpoint(tmp_path / "m")
    edit_json(model / "config.json", max_position_embeddings=None, architectures=["Qwen2ForCausalLM"])
    assert check_repository_layout(model, DECODER).max_position_embeddings == 32768
    edit_json(model / "config.json", architectures=["LlamaForCausalLM"])
    assert check_repository_layout(model, DECODER).max_position_embeddings == 2048


def test_a_text_config_keeps_its_own_positions_beside_the_architecture_defaults() -> None:
    """The defaults went to the top level of a config nesting the model's keys in `text_config`, where they hid the
    checkpoint's own value: the build recorded 131072 positions where the engine serves 32768 (probe EZ)."""
    from engine_builder.build.checkpoints.layout import _max_positions
    from engine_builder.common.decoder_defaults import with_architecture_defaults

    config = {"architectures": ["Gemma3ForCausalLM"], "text_config": {"max_position_embeddings": 32768}}
    assert _max_positions(with_architecture_defaults(config)) == 32768
    assert _max_positions(with_architecture_defaults({"architectures": ["Gemma3ForCausalLM"], "text_config": {}})) == 131072
