"""Fake `tensorrt_llm.quantization`: the QuantAlgo enum (a StrEnum; members looked up by name)."""

import enum


class QuantAlgo(enum.StrEnum):
    W8A16 = enum.auto()
    W4A16 = enum.auto()
    W4A16_AWQ = enum.auto()
    W4A8_AWQ = enum.auto()
    W8A16_GPTQ = enum.auto()
    W4A16_GPTQ = enum.auto()
    W8A8_SQ_PER_CHANNEL = enum.auto()
    W8A8_SQ_PER_TENSOR_PLUGIN = enum.auto()
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = enum.auto()
    W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN = enum.auto()
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN = enum.auto()
    W4A8_QSERVE_PER_GROUP = enum.auto()
    W4A8_QSERVE_PER_CHANNEL = enum.auto()
    FP8 = enum.auto()
    FP8_PER_CHANNEL_PER_TOKEN = enum.auto()
    FP8_BLOCK_SCALES = enum.auto()
    INT8 = enum.auto()
    MIXED_PRECISION = enum.auto()
    NVFP4 = enum.auto()
    W4A8_NVFP4_FP8 = enum.auto()
    W4A8_MXFP4_FP8 = enum.auto()
    W4A8_MXFP4_MXFP8 = enum.auto()
    W4A16_MXFP4 = enum.auto()
    NO_QUANT = enum.auto()


KV_CACHE_QUANT_ALGO_LIST = [QuantAlgo.FP8, QuantAlgo.INT8, QuantAlgo.NVFP4]
QUANT_ALGO_LIST = [algo for algo in QuantAlgo if algo != QuantAlgo.INT8]
