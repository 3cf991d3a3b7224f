"""The step buffers' block tables, staged row by row into their pinned host array, writing only what a row lacks.

A running sequence's table gains a page every `page_size` tokens, yet converting every row's whole table from its
Python list at every step cost 0.7 ms a step at 256 sequences x 2k tokens, 2.7 ms at 8k (probe ED). Kernels read
a row only below its sequence's length, so what lies past a row's pages is never read.
"""

from array import array

import numpy as np

from engine_builder.engine.sequence import Sequence

# What a row holds: (sequence, its block_table list, that list's version, pages): the row's first `pages` entries
# are that list's first `pages`. Holding the objects (not ids) means neither can be freed and its id reused while a
# record names it; a finished sequence stays referenced until its row is written again (at most max_seqs of them).
_Record = tuple[Sequence, list[int], int, int]


class StagedBlockTables:
    """Writes each step's rows of `tables` [max_seqs, max_pages], remembering what every row holds.

    A row's record is trusted only while the sequence still has the same list object at the same
    `block_table_version`: the block manager bumps the version on any change but an append (admission, freeing
    at a finish or preemption, a fork's copied last block), and code that replaces the list changes its
    identity. Then the row gets only the pages past its record; a sequence that moved rows (one before it
    finished) first copies its previous row, if that row still holds it. Anything else rewrites the row.
    """

    def __init__(self, tables: np.ndarray) -> None:
        assert tables.dtype == np.int32 and tables.flags.c_contiguous
        self.tables = tables
        # Rows are written through a flat memoryview: a slice assignment there costs about half numpy's
        self._flat = tables.reshape(-1).data
        self._width = tables.shape[1]
        self._records: list[_Record | None] = [None] * tables.shape[0]
        self._last_rows: dict[Sequence, int] = {}  # where each sequence of the previous step was staged
        self._rows: dict[Sequence, int] = {}  # this step's
        self.num_rows_rewritten = 0  # counters for tests and benchmarks: rows written from the whole list
        self.num_rows_moved = 0  # rows copied from the sequence's previous row
        self.num_pages_written = 0  # entries converted from the lists

    def start_step(self) -> None:
        self._last_rows, self._rows = self._rows, {}

    def stage(self, row: int, seq: Sequence, num_pages: int) -> None:
        """Make the row's first `num_pages` entries the sequence's first `num_pages` blocks."""
        table = seq.block_table
        version = seq.block_table_version
        kept = 0
        source = self._last_rows.get(seq, row)
        record = self._records[source]
        if record is not None and record[0] is seq and record[1] is table and record[2] == version:
            kept = min(record[3], num_pages)
        self._records[row] = None  # until written: an exception below leaves no record of a half-written row
        start = row * self._width
        if not kept:
            self.num_rows_rewritten += 1
        elif source != row:
            source_start = source * self._width
            self._flat[start : start + kept] = self._flat[source_start : source_start + kept]
            self.num_rows_moved += 1
        if num_pages > kept:
            self._flat[start + kept : start + num_pages] = array("i", table[kept:num_pages])
            self.num_pages_written += num_pages - kept
        self._records[row] = (seq, table, version, num_pages)
        self._rows[seq] = row

    def pad(self, start: int, stop: int) -> None:
        """Padding rows [start, stop): one page, the reserved block 0."""
        self.tables[start:stop, 0] = 0
        self._records[start:stop] = [None] * (stop - start)
