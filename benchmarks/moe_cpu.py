"""`python -m benchmarks.moe_cpu`: mixture-of-experts on the CPU, the torch engine against transformers.

1. block: one sparse MoE block (Qwen3-MoE layout, a scaled-down Qwen3-30B-A3B: 64 experts, top 8) at 1, 16 and
   128 tokens: our grouped expert compute (tokens sorted by expert, one grouped GEMM per projection) against
   transformers' own `Qwen3MoeSparseMoeBlock.forward` on the same weights, and the outputs compared.
2. decode: a small random-weight Qwen3-MoE checkpoint (written with transformers), greedy decode of 64 tokens at
   batch 1 and 8: the engine's in-process steps against transformers `generate()`; the tokens are compared.

Both run on one torch thread in float32 (this CPU has no fast bf16), side by side in one process, so the ratios
mean more than the absolute times. Writes benchmarks/results/moe-cpu.json (+ PNG).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.base import REPO_ROOT
from benchmarks.report import add_output_arguments, redraw, save_result

RESULTS = REPO_ROOT / "benchmarks" / "results" / "moe-cpu.json"
BLOCK_SHAPE = dict(hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8)
MODEL_SHAPE = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
    norm_topk_prob=True, max_position_embeddings=1024, tie_word_embeddings=True,
)


def best_of(repeats: int, function: Any) -> float:
    """The fastest of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def phase_block(tokens_list: list[int], repeats: int) -> list[dict[str, Any]]:
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from engine_builder.engine.layers import KernelSet
    from engine_builder.engine.layers.moe import MoESpec, SparseMoE

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**BLOCK_SHAPE, norm_topk_prob=True)
    reference = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.02)
    spec = MoESpec(BLOCK_SHAPE["num_experts"], BLOCK_SHAPE["num_experts_per_tok"],
                   BLOCK_SHAPE["moe_intermediate_size"], True, (True,))
    ours = SparseMoE(BLOCK_SHAPE["hidden_size"], spec, "silu")
    with torch.no_grad():
        ours.router.weight.copy_(reference.gate.weight)
        ours.w_gate_up.copy_(reference.experts.gate_up_proj)
        ours.w_down.copy_(reference.experts.down_proj)
    ours.kernels = KernelSet.NATIVE
    rows = []
    for tokens in tokens_list:
        x = torch.randn(1, tokens, BLOCK_SHAPE["hidden_size"])
        with torch.inference_mode():
            expected = reference(x)[0]
            got = ours(x[0])
            ours_s = best_of(repeats, lambda x=x: ours(x[0]))
            theirs_s = best_of(repeats, lambda x=x: reference(x))
        rows.append({
            "tokens": tokens, "ours_ms": round(ours_s * 1e3, 3), "transformers_ms": round(theirs_s * 1e3, 3),
            "speedup": round(theirs_s / ours_s, 2), "max_abs_diff": float((got - expected).abs().max()),
        })
        print(f"block {tokens:4d} tokens: ours {rows[-1]['ours_ms']} ms, transformers {rows[-1]['transformers_ms']} ms",
              file=sys.stderr)
    return rows


def phase_decode(batches: list[int], new_tokens: int, work: Path) -> list[dict[str, Any]]:
    import torch
    import transformers

    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**MODEL_SHAPE)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("norm.weight"):
                parameter.normal_(0, 0.05)
    folder = work / "qwen3-moe-small"
    model.save_pretrained(folder)
    prompt_len = 32
    rows = []
    for batch in batches:
        prompts = torch.randint(100, MODEL_SHAPE["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        options = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompts))
        with torch.inference_mode():
            model.generate(prompts[:, :8], max_new_tokens=2, **options | {"attention_mask": torch.ones_like(prompts[:, :8])})
            started = time.perf_counter()
            output = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
            theirs_s = time.perf_counter() - started
        expected = output[:, prompt_len:].tolist()
        engine = LLMEngine(
            EngineConfig(model_dir=folder, dtype="float32", max_seq_len=256, max_num_tokens=512, max_batch_size=batch,
                         kv_cache_memory_bytes=64 << 20, block_size=16),
            eos_token_ids=(),
        )
        sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationRequest("warm", (1, 2, 3), SamplingParams(max_tokens=2, temperature=0.0)))
        while engine.has_unfinished():
            engine.step()
        for index in range(batch):
            engine.add_request(GenerationRequest(str(index), tuple(prompts[index].tolist()), sampling))
        tokens: dict[str, list[int]] = {}
        started = time.perf_counter()
        while engine.has_unfinished():
            for step_output in engine.step():
                tokens.setdefault(step_output.request_id, []).extend(step_output.token_ids)
        ours_s = time.perf_counter() - started
        same = sum(tokens[str(index)] == expected[index] for index in range(batch))
        rows.append({
            "batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len,
            "ours_tokens_per_s": round(batch * new_tokens / ours_s, 1),
            "transformers_tokens_per_s": round(batch * new_tokens / theirs_s, 1),
            "speedup": round(theirs_s / ours_s, 2), "greedy_identical": f"{same}/{batch}",
        })
        print(f"decode batch {batch}: ours {rows[-1]['ours_tokens_per_s']} tok/s, transformers "
              f"{rows[-1]['transformers_tokens_per_s']} tok/s, identical {same}/{batch}", file=sys.stderr)
    return rows


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    blocks = document["block"]
    positions = range(len(blocks))
    left.bar([p - 0.2 for p in positions], [row["ours_ms"] for row in blocks], 0.4, label="torch engine (grouped)")
    left.bar([p + 0.2 for p in positions], [row["transformers_ms"] for row in blocks], 0.4, label="transformers")
    left.set_xticks(list(positions), [str(row["tokens"]) for row in blocks])
    left.set_xlabel("tokens in the step")
    left.set_ylabel("ms per MoE block (best of repeats)")
    left.set_yscale("log")
    left.set_title("one MoE block: 64 experts, top 8")
    left.legend()
    decodes = document["decode"]
    positions = range(len(decodes))
    right.bar([p - 0.2 for p in positions], [row["ours_tokens_per_s"] for row in decodes], 0.4, label="torch engine")
    right.bar([p + 0.2 for p in positions], [row["transformers_tokens_per_s"] for row in decodes], 0.4,
              label="transformers generate()")
    right.set_xticks(list(positions), [str(row["batch"]) for row in decodes])
    right.set_xlabel("batch")
    right.set_ylabel("output tokens/s")
    right.set_title("small Qwen3-MoE, greedy decode")
    right.legend()
    figure.suptitle("mixture of experts on the CPU, float32, one thread")
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moe_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,16,128")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.plot is not None:
        return redraw(args.plot, plot)
    import torch

    from benchmarks import machine

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        document = {
            "title": "mixture of experts on the CPU: torch engine vs transformers (float32, one thread)",
            "command": "python -m benchmarks.moe_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine.describe(),
            "block_shape": BLOCK_SHAPE,
            "model_shape": MODEL_SHAPE,
            "block": phase_block([int(t) for t in args.tokens.split(",")], args.repeats),
            "decode": phase_decode([int(b) for b in args.batches.split(",")], args.new_tokens, Path(work)),
        }
    return save_result(document, args.out, plot)


if __name__ == "__main__":
    sys.exit(main())
