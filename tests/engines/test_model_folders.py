"""The folders nbllm creates for local models (conversions, ONNX exports) are private.

A converted model holds the weights of a model that may itself be private: the folders
created for it are 0700 whatever the umask, and folders already there are left as they are.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbllm.engines.local.models import building, cache_dir


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_cache_folder_is_private_under_a_umask_of_022(tmp_path, monkeypatch):
    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))
    target = cache_dir() / "transformers" / "model-0123"
    with umask(0o022):
        with building(target) as scratch:
            assert scratch is not None and mode(scratch) == 0o700
            (scratch / "config.json").write_text("{}")
        lock = target.parent / f".{target.name}.lock"
    for folder in (cache_dir(), cache_dir() / "transformers", target):
        assert mode(folder) == 0o700, folder
    assert mode(lock) == 0o600
    assert (target / "config.json").read_text() == "{}"


def test_folders_already_there_are_left_as_they_are(tmp_path, monkeypatch):
    shared = tmp_path / "shared-cache"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    monkeypatch.setenv("NBLLM_CACHE_DIR", str(shared))
    with umask(0o022), building(cache_dir() / "onnx" / "model-0123") as scratch:
        assert scratch is not None
    assert mode(shared) == 0o755
    assert mode(shared / "onnx") == 0o700


def test_the_build_lock_is_never_opened_through_a_symlink(tmp_path, monkeypatch):
    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))
    target = cache_dir() / "onnx" / "model-0123"
    target.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (target.parent / f".{target.name}.lock").symlink_to(victim)
    with pytest.raises(OSError), building(target):
        pass
    assert victim.read_text() == "keep me"
    assert not target.exists()
