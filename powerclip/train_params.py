"""The trainer's command line: its argument parser, and the argv the workflow builds for one run.

Both come from one table, :data:`SETTINGS`, which maps each key of the config's ``train:`` section and of
a run-table row to its command-line option; the defaults are the schemas' (``schemas/*.schema.yaml``), so
a default lives in one place only. Standard library and PyYAML only: the Snakefile imports this module at
parse time. See docs/formats.md ("The run table", "Checkpoints").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from powerclip.methods import METHODS
from powerclip.settings import load_schema, schema_defaults

# Keys of `train:` that do not change what a run trains: they are passed to the trainer but are not part of
# the run's identity (Snakemake does not rerun a finished run when only they change, and a resume
# checkpoint stays valid).
OPERATIONAL_TRAIN_KEYS = frozenset(
    {"grad_checkpointing", "save_every_steps", "log_every_steps", "tensorboard", "threads", "runtime", "mem_mb"}
)
# Run-table columns that are not trainer options: the region source picks the sidecar folder, the
# description is free text.
NOT_TRAINER_COLUMNS = frozenset({"run", "regions", "description"})


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


@dataclass(frozen=True)
class Setting:
    """One configured setting: where it lives (``train`` section or ``runs`` row) and its trainer option."""

    section: str
    key: str
    option: str
    help: str
    # configured value -> option value (e.g. the global batch -> the per-rank batch); identity if None
    to_cli: Callable[[Any, Mapping], Any] | None = None

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def _per_rank(batch: int, train: Mapping) -> int:
    return batch // max(train["gpus"], 1)


SETTINGS: tuple[Setting, ...] = (
    Setting("runs", "method", "--method", "training method (powerclip.methods registry)"),
    Setting("runs", "seed", "--seed", "seed of model initialisation and of the data stream"),
    Setting("runs", "vision_pool", "--vision-pool", "pooling of the image tower"),
    Setting("runs", "text_pool", "--text-pool", "pooling of the text tower"),
    Setting("runs", "sam_loss_ratio", "--sam-loss-ratio", "lambda, the weight of the region-phrase loss"),
    Setting("runs", "topk", "--sam-regions-topk", "regions per image fed to the loss"),
    Setting("runs", "topk_random", "--sam-regions-topk-random", "draw the k regions at random"),
    Setting("runs", "use_parse_phrases", "--use-parse-phrases", "parse-tree phrases (false: every token)"),
    Setting("runs", "softplus_scoring", "--softplus-scoring", "NLA powerset scoring (false: singleton)"),
    Setting("runs", "softplus_tau", "--softplus-tau", "temperature of the softplus / log-sum-exp"),
    Setting("runs", "softplus_alpha", "--softplus-alpha", "weight of T2R against R2T"),
    Setting("runs", "patch_dropout", "--patch-dropout", "flip: fraction of patch tokens dropped in training"),
    Setting("runs", "pgs_min_mask_ratio", "--pgs-min-mask-ratio", "clip-pgs: minimum mask ratio"),
    Setting("runs", "pgs_seed_ratio", "--pgs-seed-ratio", "clip-pgs: fraction of patches drawn as seeds"),
    Setting("runs", "pgs_threshold", "--pgs-threshold", "clip-pgs: similarity threshold of cluster growth"),
    Setting("runs", "pgs_edge", "--pgs-edge", "clip-pgs: Sobel edge prior (released, paper, none)"),
    Setting("runs", "pgs_otn", "--pgs-otn", "clip-pgs: optimal-transport normalisation (released, paper, none)"),
    Setting("runs", "pgs_attention", "--pgs-attention", "clip-pgs: attention term (released, paper, none)"),
    Setting("runs", "clips_text_reduction", "--clips-text-reduction", "clips: how the text views are cut"),
    Setting("runs", "clips_text_tokens", "--clips-text-tokens", "clips: token budget K of each text view"),
    Setting("runs", "clips_caption_tokens", "--clips-caption-tokens", "clips: caption tokens the captioner predicts"),
    Setting("runs", "clips_contrastive_weight", "--clips-contrastive-weight", "clips: weight of the contrastive term"),
    Setting("runs", "clips_caption_weight", "--clips-caption-weight", "clips: weight of the caption loss"),
    Setting("runs", "clippy_towers", "--clippy-towers", "clippy: scratch (the run's model) or published towers"),
    Setting("runs", "clippy_image_tower", "--clippy-image-tower", "clippy, published: timm image tower and weights"),
    Setting("runs", "clippy_text_tower", "--clippy-text-tower", "clippy, published: HF T5 text tower and weights"),
    Setting("runs", "clippy_pretrained", "--clippy-pretrained", "clippy, published: start from pretrained weights"),
    Setting("train", "model", "--model", "open_clip model config name"),
    Setting("train", "batch_size", "--batch-size", "batch per rank (the config's is global)", _per_rank),
    Setting("train", "epochs", "--epochs", "epochs"),
    Setting("train", "samples_per_epoch", "--samples-per-epoch", "samples per epoch, all ranks together"),
    Setting("train", "lr", "--lr", "peak learning rate"),
    Setting("train", "weight_decay", "--wd", "AdamW weight decay"),
    Setting("train", "warmup_steps", "--warmup", "linear warm-up steps"),
    Setting("train", "max_phrases", "--max-phrases", "phrases per caption fed to the loss"),
    Setting("train", "workers", "--workers", "DataLoader workers per rank"),
    Setting("train", "precision", "--precision", "auto: bf16 on GPU, fp32 on CPU"),
    Setting("train", "grad_checkpointing", "--grad-checkpointing", "gradient checkpointing in both towers"),
    Setting("train", "save_every_steps", "--save-every", "steps between resumable checkpoints"),
    Setting("train", "log_every_steps", "--log-every", "steps between metrics rows"),
    Setting("train", "tensorboard", "--tensorboard", "also log to TensorBoard (<work-dir>/tensorboard)"),
    Setting("train", "threads", "--threads", "torch CPU threads"),
)
# Options that do not change what is trained: a resume checkpoint stays valid when only these differ.
NOT_IN_FINGERPRINT = frozenset(
    {s.dest for s in SETTINGS if s.section == "train" and s.key in OPERATIONAL_TRAIN_KEYS}
    | {"checkpoint", "metrics", "work_dir", "device"}
)


def _schema_property(setting: Setting) -> Mapping:
    schema = load_schema("config" if setting.section == "train" else "runs")
    node = schema["properties"]["train"] if setting.section == "train" else schema
    return node["properties"][setting.key]


def _add_setting(group: argparse._ArgumentGroup, setting: Setting, defaults: Mapping[str, Any]) -> None:
    spec = _schema_property(setting)
    kwargs: dict[str, Any] = {"help": setting.help}
    kind = spec.get("type")
    if kind == "boolean":
        # `--flag` alone means true, as open_clip's flags; `--flag false` is what the workflow writes
        kwargs.update(type=str2bool, nargs="?", const=True)
    elif kind == "integer":
        kwargs["type"] = int
    elif kind == "number":
        kwargs["type"] = float
    if setting.key == "method":
        kwargs["choices"] = sorted(METHODS)
    elif "enum" in spec:
        kwargs["choices"] = spec["enum"]
    if setting.key in defaults:
        kwargs["default"] = defaults[setting.key]
        kwargs["help"] += f" (default: {defaults[setting.key]})"
    else:
        kwargs["required"] = True
    group.add_argument(setting.option, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m powerclip.train", description="Train one run of the run table (docs/method.md)."
    )
    data = p.add_argument_group("data")
    data.add_argument("--train-data", required=True, help="brace pattern of raw (or combined-format) shards")
    data.add_argument("--phrases-dir", help="directory of the phrases sidecars (<shard>.tar); omit for combined shards")
    data.add_argument("--regions-dir", help="directory of the regions sidecars (<shard>.tar); omit for combined shards")
    data.add_argument("--recaptions-dir", help="directory of the recaptions sidecars (<shard>.tar), for clips")
    data.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in the shuffle buffer")
    out = p.add_argument_group("outputs")
    out.add_argument("--checkpoint", required=True, help="final checkpoint path (written atomically at the end)")
    out.add_argument("--metrics", help="final metrics CSV path (default: <work-dir>/metrics.csv only)")
    out.add_argument("--work-dir", required=True, help="resume checkpoints, running metrics, TensorBoard")
    opt = p.add_argument_group("optimisation (open_clip's ViT defaults)")
    opt.add_argument("--beta1", type=float, default=0.9)
    opt.add_argument("--beta2", type=float, default=0.98)
    opt.add_argument("--eps", type=float, default=1e-6)
    opt.add_argument("--device", default="auto", help="auto, cpu or cuda")
    opt.add_argument("--text-chunk", type=int, default=None, help="texts per chunk of the B x B x M x P scores")
    opt.add_argument("--local-loss", action="store_true", help="open_clip's local_loss (DDP)")
    opt.add_argument("--gather-with-grad", action="store_true", help="open_clip's gather_with_grad (DDP)")
    runs = p.add_argument_group("run-table columns (schemas/runs.schema.yaml)")
    train = p.add_argument_group("train: settings (schemas/config.schema.yaml)")
    defaults = {"runs": schema_defaults("runs"), "train": schema_defaults("config", "train")}
    for setting in SETTINGS:
        _add_setting(runs if setting.section == "runs" else train, setting, defaults[setting.section])
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def brace_pattern(paths: Sequence[str]) -> str:
    """``a/x.tar, a/y.tar`` -> ``a/{x,y}.tar`` (the trainer's --train-data); all paths in one folder."""
    folders = {os.path.dirname(p) for p in paths}
    if len(folders) != 1:
        raise ValueError(f"training shards must share one folder, got {sorted(folders)}")
    names = [os.path.basename(p)[: -len(".tar")] for p in paths]
    if len(names) == 1:
        return paths[0]
    return os.path.join(folders.pop(), "{" + ",".join(names) + "}.tar")


def build_argv(
    run: Mapping[str, Any],
    train: Mapping[str, Any],
    shards: Sequence[str],
    checkpoint: str,
    metrics: str,
    work_dir: str,
    phrases_dir: str | None = None,
    regions_dir: str | None = None,
    recaptions_dir: str | None = None,
) -> list[str]:
    """The trainer's argv for one run-table row and the config's ``train:`` section (defaults filled in).
    Columns the row lacks (those its method does not read: :func:`run_identity`) take the schema's defaults."""
    values = {"runs": {**schema_defaults("runs"), **run}, "train": train}
    argv = ["--train-data", brace_pattern(shards), "--checkpoint", checkpoint, "--metrics", metrics, "--work-dir", work_dir]
    if phrases_dir is not None:
        argv += ["--phrases-dir", phrases_dir]
    if regions_dir is not None:
        argv += ["--regions-dir", regions_dir]
    if recaptions_dir is not None:
        argv += ["--recaptions-dir", recaptions_dir]
    for setting in SETTINGS:
        value = values[setting.section][setting.key]
        if setting.to_cli is not None:
            value = setting.to_cli(value, train)
        argv += [setting.option, str(value).lower() if isinstance(value, bool) else str(value)]
    if train["gpus"] > 1:
        argv.append("--gather-with-grad")
    return argv


def run_identity(run: Mapping[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    """What defines a run's result: the row's columns its method reads (powerclip.methods: a clip run does
    not change when its unused sam_loss_ratio cell does) and the ``train:`` settings that change what is
    trained. The workflow tracks it as the train rule's params."""
    columns = METHODS[run["method"]].identity_columns
    return {
        "run": {k: run[k] for k in columns},
        "train": {k: v for k, v in train.items() if k not in OPERATIONAL_TRAIN_KEYS},
    }
