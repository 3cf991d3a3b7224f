"""Tiny synthetic checkpoints (config, fast tokenizer, safetensors) in the layouts the checks accept or refuse,
tar.gz builders for the archive tests, and a remote store backed by a folder."""

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from engine_builder.build.checkpoints.secrets import Secrets
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.config import CheckpointRepository

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def write_tokenizer(folder: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def make_checkpoint(
    folder: Path,
    kind: str = "decoder",
    *,
    config: dict[str, Any] | None = None,
    chat_template: bool = True,
    shards: int = 1,
    tensor_elements: int = 64,
    seed: int = 0,
) -> Path:
    """A checkpoint `check_repository_layout` accepts for `kind`: decoder, embedding or classifier."""
    folder.mkdir(parents=True, exist_ok=True)
    architecture = {
        "decoder": "LlamaForCausalLM",
        "embedding": "BertModel",
        "classifier": "BertForSequenceClassification",
    }[kind]
    base: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "llama" if kind == "decoder" else "bert",
        "max_position_embeddings": 128,
        "torch_dtype": "bfloat16" if kind == "decoder" else "float32",
        "vocab_size": 3,
    }
    if kind != "decoder":
        base["hidden_size"] = 8  # serving reads it (common/encoder_checkpoint.py), and the build checks as serving
    if kind == "classifier":
        base["id2label"] = {"0": "negative", "1": "positive"}
    write_json(folder / "config.json", {**base, **(config or {})})
    write_tokenizer(folder)
    tokenizer_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template and kind == "decoder":
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    if kind == "embedding":
        write_json(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ])  # fmt: skip
        write_json(
            folder / "1_Pooling" / "config.json",
            {"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True},
        )
    rng = np.random.default_rng(seed)
    if shards == 1:
        save_file(
            {"weight": rng.standard_normal(tensor_elements).astype(np.float32)},
            str(folder / "model.safetensors"),
        )
    else:
        weight_map = {}
        for index in range(shards):
            name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file(
                {f"layer{index}": rng.standard_normal(tensor_elements).astype(np.float32)}, str(folder / name)
            )
            weight_map[f"layer{index}"] = name
        write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    return folder


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An archive from explicit members, for the malicious cases the tarfile CLI would never write."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def tar_folder(folder: Path, *, top: str | None = None, compresslevel: int = 0) -> bytes:
    """The folder as a .tar.gz, its files under `top/` when given (as `tar czf x.tgz top/` writes it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=compresslevel) as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                relative = path.relative_to(folder).as_posix()
                tar.add(path, arcname=f"{top}/{relative}" if top else relative)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


class FolderStore(CheckpointSourceBase):
    """A remote store backed by a folder (every file under it, nested ones too), recording which files were read."""

    name = "FOLDER"

    def __init__(self, folder: Path, repo: str = "s3://bucket/model") -> None:
        super().__init__(CheckpointRepository(source="S3", repo=repo), Secrets(), None)
        self.folder = folder
        self.read: list[str] = []

    def list_files(self) -> Listing:
        files = tuple(
            RemoteFile(
                path=path.relative_to(self.folder).as_posix(), size=path.stat().st_size,
                fingerprint=str(path.stat().st_mtime_ns),
            )
            for path in sorted(self.folder.rglob("*")) if path.is_file()
        )  # fmt: skip
        return Listing(files=files)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        self.read.append(file.path)
        sink.write((self.folder / file.path).read_bytes()[start:])


def replace_after_listing(
    monkeypatch: Any, source_class: type[CheckpointSourceBase], replace: Any
) -> list[str]:
    """Patch `source_class` so that `replace()` runs right after its listing (the store's object changes under the
    build), and record every path its downloads read (returned, filled as the fetch runs)."""
    list_files, read_into = source_class.list_files, source_class.read_into
    reads: list[str] = []

    def list_then_replace(self: Any) -> Any:
        listing = list_files(self)
        replace()
        return listing

    def counting(self: Any, file: Any, start: int, sink: Any) -> None:
        reads.append(file.path)
        read_into(self, file, start, sink)

    monkeypatch.setattr(source_class, "list_files", list_then_replace)
    monkeypatch.setattr(source_class, "read_into", counting)
    return reads


def tear_weights_partial(monkeypatch: Any, source_class: type[CheckpointSourceBase], fetch: Any, cache_dir: Any) -> None:
    """Leave the partial file a crash leaves: the weights' transfer cut at half, then a stretch of the kept bytes
    zeroed (a torn write: the download fsyncs only at its end). `fetch()` runs one fetch that must fail."""
    read_into = source_class.read_into

    def cut(self: Any, file: Any, start: int, sink: Any) -> None:
        if file.path != "model.safetensors":
            read_into(self, file, start, sink)
            return

        class Half:
            written = start

            def write(self, data: bytes) -> None:
                room = (file.size or 0) // 2 - Half.written
                if room <= 0:
                    raise ConnectionResetError("cut")
                sink.write(data[:room])
                Half.written += min(room, len(data))

            def restart(self) -> None:
                sink.restart()

        read_into(self, file, start, Half())

    with monkeypatch.context() as patch:
        patch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "1")
        patch.setattr(source_class, "read_into", cut)
        try:
            fetch()
        except Exception as error:  # noqa: BLE001 - the cut is the point
            assert "model.safetensors" in str(error), error
        else:
            raise AssertionError("the cut fetch succeeded")
    parts = list(Path(cache_dir).rglob("*.part"))
    assert len(parts) == 1, parts
    torn = bytearray(parts[0].read_bytes())
    assert len(torn) > 64
    torn[len(torn) // 2 :] = bytes(len(torn) - len(torn) // 2)
    parts[0].write_bytes(bytes(torn))
