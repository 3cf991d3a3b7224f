"""Tensor parallelism (Megatron-style) for the torch engine over torch.distributed: NCCL on CUDA, gloo on CPU.

Rank 0 is the engine: the scheduler, the sampler, grammar matchers and HTTP stay there. Ranks 1..N-1 are worker
processes that rank 0 spawns (one per GPU, or per CPU group); each holds its shard of the weights and of the KV cache
and runs every step's forward with its shard:
- attention heads and MLP columns are split over the ranks (QKV and gate/up column-parallel, the output and down
  projections row-parallel, each followed by one all-reduce); with fewer KV heads than ranks a KV head is
  replicated on the ranks whose query heads use it;
- the embedding and the LM head are split over the vocabulary: a lookup is an all-reduce of each rank's rows (zero
  for ids outside its range, so the sum is exact), and logits are gathered on rank 0 only.
Rank 0 tells the workers what to do through a small command channel: a fixed int64 header broadcast, followed by
one tensor payload (a step's ids, positions and attention metadata in one int64 tensor; hidden rows to project; KV
slots to copy). Nothing is pickled per step.
"""

import atexit
import contextlib
import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine_builder.common import live_folders
from engine_builder.common.worker_process import exit_with_parent

if TYPE_CHECKING:
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.kv_cache import PagedKVCache
    from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata
    from engine_builder.engine.models.decoder import DecoderModel, DecoderSpec

logger = logging.getLogger(__name__)


class TensorParallelError(ValueError):
    """A model or setting tensor parallelism cannot serve; the message names the field."""


class RankFailedError(RuntimeError):
    """A worker rank died: the engine cannot run another step."""


class GroupStoppedError(RankFailedError):
    """A collective broke because rank 0 stopped the ranks on purpose (a shutdown freeing a stuck step): the end the
    caller asked for, not a failure to report."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def part(self, size: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of `size` rows: contiguous, the first `size % world_size` ranks one
        row more than the others."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """[start, stop) of this rank's KV heads: a share of them, or the one head its query heads use when there
        are fewer KV heads than ranks (replicated, as vLLM does)."""
        if num_kv_heads >= self.world_size:
            return self.part(num_kv_heads)
        head = self.rank * num_kv_heads // self.world_size
        return head, head + 1

    def query_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """[start, stop) of this rank's query heads: whole GQA groups of its KV heads (or its share of one group)."""
        if num_kv_heads >= self.world_size:
            group = num_heads // num_kv_heads
            start, stop = self.kv_heads(num_kv_heads)
            return start * group, stop * group
        return self.part(num_heads)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        dist.all_reduce(tensor)
        return tensor

    def gather_last_dim(self, tensor: torch.Tensor, total: int) -> torch.Tensor | None:
        """Rank 0: every rank's share of a last dimension of `total` (shares as `part` splits it), concatenated in
        rank order; others: None. Shares are padded to the largest for the collective and cut back after."""
        width = -(-total // self.world_size)
        padded = tensor
        if tensor.shape[-1] != width:
            padded = torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))
        padded = padded.contiguous()
        if self.rank != 0:
            dist.gather(padded, None, dst=0)
            return None
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.gather(padded, parts, dst=0)
        sizes = [TensorParallel(rank, self.world_size).part(total) for rank in range(self.world_size)]
        return torch.cat([part[..., : stop - start] for part, (start, stop) in zip(parts, sizes, strict=True)], dim=-1)


def check_shardable(spec: "DecoderSpec", world_size: int, lora: bool = False) -> None:
    """Refuse, naming the field, a model that `tensor_parallel_count: world_size` cannot split."""
    if world_size <= 1:
        return
    field = "trt_llm.build.tensor_parallel_count"
    # Uneven shares are fine (heads go by whole GQA groups); every rank needs at least one of each.
    for name, value in (("intermediate_size", spec.intermediate_size), ("vocab_size", spec.vocab_size)):
        if value < world_size:
            raise TensorParallelError(f"{field} {world_size}: the model's {name} {value} is smaller than {world_size}")
    heads, kv = spec.num_heads, spec.num_kv_heads
    if kv < world_size and (world_size % kv or heads % world_size):
        raise TensorParallelError(
            f"{field} {world_size}: the model has {kv} KV heads, fewer than the ranks; they can be replicated only "
            f"when {world_size} is a multiple of num_key_value_heads {kv} and divides num_attention_heads {heads}"
        )
    if spec.moe is not None:
        raise TensorParallelError(
            f"{field} {world_size}: {spec.architecture} has mixture-of-experts layers, which the torch engine does "
            "not split over ranks yet; serve it with tensor_parallel_count 1"
        )
    if lora:
        raise TensorParallelError(
            f"{field} {world_size}: LoRA adapters are not served under tensor parallelism by the torch engine"
        )


# -- the command channel ----------------------------------------------------------------------------------------

_HEADER = 16
_STEP, _LOGITS, _COPY_BLOCK, _COPY_SLOTS, _STOP = range(1, 6)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _broadcast_header(values: list[int] | None, device: torch.device) -> list[int]:
    header = torch.zeros(_HEADER, dtype=torch.long, device=device)
    if values is not None:
        header[: len(values)] = torch.tensor(values, dtype=torch.long)
    dist.broadcast(header, src=0)
    return header.tolist()


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    dist.broadcast(tensor, src=0)
    return tensor


class Driver:
    """Rank 0's end of the channel: every call is matched by the workers' loop (`serve_commands`). A step's and a
    projection's broadcasts run inside the runner's `WorkerGroup.collective` (with rank 0's own forward); the KV
    copies and the stop command, which the engine calls on their own, enter it here."""

    def __init__(self, device: torch.device, workers: "WorkerGroup") -> None:
        self.device = device
        self.workers = workers

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: "CpuAttentionMetadata") -> None:
        spans = metadata.extends
        decode_slots = metadata.decode_slots
        lengths = metadata.decode_lengths
        assert lengths is not None
        num_decodes, width = (decode_slots.shape[0], decode_slots.shape[1]) if decode_slots.dim() == 2 else (0, 0)
        span_facts = [value for span in spans for value in (span.row_start, span.num_new_tokens, span.context_slots.numel())]
        pieces = [
            input_ids, positions, metadata.slot_mapping, metadata.decode_rows, decode_slots.reshape(-1), lengths,
            torch.tensor(span_facts, dtype=torch.long, device=self.device),
            *(span.context_slots for span in spans),
        ]
        payload = torch.cat([piece.to(self.device, torch.long).reshape(-1) for piece in pieces])
        _broadcast_header(
            [_STEP, input_ids.numel(), metadata.decode_rows.numel(), num_decodes, width, len(spans), payload.numel()],
            self.device,
        )
        _broadcast(payload)

    def logits(self, hidden: torch.Tensor) -> None:
        rows, width = hidden.shape
        _broadcast_header([_LOGITS, rows, width, _DTYPES.index(hidden.dtype)], self.device)
        _broadcast(hidden.contiguous())

    def copy_block(self, source: int, target: int) -> None:
        with self.workers.collective():
            _broadcast_header([_COPY_BLOCK, source, target], self.device)

    def copy_slots(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        with self.workers.collective():
            _broadcast_header([_COPY_SLOTS, sources.numel()], self.device)
            _broadcast(torch.cat([sources, targets]).to(self.device, torch.long))

    def stop(self) -> None:
        with self.workers.collective():
            _broadcast_header([_STOP], self.device)


def serve_commands(model: "DecoderModel", kv_cache: "PagedKVCache", device: torch.device) -> None:
    """A worker rank's loop: run what rank 0 broadcasts until it says stop (or the group breaks)."""
    while True:
        header = _broadcast_header(None, device)
        command = header[0]
        if command == _STEP:
            input_ids, positions, metadata = _unpack_step(header, device)
            with torch.inference_mode():
                model(input_ids, positions, metadata, kv_cache)
        elif command == _LOGITS:
            rows, width, dtype = header[1:4]
            hidden = _broadcast(torch.empty(rows, width, dtype=_DTYPES[dtype], device=device))
            with torch.inference_mode():
                model.logits(hidden)
        elif command == _COPY_BLOCK:
            kv_cache.copy_block(header[1], header[2], mirror=False)
        elif command == _COPY_SLOTS:
            count = header[1]
            slots = _broadcast(torch.empty(2 * count, dtype=torch.long, device=device))
            kv_cache.copy_slots(slots[:count], slots[count:], mirror=False)
        elif command == _STOP:
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")


def _unpack_step(header: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, "CpuAttentionMetadata"]:
    from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata, ExtendSpan

    num_rows, num_decode_rows, num_decodes, width, num_spans, size = header[1:7]
    payload = _broadcast(torch.empty(size, dtype=torch.long, device=device))
    sizes = [num_rows, num_rows, num_rows, num_decode_rows, num_decodes * width, num_decodes, 3 * num_spans]
    input_ids, positions, slot_mapping, decode_rows, decode_slots, lengths, span_facts, rest = payload.split(
        [*sizes, size - sum(sizes)]
    )
    facts = span_facts.view(num_spans, 3).tolist()
    context = rest.split([length for _, _, length in facts]) if facts else ()
    spans = [ExtendSpan(start, count, slots) for (start, count, _), slots in zip(facts, context, strict=True)]
    decode_slots = decode_slots.view(num_decodes, width)
    mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).view(num_decodes, 1, 1, width)
    metadata = CpuAttentionMetadata(
        slot_mapping=slot_mapping,
        decode_rows=decode_rows,
        decode_slots=decode_slots,
        decode_mask=mask,
        extends=spans,
        decode_lengths=lengths,
    )
    return input_ids, positions, metadata


# -- processes -----------------------------------------------------------------------------------------------------

def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# How long a rank waits in a collective before it fails. Rank 0 bounds each step (`bound_steps`, the config's
# `tensor_parallel_timeout_s`) but not its start, when the other ranks load their shards (a rank dying meanwhile is
# caught by the watcher); a worker waits for rank 0's next command as long as the server idles, so never gives up:
# rank 0 is the one that notices a stalled rank, and stops every rank then.
_STARTUP_TIMEOUT = timedelta(minutes=30)
_WORKER_TIMEOUT = timedelta(days=3650)
_EXIT_GRACE_S = 2.0  # after a collective failed: how long rank 0 waits to see which rank exited


def init_group(store_path: Path, rank: int, world_size: int, device: torch.device) -> None:
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: one tensor-parallel engine a process")
    if device.type == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback only
    store = dist.FileStore(str(store_path), world_size)
    timeout = _STARTUP_TIMEOUT if rank == 0 else _WORKER_TIMEOUT
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size, timeout=timeout)
    if device.type == "cpu":
        try:
            dist.barrier()  # every rank has formed its gloo group: the store can go (`WorkerGroup.release_store`)
        except BaseException:
            dist.destroy_process_group()  # formed here and never handed back: the caller cannot leave it
            raise


def bound_steps(timeout_s: float) -> None:
    """Rank 0, once the engine is built: a collective the other ranks do not join within `timeout_s` fails (gloo
    raises; NCCL's watchdog aborts the process), instead of waiting for torch's default (30 minutes on gloo)."""
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that spawned it exits (or its process dies, however it
    dies)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(config: "EngineConfig", rank: int, store_path: str, log_level: int, parent_pid: int) -> None:
    """Entry point of a spawned rank: join the group, load this rank's shard, serve commands until told to stop.

    It exits with rank 0 however rank 0 ends: the kernel's SIGKILL when the thread that spawned it exits
    (PR_SET_PDEATHSIG; that thread is rank 0's `engine-tp-monitor`, which lives until every rank has exited, so only
    rank 0's own end fires it), and a watch on its parent for the rest. PDEATHSIG alone missed a rank 0 killed while
    this process was still importing torch (before it could ask): re-parented, the rank waited in the rendezvous for
    ever, ignoring SIGTERM (probe AV)."""
    _die_with_parent()
    exit_with_parent(parent_pid)  # also exits at once if rank 0 is already gone
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    from engine_builder.engine.model_runner import ModelRunner

    tp = TensorParallel(rank, config.tensor_parallel_size)
    try:
        runner = ModelRunner(config, tp=tp, store_path=Path(store_path))
        serve_commands(runner.model, runner.kv_cache, runner.device)
    except Exception as error:  # logged whole, in one write: multiprocessing's own report could be cut by a kill
        logger.error("rank %d stopped: %s", rank, error, exc_info=True)
        sys.exit(1)
    finally:
        leave_group()


class WorkerGroup:
    """Rank 0's view of ranks 1..N-1: spawned processes, watched. A rank that exits unasked, or a collective that
    fails, fails the engine: `failure` says why, and every later step raises it as RankFailedError."""

    def __init__(self, config: "EngineConfig") -> None:
        self.world_size = config.tensor_parallel_size
        self.timeout_s = config.tensor_parallel_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="engine-tp-")
        live_folders.register(self._dir.name)  # a signal while loading exits without clean-up (server/main.py)
        self.store_path = Path(self._dir.name) / "store"
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=worker_main,
                args=(config, rank, str(self.store_path), logging.getLogger().getEffectiveLevel(), os.getpid()),
                name=f"engine-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(1, self.world_size)
        ]
        self.failure: str | None = None
        self._lock = threading.Lock()  # one thread reaps a process and records the failure at a time
        self._stopping = threading.Event()
        # The ranks ask the kernel for SIGKILL when the thread that started them exits (PR_SET_PDEATHSIG is tied to
        # a thread, not a process): started by the caller's thread, they died with a loader thread that built the
        # engine and ended (probe DC #2). The monitor starts them and outlives them.
        started = threading.Event()
        errors: list[BaseException] = []
        self._monitor = threading.Thread(
            target=self._monitor_ranks, args=(started, errors), name="engine-tp-monitor", daemon=True
        )
        self._monitor.start()
        started.wait()
        if errors:
            raise errors[0]
        # Ranks ignore SIGTERM (rank 0 decides when they stop), and at the interpreter's exit multiprocessing
        # SIGTERMs its daemonic children and joins them without a timeout: an engine never closed (an in-process
        # user, an uncaught exception) hung the exit for ever (probe AV). Registered after multiprocessing's hook,
        # this one runs first and kills them.
        self._kill_at_exit = functools.partial(_kill_processes, self.processes)
        atexit.register(self._kill_at_exit)
        logger.info("tensor parallelism: %d ranks (pids %s)", self.world_size, [p.pid for p in self.processes])

    def _monitor_ranks(self, started: threading.Event, errors: list[BaseException]) -> None:
        """The monitor thread: start the ranks, watch them, then wait until every one has exited."""
        try:
            for process in self.processes:
                process.start()
        except BaseException as error:  # handed to the constructor's thread
            _kill_processes([process for process in self.processes if process.pid is not None])
            errors.append(error)
            return
        finally:
            started.set()
        self._watch()
        for process in self.processes:  # sentinels only: reaping is left to join/kill
            multiprocessing.connection.wait([process.sentinel])

    def _watch(self) -> None:
        while self.failure is None and not self._stopping.is_set():
            self._note_exits(0.5)

    def _note_exits(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for a rank to exit; ranks that exited before the stop was asked fail the engine."""
        ready = multiprocessing.connection.wait([process.sentinel for process in self.processes], timeout=timeout_s)
        with self._lock:
            if self._stopping.is_set():
                return
            exited = [process for process in self.processes if process.sentinel in ready]
            for process in exited:
                process.join(1)  # the exit code is set once the process is reaped
            if exited:
                self._fail("; ".join(f"tensor-parallel {p.name} exited with code {p.exitcode}" for p in exited))

    def _fail(self, failure: str) -> None:
        if self.failure is None:
            self.failure = failure
            logger.error("%s: the engine cannot run another step", failure)

    @property
    def stopped(self) -> bool:
        """The ranks were told to stop, or killed (`join`, `kill`)."""
        return self._stopping.is_set()

    def check(self) -> None:
        if self.failure is not None:
            raise RankFailedError(self.failure)

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """Rank 0's part of work every rank does together. A failure there leaves the ranks out of step: it fails
        the engine (RankFailedError), never only one step's requests. It names the rank that exited when one did
        (a dead peer is what breaks a collective most often: rank 0 waits a moment to see it go), else says what
        the collective reported (a timeout: a rank is stalled)."""
        try:
            yield
        except RankFailedError:
            raise
        except Exception as error:
            if self._stopping.is_set() and self.failure is None:
                raise GroupStoppedError("tensor-parallel step ended: the ranks were stopped") from error
            if self.failure is None:
                self._note_exits(_EXIT_GRACE_S)
            with self._lock:
                self._fail(_collective_failure(error, self.timeout_s))  # unless a rank's exit was recorded
            raise RankFailedError(self.failure) from error

    def while_watching(self, action: Callable[[], None]) -> None:
        """Run `action` (joining the group: it waits for every rank) unless a rank dies first, which raises
        RankFailedError instead of waiting for the rendezvous' half-hour timeout."""
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                action()
            except BaseException as error:  # handed to the caller's thread
                errors.append(error)
            finally:
                done.set()

        threading.Thread(target=run, name="engine-tp-join", daemon=True).start()
        while not done.wait(0.2):
            self.check()
        if errors:
            raise errors[0]

    def release_store(self) -> None:
        """Remove the FileStore's folder: on the CPU once every rank has formed the group (`init_group`'s barrier;
        gloo reads the store only then), so a rank 0 killed without clean-up while the ranks load their shards
        leaves nothing behind; on CUDA when the ranks stop."""
        live_folders.unregister(self._dir.name)
        self._dir.cleanup()

    def join(self, timeout_s: float = 10.0) -> None:
        """After the stop command: wait for the ranks, kill what does not exit."""
        self._stopping.set()
        atexit.unregister(self._kill_at_exit)
        with self._lock:
            for process in self.processes:
                process.join(timeout_s)
                if process.is_alive():
                    logger.warning("%s did not stop; killing it", process.name)
                    process.kill()
                    process.join(5)
        self.release_store()

    def kill(self, grace_s: float = 0.0) -> None:
        """Kill the ranks, after `grace_s` for them to exit on their own (one reporting its own error at a failed
        start, which a kill would cut short)."""
        self._stopping.set()
        atexit.unregister(self._kill_at_exit)
        with self._lock:
            deadline = time.monotonic() + grace_s
            for process in self.processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in self.processes:
                if process.is_alive():
                    process.kill()
            for process in self.processes:
                process.join(5)
        self.release_store()


def _kill_processes(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(5)


def _collective_failure(error: Exception, timeout_s: float) -> str:
    """A failed collective's message for clients and the log: gloo's own, without its source path and sign-off."""
    text = re.sub(r"\[[^\]]*:\d+\]\s*", "", str(error)).split(". This is typically")[0].strip()
    if "timed out" in text.lower():
        return (
            f"tensor-parallel step failed: the other ranks did not answer within {timeout_s:g} s, a rank is stalled "
            f"({text})"
        )
    return f"tensor-parallel step failed: {text}"
