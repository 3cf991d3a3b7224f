"""LoRA adapters in the engine: each adapter's greedy output equals transformers with the adapter merged, alone
and in one batch that mixes adapters and the base model; adapters never share prefix-cache blocks."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import AdapterSpec, EngineConfig
from engine_builder.engine.engine import LLMEngine, RequestRejectedError
from engine_builder.engine.lora import LoraError
from engine_builder.engine.model_runner import row_slots
from tests.engine.lora_adapters import ATTENTION, MLP, greedy, merged_reference, write_adapter
from tests.engine.tiny_models import write_tiny_model

PROMPTS = [[(7 * i + 3) % 250 + 1 for i in range(14)], [5, 6, 7], [(11 * i + 2) % 250 + 1 for i in range(30)]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[AdapterSpec]]:
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_model(root, "llama")
    first = write_adapter(root / "first", base, rank=4, alpha=8.0, targets=ATTENTION + MLP, seed=1)
    second = write_adapter(root / "second", base, rank=2, alpha=2.0, targets=("q_proj", "v_proj", "down_proj"), seed=2)
    return base, [AdapterSpec("first", first, 4, 8.0), AdapterSpec("second", second, 2, 2.0)]


def _engine(base: Path, adapters: list[AdapterSpec], **overrides: object) -> LLMEngine:
    values: dict = dict(
        model_dir=base, dtype="float32", max_seq_len=96, max_num_tokens=16, block_size=4,
        kv_cache_memory_bytes=8 << 20, lora_adapters=tuple(adapters), max_lora_rank=8,
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=())


def _run(engine: LLMEngine, requests: list[tuple[str, list[int], str | None]], max_tokens: int = 8) -> dict:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for request_id, prompt, adapter in requests:
        engine.add_request(GenerationRequest(request_id, tuple(prompt), sampling, adapter=adapter))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return tokens


def test_each_adapter_alone_and_mixed_with_the_base_matches_merged_weights(setup) -> None:
    base, adapters = setup
    references = {None: merged_reference(base, None)}
    for adapter in adapters:
        references[adapter.name] = merged_reference(base, adapter.path)
    expected = {
        (name, index): greedy(model, prompt, 8) for name, model in references.items() for index, prompt in enumerate(PROMPTS)
    }
    assert expected[("first", 0)] != expected[(None, 0)]  # the adapter changes the output
    engine = _engine(base, adapters)
    alone = _run(engine, [("a", PROMPTS[0], "first")])
    assert alone["a"] == expected[("first", 0)]
    # one batch: every prompt under every adapter and the base; the 30-token prompts prefill in chunks
    mixed = [(f"{name}-{index}", prompt, name) for name in (None, "first", "second") for index, prompt in enumerate(PROMPTS)]
    result = _run(engine, mixed)
    for name in (None, "first", "second"):
        for index in range(len(PROMPTS)):
            assert result[f"{name}-{index}"] == expected[(name, index)], (name, index)


def test_adapters_never_share_prefix_blocks(setup) -> None:
    base, adapters = setup
    engine = _engine(base, adapters)
    prompt = PROMPTS[2]
    _run(engine, [("base", prompt, None)])
    hits = engine.blocks.num_prefix_hits
    _run(engine, [("first", prompt, "first")])
    assert engine.blocks.num_prefix_hits == hits  # the base model's blocks are not reused under an adapter
    _run(engine, [("first-again", prompt, "first")])
    assert engine.blocks.num_prefix_hits > hits  # the adapter's own blocks are


def test_an_unknown_adapter_is_refused_by_name(setup) -> None:
    base, adapters = setup
    engine = _engine(base, adapters)
    with pytest.raises(RequestRejectedError, match="no LoRA adapter named 'third'"):
        engine.add_request(GenerationRequest("x", (1, 2), SamplingParams(max_tokens=2), adapter="third"))


def test_pool_refuses_an_adapter_for_another_base(setup, tmp_path: Path) -> None:
    base, _ = setup
    wrong = write_adapter(tmp_path / "wrong", base, rank=2, alpha=2.0, targets=("gate_proj",), seed=3)
    tensors = load_file(str(wrong / "adapter_model.safetensors"))  # one input feature short, as for another base
    tensors = {name: (t[:, :-1] if "lora_A" in name else t).contiguous() for name, t in tensors.items()}
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match=r"gate_proj has A \(2, 63\) and B \(128, 2\); the base model needs \(2, 64\)"):
        _engine(base, [AdapterSpec("wrong", wrong, 2, 2.0)])


def test_row_slots_follow_each_sequence_rows() -> None:
    class Item:
        def __init__(self, slot: int) -> None:
            self.seq = type("Seq", (), {"lora_slot": slot})()

    scheduled = [Item(2), Item(0), Item(1)]
    # decodes first (index 1 at row 0), then the extends: index 0 rows 1-3, index 2 rows 4-5
    assert row_slots({1: 0, 0: 1, 2: 4}, 6, scheduled) == [0, 2, 2, 2, 1, 1]  # type: ignore[arg-type]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_gathered_path_equals_the_segment_path(setup, kernels: str) -> None:
    """The per-row gather + batched matmuls (the path off the CPU) against the CPU's per-adapter segments."""
    if kernels == "triton":
        pytest.importorskip("triton")
    base, adapters = setup
    engine = _engine(base, adapters, kernels=kernels, cuda_graphs=False)
    requests = [("b", PROMPTS[1], None), ("f", PROMPTS[0], "first"), ("s", PROMPTS[1], "second")]
    segments = _run(engine, requests)
    engine = _engine(base, adapters, kernels=kernels, cuda_graphs=False)
    assert engine.runner.lora is not None
    engine.runner.lora.force_gather = True
    assert _run(engine, requests) == segments
    assert engine.runner.lora.gather


def test_only_small_steps_off_the_cpu_gather_per_row() -> None:
    """The gather path copies each row's A and B (rows x out x rank): fine for decode, gigabytes for a prefill, which
    takes the per-adapter segments whatever the device (`meta` stands in for a GPU here)."""
    from engine_builder.engine.lora import GATHER_MAX_ROWS, LoraContext

    context = LoraContext()
    context.set_rows([1, 0, 2] * 4, torch.device("meta"))
    assert context.gather
    context.set_rows([1] * (GATHER_MAX_ROWS + 1), torch.device("meta"))
    assert not context.gather and [slot for slot, _ in context.segments] == [1]
    context.set_rows([1, 2], torch.device("cpu"))
    assert not context.gather


def test_lookahead_keeps_each_adapters_greedy_output(setup) -> None:
    from engine_builder.engine.config import LookaheadConfig

    base, adapters = setup
    prompts = [("r0", [3, 4, 5, 6] * 6, "first"), ("r1", [3, 4, 5, 6] * 6, None), ("r2", [7, 8, 9] * 5, "second")]
    plain = _run(_engine(base, adapters), prompts, max_tokens=12)
    lookahead = LookaheadConfig(window_size=2, ngram_size=3, verification_set_size=2, max_batch_size=4)
    engine = _engine(base, adapters, lookahead=lookahead, max_num_tokens=64)
    assert _run(engine, prompts, max_tokens=12) == plain
    assert engine.lookahead is not None and engine.lookahead.num_steps > 0


def test_every_choice_of_an_n_request_runs_under_its_adapter(setup) -> None:
    """n = 3 forks the choices from the first (the KV blocks are shared): each must decode under the adapter."""
    base, adapters = setup
    engine = _engine(base, adapters)
    expected = greedy(merged_reference(base, adapters[0].path), PROMPTS[0], 6)
    engine.add_request(
        GenerationRequest("n", tuple(PROMPTS[0]), SamplingParams(n=3, max_tokens=6, temperature=0.0, ignore_eos=True),
                          adapter="first")
    )
    choices: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            choices.setdefault(output.index, []).extend(output.token_ids)
    assert choices == {0: expected, 1: expected, 2: expected}


def test_adapters_on_expert_mlps_are_refused_at_build_and_dense_layers_of_a_moe_model_served(tmp_path: Path) -> None:
    """Probe FG: an MLP adapter on a mixture-of-experts base (a Mistral-7B adapter pointed at Mixtral has the same
    shapes) passed the build's check and the server then failed at start; an adapter on a Qwen3-MoE model's dense
    layers only was refused though it can be served (the engine wrapped every layer's MLP)."""
    import json

    from engine_builder.build.peft_lora import AdapterCheckError, BaseModelShapes, read_peft_lora

    mixtral = write_tiny_model(tmp_path, "mixtral")
    on_experts = write_adapter(tmp_path / "experts", mixtral, rank=2, alpha=4.0, targets=("q_proj", "gate_proj"), seed=1)
    with pytest.raises(AdapterCheckError, match="gate_proj of layer 0, a mixture-of-experts layer"):
        read_peft_lora(on_experts, BaseModelShapes.from_config(json.loads((mixtral / "config.json").read_text())), 16)
    qwen_moe = write_tiny_model(tmp_path, "qwen3_moe")  # layer 1 dense (mlp_only_layers), the others experts
    adapter = write_adapter(tmp_path / "dense", qwen_moe, rank=2, alpha=4.0, targets=("q_proj", "gate_proj"), seed=2)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    kept = {name: tensor for name, tensor in weights.items() if ".mlp." not in name or ".layers.1." in name}
    save_file(kept, str(adapter / "adapter_model.safetensors"))
    read_peft_lora(adapter, BaseModelShapes.from_config(json.loads((qwen_moe / "config.json").read_text())), 16)
    engine = _engine(qwen_moe, [AdapterSpec("dense", adapter, 2, 4.0)])
    expected = greedy(merged_reference(qwen_moe, adapter), PROMPTS[0], 8)
    assert expected != greedy(merged_reference(qwen_moe, None), PROMPTS[0], 8)
    assert _run(engine, [("a", PROMPTS[0], "dense")])["a"] == expected
