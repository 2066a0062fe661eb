"""Cut a URL/caption list (e.g. CC12M's ``cc12m.tsv``) into one small TSV per shard, for img2dataset.

Rule ``split_url_list`` runs :func:`split_url_list` once per dataset; each ``fetch_shard`` job of the
``img2dataset`` source then downloads its own part. Parts are written in the quoting that img2dataset's
reader (pyarrow's CSV reader) parses back to the same strings; bad rows are skipped and counted.
"""

from __future__ import annotations

import collections
import csv
import logging
from collections.abc import Iterator
from pathlib import Path

from powerclip.shards import atomic_output

log = logging.getLogger(__name__)

# Header of the per-shard URL lists written by split_url_list and read by img2dataset.
PART_COLUMNS = ("url", "caption")
# Skipped rows named in the log per reason (the counts are always complete).
LOGGED_ROWS_PER_REASON = 20


def part_writer(handle) -> csv.writer:
    # Quote only where needed, doubling quotes: exactly what pyarrow's CSV reader (used by img2dataset with
    # delimiter "\t", quote_char '"', double_quote=True) parses back to the same strings.
    return csv.writer(handle, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL, lineterminator="\n")


def part_reader(handle) -> Iterator[list[str]]:
    return csv.reader(handle, delimiter="\t", quotechar='"', doublequote=True, strict=True)


def _split_line(line: str, sep: str, quoted: bool) -> list[str]:
    if quoted:
        return next(csv.reader([line], delimiter=sep, quotechar='"', doublequote=True, strict=True), [])
    return line.split(sep)



def split_url_list(
    url_list: str | Path,
    out_dir: str | Path,
    shard_names: list[str],
    samples_per_shard: int,
    url_col: str = "url",
    caption_col: str = "caption",
    sep: str = "\t",
    header: bool = True,
    *,
    quoted: bool = False,
) -> dict:
    """Cut a URL list into one ``out_dir/<shard>.tsv`` per shard (header ``url<TAB>caption``), streaming.

    Data row ``r`` (0-based, header excluded) goes to part ``r // samples_per_shard``, i.e. shard
    ``shard_names[r // samples_per_shard]``; rows past the last shard are counted, not written. With
    ``header=True`` the columns are found by name (``url_col``, ``caption_col``); with ``header=False``
    (CC12M's official file) column 0 is the URL and column 1 the caption. Fields are split on ``sep``
    literally (CC12M captions contain bare quotes); ``quoted=True`` reads CSV-style double-quoted
    fields instead (one line per row). Rows that are not UTF-8, have the wrong number of columns, an empty
    URL or a blank caption are skipped and counted. Every part file is written atomically, also when it
    ends up empty (the input was shorter than expected; a warning is logged).

    Returns ``{"rows_read", "rows_written", "rows_skipped_by_reason", "rows_beyond_last_shard", "parts"}``
    with ``rows_read == rows_written + sum(rows_skipped_by_reason) + rows_beyond_last_shard`` and
    ``parts = {shard: {"path": ..., "rows": n}}``.
    """
    url_list = Path(url_list)
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not shard_names:
        raise ValueError("split_url_list: shard_names is empty")
    if len(set(shard_names)) != len(shard_names):
        dup = sorted(n for n, c in collections.Counter(shard_names).items() if c > 1)
        raise ValueError(f"split_url_list: duplicate shard names {dup[:5]}")
    bad = [n for n in shard_names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"split_url_list: shard names {bad[:5]} cannot be used as file names")
    if not url_list.is_file():
        raise FileNotFoundError(f"URL list {url_list} does not exist; download it first (see the dataset's config)")
    out_dir.mkdir(parents=True, exist_ok=True)

    capacity = len(shard_names) * samples_per_shard
    skipped: collections.Counter = collections.Counter()
    logged: collections.Counter = collections.Counter()
    rows_read = rows_written = rows_beyond = 0
    parts: dict[str, dict] = {}

    def skip(reason: str, line_no: int, detail: str = "") -> None:
        skipped[reason] += 1
        logged[reason] += 1
        if logged[reason] <= LOGGED_ROWS_PER_REASON:
            log.warning("%s line %d: skipped (%s)%s", url_list, line_no, reason, f": {detail}" if detail else "")

    part_idx = -1
    ctx = handle = writer = None
    part_rows = 0

    def close_part() -> None:
        nonlocal ctx, handle
        if ctx is None:
            return
        handle.close()
        ctx.__exit__(None, None, None)
        name = shard_names[part_idx]
        parts[name] = {"path": str(out_dir / f"{name}.tsv"), "rows": part_rows}
        ctx = handle = None

    def open_part(idx: int) -> None:
        nonlocal ctx, handle, writer, part_idx, part_rows
        close_part()
        part_idx, part_rows = idx, 0
        ctx = atomic_output(out_dir / f"{shard_names[idx]}.tsv")
        tmp = ctx.__enter__()
        handle = open(tmp, "w", encoding="utf-8", newline="")
        writer = part_writer(handle)
        writer.writerow(PART_COLUMNS)

    try:
        with open(url_list, "rb") as raw:
            url_i, cap_i, n_cols = 0, 1, 2
            line_no = 0
            if header:
                first = raw.readline()
                line_no = 1
                try:
                    names = [c.strip() for c in _split_line(first.decode("utf-8-sig").rstrip("\r\n"), sep, quoted)]
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{url_list}: header line is not UTF-8 ({exc})") from exc
                missing = [c for c in (url_col, caption_col) if c not in names]
                if missing:
                    raise ValueError(
                        f"{url_list}: header has no column(s) {missing} (columns: {names}); set url_col/caption_col, "
                        "or header: false for a file without header (CC12M's cc12m.tsv has none)"
                    )
                url_i, cap_i, n_cols = names.index(url_col), names.index(caption_col), len(names)
            for line_bytes in raw:
                line_no += 1
                row_idx = rows_read
                rows_read += 1
                if row_idx >= capacity:
                    rows_beyond += 1
                    continue
                if row_idx // samples_per_shard != part_idx:
                    for idx in range(part_idx + 1, row_idx // samples_per_shard + 1):
                        open_part(idx)
                try:
                    line = line_bytes.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    skip("not_utf8", line_no, str(exc))
                    continue
                try:
                    fields = _split_line(line, sep, quoted)
                except csv.Error as exc:
                    skip("malformed_quoting", line_no, str(exc))
                    continue
                if len(fields) != n_cols:
                    skip("wrong_column_count", line_no, f"{len(fields)} columns, expected {n_cols}")
                    continue
                # A lone \r inside a field would end the row for pyarrow's reader (newlines_in_values=False).
                url, caption = fields[url_i].strip(), fields[cap_i].replace("\r", " ")
                if not url:
                    skip("empty_url", line_no)
                    continue
                if not caption.strip():
                    skip("empty_caption", line_no)
                    continue
                writer.writerow((url, caption))
                part_rows += 1
                rows_written += 1
        # Parts the input did not reach still get a (header-only) file: they are workflow outputs.
        for idx in range(part_idx + 1, len(shard_names)):
            open_part(idx)
        close_part()
    except BaseException as exc:
        if handle is not None:
            handle.close()
            ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise

    empty = [name for name, part in parts.items() if part["rows"] == 0]
    if empty:
        log.warning(
            "%s: %d of %d parts are empty (%s%s): the URL list has only %d rows for %d shards x %d",
            url_list,
            len(empty),
            len(parts),
            ", ".join(empty[:5]),
            " ..." if len(empty) > 5 else "",
            rows_read,
            len(shard_names),
            samples_per_shard,
        )
    if rows_beyond:
        log.info("%s: %d rows beyond the last shard were not used", url_list, rows_beyond)
    summary = {
        "url_list": str(url_list),
        "rows_read": rows_read,
        "rows_written": rows_written,
        "rows_skipped_by_reason": dict(sorted(skipped.items())),
        "rows_beyond_last_shard": rows_beyond,
        "parts": parts,
    }
    assert rows_read == rows_written + sum(skipped.values()) + rows_beyond, summary
    log.info(
        "%s: %d rows read, %d written into %d parts, %d skipped %s, %d beyond the last shard",
        url_list,
        rows_read,
        rows_written,
        len(parts),
        sum(skipped.values()),
        dict(skipped) or "",
        rows_beyond,
    )
    return summary



def count_part_rows(part_tsv: Path) -> int:
    with open(part_tsv, encoding="utf-8", newline="") as handle:
        rows = part_reader(handle)
        head = next(rows, None)
        if head is None or tuple(head) != PART_COLUMNS:
            raise ValueError(f"{part_tsv}: not a URL-list part (first line {head!r}, expected {list(PART_COLUMNS)})")
        return sum(1 for _ in rows)

