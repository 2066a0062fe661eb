"""Results tables: clip-benchmark output JSONs -> long rows -> results/eval.csv and a wide summary.

Long format, one row per number: ``run, benchmark, task, metric, value``. The summary has one row per run
and one column per benchmark with its headline metric (``HEADLINE``), for the README and the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

COLUMNS = ["run", "benchmark", "task", "metric", "value"]
# The number that stands for a benchmark in the summary, by task.
HEADLINE = {
    "zeroshot_classification": "acc1",
    "zeroshot_retrieval": "mean_recall@1",
    # tie-aware accuracy: a bag-of-words model scores exactly 0.5 on it (powerclip.evaluation.metrics)
    "image_caption_selection": "text_acc_ties_split",
    "linear_probe": "lp_acc1",
}


def rows_of(result: Mapping, run: str, benchmark: str) -> list[dict]:
    """The numeric metrics of one clip-benchmark output JSON as long rows (NaN metrics are left out)."""
    task = result.get("task", "")
    metrics = dict(result.get("metrics", {}))
    if task == "zeroshot_retrieval":
        r1 = [v for k, v in metrics.items() if k.endswith("retrieval_recall@1")]
        if r1:
            metrics["mean_recall@1"] = sum(r1) / len(r1)
    rows = []
    for metric, value in sorted(metrics.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        rows.append({"run": run, "benchmark": benchmark, "task": task, "metric": metric, "value": float(value)})
    return rows


def run_table(jsons: Mapping[str, str | Path], run: str) -> pd.DataFrame:
    """{benchmark: output JSON path} of one run -> its long table."""
    rows = []
    for benchmark, path in sorted(jsons.items()):
        rows += rows_of(json.loads(Path(path).read_text()), run, benchmark)
    return pd.DataFrame(rows, columns=COLUMNS)


def combine(tables: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [t for t in tables if len(t)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(["run", "benchmark", "metric"], ignore_index=True)


def summary(long: pd.DataFrame) -> pd.DataFrame:
    """One row per run, one column per benchmark: its headline metric."""
    headline = long[long.apply(lambda r: HEADLINE.get(r["task"]) == r["metric"], axis=1)]
    return headline.pivot_table(index="run", columns="benchmark", values="value", aggfunc="first")


# Run-table columns that are not part of what a run trains: runs equal in everything else are seeds of
# one setting.
NOT_SETTINGS = ("run", "seed", "description")


def seed_summary(long: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Headline metrics averaged over the seeds of each setting: setting, benchmark, mean, sd, n, runs.

    A setting is named after its seed-0 run if it has one (else its first run); sd is the sample standard
    deviation (NaN for a single seed).
    """
    runs = runs.reset_index(drop=True)
    knobs = [c for c in runs.columns if c not in NOT_SETTINGS]
    names = {}
    for _, group in runs.groupby(knobs, sort=False, dropna=False):
        base = group.sort_values("seed").iloc[0]["run"]
        for run in group["run"]:
            names[run] = base
    headline = long[long.apply(lambda r: HEADLINE.get(r["task"]) == r["metric"], axis=1)].copy()
    headline["setting"] = headline["run"].map(names)
    out = (
        headline.groupby(["setting", "benchmark"], sort=True)
        .agg(mean=("value", "mean"), sd=("value", "std"), n=("value", "size"), runs=("run", lambda r: " ".join(sorted(r))))
        .reset_index()
    )
    return out
