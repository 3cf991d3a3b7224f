"""The grouped expert GEMM and the pair alignment against per-expert matmuls, and the MoE block's kernel paths
against each other and a loop over experts."""

from unittest import mock

import pytest
import torch

from engine_builder.engine.kernels.triton.moe import align_pairs, block_rows, grouped_gemm
from engine_builder.engine.layers import KernelSet
from engine_builder.engine.layers.moe import MoESpec, SparseMoE, grouped_matmul, route


def _expert_ids(tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Distinct experts per token (as top-k gives), uneven across experts, expert 0 never chosen."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=generator)
    scores[:, 0] = -1.0
    scores[:, 1] += 0.5  # a popular expert
    return torch.topk(scores, top_k, dim=-1).indices


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_pairs_groups_every_pair_once_by_expert(block_m: int) -> None:
    experts = _expert_ids(37, 3, 8, seed=1)
    pairs, block_expert = align_pairs(experts, 8, block_m)
    flat = experts.reshape(-1)
    assert pairs.numel() == block_expert.numel() * block_m
    real = pairs[pairs < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # each pair exactly once
    for block, expert in enumerate(block_expert.tolist()):
        rows = pairs[block * block_m : (block + 1) * block_m]
        rows = rows[rows < flat.numel()]
        if expert == 8:  # past the last run: no pairs
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == expert).all()
    assert 0 not in block_expert.tolist()  # an expert with no pairs has no block
    assert block_expert.tolist() == sorted(block_expert.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [3, 40])
def test_grouped_gemm_matches_per_expert_matmuls(device, dtype: torch.dtype, tokens: int) -> None:
    num_experts, top_k, hidden, width = 8, 2, 48, 40  # sizes not multiples of the tiles
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    weights = (torch.randn(num_experts, width, hidden, generator=generator) / 8).to(dtype)
    scale = torch.rand(tokens * top_k, generator=generator)
    experts = _expert_ids(tokens, top_k, num_experts, seed=2)
    block_m = block_rows(tokens * top_k, num_experts)
    pairs, block_expert = align_pairs(experts.to(device), num_experts, block_m)
    num_pairs = tokens * top_k
    # first GEMM: rows of x (pair // top_k); second: the pair's own row, scaled
    first = grouped_gemm(x.to(device), weights.to(device), pairs, block_expert, num_pairs, block_m, top_k)
    rows = torch.randn(num_pairs, hidden, generator=generator).to(dtype)
    second = grouped_gemm(
        rows.to(device), weights.to(device), pairs, block_expert, num_pairs, block_m, 1, scale=scale.to(device)
    )
    flat = experts.reshape(-1)
    expected_first = torch.stack([x[p // top_k].float() @ weights[flat[p]].float().T for p in range(num_pairs)])
    expected_second = torch.stack(
        [rows[p].float() @ weights[flat[p]].float().T * scale[p] for p in range(num_pairs)]
    )
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-3, "rtol": 3e-3}
    torch.testing.assert_close(first.cpu().float(), expected_first, **tolerance)
    torch.testing.assert_close(second.cpu().float(), expected_second, **tolerance)


def _block(normalize: bool, seed: int = 0, gpt_oss: bool = False) -> SparseMoE:
    spec = MoESpec(num_experts=6, top_k=2, intermediate_size=24, normalize_top_k=normalize, sparse_layers=(True,))
    if gpt_oss:
        spec = MoESpec(6, 2, 24, False, (True,), softmax_after_top_k=True, biases=True, swiglu_limit=0.5)
    block = SparseMoE(32, spec, "silu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / 4)
    return block


def _loop_reference(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """A token at a time, an expert at a time: the definition the grouped paths must equal."""
    spec = block.spec
    logits = block.router(x)
    if spec.softmax_after_top_k:
        best, experts = torch.topk(logits, spec.top_k, dim=-1)
        weights = torch.softmax(best, dim=-1)
    else:
        weights, experts = route(logits, spec.top_k, spec.normalize_top_k)
    out = torch.zeros_like(x)
    size = spec.intermediate_size
    for token in range(x.shape[0]):
        for slot in range(spec.top_k):
            expert = int(experts[token, slot])
            gate_up = block.w_gate_up[expert] @ x[token]
            if block.w_gate_up_bias is not None:
                gate_up = gate_up + block.w_gate_up_bias[expert]
            gate, up = gate_up[:size], gate_up[size:]
            if spec.swiglu_limit is not None:  # gpt-oss's clamped SwiGLU, written out
                gate, up = gate.clamp(max=spec.swiglu_limit), up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
                hidden = (up + 1) * gate * torch.sigmoid(spec.swiglu_alpha * gate)
            else:
                hidden = torch.nn.functional.silu(gate) * up
            expert_out = block.w_down[expert] @ hidden
            if block.w_down_bias is not None:
                expert_out = expert_out + block.w_down_bias[expert]
            out[token] += weights[token, slot] * expert_out
    return out


@pytest.mark.parametrize("kernels", [KernelSet.TORCH, KernelSet.NATIVE, KernelSet.TRITON])
@pytest.mark.parametrize("variant", ["plain", "normalized", "gpt_oss"])
def test_moe_block_matches_the_loop_over_experts(device, kernels: KernelSet, variant: str) -> None:
    if kernels == KernelSet.NATIVE and device.type != "cpu":
        pytest.skip("native kernels are CPU kernels")
    block = _block(variant == "normalized", gpt_oss=variant == "gpt_oss")
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(3))
    expected = _loop_reference(block, x)
    block.to(device).kernels = kernels
    with torch.inference_mode():
        torch.testing.assert_close(block(x.to(device)).cpu(), expected, atol=1e-5, rtol=1e-5)


def test_route_renormalizes_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain, experts = route(logits, 2, normalize=False)
    normalized, _ = route(logits, 2, normalize=True)
    assert experts.tolist() == [[0, 1]]
    torch.testing.assert_close(plain, torch.softmax(logits, -1)[:, :2])
    torch.testing.assert_close(normalized.sum(-1), torch.ones(1))


def test_grouped_matmul_loop_fallback_equals_pytorch_grouped_gemm() -> None:
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(9, 16, generator=generator)
    weights = torch.randn(4, 8, 16, generator=generator)
    ends = torch.tensor([2, 2, 7, 9])  # the second group is empty
    grouped = grouped_matmul(rows, weights, ends)
    with mock.patch("engine_builder.engine.layers.moe._has_grouped_mm", return_value=False):
        looped = grouped_matmul(rows, weights, ends)
    torch.testing.assert_close(grouped, looped)
    torch.testing.assert_close(looped[2:7], rows[2:7] @ weights[2].T)


def test_triton_path_reads_nothing_back_to_the_host(device) -> None:
    """A CUDA graph cannot hold a host read-back: the Triton path must not call item/tolist or branch on a tensor."""
    block = _block(True).to(device)
    block.kernels = KernelSet.TRITON
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(5)).to(device)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("host read-back inside the MoE block")

    with torch.inference_mode(), mock.patch.multiple(
        torch.Tensor, item=refuse, tolist=refuse, __bool__=refuse, nonzero=refuse
    ):
        out = block(x)
    assert out.shape == (5, 32)
    # the guard can fail: the grouped PyTorch path reads the group sizes back when it loops
    block.kernels = KernelSet.TORCH
    with torch.inference_mode(), mock.patch.multiple(
        torch.Tensor, item=refuse, tolist=refuse, __bool__=refuse, nonzero=refuse
    ), mock.patch("engine_builder.engine.layers.moe._has_grouped_mm", return_value=False), pytest.raises(AssertionError):
        block(x)
