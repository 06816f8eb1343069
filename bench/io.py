"""Safe, atomic file I/O: every finished file appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a directory (some network ones): nothing more to do
        pass
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or link in directory ``path`` durable."""
    fsync_path(path)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, flush it to the disk, then rename it
    into place (and flush the directory): after a crash or power loss ``path`` is the old file or
    the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual mode
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(state, str(p)))


class WeightsError(RuntimeError):
    """Weights that are missing, corrupt or do not fit the network."""


def load_weights(module: torch.nn.Module, path: Path, fix: str) -> torch.nn.Module:
    """Load safetensors weights into ``module``; errors name the file and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}. Fix: {fix}")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types on a corrupt header
        raise WeightsError(f"weights file {path} is corrupt or not safetensors ({e}). Fix: {fix}") from e
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"weights in {path} do not fit {type(module).__name__} ({e}). Fix: {fix}") from e
    return module
