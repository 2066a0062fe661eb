"""The workflow's settings: schema defaults, the run table, and the checks that refuse a bad configuration
before any job runs.

The Snakefile imports this module at parse time, in whatever environment runs Snakemake (a login node's
base env), so it needs only the standard library, PyYAML and jsonschema (both Snakemake dependencies).
The schemas in ``schemas/`` are the one home of every default: Snakemake's ``validate`` fills them into
the config, :func:`read_run_table` into each row of the run table, and the trainer's argument parser
reads its defaults from them too (:func:`schema_defaults`). See docs/formats.md ("The run table").
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# A run name becomes a folder under results/runs/: a plain name, never "." or "..", never hidden.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Region sources that are not computed by segment.sources: none (no regions) and the regions inside
# combined-format shards.
REGIONS_NOT_COMPUTED = ("none", "embedded")


class ConfigError(ValueError):
    """A configuration or run-table value the workflow refuses; the message names file, row and value."""


@functools.cache
def load_schema(name: str) -> dict:
    """``schemas/<name>.schema.yaml`` as a dict (cached; do not mutate)."""
    import yaml

    return yaml.safe_load((SCHEMA_DIR / f"{name}.schema.yaml").read_text())


def schema_defaults(name: str, *path: str) -> dict[str, Any]:
    """The ``default:`` of each property of the object at ``path`` in schema ``name``.

    ``schema_defaults("config", "train")`` gives the defaults of the ``train:`` section,
    ``schema_defaults("runs")`` those of a run-table row.
    """
    node = load_schema(name)
    for key in path:
        node = node["properties"][key]
    return {key: spec["default"] for key, spec in node.get("properties", {}).items() if "default" in spec}


def _validator(schema: Mapping):
    """A Draft 2020-12 validator that fills in defaults, as Snakemake's ``validate(..., set_default=True)``."""
    from jsonschema import Draft202012Validator, validators

    properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, props, instance, subschema):
        if isinstance(instance, dict):
            for key, spec in props.items():
                if "default" in spec:
                    instance.setdefault(key, json.loads(json.dumps(spec["default"])))  # a copy, never shared
        yield from properties(validator, props, instance, subschema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema)


# ------------------------------------------------------------------------------------------ run table
def _convert(text: str, spec: Mapping) -> Any:
    """A TSV cell as the JSON type its column's schema asks for (the text itself if it does not convert,
    so that the schema's error names it)."""
    kind, text = spec.get("type"), text.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
        if kind == "boolean":
            lowered = text.lower()
            if lowered in ("true", "yes", "1"):
                return True
            if lowered in ("false", "no", "0"):
                return False
    except ValueError:
        pass
    return text


def read_run_table(path: str | Path, config: Mapping | None = None) -> dict[str, dict]:
    """The run table as ``{run: row}``, each row validated, converted and completed with schema defaults.

    Refuses (``ConfigError`` naming the file, the 1-based row, its line and the value): an empty table, an
    unknown column, a value of the wrong type or outside its column's range, a run name that is not a plain
    name, a duplicate name, a method that does not match its regions and lambda (the method registry says
    which methods use regions), and, given ``config``, a region source that ``segment.sources`` does not
    compute.
    """
    from powerclip.methods import METHODS

    path = Path(path)
    schema = load_schema("runs")
    columns_spec = schema["properties"]
    validator = _validator(schema)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [(n, line) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]
    if not records:
        raise ConfigError(f"{path}: the run table is empty (it needs a header and at least one run)")
    header_line, header = records[0][0], next(csv.reader([records[0][1]], delimiter="\t"))
    unknown = [c for c in header if c not in columns_spec]
    if unknown:
        raise ConfigError(
            f"{path}, line {header_line}: unknown column(s) {unknown}; the columns are {sorted(columns_spec)} "
            "(schemas/runs.schema.yaml)"
        )
    if len(records) == 1:
        raise ConfigError(f"{path}: the run table has only its header; add at least one run")
    runs: dict[str, dict] = {}
    lines_of: dict[str, int] = {}
    for row_number, (line_number, line) in enumerate(records[1:], start=1):
        where = f"{path}, row {row_number} (line {line_number})"
        cells = next(csv.reader([line], delimiter="\t"))
        if len(cells) != len(header):
            raise ConfigError(f"{where}: {len(cells)} cells for {len(header)} columns; the table is tab-separated")
        row = {col: _convert(text, columns_spec[col]) for col, text in zip(header, cells) if text.strip() != ""}
        errors = sorted(validator.iter_errors(row), key=lambda e: list(e.absolute_path))
        if errors:
            error = errors[0]
            column = error.absolute_path[0] if error.absolute_path else None
            value = f" value {row[column]!r}" if column in row else ""
            raise ConfigError(f"{where}: column {column or '?'}{value}: {error.message}")
        name = row["run"]
        if row["method"] not in METHODS:
            raise ConfigError(
                f"{where}: column method value {row['method']!r} is not a training method; the registry "
                f"(powerclip/methods) has {sorted(METHODS)}"
            )
        if not RUN_NAME.match(name):
            raise ConfigError(
                f"{where}: run name {name!r} is not a plain name (letters, digits, '_', '-', '.', not starting "
                "with '.' or '-'); it names the folder results/runs/<run>"
            )
        if name in runs:
            raise ConfigError(f"{where}: run {name!r} is already defined on line {lines_of[name]}")
        method = METHODS[row["method"]]
        if method.uses_regions:
            consistent = row["regions"] != "none" and row["sam_loss_ratio"] > 0
        else:
            consistent = row["regions"] == "none" and row["sam_loss_ratio"] == 0
        if not consistent:
            need = "a region source and sam_loss_ratio > 0" if method.uses_regions else "regions none and sam_loss_ratio 0"
            raise ConfigError(
                f"{where}: method {row['method']!r} needs {need} (got regions {row['regions']!r}, "
                f"sam_loss_ratio {row['sam_loss_ratio']!r})"
            )
        if config is not None and row["regions"] not in REGIONS_NOT_COMPUTED:
            sources = config["segment"]["sources"]
            if row["regions"] not in sources:
                raise ConfigError(
                    f"{where}: regions {row['regions']!r} is not computed: segment.sources is {sources}; add it "
                    "there or choose one of them"
                )
        runs[name] = row
        lines_of[name] = line_number
    return runs


# ------------------------------------------------------------------------------------ model and grid
def _openclip_config_dir() -> Path | None:
    """open_clip's built-in model configs, found without importing open_clip (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def model_config(name: str) -> dict | None:
    """The open_clip model config of ``name`` (ours in powerclip/model_configs first, then open_clip's),
    or None when it cannot be looked up here (open_clip is not installed in Snakemake's environment)."""
    for folder in (MODEL_CONFIG_DIR, _openclip_config_dir()):
        if folder is not None and (folder / f"{name}.json").is_file():
            return json.loads((folder / f"{name}.json").read_text())
    if _openclip_config_dir() is None:
        return None
    known = sorted(p.stem for folder in (MODEL_CONFIG_DIR, _openclip_config_dir()) for p in folder.glob("*.json"))
    raise ConfigError(
        f"train.model {name!r} is not a known model config: neither powerclip/model_configs nor open_clip has "
        f"{name}.json (some known names: {', '.join(k for k in known if k.startswith(('PowerCLIP', 'ViT-B')))} ...)"
    )


def model_grid(model_cfg: Mapping) -> tuple[int, int]:
    """(image size, patch size) of an open_clip model config's vision tower."""
    vision = model_cfg["vision_cfg"]
    image_size = vision["image_size"]
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    return int(image_size), int(vision["patch_size"])


def check_config(config: Mapping) -> None:
    """Cross-key checks the schema cannot express, each naming the keys and values involved."""
    datasets = config["datasets"]
    if config["dataset"] not in datasets:
        raise ConfigError(f"config: dataset {config['dataset']!r} is not one of datasets: {sorted(datasets)}")
    pictures = config.get("pictures")
    if pictures is not None and pictures["dataset"] not in datasets:
        raise ConfigError(f"config: pictures.dataset {pictures['dataset']!r} is not one of datasets: {sorted(datasets)}")
    grid = config["grid"]
    if grid["image_size"] % grid["patch_size"]:
        raise ConfigError(f"config: grid.image_size {grid['image_size']} is not a multiple of grid.patch_size {grid['patch_size']}")
    train = config["train"]
    if train["batch_size"] % max(train["gpus"], 1):
        raise ConfigError(f"config: train.batch_size {train['batch_size']} is not divisible by train.gpus {train['gpus']}")
    name = train["model"]
    model_cfg = None if name.startswith("hf-hub:") else model_config(name)
    if model_cfg is None:
        log.warning("train.model %r: its config cannot be read here, so grid is checked only by the trainer", name)
        return
    image_size, patch_size = model_grid(model_cfg)
    if (grid["image_size"], grid["patch_size"]) != (image_size, patch_size):
        raise ConfigError(
            f"config: grid (image_size {grid['image_size']}, patch_size {grid['patch_size']}) does not match "
            f"train.model {name!r} (image_size {image_size}, patch_size {patch_size}); regions are mapped onto "
            "the grid, so set grid to the model's values"
        )
