"""Load HF safetensors checkpoints into `DecoderModel`, fusing q/k/v and gate/up as they stream in."""

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine_builder.engine import quantized_checkpoint as quantized
from engine_builder.engine.models import DecoderModel, UnsupportedArchitectureError, decoder_spec
from engine_builder.engine.models.decoder import DecoderSpec, local_sizes
from engine_builder.engine.models.gpt_oss_weights import dequantize_mxfp4, to_engine_layout
from engine_builder.engine.parallel import TensorParallel, TensorParallelError, check_shardable

logger = logging.getLogger(__name__)

_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Expert tensors: per expert as Qwen3-MoE (`mlp.experts.E.gate_proj`) and Mixtral (`block_sparse_moe.experts.E.w1`)
# publish them, or stacked as transformers 5 keeps them in memory (`mlp.experts.gate_up_proj` [E, 2I, H]).
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_EXPERT_PARTS = {  # checkpoint name -> (our parameter, part: 0 gate, 1 up, None the whole expert)
    "gate_proj": ("mlp.w_gate_up", 0), "w1": ("mlp.w_gate_up", 0),
    "up_proj": ("mlp.w_gate_up", 1), "w3": ("mlp.w_gate_up", 1),
    "down_proj": ("mlp.w_down", None), "w2": ("mlp.w_down", None),
}
_STACKED_EXPERTS = {
    "mlp.experts.gate_up_proj": "mlp.w_gate_up", "block_sparse_moe.experts.gate_up_proj": "mlp.w_gate_up",
    "mlp.experts.down_proj": "mlp.w_down", "block_sparse_moe.experts.down_proj": "mlp.w_down",
    "mlp.gate.weight": "mlp.router.weight", "block_sparse_moe.gate.weight": "mlp.router.weight",
    # gpt-oss
    "mlp.router.weight": "mlp.router.weight", "mlp.router.bias": "mlp.router.bias",
    "mlp.experts.gate_up_proj_bias": "mlp.w_gate_up_bias", "mlp.experts.down_proj_bias": "mlp.w_down_bias",
}
_MXFP4 = re.compile(r"(.*mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)")
Part = int | tuple[int, int | None] | None  # a fused matrix's part, or (expert, part of the expert), or the whole
_NORMS = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "self_attn.o_proj.weight": "o_proj.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    "self_attn.o_proj.bias": "o_proj.bias",
    "self_attn.sinks": "attention.sinks",
}
_FUSED = {  # checkpoint suffix -> (our parameter, part index)
    "self_attn.q_proj.weight": ("qkv.weight", 0),
    "self_attn.k_proj.weight": ("qkv.weight", 1),
    "self_attn.v_proj.weight": ("qkv.weight", 2),
    "self_attn.q_proj.bias": ("qkv.bias", 0),
    "self_attn.k_proj.bias": ("qkv.bias", 1),
    "self_attn.v_proj.bias": ("qkv.bias", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up.weight", 1),
}


class CheckpointMismatchError(ValueError):
    pass


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def check_decoder_checkpoint(model_dir: Path) -> None:
    """What `load_decoder` would refuse, found from the checkpoint's tensor names, shapes and dtypes alone (no
    weight is read, nothing allocated): the build runs it, so a checkpoint the engine cannot load fails the build,
    not the first serve. Quantized and MXFP4 checkpoints are left to the load (their scales must be read)."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config") or (model_dir / "hf_quant_config.json").exists():
        return
    load_decoder(model_dir, torch.bfloat16, torch.device("meta"), metadata_only=True)


def load_decoder(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    dummy: bool = False,
    tp: TensorParallel | None = None,
    metadata_only: bool = False,
) -> DecoderModel:
    """The model of `model_dir` on `device`; with `dummy`, random weights from config.json alone (benchmarks).
    With `tp`, this rank's shard, reading only its slices of the checkpoint. With `metadata_only` (on the meta
    device), each tensor's header stands in for its data: the checks run, nothing is read."""
    config = json.loads((model_dir / "config.json").read_text())
    spec = decoder_spec(config)
    if tp is not None:
        check_shardable(spec, tp.world_size)
    with torch.device("meta"):
        model = DecoderModel(spec, tp)
    model.to(dtype)  # still on meta: the weights are allocated once, in their own dtype
    model.to_empty(device=device)
    if dummy:
        return _dummy_weights(model, config, device)
    files = safetensors_files(model_dir)
    gpt_oss_layout = spec.moe is not None and spec.moe.checkpoint_layout == "gpt_oss"
    mxfp4 = (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"
    if mxfp4 and not gpt_oss_layout:
        raise UnsupportedArchitectureError(f"{spec.architecture}: MXFP4 checkpoints are read for gpt-oss only")
    quantization = None if mxfp4 else quantized.read_quantization(model_dir, config)
    if quantization is not None and spec.moe is not None:
        raise UnsupportedArchitectureError(
            f"{spec.architecture}: quantized mixture-of-experts checkpoints are not supported by the torch engine "
            "(its FP8/NVFP4 layers cover dense linears only); serve the 16-bit checkpoint"
        )
    if quantization is not None and tp is not None and quantization.quant_algo not in ("", "FP8"):
        raise TensorParallelError(
            f"trt_llm.build.tensor_parallel_count {tp.world_size}: {quantization.quant_algo} checkpoints are not split "
            "over ranks by the torch engine (FP8 and 16-bit are)"
        )
    if quantization is not None:
        with safe_open(str(files[0]), framework="pt", device="cpu") as handle:
            prefix = quantized.checkpoint_prefix(list(handle.keys()))
        quantized.install_quantized_linears(model, quantization, prefix)
    _build_rotary_tables(model, device)
    parameters = dict(model.named_parameters())
    loaded: set[str] = set()
    num_heads, num_kv_heads, intermediate_size = local_sizes(spec, tp)
    q_size = num_heads * spec.head_dim
    kv_size = num_kv_heads * spec.head_dim
    fused_offsets = {
        "qkv": [0, q_size, q_size + kv_size, q_size + 2 * kv_size],
        "mlp.gate_up": [0, intermediate_size, 2 * intermediate_size],
    }
    pending_mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # a packed tensor's blocks or scales, until both are read
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                packed = _MXFP4.fullmatch(name) if gpt_oss_layout else None
                if packed is not None:
                    halves = pending_mxfp4.setdefault(packed.group(1), {})
                    halves[packed.group(2)] = handle.get_tensor(name)
                    if len(halves) == 2:
                        base_name = packed.group(1)
                        tensor = dequantize_mxfp4(halves["blocks"], halves["scales"])
                        del pending_mxfp4[base_name]
                        our_name = _load_whole(parameters, base_name, tensor, spec, rows_first=True, path=path)
                        loaded.add(our_name)
                    continue
                scale = quantized.split_scale_name(name) if quantization is not None else None
                if scale is not None:
                    _load_scale(model, name, scale, handle.get_tensor(name), fused_offsets)
                    continue
                target = _target(name)
                if target is None:
                    logger.debug("ignoring checkpoint tensor %s", name)
                    continue
                our_name, part = target
                if our_name not in parameters:
                    raise CheckpointMismatchError(f"{path.name}: tensor {name} has no place in {spec.architecture}")
                if metadata_only:
                    tensor = _header_tensor(handle.get_slice(name), name)
                elif tp is None:
                    tensor = handle.get_tensor(name)
                else:
                    tensor = _read_shard(handle, name, our_name, part, spec, tp)
                if gpt_oss_layout and part is None:
                    tensor = to_engine_layout(our_name, tensor, rows_first=False)
                _place(parameters[our_name], our_name, part, tensor, fused_offsets, name)
                loaded.add(our_name if part is None else f"{our_name}#{part}")
    if pending_mxfp4:
        raise CheckpointMismatchError(f"MXFP4 tensors without their blocks or scales: {sorted(pending_mxfp4)[:5]}")
    if spec.tie_word_embeddings or "lm_head.weight" not in loaded:
        if "lm_head.weight" not in loaded and not spec.tie_word_embeddings:
            logger.warning("%s has no lm_head.weight; tying it to the embeddings", model_dir)
        model.lm_head.weight = model.embed_tokens
        loaded.add("lm_head.weight")
    _check_complete(model, loaded)
    if quantization is not None and (missing := quantized.missing_scales(model)):
        raise CheckpointMismatchError(f"quantized checkpoint is missing {len(missing)} scales, e.g. {missing[:5]}")
    model.eval()
    return model


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _header_tensor(header: Any, name: str) -> torch.Tensor:
    """A meta tensor with a checkpoint tensor's shape and dtype, read from the safetensors header."""
    dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
    if dtype is None:
        raise CheckpointMismatchError(f"{name}: dtype {header.get_dtype()} is not one the engine loads")
    return torch.empty(header.get_shape(), dtype=dtype, device="meta")


def _read_shard(handle: Any, name: str, our_name: str, part: Part, spec: DecoderSpec, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor, read alone (Megatron layout: column-parallel QKV and gate/up split
    their rows, row-parallel o_proj and down their columns, the embedding and LM head the vocabulary)."""
    whole = handle.get_slice(name)
    head_dim = spec.head_dim
    leaf = our_name.split(".", 2)[-1] if our_name.startswith("layers.") else our_name
    query_heads = tp.query_heads(spec.num_heads, spec.num_kv_heads)
    rows: tuple[int, int] | None = None
    columns: tuple[int, int] | None = None
    if leaf in ("embed_tokens", "lm_head.weight"):
        rows = tp.part(spec.vocab_size)
    elif leaf in ("qkv.weight", "qkv.bias"):
        start, stop = query_heads if part == 0 else tp.kv_heads(spec.num_kv_heads)
        rows = (start * head_dim, stop * head_dim)
    elif leaf == "attention.sinks":
        rows = query_heads
    elif leaf == "mlp.gate_up.weight":
        rows = tp.part(spec.intermediate_size)
    elif leaf == "o_proj.weight":
        start, stop = query_heads
        columns = (start * head_dim, stop * head_dim)
    elif leaf == "mlp.down.weight":
        columns = tp.part(spec.intermediate_size)
    elif leaf == "o_proj.bias":  # added once, after the all-reduce: rank 0 holds it, the others zeros
        tensor = whole[:]
        return tensor if tp.rank == 0 else torch.zeros_like(tensor)
    if rows is not None:
        return whole[rows[0] : rows[1]]
    if columns is not None:
        return whole[:, columns[0] : columns[1]]
    return whole[:]


def _build_rotary_tables(model: DecoderModel, device: torch.device) -> None:
    """Rotary tables are computed, not loaded: rebuild them on the real device in float32."""
    spec = model.spec
    model.rotary.__init__(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)  # type: ignore[misc]
    model.rotary.to(device)
    if model.local_rotary is not None:
        model.local_rotary.__init__(  # type: ignore[misc]
            spec.head_dim, spec.max_position_embeddings, spec.rope_local_theta, spec.rope_local_scaling
        )
        model.local_rotary.to(device)


def _dummy_weights(model: DecoderModel, config: dict, device: torch.device) -> DecoderModel:
    """vLLM's `--load-format dummy`: normal(0, initializer_range) matrices, unit norms, zero biases, drawn on the
    device from a fixed seed; the LM head tied as the config says. Only speed is meaningful with these."""
    _build_rotary_tables(model, device)
    generator = torch.Generator(device=device).manual_seed(0)
    std = float(config.get("initializer_range", 0.02))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0 - model.spec.norm_offset)
            elif name.endswith(".bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, std, generator=generator)
    if model.spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens
    logger.warning(
        "dummy weights: %s drawn at random (load_format dummy): the outputs are meaningless", model.spec.architecture
    )
    return model.eval()


def _load_scale(
    model: DecoderModel, name: str, scale: tuple[str, str], tensor: torch.Tensor, fused_offsets: dict[str, list[int]]
) -> None:
    weight_name, scale_name = scale
    target = _target(weight_name)
    if target is None:
        raise CheckpointMismatchError(f"scale tensor {name} belongs to no layer of the torch engine")
    our_name, part = target
    if isinstance(part, tuple):  # quantized MoE checkpoints are refused before their tensors are read
        raise CheckpointMismatchError(f"scale tensor {name} belongs to an expert; quantized experts are not supported")
    module_name = our_name.removesuffix(".weight")
    rows = slice(None)
    if part is not None:
        offsets = fused_offsets["qkv" if module_name.endswith("qkv") else "mlp.gate_up"]
        rows = slice(offsets[part], offsets[part + 1])
    quantized.load_scale(model, module_name, scale_name, rows, tensor)


def _load_whole(
    parameters: Mapping[str, torch.Tensor], base_name: str, tensor: torch.Tensor, spec: object, rows_first: bool,
    path: Path,
) -> str:
    """A dequantized gpt-oss expert tensor into its parameter; returns the parameter's name."""
    target = _target(base_name)
    if target is None or target[0] not in parameters:
        raise CheckpointMismatchError(f"{path.name}: tensor {base_name} has no place in {spec}")
    our_name = target[0]
    _place(parameters[our_name], our_name, None, to_engine_layout(our_name, tensor, rows_first), {}, base_name)
    return our_name


def _place(
    parameter: torch.Tensor,
    our_name: str,
    part: Part,
    tensor: torch.Tensor,
    fused_offsets: dict[str, list[int]],
    name: str,
) -> None:
    """Copy a checkpoint tensor into its parameter: whole, as rows of a fused matrix, or into one expert."""
    target = parameter.data
    if isinstance(part, tuple):
        expert, sub = part
        target = target[expert]
        if sub is not None:
            rows = target.shape[0] // 2
            target = target[sub * rows : (sub + 1) * rows]
    elif part is not None:
        start = fused_offsets["qkv" if ".qkv." in our_name else "mlp.gate_up"][part]
        target = target[start : start + tensor.shape[0]]
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointMismatchError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(target.shape)}")
    if target.is_floating_point() and not tensor.is_floating_point():  # an int8 weight cast would be garbage
        raise CheckpointMismatchError(
            f"{name}: {tensor.dtype} values for a {target.dtype} weight (a quantized tensor without its "
            "quantization_config?)"
        )
    target.copy_(tensor)


def _target(name: str) -> tuple[str, Part] | None:
    if name == "lm_head.weight":
        return "lm_head.weight", None
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name == "embed_tokens.weight":
        return "embed_tokens", None
    if name == "norm.weight":
        return "norm.weight", None
    match = _LAYER.fullmatch(name)
    if not match:
        return None
    index, suffix = match.groups()
    expert = _EXPERT.fullmatch(suffix)
    if expert is not None:
        our, sub = _EXPERT_PARTS[expert.group(2)]
        return f"layers.{index}.{our}", (int(expert.group(1)), sub)
    if suffix in _STACKED_EXPERTS:
        return f"layers.{index}.{_STACKED_EXPERTS[suffix]}", None
    if suffix in _NORMS:
        return f"layers.{index}.{_NORMS[suffix]}", None
    if suffix in _FUSED:
        our, part = _FUSED[suffix]
        return f"layers.{index}.{our}", part
    return None


def _check_complete(model: DecoderModel, loaded: set[str]) -> None:
    missing = []
    for name, _ in model.named_parameters():
        if name in loaded:
            continue
        if name.endswith(("qkv.weight", "qkv.bias")):
            if not all(f"{name}#{part}" in loaded for part in range(3)):
                missing.append(name)
        elif name.endswith("gate_up.weight"):
            if not all(f"{name}#{part}" in loaded for part in range(2)):
                missing.append(name)
        elif name.endswith(("mlp.w_gate_up", "mlp.w_down")):
            subs: tuple[int | None, ...] = (0, 1) if name.endswith("w_gate_up") else (None,)
            experts = range(model.get_parameter(name).shape[0])
            if not all(f"{name}#{(expert, sub)}" in loaded for expert in experts for sub in subs):
                missing.append(name)
        else:
            missing.append(name)
    if missing:
        raise CheckpointMismatchError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
