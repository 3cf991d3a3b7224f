"""config.json variants read as transformers reads them (probe DE): prefill logits against transformers' (tiny random
checkpoints, float32), and the variants the engine refuses."""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_builder.engine.models import UnsupportedArchitectureError, decoder_spec
from tests.engine.tiny_models import prefill_logits

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1,
)
IDS = [(7 * i + 3) % 250 + 1 for i in range(40)]  # past the 8-token windows


def _save(family: str, path: Path, edit: Callable[[dict[str, Any]], None] | None = None, **config: Any) -> Path:
    """A random `family` checkpoint (biases random too, so a missing one shows), its config.json edited by `edit`."""
    import transformers

    torch.manual_seed(0)
    model_class = getattr(transformers, f"{family.removesuffix('Text')}ForCausalLM")  # Gemma3TextConfig's model
    model = model_class(getattr(transformers, f"{family}Config")(**TINY, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(path)
    if edit is not None:
        document = json.loads((path / "config.json").read_text())
        edit(document)
        (path / "config.json").write_text(json.dumps(document))
    return path


def _assert_matches_transformers(model_dir: Path) -> None:
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = reference(torch.tensor([IDS])).logits[0].float()
    torch.testing.assert_close(prefill_logits(model_dir, IDS), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
@pytest.mark.parametrize("layers", ["max_window_layers", "layer_types"])
def test_qwen_sliding_window_slides_only_the_layers_transformers_slides(
    family: str, layers: str, tmp_path: Path
) -> None:
    """use_sliding_window slid every layer; transformers slides the layers `layer_types` marks (derived, when the
    config has none, as those from max_window_layers on)."""
    if layers == "max_window_layers":  # layer 1 slides
        model_dir = _save(family, tmp_path, lambda c: c.pop("layer_types"), use_sliding_window=True,
                          sliding_window=8, max_window_layers=1)
    else:  # layer 0 slides, which max_window_layers cannot say
        model_dir = _save(family, tmp_path, use_sliding_window=True, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"])
    _assert_matches_transformers(model_dir)


def test_qwen_sliding_window_defaults_to_no_sliding_layer() -> None:
    """max_window_layers defaults to 28 (Qwen2Config/Qwen3Config): a shallower model without layer_types slides
    no layer; Qwen3-MoE slides every layer, as its transformers attention does."""
    config = {**TINY, "use_sliding_window": True, "sliding_window": 8}
    for architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert decoder_spec({**config, "architectures": [architecture]}).sliding_window is None
    moe = {**config, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "max_window_layers": 1}
    spec = decoder_spec(moe)
    assert spec.sliding_window == 8 and spec.sliding_layers is None


@pytest.mark.parametrize("family", ["Llama", "Qwen3"])
def test_attention_bias_loads_the_output_projection_bias(family: str, tmp_path: Path) -> None:
    """attention_bias puts biases on q, k, v and o_proj in transformers; o_proj.bias was refused as 'no place'."""
    _assert_matches_transformers(_save(family, tmp_path, attention_bias=True))


@pytest.mark.parametrize("family", ["Mistral", "Mixtral"])
@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_bias_keys_are_ignored_where_transformers_ignores_them(family: str, key: str, tmp_path: Path) -> None:
    """Mistral and Mixtral have no attention biases whatever attention_bias says (the engine expected q/k/v ones),
    nor MLP biases whatever mlp_bias says (only Llama reads it; the engine refused it)."""
    extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if family == "Mixtral" else {}
    model_dir = _save(family, tmp_path, lambda c: c.update({key: True}), sliding_window=8, **extra)
    _assert_matches_transformers(model_dir)


def test_qwen2_keeps_its_qkv_only_biases() -> None:
    spec = decoder_spec({**TINY, "architectures": ["Qwen2ForCausalLM"], "attention_bias": True})
    assert spec.qkv_bias and not spec.o_bias


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_yarn_without_original_max_position_embeddings_takes_max_position_embeddings(
    key: str, tmp_path: Path
) -> None:
    """transformers completes original_max_position_embeddings (and a missing YaRN factor) from
    max_position_embeddings; the engine failed with a bare KeyError."""
    def edit(config: dict[str, Any]) -> None:
        config.pop("rope_parameters", None)
        config["max_position_embeddings"] = 64
        if key == "rope_scaling":
            config.update(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0})
        else:
            config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}

    _assert_matches_transformers(_save("Llama", tmp_path, edit))


@pytest.mark.parametrize(
    ("scaling", "named"),
    [({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type 'dynamic'"),
     ({"type": "longrope", "factor": 2.0}, "rope_scaling.type 'longrope'")],
)
def test_an_unsupported_rope_type_is_refused_as_unsupported_not_as_a_broken_checkpoint(
    scaling: dict[str, Any], named: str, tmp_path: Path
) -> None:
    from engine_builder.build.build_stage import _check_decoder_weights, _check_torch_decoder
    from engine_builder.build.config.enums import QuantizationType
    from engine_builder.build.errors import BuildError

    with pytest.raises(UnsupportedArchitectureError, match=named):
        decoder_spec({**TINY, "architectures": ["LlamaForCausalLM"], "rope_scaling": scaling})
    model_dir = _save("Llama", tmp_path, lambda c: c.update(rope_scaling=scaling))
    for check in (lambda: _check_torch_decoder(model_dir, QuantizationType.NO_QUANT),
                  lambda: _check_decoder_weights(model_dir)):
        with pytest.raises(BuildError, match="not supported by the torch engine") as refused:
            check()
        assert named in str(refused.value) and "unmodified" not in str(refused.value), str(refused.value)


def _without_defaulted_keys(config: dict[str, Any]) -> None:
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "rms_norm_eps"):
        config.pop(key, None)


@pytest.mark.parametrize("family", ["Mixtral", "Gemma3Text", "GptOss"])
def test_a_config_without_rope_theta_takes_the_model_types_default(family: str, tmp_path: Path) -> None:
    """rope_theta fell back to 10000 whatever the model type: transformers' defaults are Mixtral 1e6 (and
    rms_norm_eps 1e-5), Gemma3 1e6 global and 1e4 local, gpt-oss 1.5e5 with YaRN (factor 32 over 4096)."""
    extra: dict[str, Any] = {
        "Mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "Gemma3Text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                       "query_pre_attn_scalar": 16},
        "GptOss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                   "layer_types": ["sliding_attention", "full_attention"]},
    }[family]
    _assert_matches_transformers(_save(family, tmp_path, _without_defaulted_keys, **extra))


def test_gemma3_sliding_layers_take_their_own_rope_scaling(tmp_path: Path) -> None:
    """Gemma3's rope_parameters is per layer type; the sliding layers' scaling was dropped (only its theta read)."""
    rope = {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    model_dir = _save("Gemma3Text", tmp_path, sliding_window=8, query_pre_attn_scalar=16, rope_parameters=rope,
                      layer_types=["sliding_attention", "full_attention"])
    _assert_matches_transformers(model_dir)


def test_omitted_window_and_head_dim_take_the_model_types_defaults() -> None:
    """MistralConfig's sliding_window is 4096 when config.json omits it (not None); Gemma3's head_dim and
    query_pre_attn_scalar are 256 (not hidden_size / heads)."""
    config = {key: value for key, value in TINY.items() if key != "head_dim"}
    assert decoder_spec({**config, "architectures": ["MistralForCausalLM"]}).sliding_window == 4096
    gemma3 = decoder_spec({**config, "architectures": ["Gemma3ForCausalLM"]})
    assert (gemma3.head_dim, gemma3.query_scale, gemma3.sliding_window) == (256, 256.0, 4096)


_CONFIG_CLASSES = {
    "LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig", "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config", "Gemma3ForCausalLM": "Gemma3TextConfig",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig", "MixtralForCausalLM": "MixtralConfig", "GptOssForCausalLM": "GptOssConfig",
}


@pytest.mark.parametrize("architecture", sorted(_CONFIG_CLASSES))
def test_a_config_with_only_the_shape_keys_means_what_transformers_config_class_makes_of_it(
    architecture: str,
) -> None:
    """Every key a config.json may omit: the spec from the bare shape keys equals the spec from transformers'
    full config for them (num_key_value_heads, Qwen3's head_dim 128 and max_position_embeddings differed)."""
    import inspect

    import transformers

    from engine_builder.engine.models import ARCHITECTURES

    assert set(_CONFIG_CLASSES) == set(ARCHITECTURES), "a new architecture needs its transformers config class here"
    config_class = getattr(transformers, _CONFIG_CLASSES[architecture])
    shape = dict(vocab_size=1000, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
                 num_experts_per_tok=2, moe_intermediate_size=64, num_experts=4, num_local_experts=4)
    shape = {key: value for key, value in shape.items() if key in inspect.signature(config_class.__init__).parameters}
    full = {**config_class(**shape).to_dict(), "architectures": [architecture]}
    bare = decoder_spec({**shape, "architectures": [architecture]})
    expected = decoder_spec(full)
    assert replace(bare, rope_scaling=None) == replace(expected, rope_scaling=None)
    # transformers' rope_parameters also carries rope_theta, which the spec holds on its own
    assert bare.rope_scaling == ({k: v for k, v in expected.rope_scaling.items() if k != "rope_theta"}
                                 if expected.rope_scaling else None)


def test_a_yarn_checkpoint_serves_its_scaled_context(tmp_path: Path) -> None:
    """Qwen2.5's long-context recipe keeps max_position_embeddings and declares YaRN (factor 4 over it): the engine
    capped the context at max_position_embeddings, its rotary table too, where vLLM serves original x factor
    (probe EP). Here 32 positions x 4: a 40-token prompt runs as transformers runs it."""
    from engine_builder.build.checkpoints.layout import _max_positions

    def edit(config: dict[str, Any]) -> None:
        config.pop("rope_parameters", None)
        config.update(max_position_embeddings=32, rope_theta=10000.0,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})

    model_dir = _save("Qwen2", tmp_path / "m", edit)
    config = json.loads((model_dir / "config.json").read_text())
    assert decoder_spec(config).max_position_embeddings == 128
    _assert_matches_transformers(model_dir)  # 40 tokens, past the 32 unscaled positions
    assert _max_positions(config) == 128  # what the build takes as the checkpoint's context (max_seq_len's default)
    linear = {**config, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    assert decoder_spec(linear).max_position_embeddings == 32  # a linear factor is read as already in the count
