"""The recaptions stage (powerclip.recaptions): the shapes data's web captions, a recaption table fetched from
127.0.0.1, indexed and joined per shard, and the rules that give a clips run its sidecars."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import FileServer, image_bytes, write_tar

from powerclip.fetch.http import fetch_url
from powerclip.recaptions import index_table, join_table, summarize, synthetic_recaptions
from powerclip.shards import iter_samples, read_keys
from powerclip.synthetic import COLORS, SHAPES, ShapesConfig, ShapesGenerator, write_shard

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile")]

# Recorded before the web caption was added to the generator (seed 3, shard 2, 40 samples of each split;
# the seven shapes suites of seed 3, 12 items each): the txt members and the suites must stay byte-identical.
TXT_SHA256 = {
    "train": "325bc916f72d5b67f8581f2efa00ab5ed7e232f7301dae1d054c7dcec7cd33e8",
    "heldout": "db91db17c1a0a4996efec4aa558299dcd6adeb958af3a6434dd7b22f66ea1c87",
}
SUITES_SHA256 = "3adedc83e520f7b396dd11f801947e82e03a284b750ba21296b5b41bd7fcb5bb"
SUITES = ("shapes_binding", "shapes_binding_heldout", "shapes_cls", "shapes_control", "shapes_order",
          "shapes_relation", "shapes_retrieval")  # fmt: skip


def sidecar(path: Path) -> list[tuple[str, str, str]]:
    return [(s["__key__"], s["syn.txt"].decode(), s["web.txt"].decode()) for s in iter_samples(path)]


def test_the_web_caption_leaves_images_captions_and_suites_byte_identical(tmp_path):
    from powerclip.evaluation.suites import write_suites

    for split, digest in TXT_SHA256.items():
        write_shard(tmp_path / f"{split}.tar", "00002", 2, 40, seed=3, config=ShapesConfig(), split=split)
        h = hashlib.sha256()
        for s in iter_samples(tmp_path / f"{split}.tar"):
            h.update(s["__key__"].encode() + b"\0" + s["txt"] + b"\0")
        assert h.hexdigest() == digest, split
    write_suites(tmp_path / "suites", ShapesConfig(), seed=3, n=12, suites=SUITES)
    h = hashlib.sha256()
    for p in sorted((tmp_path / "suites").rglob("*")):
        if p.is_file():
            h.update(f"suites/{p.relative_to(tmp_path / 'suites')}".encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    assert h.hexdigest() == SUITES_SHA256


def test_web_captions_name_some_objects_without_sizes_or_relations():
    gen = ShapesGenerator(ShapesConfig(), seed=0)
    counts = []
    for i in range(200):
        meta = gen.sample(0, i)["meta"]
        web = meta["web_caption"]
        names = [f"{o['color']} {o['shape']}" for o in meta["objects"]]
        named = [n for n in names if n in web]
        counts.append((len(named), len(names)))
        assert 1 <= len(named) < len(names)  # some, never all, of several objects
        words = set(web.replace(",", " ").split())
        assert words <= set(COLORS) | set(SHAPES) | {"and"}, web  # no size, no relation
        assert gen.sample(0, i)["meta"]["web_caption"] == web  # deterministic
    assert len({n for n, _ in counts}) >= 3  # 1, 2 and 3 objects all occur


def test_synthetic_source_keeps_keys_and_order_and_counts_skips(tmp_path):
    write_shard(tmp_path / "raw.tar", "00000", 0, 6, seed=0, config=ShapesConfig())
    raw = list(iter_samples(tmp_path / "raw.tar"))
    # one sample from an older generator (no web_caption), one without a caption at all
    meta = json.loads(raw[2]["json"])
    del meta["web_caption"]
    raw[2]["json"] = json.dumps(meta).encode()
    del raw[4]["txt"]
    write_tar(tmp_path / "raw.tar", [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in raw])
    stats = synthetic_recaptions(tmp_path / "raw.tar", tmp_path / "r.tar", tmp_path / "r.stats.json", "00000")
    out = sidecar(tmp_path / "r.tar")
    assert [k for k, _, _ in out] == [s["__key__"] for s in raw]
    for (key, syn, web), s in zip(out, raw):
        if key in (raw[2]["__key__"], raw[4]["__key__"]):
            assert syn == web == ""  # an empty entry keeps the sidecar aligned
        else:
            assert syn == s["txt"].decode() and web == json.loads(s["json"])["web_caption"]
    assert stats["samples_in"] == 6 and stats["samples_out"] == 4
    assert stats["skipped_by_reason"] == {"missing_caption": 1, "no_web_caption": 1}
    assert json.loads((tmp_path / "r.stats.json").read_text())["skipped_by_reason"] == stats["skipped_by_reason"]


def table_bytes(rows: list[list[str]], header=("url", "raw", "long")) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def url(i: int) -> str:
    return f"http://img.example/{i}.jpg"


TABLE_ROWS = [
    [url(0), "a dog", "A brown dog sits on grass. It looks at the camera."],
    [url(9), "a cat", "A cat that no sample has."],  # matches no sample
    [url(2), "a car", 'A red car, parked.\nA "quoted" second line.'],  # a cell with a newline and quotes
    [url(0), "dup", "A second row for the first URL."],  # duplicate key: the first row wins
    [url(3), "a cup", ""],  # empty caption
    ["", "no url", "A caption without a URL."],  # empty key
    ["short row"],  # malformed
    [url(5), "a hat", "A hat. On a peg."],
]


def raw_shard(path: Path) -> Path:
    """Six samples: 0, 2 and 5 have a row; 1 has a URL without a row; 3's row has no caption; 4 has no json."""
    samples = []
    for i in range(6):
        fields = {"jpg": image_bytes("JPEG", (10 * i, 50, 90)), "txt": f"web caption {i}".encode()}
        if i != 4:
            fields["json"] = json.dumps({"url": url(i), "key": f"{i:09d}"}).encode()
        samples.append((f"{i:09d}", fields))
    return write_tar(path, samples)


@pytest.fixture
def served_table(tmp_path):
    data = table_bytes(TABLE_ROWS)
    server = FileServer({"/captions/table.csv": ("text/csv", data)})
    try:
        out = tmp_path / "table.csv"
        sha = fetch_url(f"{server.url}/captions/table.csv", out, sha256=hashlib.sha256(data).hexdigest(), retries=1)
        assert sha == hashlib.sha256(data).hexdigest() and out.read_bytes() == data
        yield out
    finally:
        server.close()


def test_table_fetched_indexed_and_joined_keeps_order_and_counts_misses(served_table, tmp_path):
    index = tmp_path / "table.sqlite"
    table_stats = index_table(served_table, index, tmp_path / "table.stats.json", key_column="url", caption_column=2)
    assert table_stats["samples_in"] == len(TABLE_ROWS) and table_stats["samples_out"] == 4
    assert table_stats["skipped_by_reason"] == {"duplicate_key": 1, "empty_caption": 1, "empty_key": 1, "malformed_row": 1}
    raw = raw_shard(tmp_path / "000.tar")
    stats = join_table(raw, index, tmp_path / "r.tar", tmp_path / "r.stats.json", "000", join="url", table="t")
    out = sidecar(tmp_path / "r.tar")
    assert [k for k, _, _ in out] == read_keys(raw)
    assert out[0][1:] == ("A brown dog sits on grass. It looks at the camera.", "web caption 0")
    assert out[2][1] == 'A red car, parked.\nA "quoted" second line.'
    assert out[5][1] == "A hat. On a peg."
    assert [syn for _, syn, _ in out][1] == out[3][1] == out[4][1] == ""
    assert stats["samples_out"] == 3
    assert stats["skipped_by_reason"] == {"no_recaption": 2, "no_url": 1}  # 1 and 3 (its row had no caption); 4
    assert stats["counters"] == {"rows_matched": 3}
    summary = summarize([tmp_path / "r.stats.json"], tmp_path / "summary.json", table_stats=tmp_path / "table.stats.json")
    assert summary["rows_indexed"] == 4 and summary["rows_matched_by_no_sample"] == 1  # url(9)
    assert summary["samples_in"] == 6 and summary["samples_skipped"] == 3
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_table_by_key_without_header_and_bad_columns(tmp_path):
    (tmp_path / "t.tsv").write_text("000000000\tsyn zero\n000000001\tsyn one\n000000001\tagain\n")
    index_table(tmp_path / "t.tsv", tmp_path / "t.sqlite", tmp_path / "t.json", 0, 1, header=False, delimiter="\t")
    raw = raw_shard(tmp_path / "000.tar")
    stats = join_table(raw, tmp_path / "t.sqlite", tmp_path / "r.tar", tmp_path / "r.json", "000", join="key")
    assert [syn for _, syn, _ in sidecar(tmp_path / "r.tar")][:3] == ["syn zero", "syn one", ""]
    assert stats["skipped_by_reason"] == {"no_recaption": 4}
    with pytest.raises(ValueError, match="is a name, but the table has no header"):
        index_table(tmp_path / "t.tsv", tmp_path / "x.sqlite", tmp_path / "x.json", "url", 1, header=False, delimiter="\t")
    (tmp_path / "h.csv").write_text("url,caption\nx,y\n")
    with pytest.raises(ValueError, match=r"no column 'long' in its header \['url', 'caption'\]"):
        index_table(tmp_path / "h.csv", tmp_path / "x.sqlite", tmp_path / "x.json", "url", "long")
    assert not (tmp_path / "x.sqlite").exists()  # nothing half-written


def demo_config(tmp_path, **changes):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["shapes"].update(num_shards=2, **changes)
    cfg["datasets"]["shapes"]["synthetic"]["samples_per_shard"] = 8
    runs = (REPO / "config" / "runs.tsv").read_text().splitlines()
    (tmp_path / "runs.tsv").write_text("\n".join(line for line in runs if line.split("\t")[0] in ("run", "clip", "clips")) + "\n")
    cfg["runs"] = str(tmp_path / "runs.tsv")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(tmp_path, config, *args, check=True):
    proc = subprocess.run(SNAKEMAKE + ["--cores", "1", "--configfile", str(config), "--directory", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_dry_run_gives_the_clips_run_its_recaptions_and_no_other_run(tmp_path):
    proc = snakemake(tmp_path, demo_config(tmp_path), "-n", "results/runs/clips/checkpoint.pt", "results/runs/clip/checkpoint.pt")
    jobs = proc.stdout.split("\nrule ")[1:]
    train = {job[job.index("wildcards: run=") :].split()[1].split("=")[1]: job for job in jobs if job.startswith("train:")}
    inputs = {run: job[job.index("input: ") :].splitlines()[0] for run, job in train.items()}
    for shard in ("00000", "00001"):
        assert f"results/shapes/recaptions/{shard}.tar" in inputs["clips"]
    assert "results/shapes/recaptions.summary.json" in inputs["clips"]
    assert "recaptions" not in inputs["clip"]
    assert sum(job.startswith("recaption_shard:") for job in jobs) == 2


def test_a_clips_run_without_recaptions_is_refused_at_parse_time(tmp_path):
    config = demo_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["datasets"]["shapes"]["recaptions"]
    config.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, config, "-n", check=False)
    assert proc.returncode != 0
    assert "run 'clips' (method clips) trains on synthetic captions, but datasets.shapes has no recaptions: key" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_table_rules_fetch_index_and_join_through_the_workflow(tmp_path):
    """A local dataset whose samples carry URLs, its table served from 127.0.0.1: the rules end to end."""
    raw_shard(tmp_path / "src" / "000.tar")
    data = table_bytes(TABLE_ROWS)
    server = FileServer({"/t.csv": data})
    try:
        table = {"url": f"{server.url}/t.csv", "sha256": hashlib.sha256(data).hexdigest(), "key_column": "url", "caption_column": "long"}
        config = demo_config(tmp_path)
        cfg = yaml.safe_load(config.read_text())
        cfg["datasets"]["web"] = {"source": "local", "local": {"pattern": str(tmp_path / "src" / "*.tar")},
                                  "recaptions": {"source": "table", "table": table}}  # fmt: skip
        config.write_text(yaml.safe_dump(cfg))
        snakemake(tmp_path, config, "results/web/recaptions.summary.json")
    finally:
        server.close()
    summary = json.loads((tmp_path / "results/web/recaptions.summary.json").read_text())
    assert summary["samples_out"] == 3 and summary["rows_matched_by_no_sample"] == 1
    assert summary["skipped_by_reason"] == {"no_recaption": 2, "no_url": 1}
    assert read_keys(tmp_path / "results/web/recaptions/000.tar") == read_keys(tmp_path / "resources/web/shards/000.tar")
