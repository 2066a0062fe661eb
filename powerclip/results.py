"""Results tables: clip-benchmark output JSONs -> long rows -> results/eval.csv and a wide summary.

Long format, one row per number: ``run, benchmark, task, metric, value``. The summary has one row per run
and one column per benchmark with its headline metric (``HEADLINE``), for the README and the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["run", "benchmark", "task", "metric", "value"]
# The number that stands for a benchmark in the summary, by task.
HEADLINE = {
    "zeroshot_classification": "acc1",
    "zeroshot_retrieval": "mean_recall@1",
    # tie-aware accuracy: a bag-of-words model scores exactly 0.5 on it (powerclip.evaluation.metrics)
    "image_caption_selection": "text_acc_ties_split",
    "linear_probe": "lp_acc1",
    # ours (powerclip.evaluation.regions): region features against phrase features, patches against classes
    "region_grounding": "grounding_acc",
    "region_binding": "text_acc_ties_split",
    "zeroshot_segmentation": "miou",
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
SEED_COLUMNS = ["setting", "benchmark", "mean", "sd", "n", "runs", "baseline", "diff_mean", "diff_ci_low",
                "diff_ci_high", "diff_n", "diff_p"]  # fmt: skip


def _run_frame(runs: Mapping[str, Mapping] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(runs, pd.DataFrame):
        return runs.reset_index(drop=True)
    return pd.DataFrame([{**dict(row), "run": name} for name, row in runs.items()])


def settings_of(runs: Mapping[str, Mapping] | pd.DataFrame) -> dict[str, str]:
    """{run: its setting}: runs that agree in every column but ``run``, ``seed`` and ``description`` form one
    setting, named after its lowest-seed run. ``runs``: the validated run table (``{run: row}`` with every
    column, as powerclip.settings.read_run_table gives it) or a DataFrame with a ``run`` column."""
    frame = _run_frame(runs)
    knobs = [c for c in frame.columns if c not in NOT_SETTINGS]
    names = {}
    for _, group in frame.groupby(knobs, sort=False, dropna=False) if knobs else [(None, frame)]:
        base = group.sort_values("seed", kind="stable").iloc[0]["run"] if "seed" in group else group.iloc[0]["run"]
        for run in group["run"]:
            names[run] = base
    return names


def paired_difference(values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of the paired differences ``values - baseline``, its two-sided ``confidence`` t-interval
    (scipy.stats.t, n - 1 degrees of freedom), n and the paired t-test's p-value; interval and p are NaN
    for fewer than two pairs."""
    from scipy import stats

    diff = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(diff)
    out = {"diff_mean": float(diff.mean()) if n else float("nan"), "diff_ci_low": float("nan"),
           "diff_ci_high": float("nan"), "diff_n": n, "diff_p": float("nan")}  # fmt: skip
    if n >= 2:
        sem = diff.std(ddof=1) / np.sqrt(n)
        if sem > 0:
            low, high = stats.t.interval(confidence, n - 1, loc=diff.mean(), scale=sem)
            p = stats.ttest_1samp(diff, 0.0).pvalue
        else:  # every pair differs by the same amount: no spread to make an interval from
            low = high = diff.mean()
            p = float("nan")
        out.update(diff_ci_low=float(low), diff_ci_high=float(high), diff_p=float(p))
    return out


def seed_summary(long: pd.DataFrame, runs: Mapping[str, Mapping] | pd.DataFrame, baseline: str | None = "clip") -> pd.DataFrame:
    """Headline metrics over the seeds of each setting, and each setting against ``baseline``.

    Per setting and benchmark: ``mean``, ``sd`` (sample standard deviation, NaN for one seed), ``n``, ``runs``;
    then, paired by seed with the baseline setting's runs (the setting of the run named ``baseline``),
    :func:`paired_difference` of the headline metric: ``diff_mean``, its 95 % t-interval ``diff_ci_low`` ..
    ``diff_ci_high``, the number of pairs ``diff_n`` and ``diff_p``; empty for the baseline itself. A
    ``baseline`` that is not a run of the table raises a ValueError naming it; None skips the comparison.
    """
    table = _run_frame(runs)
    names = settings_of(table)
    seeds = dict(zip(table["run"], table["seed"] if "seed" in table else [0] * len(table)))
    headline = long[long.apply(lambda r: HEADLINE.get(r["task"]) == r["metric"], axis=1)].copy()
    unknown = sorted(set(headline["run"]) - set(names))
    if unknown:
        raise ValueError(f"results of runs {unknown} that the run table does not have; rerun aggregate_eval")
    headline["setting"] = headline["run"].map(names)
    headline["seed"] = headline["run"].map(seeds)
    out = (
        headline.groupby(["setting", "benchmark"], sort=True)
        .agg(mean=("value", "mean"), sd=("value", "std"), n=("value", "size"), runs=("run", lambda r: " ".join(sorted(r))))
        .reset_index()
    )
    out = out.reindex(columns=SEED_COLUMNS)
    if baseline is None:
        return out
    if baseline not in names:
        raise ValueError(
            f"evaluation.baseline {baseline!r} is not a run of the run table (runs: {sorted(names)}); set it to the "
            "run whose setting the others are compared with"
        )
    base = names[baseline]
    wide = headline.pivot_table(index=["benchmark", "seed"], columns="setting", values="value", aggfunc="first")
    out["baseline"] = base
    for i, row in out.iterrows():
        if row["setting"] == base:
            continue
        pairs = wide.loc[row["benchmark"], [row["setting"], base]].dropna() if base in wide else wide.iloc[:0, :0]
        diff = paired_difference(pairs.get(row["setting"], []), pairs.get(base, []))
        out.loc[i, list(diff)] = list(diff.values())
    out["diff_n"] = out["diff_n"].astype("Int64")  # a count (empty for the baseline), not a float
    return out
