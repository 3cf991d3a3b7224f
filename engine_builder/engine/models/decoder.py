"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3; Gemma3 through flags; Qwen3-MoE and Mixtral with sparse
expert layers in place of the MLP) over the paged KV cache."""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers import KernelSet
from engine_builder.engine.layers.attention import Attention, AttentionMetadata
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata
from engine_builder.engine.layers.linear import Linear
from engine_builder.engine.layers.mlp import GatedMLP
from engine_builder.engine.layers.moe import MoESpec, SparseMoE
from engine_builder.engine.layers.norm import RMSNorm
from engine_builder.engine.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from engine_builder.engine.models.fused_decode import FusedDecodeStack
    from engine_builder.engine.parallel import TensorParallel
    from engine_builder.engine.quantized_checkpoint import Quantization

RotaryRows = tuple[torch.Tensor, torch.Tensor]  # cos and sin rows of a step's positions


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture facts the decoder needs, read from config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    activation: str
    sliding_window: int | None
    # Gemma3 differences
    norm_offset: float = 0.0
    embedding_scale: float | None = None
    sandwich_norms: bool = False  # extra norms after attention and after the MLP
    sliding_layers: tuple[bool, ...] | None = None  # per layer; None = every layer slides when sliding_window is set
    rope_local_theta: float | None = None  # the sliding layers' rotary base, and their scaling below
    rope_local_scaling: dict[str, Any] | None = None
    query_scale: float | None = None
    final_logit_softcap: float | None = None
    # gpt-oss differences
    o_bias: bool = False  # a bias on the attention output projection
    attention_sinks: bool = False
    # mixture-of-experts layers (Qwen3-MoE, Mixtral); None = every layer has the dense MLP
    moe: MoESpec | None = None


def local_sizes(spec: DecoderSpec, tp: "TensorParallel | None") -> tuple[int, int, int]:
    """(query heads, KV heads, MLP width) one rank holds: all of them without tensor parallelism."""
    if tp is None:
        return spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    q_start, q_stop = tp.query_heads(spec.num_heads, spec.num_kv_heads)
    kv_start, kv_stop = tp.kv_heads(spec.num_kv_heads)
    mlp_start, mlp_stop = tp.part(spec.intermediate_size)
    return q_stop - q_start, kv_stop - kv_start, mlp_stop - mlp_start


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP over a residual stream: `forward(hidden, residual)` returns the pair for the next
    layer, whose input norm adds them (one fused pass where a kernel set has one)."""

    def __init__(self, spec: DecoderSpec, layer_index: int, tp: "TensorParallel | None" = None) -> None:
        super().__init__()
        self.spec = spec
        self.layer_index = layer_index
        self.tp = tp  # under tensor parallelism: this rank's heads and MLP columns, an all-reduce after each half
        num_heads, num_kv_heads, intermediate_size = local_sizes(spec, tp)
        q_size = num_heads * spec.head_dim
        kv_size = num_kv_heads * spec.head_dim
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.qkv = Linear(spec.hidden_size, q_size + 2 * kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        self.is_sliding = spec.sliding_window is not None and (
            spec.sliding_layers is None or spec.sliding_layers[layer_index]
        )
        self.attention = Attention(
            num_heads,
            num_kv_heads,
            spec.head_dim,
            layer_index,
            spec.query_scale ** -0.5 if spec.query_scale else 1.0 / math.sqrt(spec.head_dim),
            spec.sliding_window if self.is_sliding else None,
            qk_norm=(spec.rms_norm_eps, spec.norm_offset) if spec.qk_norm else None,
            sinks=spec.attention_sinks,
        )
        self.post_attention_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.mlp: GatedMLP | SparseMoE
        if spec.moe is not None and spec.moe.sparse_layers[layer_index]:
            self.mlp = SparseMoE(spec.hidden_size, spec.moe, spec.activation)
        else:
            self.mlp = GatedMLP(spec.hidden_size, intermediate_size, spec.activation)
        if spec.sandwich_norms:
            self.pre_mlp_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
            self.post_mlp_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.attention_input(hidden, residual)
        return self.attention_output(self.attention(qkv, cos_sin, metadata, kv_cache), residual)

    # The layer's halves on either side of attention: what runs between two attentions depends on nothing but the
    # rows, so the piecewise graph runner captures it as one graph (engine_builder/engine/graph_runner.py).
    def attention_input(
        self, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input norm (adding the residual stream) and the fused QKV projection: (qkv, residual)."""
        if residual is None:
            residual = hidden
            x = self.input_norm(hidden)
        else:
            x, residual = self.input_norm.add_and_norm(hidden, residual)
        return self.qkv(x), residual

    def attention_output(self, attended: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection, post-attention norm(s) and the MLP: (hidden, residual) for the next layer."""
        x = self._reduce(self.o_proj(attended))
        if self.spec.sandwich_norms:
            x, residual = self.pre_mlp_norm.add_and_norm(self.post_attention_norm(x), residual)
            return self.post_mlp_norm(self._reduce(self.mlp(x))), residual
        x, residual = self.post_attention_norm.add_and_norm(x, residual)
        return self._reduce(self.mlp(x)), residual

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel projection's partial sums, added over the ranks (nothing to do on one rank)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)


class DecoderModel(nn.Module):
    """Embeddings, layers, final norm and LM head. `forward` returns hidden states; `logits` projects rows."""

    # set for quantized checkpoints only, by install_quantized_linears (engine_builder/engine/quantized_checkpoint.py)
    quantization: "Quantization"
    kv_cache_scales: torch.Tensor  # [2 (k, v), layers], a buffer registered for an FP8 KV cache

    def __init__(self, spec: DecoderSpec, tp: "TensorParallel | None" = None) -> None:
        super().__init__()
        self.spec = spec
        self.tp = tp
        # Under tensor parallelism the embedding and the LM head hold this rank's rows of the vocabulary.
        self.vocab_start, vocab_stop = tp.part(spec.vocab_size) if tp is not None else (0, spec.vocab_size)
        vocab_rows = vocab_stop - self.vocab_start
        self.embed_tokens = nn.Parameter(torch.empty(vocab_rows, spec.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(spec, index, tp) for index in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.lm_head = Linear(spec.hidden_size, vocab_rows)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
        self.activation_dtype: torch.dtype | None = None  # float32 when the linears are packed for the CPU
        self.small_batch_rows = 0  # steps with at most this many rows run float32 activations
        self.kernels = KernelSet.NATIVE
        self.fused_decode = True  # the CPU's one-call decode stack, where it applies (EngineConfig.fused_decode)
        self._fused: FusedDecodeStack | None | bool = False  # False: not built yet
        self.local_rotary = (
            RotaryEmbedding(
                spec.head_dim, spec.max_position_embeddings, spec.rope_local_theta, spec.rope_local_scaling
            )
            if spec.rope_local_theta
            else None
        )

    def use_kernels(self, kernels: KernelSet) -> None:
        """Run every layer with this kernel set (see engine_builder/engine/layers/__init__.py)."""
        self.kernels = kernels
        for module in self.modules():
            if hasattr(type(module), "kernels") and module is not self:
                module.kernels = kernels  # type: ignore[assignment]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        hidden, cos_sin, local_cos_sin = self.embed(input_ids, positions)
        fused = self._fused_stack() if self.kernels == KernelSet.NATIVE and hidden.device.type == "cpu" else None
        if fused is not None and isinstance(metadata, CpuAttentionMetadata) and fused.applies(hidden, metadata, kv_cache):
            result = fused.run(hidden, cos_sin, metadata, kv_cache)
            if result is not None:
                return self.norm(result)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, local_cos_sin if layer.is_sliding else cos_sin, metadata, kv_cache)
        return self.final_norm(hidden, residual)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, RotaryRows, RotaryRows]:
        """Token embeddings and the rotary rows of the step's positions: (hidden, global, local (sliding) layers')."""
        hidden = self._lookup(input_ids)
        if self.activation_dtype is not None and input_ids.numel() <= self.small_batch_rows:
            hidden = hidden.to(self.activation_dtype)  # few rows: float32 for the FBGEMM GEMV path
        if self.spec.embedding_scale is not None:
            hidden = hidden * torch.tensor(self.spec.embedding_scale, dtype=hidden.dtype)
        cos_sin = self.rotary.lookup(positions, hidden.dtype)
        local_cos_sin = self.local_rotary.lookup(positions, hidden.dtype) if self.local_rotary is not None else cos_sin
        return hidden, cos_sin, local_cos_sin

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens[input_ids]
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed_tokens.shape[0])
        rows = self.embed_tokens[torch.where(mine, local, 0)]
        return self.tp.all_reduce(rows * mine.unsqueeze(1).to(rows.dtype))  # one rank holds each id: an exact sum

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.norm.add_and_norm(hidden, residual)[0] if residual is not None else self.norm(hidden)

    def _fused_stack(self) -> "FusedDecodeStack | None":
        """Every layer of a decode-only CPU step in one native call, when this model allows it (built on first use,
        after the runner has packed the linears)."""
        if self._fused is False:
            from engine_builder.engine.models.fused_decode import FusedDecodeStack, enabled

            self._fused = FusedDecodeStack.build(self) if self.fused_decode and enabled() else None
        return self._fused  # type: ignore[return-value]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of `hidden`'s rows; under tensor parallelism the vocabulary shards gathered on rank 0
        (the other ranks return their own shard, which nobody reads)."""
        logits = self.lm_head(hidden).float()
        if self.tp is not None:
            gathered = self.tp.gather_last_dim(logits, self.spec.vocab_size)
            if gathered is None:
                return logits
            logits = gathered
        cap = self.spec.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
