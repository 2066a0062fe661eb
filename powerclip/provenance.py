"""What produced a number: the settings a checkpoint records.

    python -m powerclip.provenance results/runs/<run>/checkpoint.pt [--json]

prints the run's method and every run-table and ``train:`` setting it was trained with, the model config
name, the pooling of both towers, the steps, world size and global batch, and the open_clip version. The
file is read with ``weights_only=True``. See docs/formats.md ("Checkpoints").
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recorded settings of one of our checkpoints, as plain data."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "powerclip_cfg" not in checkpoint:
        raise KeyError(f"{path}: not a checkpoint written by powerclip.train (no 'powerclip_cfg')")
    cfg = checkpoint["powerclip_cfg"]
    training = dict(checkpoint.get("training", {}))
    return {
        "checkpoint": str(path),
        "model": cfg["model_name"],
        "vision_pool": cfg["vision_pool"],
        "text_pool": cfg["text_pool"],
        "open_clip_version": cfg.get("open_clip_version"),
        **{k: training[k] for k in ("steps", "epochs", "global_batch", "world_size") if k in training},
        "args": training.get("args", {}),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m powerclip.provenance", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="results/runs/<run>/checkpoint.pt")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return info
    for key, value in info.items():
        if key != "args":
            print(f"{key}: {value}")
    for key, value in sorted(info["args"].items()):
        print(f"  {key}: {value}")
    return info


if __name__ == "__main__":
    main()
