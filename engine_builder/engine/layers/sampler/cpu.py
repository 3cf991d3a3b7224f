"""Turn logits into tokens on the CPU: bias, min_tokens, grammar masks, penalties, temperature, top-k/p, min-p, seeds.

Row order of processing (each step only touches the rows that ask for it):
raw logprobs -> logit_bias -> min_tokens (EOS and stop ids masked) -> grammar mask -> repetition /
presence / frequency penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.
The penalties read each sequence's token counts from `TokenHistories` (kept between steps, grown by the new tokens).
Sampling uses the exponential race (argmax of p / Exp(1) noise), which draws exactly from p and lets
each seeded request use its own generator.
"""

from collections.abc import Callable

import torch

from engine_builder.common.types import TokenLogprob
from engine_builder.engine.kernels import native_ops
from engine_builder.engine.layers.sampler import SamplerOutput, SamplingRow
from engine_builder.engine.layers.sampler.history import TokenHistories


class CpuSampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.histories = TokenHistories(vocab_size, device)

    def free(self, seq_id: int) -> None:
        self.histories.free(seq_id)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.shape[0] == len(rows)
        raw_logprobs = self._raw_logprobs(logits, rows)
        logits = self._process(logits, rows)
        token_ids = self._choose(logits, rows)
        logprobs = [
            _token_logprob(raw, token_id, row.params.logprobs)
            if raw is not None and row.params.logprobs is not None
            else None
            for raw, token_id, row in zip(raw_logprobs, token_ids, rows, strict=True)
        ]
        return SamplerOutput(token_ids, logprobs)

    def _raw_logprobs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[torch.Tensor | None]:
        wanted = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
        result: list[torch.Tensor | None] = [None] * len(rows)
        if wanted:
            values = torch.log_softmax(logits[wanted], dim=-1)
            for position, index in enumerate(wanted):
                result[index] = values[position]
        return result

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        if not any(_needs_processing(row) for row in rows):
            return logits  # plain rows (the common case): nothing to change, nothing to copy
        logits = logits.clone()
        _apply_bitmasks(logits, rows)
        with self.histories.folded(rows) as slots:
            self._apply_per_row(logits, rows, slots)
        return logits

    def _apply_per_row(self, logits: torch.Tensor, rows: list[SamplingRow], slots: dict[int, int]) -> None:
        neg_inf = float("-inf")
        for index, row in enumerate(rows):
            params = row.params
            if params.logit_bias:
                ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
                bias = torch.tensor(
                    list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device
                )
                logits[index].index_add_(0, ids, bias)
            if len(row.output_token_ids) < params.min_tokens:
                banned = [t for t in (*row.eos_token_ids, *params.stop_token_ids) if t < logits.shape[1]]
                if banned:
                    logits[index, banned] = neg_inf
            if row.allowed_tokens is not None:
                allowed = row.allowed_tokens[: logits.shape[1]]
                logits[index, : allowed.shape[0]].masked_fill_(~allowed, neg_inf)
                if allowed.shape[0] < logits.shape[1]:
                    logits[index, allowed.shape[0] :] = neg_inf
            if params.repetition_penalty != 1.0:
                seen = self.histories.seen[slots[index]].nonzero().squeeze(1)
                if seen.numel():
                    values = logits[index, seen]
                    penalty = params.repetition_penalty
                    logits[index, seen] = torch.where(values > 0, values / penalty, values * penalty)
            if (params.presence_penalty or params.frequency_penalty) and row.output_token_ids:
                counts = self.histories.counts[slots[index]].to(logits.dtype)
                logits[index] -= params.frequency_penalty * counts + params.presence_penalty * (
                    counts > 0
                ).to(logits.dtype)

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        chosen = native_ops.argmax_rows(logits)
        if chosen is None:
            chosen = logits.argmax(dim=-1).tolist()
        sampled = [index for index, row in enumerate(rows) if not row.params.is_greedy]
        if not sampled:
            return chosen
        subset = logits[sampled]
        temperatures = torch.tensor([rows[i].params.temperature for i in sampled], dtype=subset.dtype)
        subset = subset / temperatures.unsqueeze(1)
        subset = _apply_top_k(subset, [rows[i].params.top_k for i in sampled])
        probs = torch.softmax(subset, dim=-1)
        probs = _apply_top_p(probs, [rows[i].params.top_p for i in sampled])
        probs = _apply_min_p(probs, [rows[i].params.min_p for i in sampled])
        noise = torch.empty_like(probs)
        for position, index in enumerate(sampled):
            noise[position].exponential_(generator=rows[index].generator)
        picks = (probs / noise).argmax(dim=-1).tolist()
        for position, index in enumerate(sampled):
            chosen[index] = picks[position]
        return chosen


_SHIFTS = torch.arange(32, dtype=torch.int32)
_xgrammar_apply: Callable[..., None] | None
try:  # grammar masks come from xgrammar; its CPU kernel applies them (the torch unpacking below is the fallback)
    from xgrammar import apply_token_bitmask_inplace as _xgrammar_apply
except ImportError:  # pragma: no cover - xgrammar is installed with the project
    _xgrammar_apply = None


def _apply_bitmasks(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Grammar masks of every constrained row, unpacked and applied in one vectorized pass."""
    indices = [index for index, row in enumerate(rows) if row.token_bitmask is not None]
    if not indices:
        return
    packed = torch.stack([rows[index].token_bitmask for index in indices])  # type: ignore[misc]
    if native_ops.apply_token_bitmask_(logits, packed, indices):  # our CPU kernel: ~10x xgrammar's at 16 rows
        return
    if _xgrammar_apply is not None and logits.dtype == torch.float32 and packed.shape[1] * 32 >= logits.shape[1]:
        full = torch.full((logits.shape[0], packed.shape[1]), -1, dtype=torch.int32)
        full[torch.tensor(indices, dtype=torch.long)] = packed
        _xgrammar_apply(logits, full, indices=indices)  # xgrammar's C++ kernel: ~10x faster than unpacking
        return
    allowed = ((packed.unsqueeze(-1) >> _SHIFTS) & 1).view(len(indices), -1).bool()
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    selected = torch.tensor(indices, dtype=torch.long)
    logits[selected] = logits[selected].masked_fill(~allowed[:, :vocab], float("-inf"))


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


def _apply_top_k(logits: torch.Tensor, top_ks: list[int | None]) -> torch.Tensor:
    limits = [k for k in top_ks if k is not None and 0 < k < logits.shape[1]]
    if not limits:
        return logits
    values = logits.topk(max(limits), dim=-1).values
    for position, k in enumerate(top_ks):
        if k is not None and 0 < k < logits.shape[1]:
            threshold = values[position, k - 1]
            logits[position].masked_fill_(logits[position] < threshold, float("-inf"))
    return logits


def _apply_top_p(probs: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    rows = [position for position, p in enumerate(top_ps) if p < 1.0]
    for position in rows:
        sorted_probs, order = probs[position].sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        remove = (cumulative - sorted_probs) >= top_ps[position]
        remove[0] = False  # the most likely token always stays: a top_p below float32's smallest value is 0 here
        sorted_probs[remove] = 0.0
        probs[position] = torch.zeros_like(probs[position]).scatter_(0, order, sorted_probs)
    return probs


def _apply_min_p(probs: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    for position, min_p in enumerate(min_ps):
        if min_p > 0.0:
            threshold = probs[position].max() * min_p
            probs[position].masked_fill_(probs[position] < threshold, 0.0)
    return probs


def _token_logprob(logprobs: torch.Tensor, token_id: int, num_top: int | None) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if num_top:
        values, ids = logprobs.topk(num_top)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
