"""Each supported architecture's prefill logits equal transformers' (tiny random checkpoints, float32)."""

from pathlib import Path

import pytest
import torch

from tests.engine.tiny_models import prefill_logits

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _tiny(kind: str, path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            **TINY,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=8))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=32))
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(
            **TINY,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )
        model = transformers.Gemma3ForCausalLM(config)
    elif kind == "qwen3_moe":  # plain top-k weights; layer 1 dense (mlp_only_layers), layer 2 by the sparse step
        config = transformers.Qwen3MoeConfig(
            **{**TINY, "num_hidden_layers": 3}, head_dim=16, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**{**TINY, "intermediate_size": 48}, num_local_experts=4,
                                            num_experts_per_tok=2, sliding_window=None)
        model = transformers.MixtralForCausalLM(config)
    elif kind == "gpt_oss":  # sinks, biases, alternating sliding/full layers, YaRN, clamped SwiGLU experts
        config = transformers.GptOssConfig(
            **{**TINY, "intermediate_size": 32}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        )
        model = transformers.GptOssForCausalLM(config)
        with torch.no_grad():  # sinks and expert weights large enough to matter
            for name, parameter in model.named_parameters():
                if name.endswith(("sinks", "experts.gate_up_proj", "experts.down_proj")):
                    parameter.normal_(0, 0.5 if name.endswith("sinks") else 0.2)
    else:
        raise AssertionError(kind)
    with torch.no_grad():  # random biases too, so a missing bias would show
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "qwen3_moe", "mixtral", "gpt_oss"])
def test_prefill_logits_match_transformers(kind: str, tmp_path: Path) -> None:
    import transformers

    model_dir = _tiny(kind, tmp_path / kind)
    ids = [(7 * i + 3) % 250 + 1 for i in range(20)]  # longer than the sliding windows
    ours = prefill_logits(model_dir, ids)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


def test_unknown_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from engine_builder.engine.models import UnsupportedArchitectureError, decoder_spec

    with pytest.raises(UnsupportedArchitectureError, match="PhiForCausalLM"):
        decoder_spec({"architectures": ["PhiForCausalLM"]})


@pytest.mark.parametrize("kind", ["mistral", "gemma3", "qwen3", "qwen3_moe", "mixtral", "gpt_oss"])
def test_paged_decode_matches_transformers_past_the_sliding_window(kind: str, tmp_path: Path) -> None:
    import transformers

    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    model_dir = _tiny(kind, tmp_path / kind)
    prompt = [(5 * i + 11) % 250 + 1 for i in range(6)]
    engine = LLMEngine(
        EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            max_seq_len=64,
            max_num_tokens=64,
            block_size=4,
            kv_cache_memory_bytes=8 * 2**20,
        ),
        eos_token_ids=(),
    )
    engine.add_request(GenerationRequest("r", tuple(prompt), SamplingParams(max_tokens=20, temperature=0.0)))
    ours: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            ours.extend(output.token_ids)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert ours == expected


def _generate(model: object, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(  # type: ignore[attr-defined]
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            eos_token_id=None,
            pad_token_id=0,
        )
    return output[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_moe_batch_with_chunked_prefill_and_prefix_cache_matches_transformers(kind: str, tmp_path: Path) -> None:
    """Four requests in one batch: prompts longer than a step's token budget (chunked prefill), two sharing a
    16-token prefix (the second reuses cached blocks); each equals transformers' greedy output alone."""
    import transformers

    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    model_dir = _tiny(kind, tmp_path / kind)
    shared = [(3 * i + 7) % 250 + 1 for i in range(16)]
    prompts = [shared + [11, 12, 13], shared + [200, 9], [5, 6, 7], [(11 * i + 2) % 250 + 1 for i in range(30)]]
    engine = LLMEngine(
        EngineConfig(model_dir=model_dir, dtype="float32", max_seq_len=64, max_num_tokens=12, block_size=4,
                     kv_cache_memory_bytes=8 * 2**20),
        eos_token_ids=(),
    )
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest("r0", tuple(prompts[0]), sampling))
    while engine.has_unfinished():  # the first request fills the cache with the shared prefix
        engine.step()
    ours: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"b{index}", tuple(prompt), sampling))
    while engine.has_unfinished():
        for output in engine.step():
            ours.setdefault(output.request_id, []).extend(output.token_ids)
    assert engine.blocks.hit_rate() > 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for index, prompt in enumerate(prompts):
        assert ours[f"b{index}"] == _generate(reference, prompt, 8), index


def test_attention_sinks_are_refused_by_the_triton_kernels_when_asked_for(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    model_dir = _tiny("gpt_oss", tmp_path / "gpt_oss")
    with pytest.raises(ValueError, match="no attention-sink kernels"):
        LLMEngine(EngineConfig(model_dir=model_dir, dtype="float32", kernels="triton", max_seq_len=64,
                               kv_cache_memory_bytes=8 << 20, block_size=4), eos_token_ids=())
