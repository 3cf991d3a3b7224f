"""Pooling modes against hand-computed values on a right-padded batch."""

import pytest
import torch

from engine_builder.serve.encoders.pooling import POOLING_MODES, get_pooling

HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]],
        [[-1.0, 0.5], [7.0, 1.0], [100.0, 100.0]],  # last position is padding
    ]
)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("cls", [[1.0, 2.0], [-1.0, 0.5]]),
        ("lasttoken", [[5.0, -6.0], [7.0, 1.0]]),
        ("max", [[5.0, 4.0], [7.0, 1.0]]),
        ("mean", [[3.0, 0.0], [3.0, 0.75]]),
        ("mean_sqrt_len_tokens", [[9.0 / 3**0.5, 0.0], [6.0 / 2**0.5, 1.5 / 2**0.5]]),
        ("weightedmean", [[(1 + 6 + 15) / 6, (2 + 8 - 18) / 6], [(-1 + 14) / 3, (0.5 + 2) / 3]]),
    ],
)
def test_pooling_modes_ignore_padding(mode: str, expected: list[list[float]]) -> None:
    pooled = get_pooling(mode)(HIDDEN, MASK)
    torch.testing.assert_close(pooled, torch.tensor(expected))


def test_every_registered_mode_is_tested() -> None:
    assert set(POOLING_MODES) == {"cls", "lasttoken", "max", "mean", "mean_sqrt_len_tokens", "weightedmean"}


def test_unknown_mode_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known modes: cls, lasttoken"):
        get_pooling("splade")
