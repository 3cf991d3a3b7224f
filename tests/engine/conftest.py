"""Engine fixtures: greedy references from Hugging Face transformers, computed once per session."""

from pathlib import Path

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\narr = np.array([1, 2, 3])\n",
    "Water boils at a temperature of",
    "Translate to French: Good morning, how are you?",
    "The quick brown fox",
    "List three fruits:\n1.",
    "In machine learning, overfitting means",
]


def hf_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Reference continuations: one `generate()` per prompt (no padding), float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            generated = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                attention_mask=torch.ones_like(ids),
                pad_token_id=tokenizer.eos_token_id,
            )
            outputs.append(generated[0, ids.shape[1] :].tolist())
    return outputs


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    return prompts, hf_greedy(smollm2_dir, PROMPTS, 24)


@pytest.fixture(scope="session")
def qwen_reference(qwen_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    return prompts, hf_greedy(qwen_dir, PROMPTS, 12)
