"""Synthetic captions beside the web ones: the recaptions sidecar that CLIPS trains on (docs/formats.md).

For every raw shard, ``results/<dataset>/recaptions/<shard>.tar`` holds, with the same keys in the same
order, ``{key}.syn.txt`` (the long synthetic caption: the text encoder sees sub-captions of it, the
captioner predicts all of it) and ``{key}.web.txt`` (the web caption the captioner is conditioned on).
Both come from one of two sources (``datasets.<name>.recaptions.source``):

* ``synthetic`` (:func:`synthetic_recaptions`): the shapes generator's own long caption (``{key}.txt``) is
  the synthetic one, its short ``web_caption`` (in ``{key}.json``) the web one;
* ``table`` (:func:`join_table`): a recaption table such as DreamLIP's CC12M long captions, downloaded once
  (powerclip.fetch.http), indexed once into SQLite (:func:`index_table`: one lookup per sample instead of a
  pass over a 23 GB CSV per shard) and joined per shard by the sample's URL (``{key}.json``'s ``url``, as
  img2dataset writes it) or key; the raw caption is the web one.

A sample without a synthetic caption keeps an empty entry (both members empty) and is counted by reason in
``<shard>.stats.json``; rows of the table that match no sample are counted by :func:`summarize`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from powerclip.shards import ShardWriter, StageStats, atomic_output, iter_samples, write_json_atomic

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "table")
JOINS = ("url", "key")
SYN, WEB = "syn.txt", "web.txt"  # the sidecar's members
EMPTY = {SYN: b"", WEB: b""}  # the entry of a sample without a synthetic caption


def _text(sample: Mapping, field: str) -> str | None:
    """A sample's UTF-8 text member, stripped, or None when absent, undecodable or blank."""
    try:
        text = sample[field].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        return None
    return text or None


def _metadata(sample: Mapping) -> dict | None:
    try:
        meta = json.loads(sample["json"])
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_sidecar(raw_shard, out_tar, stats: StageStats, entries) -> dict:
    """Write ``entries`` (one ``(key, fields or None, skip reason)`` per raw sample) into the sidecar."""
    with ShardWriter(out_tar) as sink:
        for key, fields, reason in entries:
            stats.samples_in += 1
            if fields is None:
                stats.skip(reason, key)
                fields = EMPTY
            else:
                stats.samples_out += 1
            sink.write(key, fields)
    return stats.to_dict()


def synthetic_recaptions(raw_shard, out_tar, stats_path, shard: str) -> dict:
    """The shapes data's recaptions: ``{key}.txt`` is the synthetic caption, ``web_caption`` of
    ``{key}.json`` the web one. Skips: ``missing_caption`` (no usable ``txt``), ``no_web_caption``."""
    stats = StageStats("recaption_shard", shard, info={"source": "synthetic"})

    def entries():
        for sample in iter_samples(raw_shard, fields={"txt", "json"}):
            key, syn = sample["__key__"], _text(sample, "txt")
            web = (_metadata(sample) or {}).get("web_caption")
            if syn is None:
                yield key, None, "missing_caption"
            elif not isinstance(web, str) or not web.strip():
                yield key, None, "no_web_caption"
            else:
                yield key, {SYN: syn.encode("utf-8"), WEB: web.strip().encode("utf-8")}, None

    summary = _write_sidecar(raw_shard, out_tar, stats, entries())
    stats.write(stats_path)
    return summary


# ------------------------------------------------------------------------------------ the recaption table
def _column(header: Sequence[str] | None, column: str | int, table) -> int:
    """A column given by 0-based index or by header name, as an index."""
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
        return int(column)
    if header is None:
        raise ValueError(f"{table}: column {column!r} is a name, but the table has no header (header: false); give its index")
    try:
        return list(header).index(column)
    except ValueError:
        raise ValueError(f"{table}: no column {column!r} in its header {list(header)[:12]}; check the config's recaptions.table") from None


def index_table(
    table,
    index_path,
    stats_path,
    key_column: str | int = 0,
    caption_column: str | int = 1,
    header: bool = True,
    delimiter: str = ",",
) -> dict:
    """Index a recaption table (CSV/TSV: one row per image) into SQLite ``recaptions(key, caption)``.

    ``key_column`` holds what samples are joined on (a URL or a sample key), ``caption_column`` the
    synthetic caption (0-based index or header name). The first row with a key wins. Rows read but not
    indexed are counted: ``malformed_row`` (too few cells), ``empty_key``, ``empty_caption``,
    ``duplicate_key``, ``undecodable_row`` (not UTF-8). Written atomically; ``<stats>`` in the stage-statistics format (a row is a "sample").
    """
    csv.field_size_limit(sys.maxsize)  # long captions exceed the module's 128 KiB default cell limit
    stats = StageStats(
        "index_recaptions",
        Path(table).name,
        info={"table": str(table), "bytes": os.path.getsize(table), "key_column": key_column,
              "caption_column": caption_column, "header": header, "delimiter": delimiter},
    )  # fmt: skip
    # undecodable bytes become U+FFFD and their row is counted (undecodable_row), not a failed 23 GB pass
    with open(table, newline="", encoding="utf-8", errors="replace") as handle, atomic_output(index_path) as tmp:
        rows = csv.reader(handle, delimiter=delimiter)
        names = next(rows, None) if header else None
        key_i, caption_i = _column(names, key_column, table), _column(names, caption_column, table)
        db = sqlite3.connect(tmp)
        try:
            db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                             "CREATE TABLE recaptions (key TEXT PRIMARY KEY, caption TEXT NOT NULL);")  # fmt: skip
            for line, row in enumerate(rows, start=2 if header else 1):
                stats.samples_in += 1
                if len(row) <= max(key_i, caption_i):
                    stats.skip("malformed_row", f"line {line}", f"{len(row)} cells")
                    continue
                key, caption = row[key_i].strip(), row[caption_i].strip()
                if "\ufffd" in key or "\ufffd" in caption:
                    stats.skip("undecodable_row", f"line {line}")
                    continue
                if not key or not caption:
                    stats.skip("empty_key" if not key else "empty_caption", f"line {line}")
                    continue
                if db.execute("INSERT OR IGNORE INTO recaptions VALUES (?, ?)", (key, caption)).rowcount == 0:
                    stats.skip("duplicate_key", f"line {line}", key[:200])
                    continue
                stats.samples_out += 1
            db.commit()
        finally:
            db.close()
    return stats.write(stats_path)


def open_index(index_path) -> sqlite3.Connection:
    """The index, read-only and immutable (no locks: safe on the shared file systems of clusters)."""
    if not Path(index_path).is_file():
        raise FileNotFoundError(f"{index_path}: no recaption index; build it with index_table (rule index_recaption_table)")
    return sqlite3.connect(f"{Path(index_path).resolve().as_uri()}?mode=ro&immutable=1", uri=True)


def join_value(sample: Mapping, join: str) -> str | None:
    """What a sample is looked up by: its key, or the ``url`` of its ``{key}.json`` (img2dataset's)."""
    if join == "key":
        return sample["__key__"]
    url = (_metadata(sample) or {}).get("url")
    return url.strip() if isinstance(url, str) and url.strip() else None


def join_table(raw_shard, index_path, out_tar, stats_path, shard: str, join: str = "url", table: str | None = None) -> dict:
    """The recaptions of one raw shard from an indexed table (:func:`index_table`): ``{key}.syn.txt`` is the
    table's caption, ``{key}.web.txt`` the raw caption. Skips: ``missing_caption`` (no usable ``txt``),
    ``no_url`` (join by URL and the sample's ``json`` has none), ``no_recaption`` (no row). Counters:
    ``rows_matched`` (distinct rows used), ``samples_sharing_a_row`` (a later sample with an earlier's row)."""
    if join not in JOINS:
        raise ValueError(f"recaptions join {join!r} is not one of {JOINS}")
    stats = StageStats("recaption_shard", shard, info={"source": "table", "join": join, "table": table})
    db = open_index(index_path)
    seen: set[str] = set()

    def entries():
        fields = {"txt", "json"} if join == "url" else {"txt"}
        for sample in iter_samples(raw_shard, fields=fields):
            key, web, value = sample["__key__"], _text(sample, "txt"), join_value(sample, join)
            if web is None:
                yield key, None, "missing_caption"
                continue
            if value is None:
                yield key, None, "no_url"
                continue
            row = db.execute("SELECT caption FROM recaptions WHERE key = ?", (value,)).fetchone()
            if row is None:
                yield key, None, "no_recaption"
                continue
            stats.counters["samples_sharing_a_row" if value in seen else "rows_matched"] += 1
            seen.add(value)
            yield key, {SYN: row[0].encode("utf-8"), WEB: web.encode("utf-8")}, None

    try:
        summary = _write_sidecar(raw_shard, out_tar, stats, entries())
    finally:
        db.close()
    stats.write(stats_path)
    return summary


def summarize(shard_stats: Sequence, out_path, table_stats=None) -> dict:
    """One dataset's recaptions in numbers: samples with and without a synthetic caption (by reason) over
    all shards and, for a table, its rows indexed and how many of them no sample matched
    (``rows_indexed - sum of the shards' rows_matched``; exact unless a row's URL occurs in two shards)."""
    out = {"shards": len(shard_stats), "samples_in": 0, "samples_out": 0, "skipped_by_reason": {}, "counters": {}}
    for path in shard_stats:
        stats = json.loads(Path(path).read_text())
        out["samples_in"] += stats["samples_in"]
        out["samples_out"] += stats["samples_out"]
        for group in ("skipped_by_reason", "counters"):
            for name, count in stats[group].items():
                out[group][name] = out[group].get(name, 0) + count
    out["samples_skipped"] = sum(out["skipped_by_reason"].values())
    if table_stats is not None:
        table = json.loads(Path(table_stats).read_text())
        out["rows_read"], out["rows_indexed"] = table["samples_in"], table["samples_out"]
        out["rows_not_indexed_by_reason"] = table["skipped_by_reason"]
        out["rows_matched_by_no_sample"] = max(0, table["samples_out"] - out["counters"].get("rows_matched", 0))
    for group in ("skipped_by_reason", "counters"):
        out[group] = dict(sorted(out[group].items()))
    write_json_atomic(out_path, out)
    log.info("recaptions: %d of %d samples have a synthetic caption", out["samples_out"], out["samples_in"])
    return out
