"""LoRA adapters of a torch build: fetch every `trt_llm.build.lora_adapters` entry through the checkpoint sources,
check it against the base model (engine_builder/build/peft_lora.py), then store it as `adapters/<name>/` in the
engine directory with its manifest entry. Every refusal is a BuildError raised before the engine directory
exists: `fetch_lora_adapters` runs before the staging folder is made, `store_lora_adapters` inside it."""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine_builder.build.build_stage import default_cache_dir, public_repo
from engine_builder.build.checkpoints import (
    ADAPTER_FILES,
    CheckpointError,
    FetchedCheckpoint,
    Secrets,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.selection import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE
from engine_builder.build.config import CheckpointRepository, CheckpointSource, LoadedConfig
from engine_builder.build.errors import BuildError
from engine_builder.build.peft_lora import (
    AdapterCheckError,
    BaseModelShapes,
    PeftLora,
    read_peft_lora,
    read_tensors,
)
from engine_builder.common.artifact import EngineDir, LoraAdapter, SourceInfo, sha256_file
from engine_builder.common.types import TRUSS_MODEL_NAME

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"  # in the engine directory: adapters/<name>/{adapter_config.json,adapter_model.safetensors}


@dataclass(frozen=True)
class FetchedAdapter:
    """An adapter fetched into the cache (or a LOCAL folder) and checked, not yet in the engine."""

    name: str
    repository: CheckpointRepository
    fetched: FetchedCheckpoint
    lora: PeftLora


def check_adapter_names(loaded: LoadedConfig, served_name: str | None) -> None:
    """Refuse an adapter name that cannot name its folder, or that is the base model's served name (requests for
    the base by its own name would reach the adapter). Run by every build, a reused one too: a reuse takes a new
    `model_name`, which could name an adapter (probe AT)."""
    for name in sorted(loaded.trt_llm.build.lora_adapters or {}):
        field = f"trt_llm.build.lora_adapters.{name}"
        if name in (".", ".."):
            raise BuildError(f"{field}: {name!r} cannot name the adapter's folder; pick a name with a letter or digit")
        if name == TRUSS_MODEL_NAME:  # probe JF: requests for the deployment by Truss's name would reach the adapter
            raise BuildError(
                f"{field}: {name!r} is Truss's name for the deployment itself (its readiness check asks for "
                "/v1/models/model, its predict route is /v1/models/model:predict); rename the adapter"
            )
        if name == served_name:
            raise BuildError(
                f"{field}: the adapter has the served model name {name!r}, so the base model could not be asked "
                "for by its own name; rename the adapter"
            )


def fetch_lora_adapters(
    loaded: LoadedConfig, model_dir: Path, *, cache_dir: Path, secrets: Secrets
) -> list[FetchedAdapter]:
    """Fetch and check every adapter of the config against the base model in `model_dir`, sorted by name (the
    config hash does not see their order, so neither does the engine)."""
    build = loaded.trt_llm.build
    base = _base_shapes(model_dir)
    max_rank = build.lora_pool_rank
    # As the server names the base (engine_builder/serve/server/factory.py): the architecture when nothing else does.
    served_name = (
        loaded.trt_llm.runtime.declared("served_model_name")
        or loaded.truss.model_name
        or _architecture(model_dir)
    )
    check_adapter_names(loaded, served_name)
    adapters = []
    for name, repository in sorted((build.lora_adapters or {}).items()):
        field = f"trt_llm.build.lora_adapters.{name}"
        where = f"{field} ({repository.source.value} {public_repo(repository)})"
        logger.info("fetching LoRA adapter %s", where)
        try:
            fetched = fetch_checkpoint(
                repository, cache_dir=cache_dir, secrets=secrets, base_dir=loaded.base_dir, selection=ADAPTER_FILES
            )
        except CheckpointError as error:  # already redacted by fetch_checkpoint
            raise BuildError(f"{field}: {error}") from None
        try:
            lora = read_peft_lora(fetched.path, base, max_rank)
        except AdapterCheckError as error:
            raise BuildError(f"{where}: {error}") from None
        logger.info("LoRA adapter %s: rank %d, alpha %g, %s", name, lora.rank, lora.alpha, lora.target_modules)
        adapters.append(FetchedAdapter(name, repository, fetched, lora))
    return adapters


def store_lora_adapters(adapters: list[FetchedAdapter], engine_root: Path) -> list[LoraAdapter]:
    """Write each adapter as adapters/<name>/ under `engine_root` (the staging folder); returns the manifest
    entries, with the sha256 of every stored file."""
    entries = []
    for adapter in adapters:
        relative = f"{ADAPTERS_DIR}/{adapter.name}"
        folder = engine_root / relative
        folder.mkdir(parents=True)
        shutil.copyfile(adapter.fetched.path / ADAPTER_CONFIG_FILE, folder / ADAPTER_CONFIG_FILE)
        weights = folder / ADAPTER_SAFETENSORS_FILE
        if adapter.lora.is_pickled:
            from safetensors.torch import save_file

            tensors = read_tensors(adapter.lora.weights_file)
            save_file({key: value.contiguous().clone() for key, value in tensors.items()}, weights, {"format": "pt"})
        else:  # copied, not linked: retraining into the adapter's folder must not change a built engine
            shutil.copyfile(adapter.lora.weights_file, weights)
        files = {path.name: sha256_file(path) for path in (folder / ADAPTER_CONFIG_FILE, weights)}
        repository = adapter.repository
        source = SourceInfo(repository.source.value, public_repo(repository), adapter.fetched.revision, files)
        entries.append(
            LoraAdapter(
                name=adapter.name,
                path=relative,
                rank=adapter.lora.rank,
                alpha=adapter.lora.alpha,
                target_modules=list(adapter.lora.target_modules),
                source=source,
            )
        )
    return entries


def _architecture(model_dir: Path) -> str | None:
    try:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or [None]
    except (OSError, ValueError):
        return None
    return architectures[0]


def local_adapters_changed(loaded: LoadedConfig, engine: EngineDir) -> list[str]:
    """Names of the config's LOCAL adapters whose files differ from what `engine` was built from (a LOCAL folder
    can be retrained in place under the same config). Remote adapters are pinned by the config itself."""
    recorded = {adapter.name: adapter.source.revision for adapter in engine.manifest.runtime.lora_adapters}
    changed = []
    for name, repository in sorted((loaded.trt_llm.build.lora_adapters or {}).items()):
        if repository.source is not CheckpointSource.LOCAL:
            continue
        try:
            fetched = fetch_checkpoint(
                repository, cache_dir=default_cache_dir(), base_dir=loaded.base_dir, selection=ADAPTER_FILES,
                progress=False,
            )
        except CheckpointError:  # gone or unreadable: the rebuild reports it
            changed.append(name)
            continue
        if recorded.get(name) != fetched.revision:
            changed.append(name)
    return changed


def _base_shapes(model_dir: Path) -> BaseModelShapes:
    try:
        return BaseModelShapes.from_config(json.loads((model_dir / "config.json").read_text()))
    except KeyError as error:
        raise BuildError(
            f"the base model's config.json lacks {error}, which LoRA adapters are checked against; "
            "remove trt_llm.build.lora_adapters"
        ) from None
