"""LoRA adapters in a torch build: random PEFT adapters for SmolLM2 made here (no peft package), fetched from a
LOCAL folder, S3 (moto) and a REMOTE_URL archive, checked against the base model, stored as adapters/<name>/ with their hashes
in the manifest; and every refusal raised before the engine directory exists."""

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from engine_builder.build.build_stage import BuildError, BuildResult, build_engine, default_cache_dir
from engine_builder.build.checkpoints import fetch_checkpoint
from engine_builder.build.config import CheckpointRepository, EngineOptions, load_config
from engine_builder.common.artifact import LoraAdapter, load_engine_dir
from tests.build.checkpoints.factory import tar_folder
from tests.conftest import REPO_ROOT
from tests.emulators.http_server import LocalHttpServer
from tests.emulators.processes import Emulator, start_moto
from tests.serve.server.harness import write_config

# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, intermediate 1536, 30 layers.
SMOLLM2_FEATURES = {
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def lora_tensors(
    rank: int, modules: tuple[str, ...], layers: range = range(30), seed: int = 0,
    features: dict[str, tuple[int, int]] = SMOLLM2_FEATURES,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """lora_A [r, in] and lora_B [out, r] for each module of each layer, named as PEFT's save_pretrained does."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            in_features, out_features = features[module]
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS.get(module, 'mlp')}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    return tensors


def write_adapter(
    folder: Path, tensors: dict[str, torch.Tensor], *, rank: int, modules: tuple[str, ...], pickled: bool = False,
    **config: Any,
) -> Path:  # fmt: skip
    folder.mkdir(parents=True)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "r": rank, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": list(modules), "bias": "none",
        "use_dora": False, "use_rslora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "fan_in_fan_out": False, "inference_mode": True, **config,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    if pickled:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def simple_adapter(folder: Path, rank: int = 8, **config: Any) -> Path:
    return write_adapter(folder, lora_tensors(rank, ("q_proj", "v_proj")), rank=rank, modules=("q_proj", "v_proj"),
                         **config)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the base model's sha256 is remembered there, so each build hashes it once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, shared_cache: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(shared_cache))
    monkeypatch.setenv("ENGINE_BUILDER_SECRETS_DIR", str(tmp_path / "no-secrets"))


def lora_config(
    tmp_path: Path, smollm2_dir: Path, adapters: dict[str, dict[str, Any]], max_lora_rank: int | None = None
) -> Path:
    """The harness's SmolLM2 config with lora_adapters (and lora_configuration) in its build section."""
    path = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256)
    document = yaml.safe_load(path.read_text())
    document["trt_llm"]["build"]["lora_adapters"] = adapters
    if max_lora_rank is not None:
        document["trt_llm"]["build"]["lora_configuration"] = {"max_lora_rank": max_lora_rank}
    path.write_text(yaml.safe_dump(document))
    return path


def local(path: Path) -> dict[str, str]:
    return {"source": "LOCAL", "repo": str(path)}


def build(config: Path, output: Path) -> BuildResult:
    loaded = load_config(config)
    options = EngineOptions.model_validate(loaded.truss.engine_builder.model_dump())
    return build_engine(loaded, output, options)


def assert_stored(engine: Path, entry: LoraAdapter, expected_tensors: dict[str, torch.Tensor]) -> None:
    folder = engine / entry.path
    assert entry.path == f"adapters/{entry.name}"
    assert sorted(path.name for path in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert entry.source.files == {path.name: sha256(path) for path in folder.iterdir()}
    stored = load_file(folder / "adapter_model.safetensors")
    assert stored.keys() == expected_tensors.keys()
    assert all(torch.equal(stored[name], tensor) for name, tensor in expected_tensors.items())


def test_local_adapters_are_checked_stored_and_recorded(tmp_path: Path, smollm2_dir: Path) -> None:
    attention = lora_tensors(8, ATTENTION, seed=1)
    write_adapter(tmp_path / "support", attention, rank=8, modules=ATTENTION, lora_alpha=16)
    # An older PEFT save (adapter_model.bin), rsLoRA, on the MLP of the first four layers only.
    mlp = lora_tensors(4, MLP, layers=range(4), seed=2)
    write_adapter(tmp_path / "sql", mlp, rank=4, modules=MLP, pickled=True, lora_alpha=6, use_rslora=True,
                  layers_to_transform=[0, 1, 2, 3])  # fmt: skip
    (tmp_path / "support" / "README.md").write_text("not fetched")
    adapters = {"support-bot": local(tmp_path / "support"), "sql:v1": local(tmp_path / "sql")}
    config = lora_config(tmp_path, smollm2_dir, adapters, max_lora_rank=16)

    engine = build(config, tmp_path / "engine").engine_dir

    runtime = engine.manifest.runtime
    assert runtime.max_lora_rank == 16
    sql, support = runtime.lora_adapters  # sorted by name
    assert (support.name, support.rank, support.alpha, support.target_modules) == ("support-bot", 8, 16.0, list(ATTENTION))
    # rsLoRA scales by lora_alpha / sqrt(r); stored as the alpha whose alpha / r is that scale.
    assert (sql.name, sql.rank, sql.target_modules) == ("sql:v1", 4, list(MLP))
    assert sql.alpha == pytest.approx(6 * math.sqrt(4)) and sql.alpha / sql.rank == pytest.approx(6 / math.sqrt(4))
    assert_stored(engine.path, support, attention)
    assert_stored(engine.path, sql, mlp)
    assert support.source.source == "LOCAL" and support.source.repo == str(tmp_path / "support")
    assert support.source.files["adapter_model.safetensors"] == sha256(tmp_path / "support" / "adapter_model.safetensors")
    assert support.source.revision and support.source.revision.startswith("sha256:")
    raw = json.loads((engine.path / "manifest.json").read_text())["runtime"]["lora_adapters"]
    assert [item["path"] for item in raw] == ["adapters/sql:v1", "adapters/support-bot"]
    assert load_engine_dir(engine.path).manifest.runtime.lora_adapters == runtime.lora_adapters
    recorded = yaml.safe_load((engine.path / "config.yaml").read_text())["trt_llm"]["build"]["lora_adapters"]
    assert recorded["sql:v1"]["repo"] == str(tmp_path / "sql")


# --- S3 through moto -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_bucket() -> Iterator[tuple[Emulator, Any, str]]:
    """moto with IAM auth: every request after the bootstrap must be signed with the created user's key."""
    import boto3

    emulator = start_moto(initial_no_auth_actions=3)
    try:
        bootstrap = {"endpoint_url": emulator.url, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", **bootstrap)
        iam.create_user(UserName="lora")
        key = iam.create_access_key(UserName="lora")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="lora", PolicyName="s3", PolicyDocument=json.dumps(policy))
        client = boto3.client(
            "s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], **bootstrap
        )
        client.create_bucket(Bucket="adapters")
        secret = json.dumps(
            {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"], "region": "us-east-1"}
        )
        yield emulator, client, secret
    finally:
        emulator.stop()


@pytest.mark.emulator
def test_adapter_from_s3(
    tmp_path: Path, smollm2_dir: Path, moto_bucket: tuple[Emulator, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator, client, secret = moto_bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", emulator.url)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("lora_s3", secret)
    tensors = lora_tensors(16, ("q_proj", "o_proj", "down_proj"), seed=3)
    folder = write_adapter(tmp_path / "upload", tensors, rank=16, modules=("q_proj", "o_proj", "down_proj"))
    (folder / "README.md").write_text("a model card the build does not fetch")
    for file in folder.iterdir():
        client.upload_file(str(file), "adapters", f"jobs/42/{file.name}")
    repository = {"source": "S3", "repo": "s3://adapters/jobs/42", "runtime_secret_name": "lora_s3"}
    config = lora_config(tmp_path, smollm2_dir, {"from-s3": repository})  # no lora_configuration: rank 64

    engine = build(config, tmp_path / "engine").engine_dir

    assert engine.manifest.runtime.max_lora_rank == 64
    (entry,) = engine.manifest.runtime.lora_adapters
    assert (entry.rank, entry.alpha, entry.target_modules) == (16, 16.0, ["q_proj", "o_proj", "down_proj"])
    assert (entry.source.source, entry.source.repo) == ("S3", "s3://adapters/jobs/42")
    assert_stored(engine.path, entry, tensors)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert entry.source.files[name] == sha256(folder / name)
    key = json.loads(secret)["secret_access_key"]
    assert key not in (engine.path / "manifest.json").read_text() + (engine.path / "config.yaml").read_text()


# --- REMOTE_URL: a presigned tar.gz --------------------------------------------------------------------------


def test_adapter_from_a_presigned_archive(tmp_path: Path, smollm2_dir: Path) -> None:
    tensors = lora_tensors(8, ("k_proj", "up_proj"), seed=4)
    folder = write_adapter(tmp_path / "archive", tensors, rank=8, modules=("k_proj", "up_proj"), pickled=True)
    (folder / "README.md").write_text("a model card an adapter build does not keep")
    (folder / "config.json").write_text("{}")  # the root file a model fetch looks for; no adapter file
    server = LocalHttpServer()
    try:
        server.add_file("/adapter.tar.gz", tar_folder(folder))
        url = f"{server.url}/adapter.tar.gz?X-Amz-Signature=presigned-secret"
        repository = {"source": "REMOTE_URL", "repo": url}
        # The same URL fetched as a model first: a model's selection drops adapter_model.bin, and the adapter
        # fetch must not reuse that snapshot.
        cache_dir = default_cache_dir()  # where the build looks
        as_model = fetch_checkpoint(CheckpointRepository(**repository), cache_dir=cache_dir, progress=False)
        assert sorted(as_model.files) == ["README.md", "adapter_config.json", "config.json"]
        config = lora_config(tmp_path, smollm2_dir, {"archived": repository})
        engine = build(config, tmp_path / "engine").engine_dir
    finally:
        server.stop()
    (entry,) = engine.manifest.runtime.lora_adapters
    assert entry.source.repo == f"{server.url}/adapter.tar.gz"
    assert entry.target_modules == ["k_proj", "up_proj"]
    assert_stored(engine.path, entry, tensors)  # converted from adapter_model.bin
    assert "presigned-secret" not in (engine.path / "config.yaml").read_text()
    assert "presigned-secret" not in (engine.path / "manifest.json").read_text()


# --- refusals ----------------------------------------------------------------------------------------------


def _bigger_base(folder: Path) -> Path:
    """An adapter trained on a 960-wide model (SmolLM2-360M's hidden size)."""
    features = dict(SMOLLM2_FEATURES, q_proj=(960, 960), v_proj=(960, 320))
    return write_adapter(folder, lora_tensors(8, ("q_proj", "v_proj"), features=features), rank=8,
                         modules=("q_proj", "v_proj"), base_model_name_or_path="HuggingFaceTB/SmolLM2-360M")  # fmt: skip


def _with_tensor(folder: Path, name: str, tensor: torch.Tensor, **config: Any) -> Path:
    tensors = lora_tensors(8, ("q_proj",)) | {name: tensor}
    return write_adapter(folder, tensors, rank=8, modules=("q_proj",), **config)


def _without_weights(folder: Path) -> Path:
    simple_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    return folder


REFUSALS = {
    "rank over the pool": (
        lambda folder: simple_adapter(folder, rank=32),
        r"lora_adapters\.bad .*rank 32 is over the LoRA pool's max_lora_rank 16; raise "
        r"trt_llm\.build\.lora_configuration\.max_lora_rank to 32",
    ),
    "lm_head in target_modules": (
        lambda folder: _with_tensor(folder, "base_model.model.lm_head.lora_A.weight", torch.zeros(8, 576),
                                    target_modules=["q_proj", "lm_head"]),  # fmt: skip
        r"target module lm_head \(adapter_config.json target_modules\) is not supported: LoRA applies to q_proj",
    ),
    "embed_tokens tensor": (
        lambda folder: _with_tensor(folder, "base_model.model.model.embed_tokens.lora_embedding_A",
                                    torch.zeros(8, 49152), target_modules="all-linear"),  # fmt: skip
        r"target module embed_tokens \(tensor base_model\.model\.model\.embed_tokens\.lora_embedding_A\) is not",
    ),
    "different base model": (
        _bigger_base,
        r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \[8, 960\], "
        r"but \[8, 576\] is expected .*SmolLM2-360M",
    ),
    "layer beyond the base": (
        lambda folder: _with_tensor(folder, "base_model.model.model.layers.30.self_attn.q_proj.lora_A.weight",
                                    torch.zeros(8, 576)),  # fmt: skip
        r"layers\.30\.self_attn\.q_proj\.lora_A\.weight is for layer 30, but the base model's layers are 0\.\.29",
    ),
    "DoRA": (lambda folder: simple_adapter(folder, use_dora=True), r"sets use_dora \(True\): DoRA is not supported"),
    "DoRA magnitude tensor": (
        lambda folder: _with_tensor(
            folder, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(576)
        ),
        r"q_proj\.lora_magnitude_vector is a DoRA magnitude",
    ),
    "missing adapter_model": (_without_weights, r"no adapter_model\.safetensors \(or adapter_model\.bin\)"),
    "modules_to_save": (
        lambda folder: simple_adapter(folder, modules_to_save=["lm_head"]),
        r"sets modules_to_save \(\['lm_head'\]\): fully trained modules are not supported",
    ),
    "bias": (lambda folder: simple_adapter(folder, bias="lora_only"), r"bias is 'lora_only'"),
    "rank_pattern": (
        lambda folder: simple_adapter(folder, rank_pattern={"v_proj": 4}),
        r"rank_pattern gives v_proj 4, not the adapter's r 8",
    ),
    "not LoRA": (lambda folder: simple_adapter(folder, peft_type="IA3"), r"peft_type is 'IA3'"),
    "activated LoRA": (
        lambda folder: simple_adapter(folder, alora_invocation_tokens=[1, 2, 3]),
        r"sets alora_invocation_tokens \(\[1, 2, 3\]\): activated LoRA .* is not supported",
    ),
    "BD-LoRA": (
        lambda folder: simple_adapter(folder, use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2}),
        r"sets use_bdlora \(\{.*\): the BD-LoRA variant of LoRA is not supported; train a plain LoRA",
    ),
    "KaSA": (lambda folder: simple_adapter(folder, kasa_config={"r": 8}), r"sets kasa_config .*the KaSA variant"),
    "a variant PEFT adds later": (
        lambda folder: simple_adapter(folder, use_newlora=True),
        r"sets use_newlora \(True\): the newlora variant of LoRA is not supported",
    ),
    "tensors of another rank than the config's": (
        lambda folder: write_adapter(folder, lora_tensors(4, ("q_proj", "v_proj")), rank=8, modules=("q_proj", "v_proj")),
        r"q_proj\.lora_A\.weight has rank 4 \(shape \[4, 576\]\), but adapter_config\.json says r 8",
    ),
    "missing lora_B": (
        lambda folder: write_adapter(
            folder,
            {k: v for k, v in lora_tensors(8, ("q_proj",)).items() if not k.startswith("base_model.model.model.layers.3.")
             or "lora_A" in k},
            rank=8, modules=("q_proj",),
        ),  # fmt: skip
        r"no lora_B for layers\.3\.self_attn\.q_proj",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_no_engine(case: str, tmp_path: Path, smollm2_dir: Path) -> None:
    make, message = REFUSALS[case]
    good = simple_adapter(tmp_path / "good")
    bad = make(tmp_path / "bad")
    config = lora_config(tmp_path, smollm2_dir, {"good": local(good), "bad": local(bad)}, max_lora_rank=16)
    with pytest.raises(BuildError, match=message):
        build(config, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()
    assert not list(tmp_path.glob(".engine.building-*"))


def test_refusals_of_names(tmp_path: Path, smollm2_dir: Path) -> None:
    adapter = simple_adapter(tmp_path / "adapter")
    for name, message in ((
        "..", r"'\.\.' cannot name the adapter's folder"), ("test-model", r"has the served model name 'test-model'"),
        ("model", r"'model' is Truss's name for the deployment itself"),  # probe JF
    ):  # fmt: skip
        config = lora_config(tmp_path, smollm2_dir, {name: local(adapter)})
        with pytest.raises(BuildError, match=message):
            build(config, tmp_path / "engine")
        assert not (tmp_path / "engine").exists()


def test_without_a_served_name_an_adapter_may_not_take_the_architectures(tmp_path: Path, smollm2_dir: Path) -> None:
    """With no model_name or served_model_name the server names the base by its architecture: an adapter of that
    name would hide it."""
    config = lora_config(tmp_path, smollm2_dir, {"LlamaForCausalLM": local(simple_adapter(tmp_path / "adapter"))})
    document = yaml.safe_load(config.read_text())
    document.pop("model_name", None)
    document["trt_llm"].get("runtime", {}).pop("served_model_name", None)
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(BuildError, match=r"has the served model name 'LlamaForCausalLM'"):
        build(config, tmp_path / "engine")


def test_an_adapter_retrained_in_place_is_rebuilt_and_never_changes_a_built_engine(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    folder = write_adapter(tmp_path / "adapter", lora_tensors(8, ("q_proj",), seed=1), rank=8, modules=("q_proj",))
    config = lora_config(tmp_path, smollm2_dir, {"tuned": local(folder)})
    first = build(config, tmp_path / "engine")
    stored = tmp_path / "engine" / "adapters" / "tuned" / "adapter_model.safetensors"
    before = sha256(stored)
    assert build(config, tmp_path / "engine").reused
    # Retrain into the same folder, writing the same file in place (same inode), as safetensors' save_file does.
    retrained = tmp_path / "retrained.safetensors"
    save_file(lora_tensors(8, ("q_proj",), seed=2), retrained, metadata={"format": "pt"})
    with (folder / "adapter_model.safetensors").open("r+b") as handle:
        handle.truncate(0)
        handle.write(retrained.read_bytes())
    assert sha256(stored) == before  # the engine holds its own copy
    second = build(config, tmp_path / "engine")
    assert not second.reused
    assert sha256(stored) == sha256(retrained) != before
    assert second.engine_dir.manifest.runtime.lora_adapters[0].source.revision != (
        first.engine_dir.manifest.runtime.lora_adapters[0].source.revision
    )
    assert build(config, tmp_path / "engine").reused


def test_cli_exits_1_with_the_reason(tmp_path: Path, smollm2_dir: Path) -> None:
    adapter = simple_adapter(tmp_path / "adapter", rank=128)
    config = lora_config(tmp_path, smollm2_dir, {"too-big": local(adapter)})
    result = subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", "build", str(config), "-o", str(tmp_path / "engine")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "error: trt_llm.build.lora_adapters.too-big (LOCAL " in result.stderr
    assert "rank 128 is over the LoRA pool's max_lora_rank 64" in result.stderr
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize(
    "config", [{"loftq_config": {"loftq_bits": 4}}, {"use_rslora": True}, {"eva_config": None}, {"use_dora": False}]
)
def test_initialization_settings_and_plain_flags_are_not_variants(tmp_path: Path, config: dict) -> None:
    """A LoftQ/EVA setting without its initialization, rsLoRA, DoRA off: the saved A and B are a plain LoRA."""
    from engine_builder.build.peft_lora import BaseModelShapes, read_peft_lora

    base = BaseModelShapes(num_hidden_layers=30, features=SMOLLM2_FEATURES)
    adapter = read_peft_lora(simple_adapter(tmp_path / "adapter", **config), base, max_rank=16)
    assert adapter.rank == 8


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_an_adapter_whose_training_changed_the_base_is_refused(tmp_path: Path, init: str) -> None:
    """PiSSA, OLoRA, CorDA and LoftQ start training by changing the base weights; their saved A and B fit that base
    only, and were served over the original (probe CA: SmolLM2 with a PiSSA adapter answered newlines). PEFT's
    conversion (`path_initial_model_for_weight_conversion`) writes a plain LoRA, saved with `true`."""
    from engine_builder.build.peft_lora import AdapterCheckError, BaseModelShapes, read_peft_lora

    base = BaseModelShapes(num_hidden_layers=30, features=SMOLLM2_FEATURES)
    fix = "LoftQ-quantized base" if init == "loftq" else "path_initial_model_for_weight"
    with pytest.raises(AdapterCheckError, match=f"init_lora_weights is '{init}'.*{fix}"):
        read_peft_lora(simple_adapter(tmp_path / "adapter", init_lora_weights=init), base, max_rank=16)
    for plain in (True, False, "gaussian", "eva", "orthogonal"):
        assert read_peft_lora(simple_adapter(tmp_path / str(plain), init_lora_weights=plain), base, max_rank=16)


def test_a_reused_engine_refuses_a_model_name_that_is_an_adapters(tmp_path: Path, smollm2_dir: Path) -> None:
    """A reuse takes the config's new model_name as the served name: renamed to an adapter's name, the base model
    could no longer be asked for by name (probe AT). Refused as a fresh build refuses it; the engine is unchanged."""
    config = lora_config(tmp_path, smollm2_dir, {"tuned": local(simple_adapter(tmp_path / "adapter"))})
    document = yaml.safe_load(config.read_text())
    document["trt_llm"]["runtime"].pop("served_model_name", None)
    config.write_text(yaml.safe_dump(document))
    assert not build(config, tmp_path / "engine").reused
    before = (tmp_path / "engine" / "manifest.json").read_text()
    config.write_text(yaml.safe_dump({**document, "model_name": "tuned"}))
    with pytest.raises(BuildError, match=r"has the served model name 'tuned'"):
        build(config, tmp_path / "engine")
    assert (tmp_path / "engine" / "manifest.json").read_text() == before


def test_adapter_shapes_read_the_base_models_defaults_for_omitted_keys() -> None:
    """Qwen3's head_dim is 128 whatever hidden_size / heads is: an adapter was checked against hidden / heads."""
    from engine_builder.build.peft_lora import BaseModelShapes

    config = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 512, "num_attention_heads": 16,
              "num_key_value_heads": 4, "intermediate_size": 1024, "num_hidden_layers": 2}
    shapes = BaseModelShapes.from_config(config)
    assert shapes.features["q_proj"] == (512, 16 * 128) and shapes.features["k_proj"] == (512, 4 * 128)
