"""powerclip.evaluation.loader refuses checkpoints whose unpickling would run code, before any of it runs.

Each hostile file holds an object whose ``__reduce__`` makes the unpickler call ``exec`` on code that creates a
marker file. A positive control shows that a full unpickler (``torch.load(weights_only=False)``) does create
the marker; the evaluation entry points (the clip-benchmark loader, ``run_benchmark``, the CLI) must refuse
the file with an error naming it, and the marker must never appear.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from powerclip.evaluation import loader, runner
from powerclip.evaluation.loader import UnsafeCheckpointError
from powerclip.evaluation.suites import write_suite
from powerclip.model import create_model

MODEL = "PowerCLIP-Tiny-64-8"
PACKAGE = Path(__file__).resolve().parent.parent / "powerclip"


class CreatesMarker:
    """Unpickling this calls ``exec``, which creates ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def hostile_file(path: Path, kind: str, layout: str, marker: Path) -> Path:
    """A released state_dict (``kind="released"``) or one of our checkpoints (``"powerclip"``) carrying the payload,
    in torch.save's zip or legacy (non-zip, not memory-mappable) format."""
    model = create_model(MODEL, seed=0)
    state = dict(model.state_dict())
    if kind == "released":
        payload = {"state_dict": state, "epoch": CreatesMarker(marker)}
    else:
        payload = {"powerclip_cfg": model.powerclip_cfg, "state_dict": state, "extra": CreatesMarker(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=layout == "zip")
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return write_suite(tmp_path_factory.mktemp("suites"), "shapes_cls", {}, seed=0, n=4)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_the_payload_runs_under_a_full_unpickler(tmp_path, layout):
    marker = tmp_path / "control-marker"
    path = hostile_file(tmp_path / "control.pt", "powerclip", layout, marker)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()  # the file really would run code


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("kind", ["released", "powerclip"])
def test_hostile_checkpoints_are_refused_by_every_entry_point(tmp_path, suite, kind, layout):
    marker = tmp_path / "marker"
    path = hostile_file(tmp_path / f"{kind}.pt", kind, layout, marker)
    refused = rf"{path}: refused to load: .* unpickling them could run code"
    # the clip-benchmark loader, with the architecture given (how released weights are passed) or not
    with pytest.raises(UnsafeCheckpointError, match=refused):
        loader.load_powerclip(model_name=MODEL, pretrained=str(path))
    with pytest.raises(UnsafeCheckpointError, match=refused):
        loader.checkpoint_model_name(path)
    # run_benchmark: a released file (--model given) and a checkpoint that should name its own architecture
    out = tmp_path / "result.json"
    for model_name in (MODEL, None):
        with pytest.raises(UnsafeCheckpointError, match=refused):
            runner.run_benchmark(path, "wds/shapes_cls", suite, None, out, model_name=model_name, device="cpu")
    with pytest.raises(UnsafeCheckpointError, match=refused):
        runner.main(["--checkpoint", str(path), "--model", MODEL, "--dataset", "wds/shapes_cls",
                     "--dataset-root", str(suite), "--output", str(out), "--device", "cpu"])  # fmt: skip
    assert not marker.exists()
    assert not out.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """A static check of powerclip/**/*.py: each torch.load call passes weights_only=True literally."""
    calls = 0
    for module in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(), filename=str(module))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{module.name}:{node.lineno}: torch.load without weights_only=True"
                )
    assert calls >= 5  # safe_load.read_checkpoint's two calls, model, clippy, sam, train's resume are seen
