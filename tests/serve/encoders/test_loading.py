"""Loading checks: which checkpoints each `base_model` kind serves, pooling resolution, ST layouts."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_builder.common.encoder_checkpoint import (
    EncoderTask,
    read_checkpoint_config,
    read_layout_spec,
    read_pooling_mode,
)
from engine_builder.serve.encoders.engine import EncoderEngine
from engine_builder.serve.encoders.errors import ModelLoadError
from engine_builder.serve.encoders.loader import default_dtype
from engine_builder.serve.encoders.tokenizer import EncoderTokenizer
from engine_builder.serve.encoders.truncation import REFUSE_OVER_LENGTH, Truncation, TruncationDirection
from tests.serve.encoders.helpers import run_with


def test_encoder_bert_refuses_causal_decoders(tiny_llama_embedder_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="use `base_model: encoder`"):
        read_checkpoint_config(tiny_llama_embedder_dir, "encoder_bert")


def test_decoder_kind_is_not_an_encoder(minilm_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not an encoder"):
        read_checkpoint_config(minilm_dir, "decoder")


def test_generation_checkpoint_without_pooling_config_is_refused(smollm2_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no sentence-transformers pooling config"):
        EncoderEngine.from_model_dir(smollm2_dir, kind="encoder", max_num_tokens=1024, max_batch_size=4)


def test_classifier_config_reads_labels_in_index_order(tiny_bert_classifier_dir: Path) -> None:
    config = read_checkpoint_config(tiny_bert_classifier_dir, "encoder_bert")
    assert config.task is EncoderTask.CLASSIFICATION
    assert config.id2label == ("negative", "neutral", "positive")


def test_causal_lm_checkpoint_with_st_pooling_embeds_with_its_base_model(
    tmp_path: Path, smollm2_dir: Path, tiny_llama_embedder_dir: Path
) -> None:
    """Qwen3-Embedding style: a `...ForCausalLM` config plus modules.json and a lasttoken Pooling folder."""
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig.from_pretrained(str(tiny_llama_embedder_dir))
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path)
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(smollm2_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    engine = EncoderEngine.from_model_dir(tmp_path, kind="encoder", max_num_tokens=1024, max_batch_size=4)
    assert engine.info.architecture == "LlamaForCausalLM" and engine.info.pooling == "lasttoken"
    base = AutoModel.from_pretrained(str(tmp_path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    with torch.inference_mode():
        reference = base(**tokenizer("hello there", return_tensors="pt")).last_hidden_state[0, -1].numpy()
    result = run_with(engine, lambda: engine.embed(["hello there", "a second, longer input"]))
    np.testing.assert_allclose(result.embeddings[0], reference / np.linalg.norm(reference), atol=1e-5)


def test_default_dtype_is_the_checkpoints_16_bit_one_on_cuda(minilm_dir: Path) -> None:
    config = read_checkpoint_config(minilm_dir, "encoder_bert")  # MiniLM's config states no dtype
    assert default_dtype(config, "cpu") is torch.float32
    assert default_dtype(config, "cuda:0") is torch.float16
    for stated, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float16)):
        assert default_dtype(dataclasses.replace(config, torch_dtype=stated), "cuda") is expected
        assert default_dtype(dataclasses.replace(config, torch_dtype=stated), "cpu") is torch.float32
    # EmbeddingGemma states float32, and its activations overflow float16 (its model card): bfloat16 on CUDA
    gemma = dataclasses.replace(config, model_type="gemma3_text", torch_dtype="float32")
    assert default_dtype(gemma, "cuda") is torch.bfloat16 and default_dtype(gemma, "cpu") is torch.float32


def test_pooling_config_formats(tmp_path: Path) -> None:
    config = tmp_path / "1_Pooling" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert read_pooling_mode(tmp_path, "1_Pooling") == "cls"
    config.write_text(json.dumps({"pooling_mode": "weightedmean"}))
    assert read_pooling_mode(tmp_path, "1_Pooling") == "weightedmean"
    config.write_text(json.dumps({"pooling_mode": ["cls", "mean"]}))
    with pytest.raises(ModelLoadError, match="exactly one"):
        read_pooling_mode(tmp_path, "1_Pooling")


def test_unknown_sentence_transformers_module_is_refused(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.StaticEmbedding"}]
        )
    )
    with pytest.raises(ModelLoadError, match="StaticEmbedding"):
        read_layout_spec(tmp_path)


def test_minilm_layout_and_matryoshka_hint(minilm_dir: Path, tiny_st_dense_dir: Path) -> None:
    layout = read_layout_spec(minilm_dir)
    assert layout is not None
    assert (layout.pooling_mode, layout.normalize, layout.max_seq_length, layout.dense_modules) == (
        "mean",
        True,
        256,
        (),
    )
    engine = EncoderEngine.from_model_dir(
        tiny_st_dense_dir, kind="encoder_bert", max_num_tokens=1024, max_batch_size=4
    )
    assert engine.info.supports_matryoshka  # its model card mentions MatryoshkaLoss


def test_tokenizer_ignores_the_padding_baked_into_tokenizer_json(minilm_dir: Path) -> None:
    tokenizer = EncoderTokenizer.from_model_dir(minilm_dir, max_input_length=8, vocab_size=30522)
    (hello,) = tokenizer.encode(["hello"], truncation=REFUSE_OVER_LENGTH, field="input")
    assert hello.token_ids == [101, 7592, 102]
    text = "one two three four five six seven eight nine ten"
    right, left = (
        tokenizer.encode([text], truncation=Truncation(8, direction), field="input")[0]
        for direction in (TruncationDirection.RIGHT, TruncationDirection.LEFT)
    )
    assert right.num_tokens == left.num_tokens == 8
    assert right.token_ids[0] == left.token_ids[0] == 101 and right.token_ids[-1] == left.token_ids[-1] == 102
    assert right.token_ids[1:-1] != left.token_ids[1:-1]
    (pair,) = tokenizer.encode([("a b", "c")], truncation=REFUSE_OVER_LENGTH, field="texts")
    assert pair.token_type_ids == [0, 0, 0, 0, 1, 1]


def test_a_mixed_batch_names_a_bad_input_by_its_place_in_the_request(minilm_dir: Path) -> None:
    """Probe HB: texts and token-id lists mixed in one TEI request were checked as two lists, so a refusal named
    the input by its place in its kind's list (`inputs[1]` for the third input), or not at all."""
    from engine_builder.serve.encoders.errors import EmptyInputError, InputTooLongError, InvalidRequestError

    tokenizer = EncoderTokenizer.from_model_dir(minilm_dir, max_input_length=8, vocab_size=30522)
    cases = [
        (["short", [101, 102], "word " * 40], InputTooLongError, "inputs[2] has"),
        (["word " * 4000, [101]], InputTooLongError, "inputs[0] is far over"),
        (["ok", [101] * 30], InputTooLongError, "inputs[1] has 30 tokens"),
        (["ok", "fine", [10**6]], InvalidRequestError, "inputs[2] contains token id 1000000"),
        ([[101], "ok", []], EmptyInputError, "inputs[2] has no tokens"),
    ]
    for inputs, kind, says in cases:
        with pytest.raises(kind) as refused:
            tokenizer.encode_inputs(inputs, REFUSE_OVER_LENGTH, "inputs")
        assert says in str(refused.value), (inputs, str(refused.value))
    assert [e.token_ids for e in tokenizer.encode_inputs(["hello", [7, 8]], REFUSE_OVER_LENGTH, "inputs")] == [
        [101, 7592, 102], [7, 8]]


def test_a_max_seq_length_past_the_position_table_is_capped_to_it(minilm_dir: Path, tmp_path: Path) -> None:
    """Probe AG: MiniLM with `max_seq_length: 1024` (512 positions) took a 702-token input, whose forward failed,
    and with it every request in the same batch."""
    from engine_builder.serve.encoders.loader import load_encoder

    copy = tmp_path / "minilm"
    shutil.copytree(minilm_dir, copy)
    settings = json.loads((copy / "sentence_bert_config.json").read_text())
    (copy / "sentence_bert_config.json").write_text(json.dumps({**settings, "max_seq_length": 1024}))
    _, _, info = load_encoder(copy, kind="encoder_bert", max_num_tokens=16384, max_batch_size=8)
    assert info.max_input_length == 512
