"""The two-phase evaluation (bf16 weights, float32 compute per layer, reference logits stored between phases) gives
the numbers of the one-shot evaluation it replaced (both models in float32 in memory at once), calibration included.

The one-shot computation is kept below as the oracle. Tiny random checkpoints stored in bfloat16 (the production
case on the CPU: a per-layer float32 copy of bf16 weights is exact), Llama and Qwen3 (per-head q/k norms) shaped.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine_builder.build.calibration.calibrate import calibrate
from engine_builder.build.calibration.device import ComputePlan, plan_for
from engine_builder.build.calibration.evaluate import (
    AccuracyMetrics,
    ReferenceLogits,
    compare,
    record_reference,
)
from engine_builder.build.calibration.export_hf import export_hf_checkpoint
from engine_builder.build.calibration.forward import batches, run_batch
from engine_builder.build.calibration.pipeline import load_for_calibration
from engine_builder.build.calibration.quantize import quantize_tensors
from engine_builder.build.calibration.recipes import recipe_for
from engine_builder.engine.kernels import triton as triton_kernels
from engine_builder.engine.layers import KernelSet
from engine_builder.engine.models.decoder import DecoderModel
from engine_builder.engine.models.loader import load_decoder
from tests.engine.tiny_models import write_tiny_model

CPU = torch.device("cpu")


def _bf16_checkpoint(root: Path, family: str) -> Path:
    source = write_tiny_model(root, family)
    target = root / f"{family}-bf16"
    target.mkdir()
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(source / "model.safetensors").items()}
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config))
    return target


def _sequences(seed: int, count: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 48, (count,), generator=generator).tolist()
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in lengths]


@torch.inference_mode()
def _one_shot(
    reference: DecoderModel, quantized: DecoderModel, sequences: list[list[int]], kv_cache_dtype: torch.dtype | None
) -> AccuracyMetrics:
    """engine_builder/build/calibration/evaluate.py's `evaluate` before issue 26: both models in memory, logits compared batch by batch."""
    agree = positions = targets_total = 0
    cosine_sum = kl_sum = 0.0
    cosine_min = 1.0
    nll = [0.0, 0.0]
    for batch_sequences in batches(sequences):
        ref_batch = run_batch(reference, batch_sequences)
        quant_batch = run_batch(quantized, batch_sequences, kv_cache_dtype)
        for index, sequence in enumerate(batch_sequences):
            rows = ref_batch.rows(index)
            ref_logits = reference.logits(ref_batch.hidden[rows]).float()
            quant_logits = quantized.logits(quant_batch.hidden[rows]).float()
            agree += int((ref_logits.argmax(-1) == quant_logits.argmax(-1)).sum())
            positions += len(sequence)
            cosine = F.cosine_similarity(ref_logits, quant_logits, dim=-1)
            cosine_sum += float(cosine.sum())
            cosine_min = min(cosine_min, float(cosine.min()))
            ref_log_probs, quant_log_probs = ref_logits.log_softmax(-1), quant_logits.log_softmax(-1)
            kl_sum += float((ref_log_probs.exp() * (ref_log_probs - quant_log_probs)).sum())
            targets = torch.tensor(sequence[1:])
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


@pytest.mark.parametrize(("family", "quantization"), [("llama", "fp8_kv"), ("llama", "fp4"), ("qwen3", "fp8")])
def test_two_phase_equals_one_shot_float32(tmp_path: Path, family: str, quantization: str) -> None:
    checkpoint = _bf16_checkpoint(tmp_path, family)
    recipe = recipe_for(quantization)
    kv_dtype = torch.float8_e4m3fn if recipe.kv_cache_fp8 else None
    samples = _sequences(0, 12, 256)
    heldout = _sequences(1, 120, 256)
    assert len(list(batches(heldout))) > 1  # stored logits are matched to sequences across batches

    plan = plan_for(checkpoint, CPU)
    assert (plan.weight_dtype, plan.compute_dtype) == (torch.bfloat16, torch.float32)
    reference = load_for_calibration(checkpoint, plan)
    stats = calibrate(reference, samples, plan.compute_dtype)
    store = ReferenceLogits(tmp_path)
    record_reference(reference, heldout, store, plan.compute_dtype)
    assert all(p.dtype == torch.bfloat16 for p in reference.parameters())  # the float32 copies were transient
    assert store.count == len(heldout)

    reference32 = load_decoder(checkpoint, torch.float32, CPU)
    stats32 = calibrate(reference32, samples)
    assert stats.input_amax.keys() == stats32.input_amax.keys()
    for name, amax in stats32.input_amax.items():
        assert stats.input_amax[name] == pytest.approx(amax, rel=1e-6), name
    torch.testing.assert_close(stats.kv_amax, stats32.kv_amax, rtol=1e-6, atol=0)

    model_dir = tmp_path / "quantized"
    export_hf_checkpoint(quantize_tensors(checkpoint, reference.spec.num_layers, recipe, stats), recipe, checkpoint, model_dir)
    two_phase = compare(load_for_calibration(model_dir, plan), heldout, store, kv_dtype, plan.compute_dtype)
    one_shot = _one_shot(reference32, load_decoder(model_dir, torch.float32, CPU), heldout, kv_dtype)
    assert (two_phase.num_sequences, two_phase.num_tokens) == (one_shot.num_sequences, one_shot.num_tokens)
    assert two_phase.top1_agreement == one_shot.top1_agreement
    for field in ("logit_cosine_mean", "logit_cosine_min", "kl_divergence_mean", "perplexity_reference",
                  "perplexity_quantized"):
        assert getattr(two_phase, field) == pytest.approx(getattr(one_shot, field), rel=1e-5, abs=1e-7), field
    assert 0 < two_phase.top1_agreement <= 1 and two_phase.kl_divergence_mean > 0  # a real, imperfect quantization


def test_compare_refuses_a_store_of_other_sequences(tmp_path: Path) -> None:
    checkpoint = _bf16_checkpoint(tmp_path, "llama")
    plan = plan_for(checkpoint, CPU)
    model = load_for_calibration(checkpoint, plan)
    store = ReferenceLogits(tmp_path)
    record_reference(model, _sequences(2, 3, 256), store, plan.compute_dtype)
    with pytest.raises(ValueError, match="3 reference sequences recorded for 4 to compare"):
        compare(model, _sequences(3, 4, 256), store, None, plan.compute_dtype)


@pytest.mark.parametrize("kernels", [KernelSet.TORCH, KernelSet.TRITON])
def test_the_cuda_plan_on_cpu_tensors(tmp_path: Path, kernels: KernelSet) -> None:
    """What CUDA runs (weights and compute in the checkpoint's bf16, the GPU kernel set: Triton under the
    interpreter here), on CPU tensors: calibration and metrics within bf16 rounding of the float32 plan's."""
    if kernels == KernelSet.TRITON and not triton_kernels.available(CPU):
        pytest.skip("triton is not importable or TRITON_INTERPRET is unset")
    checkpoint = _bf16_checkpoint(tmp_path, "llama")
    recipe = recipe_for("fp8")
    samples, heldout = _sequences(0, 8, 256), _sequences(1, 6, 256)
    results = {}
    for plan in (plan_for(checkpoint, CPU), ComputePlan(CPU, torch.bfloat16, torch.bfloat16, kernels)):
        reference = load_for_calibration(checkpoint, plan)
        stats = calibrate(reference, samples, plan.compute_dtype)
        store = ReferenceLogits(tmp_path / f"logits-{plan.compute_dtype}")
        store.folder.mkdir()
        record_reference(reference, heldout, store, plan.compute_dtype)
        model_dir = tmp_path / f"quantized-{plan.compute_dtype}"
        export_hf_checkpoint(quantize_tensors(checkpoint, 2, recipe, stats), recipe, checkpoint, model_dir)
        results[plan.compute_dtype] = stats, compare(load_for_calibration(model_dir, plan), heldout, store, None,
                                                     plan.compute_dtype)
    (stats32, metrics32), (stats16, metrics16) = results[torch.float32], results[torch.bfloat16]
    for name, amax in stats32.input_amax.items():
        assert stats16.input_amax[name] == pytest.approx(amax, rel=0.03), name
    assert metrics16.perplexity_reference == pytest.approx(metrics32.perplexity_reference, rel=0.01)
    assert metrics16.perplexity_quantized == pytest.approx(metrics32.perplexity_quantized, rel=0.01)
    assert metrics16.logit_cosine_mean == pytest.approx(metrics32.logit_cosine_mean, abs=0.01)
