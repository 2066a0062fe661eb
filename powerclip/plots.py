"""Figures for the report: one bar chart of the headline metrics per suite, and the training curves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def mean_interval(seeds: pd.DataFrame, confidence: float = 0.95) -> pd.Series:
    """Half-width of the t-interval of each row's mean over seeds (from ``sd`` and ``n``; NaN for one seed)."""
    from scipy import stats

    n = seeds["n"].astype(float)
    t = stats.t.ppf(0.5 + confidence / 2, (n - 1).where(n > 1))
    return pd.Series(t * seeds["sd"] / n.pow(0.5), index=seeds.index)


def _grouped_bars(
    ax, rows: pd.DataFrame, benchmarks: list[str], settings: list[str], value: str, low, high, colors: dict[str, str]
) -> None:
    """One group per benchmark, one bar per setting (in ``colors[setting]``), each with its interval [low, high]
    as an error bar."""
    width = 0.8 / max(len(settings), 1)
    for i, setting in enumerate(settings):
        mine = rows[rows["setting"] == setting].set_index("benchmark").reindex(benchmarks)
        xs = [b + (i - (len(settings) - 1) / 2) * width for b in range(len(benchmarks))]
        errors = [(mine[value] - low(mine)).clip(lower=0).fillna(0), (high(mine) - mine[value]).clip(lower=0).fillna(0)]
        ax.bar(xs, mine[value], width, yerr=errors, capsize=3, label=setting, color=colors[setting])
    ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=30, ha="right")
    ax.legend(fontsize="small")


def eval_bars(seeds: pd.DataFrame, out_png) -> None:
    """Bar charts of ``results/eval_seeds.csv``: the headline metric of each setting (mean over seeds, 95 %
    t-interval of the mean), and below it each setting's mean paired difference to the baseline setting with
    its 95 % t-interval (bars without an interval: a single seed or a single pair)."""
    plt = _pyplot()
    benchmarks = sorted(seeds["benchmark"].unique())
    settings = list(dict.fromkeys(seeds["setting"]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {setting: cycle[i % len(cycle)] for i, setting in enumerate(settings)}  # the same in both panels
    half = mean_interval(seeds)
    paired = seeds[seeds["diff_mean"].notna()] if "diff_mean" in seeds else seeds.iloc[:0]
    panels = 2 if len(paired) else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 1.2 * len(benchmarks)), 4 * panels), squeeze=False)
    top = axes[0][0]
    _grouped_bars(top, seeds.assign(half=half), benchmarks, settings, "mean", lambda r: r["mean"] - r["half"],
                  lambda r: r["mean"] + r["half"], colors)  # fmt: skip
    top.set_ylabel("headline metric (mean over seeds, 95 % CI)")
    top.set_ylim(0, 1)
    top.axhline(0.5, color="grey", lw=0.8, ls=":")
    if panels == 2:
        bottom = axes[1][0]
        others = list(dict.fromkeys(paired["setting"]))
        _grouped_bars(bottom, paired, benchmarks, others, "diff_mean", lambda r: r["diff_ci_low"],
                      lambda r: r["diff_ci_high"], colors)  # fmt: skip
        bottom.axhline(0.0, color="black", lw=0.8)
        bottom.set_ylabel(f"minus {paired['baseline'].iloc[0]}, paired by seed (95 % CI)")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


# metrics.csv columns that are not curves of the loss terms (powerclip.train writes them for every method)
NOT_CURVES = ("step", "epoch", "lr", "samples_per_s", "data_s", "batch_s", "local_skipped_pairs")


def training_curves(metrics: Mapping[str, str | Path], out_png) -> None:
    """Each loss term and the logit scale against the step, one line per run. The panels are the union of
    the runs' metrics columns (a method logs its own terms: powerclip.methods)."""
    plt = _pyplot()
    frames = {run: pd.read_csv(path) for run, path in sorted(metrics.items())}
    panels = list(dict.fromkeys(c for f in frames.values() for c in f.columns if c not in NOT_CURVES))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6), squeeze=False)
    for ax, column in zip(axes[0], panels):
        for run, frame in frames.items():
            if column in frame:
                ax.plot(frame["step"], frame[column], label=run)
        ax.set_title(column.replace("_", " "))
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
