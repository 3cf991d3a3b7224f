"""Folders a hard exit must still remove. `os._exit` (the server's exit on a signal while loading) runs no clean-up:
a temporary folder its owner removes only on its own way out is registered here while it lives."""

import shutil
import threading

_lock = threading.Lock()
_folders: set[str] = set()


def register(path: str) -> None:
    with _lock:
        _folders.add(path)


def unregister(path: str) -> None:
    with _lock:
        _folders.discard(path)


def registered() -> frozenset[str]:
    with _lock:
        return frozenset(_folders)


def remove_all() -> None:
    """Remove every registered folder (the caller is about to exit without clean-up)."""
    with _lock:
        folders = list(_folders)
        _folders.clear()
    for path in folders:
        shutil.rmtree(path, ignore_errors=True)
