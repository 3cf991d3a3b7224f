"""Pooling modes: token states [batch, seq, hidden] plus the attention mask -> one vector per input.

Names follow sentence-transformers' `pooling_mode` values. Inputs are always right-padded by the
collator, so the last real token of row i sits at `lengths[i] - 1`.
"""

from collections.abc import Callable

import torch

PoolingFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _float_mask(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.unsqueeze(-1).to(hidden.dtype)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = _float_mask(hidden, mask)
    summed = (hidden * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def mean_sqrt_len_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = _float_mask(hidden, mask)
    summed = (hidden * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9).sqrt()


def weighted_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (weights 1..n over the real tokens), as in SGPT-style models."""
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
    weights = _float_mask(hidden, mask) * positions.view(1, -1, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    padded = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min)
    return padded.max(dim=1).values


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each right-padded row."""
    return mask.sum(dim=1).long() - 1


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(mask)]


POOLING_MODES: dict[str, PoolingFn] = {
    "cls": cls_pool,
    "lasttoken": last_token_pool,
    "max": max_pool,
    "mean": mean_pool,
    "mean_sqrt_len_tokens": mean_sqrt_len_pool,
    "weightedmean": weighted_mean_pool,
}


def get_pooling(name: str) -> PoolingFn:
    """The pooling function for a mode name; unknown names are answered with the known ones."""
    try:
        return POOLING_MODES[name]
    except KeyError:
        known = ", ".join(sorted(POOLING_MODES))
        raise ValueError(f"unknown pooling mode {name!r}; known modes: {known}") from None
