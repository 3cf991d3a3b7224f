"""Accuracy of a quantized decoder against its unquantized reference on held-out text (teacher forcing).

Both models run the same token sequences through the serving code (the quantized one with its FP8 KV
cache when it has one), one after the other so only one is in memory: `record_reference` stores the reference's
logits, `compare` runs the quantized model against them. Per position: does the argmax agree (top-1 agreement),
cosine of the logit vectors, KL(reference || quantized); per model: perplexity of the held-out text.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine_builder.build.calibration.forward import batches, logits, run_batch
from engine_builder.engine.models.decoder import DecoderModel


@dataclass(frozen=True)
class AccuracyMetrics:
    num_sequences: int
    num_tokens: int
    top1_agreement: float
    logit_cosine_mean: float
    logit_cosine_min: float
    kl_divergence_mean: float
    perplexity_reference: float
    perplexity_quantized: float

    @property
    def perplexity_change(self) -> float:
        """Relative change: 0.05 means the quantized model's perplexity is 5 % higher."""
        return self.perplexity_quantized / self.perplexity_reference - 1.0

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "perplexity_change": self.perplexity_change}


class ReferenceLogits:
    """The reference model's float32 logits of each held-out sequence, in order, one file each under `folder`: the
    reference is freed before the quantized model is loaded, and full distributions (for cosine and KL) of a large
    vocabulary would otherwise rival the checkpoint in host memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def append(self, logits: torch.Tensor) -> None:
        torch.save(logits.detach().float().cpu(), self._path(self.count))
        self.count += 1

    def read(self, index: int, device: torch.device) -> torch.Tensor:
        return torch.load(self._path(index), weights_only=True).to(device)

    def _path(self, index: int) -> Path:
        return self.folder / f"reference-logits-{index:06d}.pt"


@torch.inference_mode()
def record_reference(
    reference: DecoderModel,
    sequences: list[list[int]],
    store: ReferenceLogits,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Phase one: the reference's logits of every sequence into `store`."""
    for batch_sequences in batches(sequences, progress="reference logits"):
        batch = run_batch(reference, batch_sequences, compute_dtype=compute_dtype)
        for index in range(len(batch_sequences)):
            store.append(logits(reference, batch.hidden[batch.rows(index)], compute_dtype))


@torch.inference_mode()
def compare(
    quantized: DecoderModel,
    sequences: list[list[int]],
    store: ReferenceLogits,
    kv_cache_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> AccuracyMetrics:
    """Phase two: the quantized model over the same sequences, measured against the stored reference logits."""
    if store.count != len(sequences):
        raise ValueError(f"{store.count} reference sequences recorded for {len(sequences)} to compare")
    agree = 0
    positions = 0
    cosine_sum = 0.0
    cosine_min = 1.0
    kl_sum = 0.0
    nll = [0.0, 0.0]
    targets_total = 0
    number = 0
    for batch_sequences in batches(sequences, progress="evaluation"):
        quant_batch = run_batch(quantized, batch_sequences, kv_cache_dtype, compute_dtype)
        for index, sequence in enumerate(batch_sequences):
            quant_logits = logits(quantized, quant_batch.hidden[quant_batch.rows(index)], compute_dtype)
            ref_logits = store.read(number, quant_logits.device)
            number += 1
            agree += int((ref_logits.argmax(-1) == quant_logits.argmax(-1)).sum())
            positions += len(sequence)
            cosine = F.cosine_similarity(ref_logits, quant_logits, dim=-1)
            cosine_sum += float(cosine.sum())
            cosine_min = min(cosine_min, float(cosine.min()))
            ref_log_probs = ref_logits.log_softmax(-1)
            quant_log_probs = quant_logits.log_softmax(-1)
            kl_sum += float((ref_log_probs.exp() * (ref_log_probs - quant_log_probs)).sum())
            targets = torch.tensor(sequence[1:], device=ref_logits.device)
            nll[0] += float(F.cross_entropy(ref_logits[:-1], targets, reduction="sum"))
            nll[1] += float(F.cross_entropy(quant_logits[:-1], targets, reduction="sum"))
            targets_total += len(sequence) - 1
    return AccuracyMetrics(
        num_sequences=len(sequences),
        num_tokens=positions,
        top1_agreement=agree / positions,
        logit_cosine_mean=cosine_sum / positions,
        logit_cosine_min=cosine_min,
        kl_divergence_mean=kl_sum / positions,
        perplexity_reference=math.exp(nll[0] / targets_total),
        perplexity_quantized=math.exp(nll[1] / targets_total),
    )
