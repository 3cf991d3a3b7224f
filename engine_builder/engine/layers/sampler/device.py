"""Sampling where the logits are (a GPU), batched over rows; only token ids and requested logprobs reach the host.

Same order and semantics as the CPU sampler: raw logprobs -> grammar bitmasks -> logit_bias -> min_tokens ->
allowed tokens -> repetition / presence / frequency penalties -> greedy argmax, or temperature -> top-k -> top-p
-> min-p -> exponential race. Common work (argmax, temperature, top-k/p, min-p, the race) is one batched op per
step whatever the row count; sparse per-row work (biases, banned ids, penalties) is gathered into one scatter
each. The penalties read each sequence's token counts from `TokenHistories`, which keeps them on the device and
adds only the tokens appended since the last step. Rows with a seed draw their noise from their own device
generator (the same draws whatever else is in the batch); the others share one batched draw. Results come back
through pinned host buffers in one copy.
"""

import torch

from engine_builder.common.types import TokenLogprob
from engine_builder.engine.layers.sampler import SamplerOutput, SamplingRow
from engine_builder.engine.layers.sampler.history import TokenHistories

_SHIFTS = torch.arange(32, dtype=torch.int32)
NEG_INF = float("-inf")


class DeviceSampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._shifts = _SHIFTS.to(device)
        self._pin = device.type == "cuda"
        self.histories = TokenHistories(vocab_size, device)

    def free(self, seq_id: int) -> None:
        self.histories.free(seq_id)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.shape[0] == len(rows)
        wanted = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(self._rows(logits, wanted), dim=-1) if wanted else None
        logits = self._process(logits, rows)
        sampled = [index for index, row in enumerate(rows) if not row.params.is_greedy]
        if len(sampled) == len(rows):  # every row samples: no argmax, and no gather and scatter of the logits
            token_ids = self._sample(logits, rows)
        else:
            token_ids = logits.argmax(dim=-1)
            if sampled:
                selected = self._index(sampled)
                token_ids[selected] = self._sample(logits[selected], [rows[i] for i in sampled])
        return self._to_host(token_ids, raw_logprobs, wanted, rows)

    def _rows(self, tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """`tensor`'s rows `indices`: the tensor itself when they are all of its rows, in order."""
        if len(indices) == tensor.shape[0]:
            return tensor
        return tensor[self._index(indices)]

    # -- processing ------------------------------------------------------------------------------------------
    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        if not any(_needs_processing(row) for row in rows):
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        self._apply_bitmasks(logits, rows)
        bias_rows, bias_ids, bias_values = [], [], []
        ban_rows, ban_ids = [], []
        for index, row in enumerate(rows):
            params = row.params
            for token, value in params.logit_bias.items():
                bias_rows.append(index)
                bias_ids.append(token)
                bias_values.append(value)
            if len(row.output_token_ids) < params.min_tokens:
                banned = [t for t in (*row.eos_token_ids, *params.stop_token_ids) if t < vocab]
                ban_rows.extend([index] * len(banned))
                ban_ids.extend(banned)
        if bias_rows:
            values = self._tensor(bias_values, torch.float32).to(logits.dtype)
            logits.index_put_((self._index(bias_rows), self._index(bias_ids)), values, accumulate=True)
        if ban_rows:
            logits[self._index(ban_rows), self._index(ban_ids)] = NEG_INF
        for index, row in enumerate(rows):
            if row.allowed_tokens is not None:
                allowed = row.allowed_tokens[:vocab].to(logits.device)
                logits[index, : allowed.shape[0]].masked_fill_(~allowed, NEG_INF)
                if allowed.shape[0] < vocab:
                    logits[index, allowed.shape[0] :] = NEG_INF
        with self.histories.folded(rows) as slots:
            self._apply_repetition(logits, rows, slots)
            self._apply_presence_frequency(logits, rows, slots)
        return logits

    def _apply_bitmasks(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        indices = [index for index, row in enumerate(rows) if row.token_bitmask is not None]
        if not indices:
            return
        packed = torch.stack([rows[index].token_bitmask for index in indices])  # type: ignore[misc]
        if self._pin:
            packed = packed.pin_memory()
        packed = packed.to(logits.device, non_blocking=True)
        allowed = ((packed.unsqueeze(-1) >> self._shifts) & 1).view(len(indices), -1).bool()
        vocab = logits.shape[1]
        if allowed.shape[1] < vocab:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
        selected = self._index(indices)
        logits[selected] = logits[selected].masked_fill(~allowed[:, :vocab], NEG_INF)

    def _apply_repetition(self, logits: torch.Tensor, rows: list[SamplingRow], slots: dict[int, int]) -> None:
        indices = [index for index, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
        if not indices:
            return
        seen = self.histories.seen.index_select(0, self._index([slots[i] for i in indices]))
        selected = self._index(indices)
        values = logits[selected]
        penalty = self._tensor([rows[i].params.repetition_penalty for i in indices], torch.float32).unsqueeze(1)
        penalized = torch.where(values > 0, values / penalty, values * penalty)
        logits[selected] = torch.where(seen, penalized, values)

    def _apply_presence_frequency(self, logits: torch.Tensor, rows: list[SamplingRow], slots: dict[int, int]) -> None:
        indices = [
            index for index, row in enumerate(rows)
            if (row.params.presence_penalty or row.params.frequency_penalty) and row.output_token_ids
        ]
        if not indices:
            return
        counts = self.histories.counts.index_select(0, self._index([slots[i] for i in indices]))
        counts = counts.to(logits.dtype)
        frequency = self._tensor([rows[i].params.frequency_penalty for i in indices], torch.float32).unsqueeze(1)
        presence = self._tensor([rows[i].params.presence_penalty for i in indices], torch.float32).unsqueeze(1)
        selected = self._index(indices)
        logits[selected] -= frequency * counts + presence * (counts > 0).to(logits.dtype)

    # -- sampling --------------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        temperatures = self._tensor([row.params.temperature for row in rows], torch.float32).unsqueeze(1)
        logits = logits / temperatures
        top_ks = [row.params.top_k if row.params.top_k is not None and 0 < row.params.top_k < vocab else 0 for row in rows]
        if any(top_ks):
            largest = logits.topk(max(top_ks), dim=-1).values
            kth = largest.gather(1, self._index([max(k, 1) - 1 for k in top_ks]).unsqueeze(1))
            limited = self._tensor([k > 0 for k in top_ks], torch.bool).unsqueeze(1)
            logits = logits.masked_fill(limited & (logits < kth), NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        top_ps = [row.params.top_p for row in rows]
        if any(p < 1.0 for p in top_ps):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
            limits = self._tensor(top_ps, torch.float32).unsqueeze(1)
            # only rows that ask for it: a top_p of 1 row's float32 cumsum reaches 1.0 before its tail, which was cut
            # whenever another row of the step had top_p < 1 (a seeded draw then depended on the batch: probe IB)
            remove = ((cumulative - sorted_probs) >= limits) & (limits < 1.0)
            remove[:, 0] = False  # the most likely token always stays (a top_p under float32's range reads as 0)
            sorted_probs = sorted_probs.masked_fill(remove, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        min_ps = [row.params.min_p for row in rows]
        if any(p > 0.0 for p in min_ps):
            threshold = probs.max(dim=-1, keepdim=True).values * self._tensor(min_ps, torch.float32).unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for position, row in enumerate(rows):
            if row.generator is not None:
                noise[position].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)

    # -- host side -------------------------------------------------------------------------------------------
    def _to_host(
        self, token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, wanted: list[int], rows: list[SamplingRow]
    ) -> SamplerOutput:
        results: list[torch.Tensor] = [token_ids]
        num_top = 0
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, self._rows(token_ids, wanted).unsqueeze(1)).squeeze(1)
            results.append(chosen)
            num_top = max(rows[i].params.logprobs or 0 for i in wanted)
            if num_top:
                best = raw_logprobs.topk(num_top, dim=-1)
                results.extend([best.values, best.indices])
        host = [self._host_copy(tensor) for tensor in results]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        ids = host[0].tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if raw_logprobs is not None:
            chosen_values = host[1].tolist()
            top_values = host[2].tolist() if num_top else None
            top_ids = host[3].tolist() if num_top else None
            for position, index in enumerate(wanted):
                count = rows[index].params.logprobs or 0
                alternatives: tuple[tuple[int, float], ...] = ()
                if count and top_values is not None and top_ids is not None:
                    alternatives = tuple(zip(top_ids[position][:count], top_values[position][:count], strict=True))
                logprobs[index] = TokenLogprob(
                    token_id=ids[index], logprob=float(chosen_values[position]), top=alternatives
                )
        return SamplerOutput(ids, logprobs)

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin)
        host.copy_(tensor, non_blocking=True)
        return host

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=dtype, pin_memory=self._pin)
        return tensor.to(self.device, non_blocking=True)

    def _index(self, values: list[int]) -> torch.Tensor:
        return self._tensor(values, torch.long)


def _needs_processing(row: SamplingRow) -> bool:
    params = row.params
    return bool(
        params.logit_bias
        or len(row.output_token_ids) < params.min_tokens
        or row.allowed_tokens is not None
        or row.token_bitmask is not None
        or params.repetition_penalty != 1.0
        or params.presence_penalty
        or params.frequency_penalty
    )
