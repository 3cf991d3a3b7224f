"""Architectures end to end: a random-weight mixture-of-experts checkpoint builds and serves over HTTP with
transformers' greedy output; an architecture the torch engine cannot serve is refused by the build before it
writes anything, and a server that fails to start exits non-zero."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.serve.server.harness import ServerProcess, write_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _tiny_moe(root: Path, smollm2_dir: Path, kind: str) -> Path:
    """A random-weight checkpoint of `kind` with SmolLM2's tokenizer (and so its vocabulary size)."""
    import transformers

    torch.manual_seed(0)
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
    )
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True,
        )
    elif kind == "gpt_oss":
        config = transformers.GptOssConfig(
            **common, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    else:
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = root / kind
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, folder / name)
    return folder


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "ENGINE_BUILDER_CACHE": str(cache),
             "ENGINE_BUILDER_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_moe_checkpoint_served_over_http_matches_transformers_greedy(
    tmp_path: Path, smollm2_dir: Path, kind: str
) -> None:
    import openai
    import transformers

    folder = _tiny_moe(tmp_path, smollm2_dir, kind)
    config = write_config(
        tmp_path / "config.yaml", folder, max_seq_len=128, max_num_tokens=72,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 16 * 2**20},
    )
    prompts = [[(97 * i + 13 * j) % 40000 + 100 for j in range(length)] for i, length in enumerate((5, 90, 9))]
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            output = reference.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
            expected.append(output[0, len(prompt) :].tolist())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    server = ServerProcess(config, tmp_path / "engine")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        # one request with three prompts: a batch, the 90-token prompt prefilled in two chunks (72 tokens a step)
        response = client.completions.create(
            model="test-model", prompt=prompts, max_tokens=8, temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        texts = [choice.text for choice in sorted(response.choices, key=lambda choice: choice.index)]
        assert texts == [tokenizer.decode(ids) for ids in expected]
        assert response.usage is not None and response.usage.completion_tokens == 24
    finally:
        server.stop()


def _unsupported_checkpoint(root: Path, smollm2_dir: Path, architecture: str) -> Path:
    folder = root / "unsupported"
    shutil.copytree(smollm2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=[architecture])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_build_refuses_an_architecture_the_torch_engine_cannot_serve(tmp_path: Path, smollm2_dir: Path) -> None:
    folder = _unsupported_checkpoint(tmp_path, smollm2_dir, "PhiForCausalLM")
    config = write_config(tmp_path / "config.yaml", folder)
    result = _cli("build", str(config), "--output", str(tmp_path / "engine"), "--backend", "torch",
                  cache=tmp_path / "cache")
    assert result.returncode == 1, result.stderr
    assert "PhiForCausalLM" in result.stderr and "LlamaForCausalLM" in result.stderr
    assert "Qwen3MoeForCausalLM" in result.stderr  # the supported list is named
    assert not (tmp_path / "engine").exists()


def test_build_refuses_quantized_experts(tmp_path: Path, smollm2_dir: Path) -> None:
    folder = _tiny_moe(tmp_path, smollm2_dir, "mixtral")
    config = write_config(tmp_path / "config.yaml", folder)
    config.write_text(config.read_text().replace("base_model: decoder", "base_model: decoder\n    quantization_type: fp8"))
    result = _cli("build", str(config), "--output", str(tmp_path / "engine"), "--backend", "torch",
                  cache=tmp_path / "cache")
    assert result.returncode == 1, result.stderr
    assert "mixture-of-experts" in result.stderr and "fp8" in result.stderr
    assert not (tmp_path / "engine").exists()


def test_a_server_that_fails_to_start_exits_non_zero(tmp_path: Path, smollm2_dir: Path) -> None:
    """An engine directory whose checkpoint was swapped for one the engine cannot load after the build."""
    config = write_config(
        tmp_path / "config.yaml", smollm2_dir,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 16 * 2**20},
    )
    engine_dir = tmp_path / "engine"
    built = _cli("build", str(config), "--output", str(engine_dir), "--backend", "torch", cache=tmp_path / "cache")
    assert built.returncode == 0, built.stderr
    model_config = engine_dir / "model" / "config.json"
    text = model_config.read_text()
    model_config.unlink()  # the build links the checkpoint's files: replace the link, not its target
    model_config.write_text(text.replace("LlamaForCausalLM", "PhiForCausalLM"))
    # record the swapped file as built (serve otherwise refuses an engine whose files changed since the build)
    manifest_file = engine_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    stat = model_config.stat()
    manifest["extra"]["model_files"]["config.json"] = [stat.st_size, stat.st_mtime_ns]
    manifest_file.write_text(json.dumps(manifest))
    result = _cli("serve", str(engine_dir), "--host", "127.0.0.1", "--port", "0", cache=tmp_path / "cache")
    assert result.returncode != 0
    assert "PhiForCausalLM" in result.stderr + result.stdout
