"""Reading a checkpoint without running code: ``torch.load(weights_only=True)``, with a clear error naming
the file when it holds anything else. Every checkpoint, resume file and released weight file that this
package reads goes through :func:`read_checkpoint` or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses: unpickling it could run code."""


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped where possible (large released weights).

    Raises :class:`UnsafeCheckpointError` naming the file when it holds anything but tensors, containers
    and plain values (a pickled object whose loading would call arbitrary code).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # legacy (non-zip) serialisation cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^.]*)", str(exc))
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain containers "
            f"({found.group(1) if found else exc.__class__.__name__}), and unpickling them could run code. "
            "Evaluate only checkpoints written by powerclip.model.save_checkpoint, or released weights saved as a "
            "plain state_dict or .safetensors."
        ) from exc
