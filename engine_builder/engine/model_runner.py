"""Run one scheduled step through the model: flatten token rows, build attention metadata, return hidden rows.

The kernel set decides the attention backend: the CPU path (native kernels, PyTorch elsewhere) builds
`CpuAttentionMetadata` per step; the Triton path keeps the step's inputs in persistent buffers and, on CUDA,
replays steps from CUDA graphs (graph_runner.py: whole decode steps, piecewise prefill and mixed ones).
"""

import contextlib
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine_builder.engine.config import EngineConfig
from engine_builder.engine.graph_runner import CudaGraphRunner, PiecewiseGraphRunner
from engine_builder.engine.host_to_device import index_tensor
from engine_builder.engine.kernels import build as native_build
from engine_builder.engine.kernels import triton as triton_kernels
from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers import KernelSet
from engine_builder.engine.layers.attention import AttentionMetadata
from engine_builder.engine.layers.attention.cpu import (
    CpuAttentionMetadata,
    build_cpu_metadata,
    native_decode_available,
)
from engine_builder.engine.layers.attention.triton import TritonAttentionMetadata, TritonStepBuffers
from engine_builder.engine.lora import LoraContext, install_adapters
from engine_builder.engine.models.decoder import local_sizes
from engine_builder.engine.models.loader import load_decoder
from engine_builder.engine.parallel import (
    Driver,
    GroupStoppedError,
    RankFailedError,
    TensorParallel,
    TensorParallelError,
    WorkerGroup,
    bound_steps,
    init_group,
    leave_group,
)
from engine_builder.engine.quantized import Fp8Linear
from engine_builder.engine.scheduler import ScheduledSequence
from engine_builder.engine.step_rows import flatten

logger = logging.getLogger(__name__)

_FAILED_START_GRACE_S = 3.0  # a failed start lets the other ranks report their own error before they are killed

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logit_rows: torch.Tensor | None  # rows whose logits are needed, in the order asked; None = every row, in order
    row_of: dict[int, int]  # index in the scheduled list -> first row of that sequence
    num_rows: int = 0
    graph_bucket: int | None = None  # replay the CUDA graph of this batch size
    piece_bucket: int | None = None  # replay the piecewise graphs of this token count


def row_slots(row_of: dict[int, int], num_rows: int, scheduled: list[ScheduledSequence]) -> list[int]:
    """The LoRA pool slot of every row of a step (a sequence's rows are contiguous from `row_of[index]`)."""
    starts = sorted((first, index) for index, first in row_of.items())
    slots = [0] * num_rows
    for position, (first, index) in enumerate(starts):
        end = starts[position + 1][0] if position + 1 < len(starts) else num_rows
        slots[first:end] = [scheduled[index].seq.lora_slot] * (end - first)
    return slots


def resolve_device(name: str, tp: TensorParallel | None = None) -> torch.device:
    """The engine's device, with its index on CUDA ("cuda" is the current device, as PyTorch means it): the
    index is what `torch.cuda.set_device` needs and what tensors' `.device` compares equal to. Under tensor
    parallelism rank r runs on GPU r."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if device.type == "cuda" and tp is not None:
        visible = torch.cuda.device_count()
        if tp.world_size > visible:
            raise TensorParallelError(
                f"trt_llm.build.tensor_parallel_count {tp.world_size}: only {visible} GPU(s) are visible"
            )
        return torch.device("cuda", tp.rank)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


THREADS_VARIABLE = "ENGINE_BUILDER_NUM_THREADS"


def configure_threads(num_threads: int | None) -> None:
    threads = num_threads or threads_from_environment()
    if threads > 0:
        torch.set_num_threads(threads)


def threads_from_environment() -> int:
    """ENGINE_BUILDER_NUM_THREADS as a thread count (0 when unset or empty: torch's default)."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return 0
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a whole number of threads, 1 or more; got {value!r}")
    return int(value)


def resolve_kernels(name: str, device: torch.device) -> KernelSet:
    """auto: the native CPU kernels on the CPU, Triton on CUDA (PyTorch there when triton is missing)."""
    if name == "auto":
        if device.type == "cpu":
            return KernelSet.NATIVE
        return KernelSet.TRITON if triton_kernels.available(device) else KernelSet.TORCH
    kernels = KernelSet(name)
    if kernels == KernelSet.TRITON and not triton_kernels.available(device):
        raise ValueError(
            f"kernels: triton needs the triton package and a CUDA device (on the CPU only under TRITON_INTERPRET=1); "
            f"device is {device}"
        )
    if kernels == KernelSet.NATIVE and device.type != "cpu":
        raise ValueError(f"kernels: native are CPU kernels; device is {device} (use auto, triton or torch)")
    return kernels


class ModelRunner:
    """One rank's model, KV cache and step inputs. Under tensor parallelism (`tensor_parallel_size` > 1) the runner
    built by the engine is rank 0: it spawns the other ranks (engine_builder/engine/parallel.py), whose runners are built
    with `tp` and driven through the command channel; every call below that runs the model is repeated there."""

    def __init__(self, config: EngineConfig, tp: TensorParallel | None = None, store_path: Path | None = None) -> None:
        self.config = config
        self.workers: WorkerGroup | None = None
        self.driver: Driver | None = None
        if config.tensor_parallel_size > 1 and tp is None:
            if config.lora_adapters:
                raise TensorParallelError(
                    f"trt_llm.build.tensor_parallel_count {config.tensor_parallel_size}: LoRA adapters are not served "
                    "under tensor parallelism by the torch engine"
                )
            if torch.distributed.is_initialized():  # refused before a rank starts: that group is not this runner's
                raise TensorParallelError(
                    f"trt_llm.build.tensor_parallel_count {config.tensor_parallel_size}: torch.distributed is already "
                    "initialized in this process (another tensor-parallel engine, or the caller's own process group); "
                    "one tensor-parallel engine a process: close the other engine first"
                )
            self.workers = WorkerGroup(config)
            tp, store_path = TensorParallel(0, config.tensor_parallel_size), self.workers.store_path
        self.tp = tp
        self._joined_group = False  # only a group this runner joined is left on failure
        try:
            self._build(config, store_path)
        except BaseException:
            if self.workers is not None:
                self.workers.kill(grace_s=_FAILED_START_GRACE_S)
            if self._joined_group:
                leave_group()
            raise
        if self.workers is not None:
            bound_steps(config.tensor_parallel_timeout_s)

    def _build(self, config: EngineConfig, store_path: Path | None) -> None:
        tp = self.tp
        configure_threads(config.num_threads)
        self.device = resolve_device(config.device, tp)
        if config.lookahead is not None:  # the draft sizes the pool and the step buffers below are sized for
            config = self.config = dataclasses.replace(config, lookahead=config.lookahead.on_device(self.device.type))
        self.dtype = DTYPES[config.dtype]
        self.kernels = resolve_kernels(config.kernels, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        if tp is not None:
            assert store_path is not None
            join = functools.partial(init_group, store_path, tp.rank, tp.world_size, self.device)
            if self.workers is not None:
                self.workers.while_watching(join)
            else:
                join()
            self._joined_group = True
            if self.workers is not None and self.device.type == "cpu":  # on CUDA NCCL may read the store later
                self.workers.release_store()
            if self.kernels == KernelSet.TRITON:
                if config.kernels != "auto":
                    raise TensorParallelError(
                        "kernels: triton is not run under tensor parallelism yet (its step buffers are not sent to the "
                        "other ranks); use kernels: auto or torch"
                    )
                logger.warning("tensor parallelism: the PyTorch kernel set (Triton steps are not sharded yet)")
                self.kernels = KernelSet.TORCH
        self.model = load_decoder(
            config.model_dir, self.dtype, self.device, dummy=config.load_format == "dummy", tp=tp
        )
        if self.model.spec.attention_sinks and self.kernels == KernelSet.TRITON:
            if config.kernels != "auto":
                raise ValueError("kernels: triton has no attention-sink kernels yet (gpt-oss); use kernels: torch")
            logger.warning("attention sinks (gpt-oss): the PyTorch kernel set, the Triton kernels have no sinks yet")
            self.kernels = KernelSet.TORCH
        self.model.use_kernels(self.kernels)
        if self.device.type == "cuda":
            for module in self.model.modules():
                if isinstance(module, Fp8Linear):
                    module.requantize_to_one_scale()
        self.model.fused_decode = config.fused_decode and tp is None  # with adapters: for steps without their rows
        if self.kernels == KernelSet.NATIVE:
            self._maybe_pack_linears()
        self.lora: LoraContext | None = None
        if config.lora_adapters:
            self.lora = install_adapters(
                self.model, list(config.lora_adapters), config.max_lora_rank, self.dtype, self.device
            )
        spec = self.model.spec
        self.block_size = config.block_size
        self.num_kv_heads = local_sizes(spec, tp)[1]  # this rank's KV heads
        self.num_blocks = self._num_kv_blocks()
        kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.kv_cache = PagedKVCache(
            spec.num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            spec.head_dim,
            kv_dtype,
            self.device,
        )
        if self.workers is not None:
            self.driver = Driver(self.device, self.workers)
            self.kv_cache.mirror = self.driver
        if self.kernels == KernelSet.NATIVE:
            logger.info(
                "CPU decode attention: %s",
                "native kernel"
                if native_decode_available()
                else "PyTorch SDPA (native kernels off: ENGINE_BUILDER_NATIVE_KERNELS)"
                if not native_build.enabled()
                else "PyTorch SDPA (native kernel unavailable: no C compiler or the build failed, see above)",
            )
        kv_scales = getattr(self.model, "kv_cache_scales", None)
        if kv_scales is not None:
            self.kv_cache.set_scales(kv_scales)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.0f MiB, %s); kernels: %s",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self._bytes_per_block(kv_dtype) / 2**20,
            kv_dtype,
            self.kernels.value,
        )
        self.max_model_len = min(config.max_seq_len, spec.max_position_embeddings)
        if tp is not None:
            logger.info("tensor parallelism: rank %d of %d on %s", tp.rank, tp.world_size, self.device)
        self.step_buffers = self._step_buffers() if self.kernels == KernelSet.TRITON else None
        self.graphs: CudaGraphRunner | None = None
        if self.lora is not None and config.cuda_graphs and self.device.type == "cuda":
            logger.warning("CUDA graphs off: the LoRA path gathers each row's adapter outside a graph's buffers")
        use_graphs = config.cuda_graphs and self.lora is None
        if self.step_buffers is not None and use_graphs and self.device.type == "cuda":
            self.graphs = CudaGraphRunner(
                self.model, self.kv_cache, self.step_buffers, config.max_batch_size, self.max_model_len
            )
            self.graphs.capture_all()
        self.pieces: PiecewiseGraphRunner | None = None
        if self.graphs is not None and self.step_buffers is not None and config.cuda_graph_max_tokens > 0:
            self.pieces = PiecewiseGraphRunner(
                self.model, self.kv_cache, self.step_buffers, config.cuda_graph_max_tokens, self.dtype
            )
            self.pieces.capture_all()

    def bind_thread(self) -> None:
        """Make this runner's GPU the current one of the calling thread (the engine loop runs on its own)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _step_buffers(self) -> TritonStepBuffers:
        config = self.config
        if self.device.type == "cuda":
            split_programs = 2 * torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            split_programs = 16
        return TritonStepBuffers(
            max_tokens=max(config.max_num_tokens, config.max_batch_size) + config.max_draft_tokens + 1,
            max_seqs=config.max_batch_size + 1,
            max_pages=-(-(self.max_model_len + config.max_draft_tokens) // self.block_size) + 1,
            page_size=self.block_size,
            device=self.device,
            split_programs=split_programs,
            num_kv_heads=self.num_kv_heads,
        )

    def _maybe_pack_linears(self) -> None:
        from engine_builder.engine.models.cpu_kernels import fbgemm_available, pack_linears

        wanted = self.config.cpu_gemm
        if wanted == "native" or self.device.type != "cpu" or self.dtype == torch.float32:
            return
        if not fbgemm_available():
            if wanted == "fbgemm_fp16":
                raise ValueError("cpu_gemm fbgemm_fp16: this PyTorch build or CPU has no FBGEMM fp16 kernels")
            return
        packed = pack_linears(self.model)
        if packed:
            from engine_builder.engine.models.cpu_kernels import SMALL_BATCH_ROWS

            self.model.activation_dtype = torch.float32
            self.model.small_batch_rows = SMALL_BATCH_ROWS
            logger.info("CPU linears: %d packed as FBGEMM fp16 (float32 activations)", packed)

    def _bytes_per_block(self, dtype: torch.dtype) -> int:
        spec = self.model.spec
        return PagedKVCache.bytes_per_block(
            spec.num_layers, self.block_size, self.num_kv_heads, spec.head_dim, dtype
        )

    def _num_kv_blocks(self) -> int:
        config = self.config
        kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what loading freed is still cached by PyTorch, not free to mem_get_info
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.kv_cache_fraction)
        else:
            budget = int(config.kv_cache_memory_bytes * config.kv_cache_fraction)
        bytes_per_block = self._bytes_per_block(kv_dtype)
        if self.tp is not None and self.device.type == "cpu":
            # The ranks share the host's memory: the budget holds every rank's pool (probe AV), each block as many
            # times as there are ranks, with each rank's share of the KV heads. An even split of the budget left the
            # ranks with fewer heads (SmolLM2's 2 + 1) a quarter of it unused (probe DC #3).
            bytes_per_block = self._agreed(bytes_per_block, torch.distributed.ReduceOp.SUM)
        blocks = budget // bytes_per_block
        scratch = -(-config.lookahead_scratch_tokens // self.block_size)
        # Never more than the scheduler could ever fill: every sequence at full length (and its drafts); and always
        # one sequence at full length, which the scheduler runs alone when it is over total_token_limit (a limit
        # below max_seq_len, which Baseten's schema allows, refused the start, blaming the memory; probe BE #2).
        tokens = max(min(config.total_token_limit, config.max_batch_size * config.max_seq_len), config.max_seq_len)
        if config.lookahead is not None:
            tokens += config.lookahead.num_lanes(config.max_batch_size) * config.lookahead.max_draft_slots
        blocks = min(blocks, -(-tokens // self.block_size) + 2 + scratch)
        if self.tp is not None:  # every rank's pool has the same blocks: on CUDA the smallest GPU budget decides
            blocks = self._agreed(blocks, torch.distributed.ReduceOp.MIN)
        usable = max(blocks - 1 - scratch, 0) * self.block_size
        if blocks - scratch < 2 or usable < config.max_seq_len:
            lookahead = config.lookahead
            taken = (
                f" after lookahead's scratch of {scratch * self.block_size} tokens (window_size "
                f"{lookahead.window_size}, ngram_size {lookahead.ngram_size}, verification_set_size "
                f"{lookahead.verification_set_size}: {lookahead.lane_rows} draft rows for each of "
                f"{lookahead.num_lanes(config.max_batch_size)} sequences; lookahead_max_batch_size sets how many)"
                if lookahead is not None and scratch
                else ""
            )
            raise ValueError(
                f"the KV cache budget holds {usable} tokens{taken}, fewer than max_seq_len {config.max_seq_len}: "
                "raise kv_cache_memory_bytes / kv_cache_free_gpu_mem_fraction or lower max_seq_len"
                + (", the lookahead sizes or lookahead_max_batch_size" if taken else "")
            )
        return int(blocks)

    def _agreed(self, value: int, op: torch.distributed.ReduceOp.RedOpType) -> int:
        """`value` reduced over the ranks with `op` (every rank calls it)."""
        agreed = torch.tensor([value], dtype=torch.long, device=self.device)
        with self._group_failure():
            torch.distributed.all_reduce(agreed, op=op)
        return int(agreed.item())

    # -- inputs ------------------------------------------------------------------------------------------
    def prepare(
        self, scheduled: list[ScheduledSequence], logit_requests: list[tuple[int, int]]
    ) -> StepInputs:
        """`logit_requests` lists (scheduled index, row offset within that sequence's rows) to project."""
        rows = flatten(scheduled, self.block_size)
        graph_bucket = piece_bucket = None
        metadata: AttentionMetadata
        if self.step_buffers is not None:
            if self.graphs is not None and rows.is_decode_only:
                graph_bucket = self.graphs.bucket_for(rows.num_rows)
            num_splits = self.graphs.num_splits(graph_bucket) if self.graphs is not None and graph_bucket else None
            if graph_bucket is None and self.pieces is not None:
                piece_bucket = self.pieces.bucket_for(rows.num_rows)
            input_ids, positions, metadata = self.step_buffers.build(
                rows, scheduled, graph_bucket, num_splits, pad_slots_to=piece_bucket
            )
        else:
            metadata = build_cpu_metadata(rows, scheduled, self.block_size, self.device)
            input_ids = torch.tensor(rows.input_ids, dtype=torch.long, device=self.device)
            positions = torch.tensor(rows.positions, dtype=torch.long, device=self.device)
        if self.lora is not None:
            self.lora.set_rows(row_slots(rows.row_of, rows.num_rows, scheduled), self.device)
        wanted = [rows.row_of[i] + offset for i, offset in logit_requests]
        logit_rows = None if wanted == list(range(rows.num_rows)) else index_tensor(wanted, self.device)
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            metadata=metadata,
            logit_rows=logit_rows,
            row_of=rows.row_of,
            num_rows=rows.num_rows,
            graph_bucket=graph_bucket,
            piece_bucket=piece_bucket,
        )

    # -- execution ---------------------------------------------------------------------------------------
    def check_ranks(self) -> None:
        """Raise RankFailedError when a tensor-parallel rank has died (the engine cannot step any more)."""
        if self.workers is not None:
            self.workers.check()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one rank). A failed group (a rank gone or stalled)
        is not asked to stop: its ranks are killed, as are ranks already killed on purpose (a shutdown)."""
        if self.driver is None or self.workers is None:
            return
        try:
            if self.workers.failure is None and not self.workers.stopped:
                self.driver.stop()
                self.workers.join()
            else:
                self.workers.kill()
        except GroupStoppedError:  # killed on purpose while it stopped (a shutdown freeing a stuck stop command)
            self.workers.kill()
        except RankFailedError as error:  # the group broke while stopping (logged with its cause)
            logger.error("tensor parallelism: stopping the ranks failed (%s); killing them", error)
            self.workers.kill()
        finally:
            self.driver = None
            leave_group()

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Final hidden states of the requested rows (project them with `logits`, all or only some)."""
        if self.driver is None:
            return self._execute(inputs)
        assert isinstance(inputs.metadata, CpuAttentionMetadata)
        self.check_ranks()
        with self._group_failure():
            self.driver.step(inputs.input_ids, inputs.positions, inputs.metadata)
            return self._execute(inputs)

    def _execute(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.graph_bucket is not None and self.graphs is not None:
            hidden = self.graphs.replay(inputs.graph_bucket, inputs.num_rows)
        elif inputs.piece_bucket is not None and self.pieces is not None:
            assert isinstance(inputs.metadata, TritonAttentionMetadata)
            hidden = self.pieces.run(inputs.piece_bucket, inputs.metadata, inputs.num_rows)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata, self.kv_cache)
        return hidden if inputs.logit_rows is None else hidden[inputs.logit_rows]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab], on the model's device (the sampler runs there)."""
        if hidden.shape[0] == 0:
            return torch.empty(0, self.model.spec.vocab_size, device=self.device)
        if self.driver is None:
            return self.model.logits(hidden)
        with self._group_failure():
            self.driver.logits(hidden)
            return self.model.logits(hidden)

    def _group_failure(self) -> contextlib.AbstractContextManager[None]:
        """Rank 0, under tensor parallelism: a failure while the ranks work together fails the engine
        (RankFailedError naming the rank that died, or the collective's error), never just that step's requests."""
        return self.workers.collective() if self.workers is not None else contextlib.nullcontext()

    def host_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The same on the host, for the rare consumers that read logits in Python (lookahead, prompt logprobs)."""
        return self.logits(hidden).cpu()
