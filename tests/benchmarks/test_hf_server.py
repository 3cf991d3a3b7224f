"""The naive HF peer's per-row controls inside a static batch (no model: tensors by hand)."""

import asyncio

import torch

from benchmarks.peers.hf_server import Job, RowControls, StreamRows

EOS = [2, 0]


def make_job(loop: asyncio.AbstractEventLoop, **fields: object) -> Job:
    defaults: dict[str, object] = {
        "prompt_ids": [5],
        "max_tokens": 3,
        "min_tokens": 0,
        "ignore_eos": False,
        "temperature": 0.0,
        "logit_bias": {},
    }
    return Job(loop=loop, **{**defaults, **fields})  # type: ignore[arg-type]


def test_rows_stop_at_their_own_length_or_eos() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        short, forced, natural = make_job(loop, max_tokens=1), make_job(loop, max_tokens=3), make_job(loop)
        criteria = StreamRows([short, forced, natural], EOS)
        assert criteria(torch.tensor([[5, 7], [5, 8], [5, 9]]), None).tolist() == [True, False, False]
        assert criteria(torch.tensor([[5, 7, 2], [5, 8, 11], [5, 9, 2]]), None).tolist() == [
            True,
            False,
            True,
        ]
        assert (
            criteria(torch.tensor([[5, 7, 2, 2], [5, 8, 11, 12], [5, 9, 2, 2]]), None).tolist() == [True] * 3
        )
        await asyncio.sleep(0)
        events = [
            [job.events.get_nowait() for _ in range(job.events.qsize())] for job in (short, forced, natural)
        ]
        assert events[0] == [("token", 7), ("finish", "length")]
        assert events[1] == [("token", 8), ("token", 11), ("token", 12), ("finish", "length")]
        assert events[2] == [("token", 9), ("finish", "stop")]

    asyncio.run(main())


def test_eos_suppressed_until_min_tokens_and_logit_bias_applied() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        jobs = [
            make_job(loop, min_tokens=2),
            make_job(loop, ignore_eos=True, generated=5),
            make_job(loop, logit_bias={3: -100.0}, generated=1),
        ]
        scores = RowControls(jobs, EOS)(torch.zeros(3, 2), torch.zeros(3, 4))
        assert scores[0].tolist() == [float("-inf"), 0.0, float("-inf"), 0.0]
        assert scores[1].tolist() == [float("-inf"), 0.0, float("-inf"), 0.0]
        assert scores[2].tolist() == [0.0, 0.0, 0.0, -100.0]
        jobs[0].generated = 2
        assert RowControls(jobs[:1], EOS)(torch.zeros(1, 2), torch.zeros(1, 4))[0].tolist() == [0.0] * 4

    asyncio.run(main())
