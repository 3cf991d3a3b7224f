"""Safe extraction of checkpoint tarballs: the malicious shapes are refused before anything is written."""

import tarfile
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import CheckpointLayoutError, UnsafeArchiveError
from engine_builder.build.checkpoints.archive import ArchiveLimits, extract_checkpoint_archive
from engine_builder.build.checkpoints.selection import is_needed
from tests.build.checkpoints.factory import make_checkpoint, member, tar_folder, tar_gz

LIMITS = ArchiveLimits()


def extract(tmp_path: Path, archive: bytes, limits: ArchiveLimits = LIMITS) -> tuple[Path, dict[str, str]]:
    source = tmp_path / "archive.tar.gz"
    source.write_bytes(archive)
    destination = tmp_path / "out"
    destination.mkdir()
    return destination, extract_checkpoint_archive(
        source, destination, keep=is_needed, limits=limits, what="test"
    )


MALICIOUS = {
    "absolute": [(member("/etc/cron.d/evil"), b"x")],
    "dotdot": [(member("config.json"), b"{}"), (member("../../evil.json"), b"x")],
    "nested-dotdot": [(member("a/b/../../../evil.json"), b"x")],
    "symlink-escape": [(member("config.json", tarfile.SYMTYPE, "../../../etc/passwd"), None)],
    "absolute-symlink": [(member("tokenizer.json", tarfile.SYMTYPE, "/etc/shadow"), None)],
    "hardlink-escape": [(member("model.safetensors", tarfile.LNKTYPE, "../outside"), None)],
    "char-device": [(member("config.json", tarfile.CHRTYPE), None)],
    "block-device": [(member("dev.json", tarfile.BLKTYPE), None)],
    "fifo": [(member("pipe.json", tarfile.FIFOTYPE), None)],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_members_are_refused_before_writing(tmp_path: Path, case: str) -> None:
    # A harmless file first: if checks ran while writing, it would already be on disk.
    archive = tar_gz([(member("tokenizer_config.json"), b"{}"), *MALICIOUS[case]])
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack"):
        extract(tmp_path, archive)
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path.parent / "evil.json").exists()


def test_size_and_member_limits(tmp_path: Path) -> None:
    archive = tar_gz([(member(f"f{index}.json"), b"{}" * 10) for index in range(5)])
    with pytest.raises(UnsafeArchiveError, match="more than 3 members"):
        extract(tmp_path, archive, ArchiveLimits(max_members=3))
    (tmp_path / "second").mkdir()
    with pytest.raises(UnsafeArchiveError, match="more than 50 bytes"):
        extract(tmp_path / "second", archive, ArchiveLimits(max_total_bytes=50))


def test_top_folder_is_stripped_and_only_needed_files_kept(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "src")
    (folder / "pytorch_model.bin").write_bytes(b"unused weights")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"unused export")
    destination, hashes = extract(tmp_path, tar_folder(folder, top="my-model"))
    assert sorted(hashes) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (destination / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_macos_metadata_beside_the_top_folder_is_ignored(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    files = [(member(f"smollm2/{path.name}"), path.read_bytes()) for path in sorted(folder.iterdir()) if path.is_file()]
    apple_double = [(member("._smollm2"), b"\0\5\26\7"), (member("smollm2/._config.json"), b"\0\5\26\7"),
                    (member("__MACOSX/smollm2/._config.json"), b"\0\5\26\7")]  # fmt: skip
    destination, hashes = extract(tmp_path, tar_gz([*apple_double, *files]))
    assert "config.json" in hashes and not any("._" in name or "MACOSX" in name for name in hashes)
    assert sorted(path.name for path in destination.iterdir()) == sorted(hashes)


def test_links_inside_the_tree_become_copies(tmp_path: Path) -> None:
    archive = tar_gz([
        (member("blobs/abc.json"), b'{"model": {}}'),
        (member("tokenizer.json", tarfile.SYMTYPE, "blobs/abc.json"), None),
        (member("config.json", tarfile.LNKTYPE, "blobs/abc.json"), None),
    ])  # fmt: skip
    destination, hashes = extract(tmp_path, archive)
    assert (destination / "tokenizer.json").read_bytes() == b'{"model": {}}'
    assert not (destination / "tokenizer.json").is_symlink()
    assert hashes["config.json"] == hashes["tokenizer.json"]


def test_garbage_is_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(CheckpointLayoutError, match="not a readable tar archive"):
        extract(tmp_path, b"this is not gzip at all" * 10)


def test_a_gzip_archive_whose_crc_does_not_match_is_refused(tmp_path: Path) -> None:
    """Probe AH: tarfile's stream mode never reads the gzip trailer, so an archive with one byte changed (in a stored
    block, where no inflate error shows it) unpacked without a word; REMOTE_URL has no other checksum."""
    import gzip

    folder = make_checkpoint(tmp_path / "src", tensor_elements=4096)
    plain = tar_folder(folder)
    stored = bytearray(gzip.compress(gzip.decompress(plain), compresslevel=0))  # stored blocks: bytes as they are
    weights_at = stored.index((folder / "model.safetensors").read_bytes()[-64:])
    stored[weights_at] ^= 0x01
    with pytest.raises(CheckpointLayoutError, match="the archive is corrupt"):
        extract(tmp_path, bytes(stored))
    (tmp_path / "good").mkdir()
    assert extract(tmp_path / "good", plain)[1]  # the intact archive unpacks
