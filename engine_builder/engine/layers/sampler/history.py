"""The token history the penalties read, kept per sequence between steps where the logits are.

Each penalized sequence holds one row of two pooled tables: `counts` (how often each token appears in its output,
for presence / frequency) and `seen` (every token of its prompt and output, for repetition). A row is filled from
the prompt once, when the sequence first needs a penalty; each later call folds in only the output tokens appended
since (one scatter for the whole batch), so a step costs O(new tokens), not O(context). Rows without a `seq_id` get
a row for that call only.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from engine_builder.engine.layers.sampler import SamplingRow

_MIN_CAPACITY = 8


def needs_history(row: SamplingRow) -> bool:
    """Whether a penalty reads this row's history now (presence / frequency only once there is output)."""
    params = row.params
    return params.repetition_penalty != 1.0 or bool(
        (params.presence_penalty or params.frequency_penalty) and row.output_token_ids
    )


@dataclass
class _History:
    slot: int  # its row in the tables
    num_output_tokens: int  # output tokens already folded in


class TokenHistories:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [slots, vocab]
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [slots, vocab]
        self._histories: dict[int, _History] = {}  # by seq_id
        self._free_slots: list[int] = []
        self._pin = device.type == "cuda"

    @property
    def num_histories(self) -> int:
        return len(self._histories)

    @contextmanager
    def folded(self, rows: list[SamplingRow]) -> Iterator[dict[int, int]]:
        """Bring the history of every row that `needs_history` up to date; yields the slot in the tables of each
        such row, by row index. Rows without a `seq_id` hold their slot only inside the block."""
        slots: dict[int, int] = {}
        unkeyed: list[int] = []
        touched: list[int] = []  # seq_ids whose history this call advances
        fresh: list[int] = []  # slots to clear before filling
        seen: list[int] = []  # flat (slot, token) indices to mark seen: prompts and new output
        counted: list[int] = []  # the same to count: new output
        try:
            for index, row in enumerate(rows):
                if not needs_history(row):
                    continue
                output = row.output_token_ids
                history = None
                if row.seq_id is not None:
                    touched.append(row.seq_id)
                    history = self._histories.get(row.seq_id)
                    if history is not None and history.num_output_tokens > len(output):  # not the list it was built from
                        self.free(row.seq_id)
                        history = None
                if history is None:
                    history = _History(self._allocate(), 0)
                    fresh.append(history.slot)
                    if row.seq_id is None:
                        unkeyed.append(history.slot)
                    else:
                        self._histories[row.seq_id] = history
                    seen.extend(self._flat(history.slot, row.prompt_token_ids))
                new = self._flat(history.slot, output[history.num_output_tokens :])
                seen.extend(new)
                counted.extend(new)
                history.num_output_tokens = len(output)
                slots[index] = history.slot
            self._fold(fresh, seen, counted)
            yield slots
        except BaseException:  # a partly folded history is wrong: forget it, the next call rebuilds it
            for seq_id in touched:
                self.free(seq_id)
            raise
        finally:
            self._free_slots.extend(unkeyed)
            self._shrink_if_unused()

    def free(self, seq_id: int) -> None:
        """Forget a sequence's history (it ended, or was preempted: a later row rebuilds it from its lists)."""
        history = self._histories.pop(seq_id, None)
        if history is not None:
            self._free_slots.append(history.slot)
            self._shrink_if_unused()

    def _flat(self, slot: int, token_ids: list[int]) -> list[int]:
        """Indices of `slot`'s tokens in the flattened tables. Checked here: an id past the vocabulary would land
        silently in the next slot's row."""
        if not token_ids:
            return []
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise IndexError(f"token ids must be in [0, {self.vocab_size}), got {min(token_ids)}..{max(token_ids)}")
        base = slot * self.vocab_size
        return [base + token for token in token_ids]

    def _fold(self, fresh: list[int], seen: list[int], counted: list[int]) -> None:
        if fresh:
            cleared = self._tensor(fresh)
            self.counts.index_fill_(0, cleared, 0)
            self.seen.index_fill_(0, cleared, False)
        if seen:
            self.seen.view(-1)[self._tensor(seen)] = True
        if counted:
            flat = self._tensor(counted)
            self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def _allocate(self) -> int:
        if not self._free_slots:
            old = self.counts.shape[0]
            capacity = max(_MIN_CAPACITY, 2 * old)
            counts = torch.zeros(capacity, self.vocab_size, dtype=torch.int32, device=self.device)
            seen = torch.zeros(capacity, self.vocab_size, dtype=torch.bool, device=self.device)
            counts[:old] = self.counts
            seen[:old] = self.seen
            self.counts, self.seen = counts, seen
            self._free_slots.extend(range(capacity - 1, old - 1, -1))
        return self._free_slots.pop()

    def _shrink_if_unused(self) -> None:
        """Give the tables' memory back once no history is held (a burst of penalized requests ended)."""
        if not self._histories and len(self._free_slots) == self.counts.shape[0] and self.counts.shape[0]:
            self.counts = self.counts[:0].clone()
            self.seen = self.seen[:0].clone()
            self._free_slots.clear()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.long, pin_memory=self._pin)
        return tensor.to(self.device, non_blocking=True)
