"""The configuration is refused early and precisely; the schemas hold every default, and the trainer's command
line round-trips through its parser."""

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from powerclip import settings
from powerclip.settings import ConfigError, check_config, read_run_table
from powerclip.train_params import build_argv, parse_args, run_identity

REPO = Path(__file__).resolve().parent.parent
HEADER = "run\tmethod\tregions\tsam_loss_ratio\ttopk\tseed\n"


@pytest.fixture
def config():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    settings._validator(settings.load_schema("config")).validate(cfg)  # fills the defaults, as Snakemake's validate
    return cfg


def table(tmp_path, *rows, header=HEADER):
    path = tmp_path / "runs.tsv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def test_the_shipped_run_tables_are_valid(config):
    runs = read_run_table(REPO / "config" / "runs.tsv", config)
    assert list(runs)[:2] == ["clip", "powerclip"]
    # defaults fill every column a row leaves out
    assert runs["clip"]["softplus_tau"] == 0.001 and runs["clip"]["topk_random"] is False
    paper = yaml.safe_load((REPO / "config" / "cc12m.yaml").read_text())
    settings._validator(settings.load_schema("config")).validate(paper)
    assert len(read_run_table(REPO / "config" / "runs_cc12m.tsv", paper)) >= 12


def test_defaults_fill_left_out_columns_and_empty_cells(tmp_path, config):
    runs = read_run_table(table(tmp_path, "a\tclip\tnone\t0\t\t3", header="run\tmethod\tregions\tsam_loss_ratio\ttopk\tseed\n"), config)
    assert runs["a"]["topk"] == 5 and runs["a"]["seed"] == 3 and runs["a"]["vision_pool"] == "avg"


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ((), "", "is empty"),
        ((), HEADER, "only its header"),
        (("..\tclip\tnone\t0\t5\t0",), HEADER, "run name '..' is not a plain name"),
        ((".hidden\tclip\tnone\t0\t5\t0",), HEADER, "not a plain name"),
        (("a\tclip\tnone\t0\t5\t0", "a\tclip\tnone\t0\t5\t1"), HEADER, "run 'a' is already defined on line 2"),
        (("a\tclip\tnone\t0\t5\t0",), "run\tmethod\tregion\tsam_loss_ratio\ttopk\tseed\n", "unknown column(s) ['region']"),
        (("a\tsimclr\tnone\t0\t5\t0",), HEADER, "value 'simclr' is not a training method"),
        (("a\tclip\tfelzenszwalb\t0.1\t5\t0",), HEADER, "method 'clip' needs regions none and sam_loss_ratio 0"),
        (("a\tpowerclip\tnone\t0\t5\t0",), HEADER, "method 'powerclip' needs a region source"),
        (("a\tpowerclip\tsam\t0.1\t5\t0",), HEADER, "regions 'sam' is not computed: segment.sources is"),
        (("a\tclip\tnone\t0\t5",), HEADER, "5 cells for 6 columns"),
    ],
)
def test_bad_run_tables_are_refused_with_file_row_and_value(tmp_path, config, rows, header, message):
    path = table(tmp_path, *rows, header=header)
    with pytest.raises(ConfigError) as err:
        read_run_table(path, config)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_bad_value_is_reported_against_its_own_row(tmp_path, config):
    """The second row's bad value: row 2, its line (a comment line shifts it), the column and the value."""
    path = table(tmp_path, "good\tclip\tnone\t0\t5\t0", "# a comment", "bad\tpowerclip\tfelzenszwalb\t0.1\tfive\t0")
    with pytest.raises(ConfigError, match=r"row 2 \(line 4\): column topk value 'five'"):
        read_run_table(path, config)
    path = table(tmp_path, "good\tclip\tnone\t0\t5\t0", "bad\tpowerclip\tfelzenszwalb\t-1\t5\t0")
    with pytest.raises(ConfigError, match=r"row 2 \(line 3\): column sam_loss_ratio value -1.0"):
        read_run_table(path, config)


def test_grid_must_match_the_model(config):
    check_config(config)
    for grid, model in [((64, 16), "PowerCLIP-Tiny-64-8"), ((64, 8), "ViT-B-16")]:
        bad = copy.deepcopy(config)
        bad["grid"].update(image_size=grid[0], patch_size=grid[1])
        bad["train"]["model"] = model
        with pytest.raises(ConfigError) as err:
            check_config(bad)
        message = str(err.value)
        assert f"image_size {grid[0]}, patch_size {grid[1]}" in message and model in message
    paper = copy.deepcopy(config)
    paper["grid"].update(image_size=224, patch_size=16)
    paper["train"]["model"] = "ViT-B-16"
    check_config(paper)  # open_clip's own config, read without importing open_clip


def test_unknown_model_and_other_cross_key_errors(config):
    bad = copy.deepcopy(config)
    bad["train"]["model"] = "ViT-B-61"
    with pytest.raises(ConfigError, match="train.model 'ViT-B-61' is not a known model config"):
        check_config(bad)
    bad = copy.deepcopy(config)
    bad["pictures"]["dataset"] = "nowhere"
    with pytest.raises(ConfigError, match="pictures.dataset 'nowhere'"):
        check_config(bad)
    bad = copy.deepcopy(config)
    bad["train"].update(gpus=3, batch_size=64)
    with pytest.raises(ConfigError, match="not divisible by train.gpus 3"):
        check_config(bad)


def test_the_schema_refuses_unknown_keys_and_suites(config):
    from jsonschema import ValidationError

    validator = settings._validator(settings.load_schema("config"))
    for key, value in [("trian", {"epochs": 1}), ("evaluation", {**config["evaluation"], "bench": {}})]:
        bad = {**copy.deepcopy(config), key: value}
        with pytest.raises(ValidationError, match="Additional properties are not allowed"):
            validator.validate(bad)
    bad = copy.deepcopy(config)
    bad["evaluation"]["benchmarks"]["x"] = {"dataset": "wds/x", "task": "zeroshot_classification", "suite": "shapes_clss"}
    with pytest.raises(ValidationError, match="'shapes_clss' is not one of"):
        validator.validate(bad)


def test_the_schema_suites_are_the_suites_that_exist():
    from powerclip.evaluation.suites import SUITES

    spec = settings.load_schema("config")["properties"]["evaluation"]["properties"]["benchmarks"]
    assert set(spec["additionalProperties"]["properties"]["suite"]["enum"]) == set(SUITES)


def test_the_schema_methods_are_the_registry():
    from powerclip.methods import METHODS, method_class
    from powerclip.methods.base import TrainingMethod

    for name, info in METHODS.items():
        cls = method_class(name)
        assert issubclass(cls, TrainingMethod) and cls.uses_regions == info.uses_regions


def test_train_argv_round_trips_through_the_parser(config, tmp_path):
    runs = read_run_table(REPO / "config" / "runs.tsv", config)
    train = {**config["train"], "gpus": 2, "batch_size": 64}
    shards = [f"{tmp_path}/a dir/{i:05d}.tar" for i in range(3)]  # a space in the path
    argv = build_argv(runs["powerclip"], train, shards, "c k.pt", "m.csv", "w d", "p", "r")
    args = parse_args(argv)
    assert args.train_data == f"{tmp_path}/a dir/{{00000,00001,00002}}.tar"
    assert (args.checkpoint, args.work_dir, args.phrases_dir, args.regions_dir) == ("c k.pt", "w d", "p", "r")
    assert args.batch_size == 32 and args.gather_with_grad  # per rank, two ranks
    from powerclip.train_params import SETTINGS

    for s in SETTINGS:
        expected = (runs["powerclip"] if s.section == "runs" else train)[s.key]
        if s.key != "batch_size":
            assert getattr(args, s.dest) == expected, s.key


def test_a_default_changed_in_the_schema_reaches_the_trainer(tmp_path, monkeypatch):
    """One home per default: the trainer's parser reads the schema."""
    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas", schemas)
    text = (schemas / "config.schema.yaml").read_text()
    assert "default: 10000, description: \"Linear warm-up" in text
    (schemas / "config.schema.yaml").write_text(text.replace("default: 10000, description: \"Linear warm-up", "default: 77, description: \"Linear warm-up"))
    runs = (schemas / "runs.schema.yaml").read_text().replace("default: 0.001", "default: 0.25")
    (schemas / "runs.schema.yaml").write_text(runs)
    minimal = ["--train-data", "x.tar", "--checkpoint", "c", "--work-dir", "w", "--method", "clip", "--model", "M",
               "--batch-size", "8", "--epochs", "1", "--samples-per-epoch", "8", "--lr", "0.1"]  # fmt: skip
    assert parse_args(minimal).warmup == 10000 and parse_args(minimal).softplus_tau == 0.001
    monkeypatch.setattr(settings, "SCHEMA_DIR", schemas)
    settings.load_schema.cache_clear()
    try:
        args = parse_args(minimal)
        assert args.warmup == 77 and args.softplus_tau == 0.25
    finally:
        settings.load_schema.cache_clear()


def test_identity_leaves_out_what_does_not_change_the_result(config, tmp_path):
    runs = read_run_table(REPO / "config" / "runs.tsv", config)
    a = run_identity(runs["clip"], config["train"])
    b = run_identity({**runs["clip"], "description": "other words"}, {**config["train"], "threads": 9, "save_every_steps": 3})
    assert a == b
    assert run_identity({**runs["clip"], "topk": 9}, config["train"]) == a  # a column clip does not read
    assert run_identity({**runs["powerclip"], "topk": 9}, config["train"]) != run_identity(runs["powerclip"], config["train"])
    assert run_identity(runs["clip"], {**config["train"], "epochs": 5}) != a


def test_a_method_without_regions_refuses_a_region_source_even_at_lambda_zero(tmp_path, config):
    with pytest.raises(ConfigError, match="method 'clip' needs regions none"):
        read_run_table(table(tmp_path, "a\tclip\tfelzenszwalb\t0\t5\t0"), config)


def test_the_identity_of_a_run_is_enough_to_build_its_command_line(config):
    runs = read_run_table(REPO / "config" / "runs.tsv", config)
    for name in ("clip", "powerclip"):
        identity = run_identity(runs[name], config["train"])
        args = parse_args(build_argv(identity["run"], {**config["train"], **identity["train"]}, ["s/0.tar"], "c", "m", "w"))
        assert (args.method, args.sam_loss_ratio, args.seed) == (name, runs[name]["sam_loss_ratio"], 0)


def _schema_keys(node, path=()):
    """Every property path of a JSON schema (objects' properties, and the values of additionalProperties)."""
    for key, spec in node.get("properties", {}).items():
        yield (*path, key)
        yield from _schema_keys(spec, (*path, key))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _schema_keys(extra, (*path, "<name>"))


def test_config_readme_names_every_key_of_the_schemas():
    import re

    readme = (REPO / "config" / "README.md").read_text()
    named = {word for span in re.findall(r"`([^`]+)`", readme) for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}
    for schema in ("config", "runs"):
        missing = sorted({".".join(p) for p in _schema_keys(settings.load_schema(schema)) if p[-1] not in named})
        assert not missing, f"config/README.md does not name these keys of schemas/{schema}.schema.yaml: {missing}"
