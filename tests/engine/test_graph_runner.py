"""CUDA-graph bookkeeping that needs no GPU: the bucket sizes and how a step is padded into the step buffers."""

import torch

from engine_builder.common.types import SamplingParams
from engine_builder.engine.graph_runner import CudaGraphRunner, EagerCapture, graph_buckets
from engine_builder.engine.layers.attention.triton import PADDING_SLOT, TritonStepBuffers
from engine_builder.engine.scheduler import ScheduledSequence
from engine_builder.engine.sequence import Sequence, SequenceStatus
from engine_builder.engine.step_rows import flatten


def test_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    assert graph_buckets(100)[-3:] == [80, 96, 100]


def _decoding(index: int, context: int, pages: list[int]) -> ScheduledSequence:
    seq = Sequence(index, f"r{index}", 0, list(range(context)), SamplingParams(max_tokens=8), 0.0)
    seq.output_token_ids = [7 + index]
    seq.block_table = pages
    seq.num_computed_tokens = context
    seq.status = SequenceStatus.RUNNING
    return ScheduledSequence(seq, 1, True)


def test_padding_rows_write_the_padding_slot_and_attend_to_it_alone():
    buffers = TritonStepBuffers(64, 9, 4, 4, torch.device("cpu"), 16, 2)
    items = [_decoding(0, 5, [3, 4]), _decoding(1, 2, [6])]
    input_ids, positions, metadata = buffers.build(flatten(items, 4), items, pad_to=4, num_splits=2)
    assert input_ids.tolist() == [7, 8, 0, 0] and positions.tolist() == [5, 2, 0, 0]
    assert metadata.slot_mapping.tolist() == [4 * 4 + 1, 6 * 4 + 2, PADDING_SLOT, PADDING_SLOT]
    assert metadata.num_decodes == 4 and metadata.num_splits == 2
    assert metadata.decode_seq_lens.tolist() == [6, 3, 1, 1]
    assert metadata.decode_block_tables[:2, :2].tolist() == [[3, 4], [6, 0]]
    assert metadata.decode_block_tables[2:, 0].tolist() == [0, 0]
    assert metadata.num_extend_rows == 0 and metadata.masked is None


def test_bucket_for_prefers_the_smallest_captured_bucket():
    buffers = TritonStepBuffers(64, 9, 4, 4, torch.device("cpu"), 16, 2)
    runner = CudaGraphRunner(torch.nn.Identity(), None, buffers, 8, 64, capture=EagerCapture())  # type: ignore[arg-type]
    assert runner.buckets == [1, 2, 4, 8]
    assert runner.bucket_for(3) is None  # nothing captured yet
    runner._graphs = {bucket: (lambda: None, torch.zeros(bucket, 1)) for bucket in (1, 2, 4, 8)}
    assert [runner.bucket_for(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_a_step_of_more_sequences_than_the_buffers_hold_is_refused_by_name_before_any_write() -> None:
    """The check ran after the loops that fill the rows, so numpy's IndexError came first (probe AW)."""
    import pytest

    buffers = TritonStepBuffers(64, 2, 4, 4, torch.device("cpu"), 16, 2)
    items = [_decoding(index, 3, [index + 1]) for index in range(3)]
    with pytest.raises(ValueError, match="a step of 3 sequences exceeds the 2 the step buffers hold"):
        buffers.build(flatten(items, 4), items)
