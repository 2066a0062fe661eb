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


def eval_bars(seeds: pd.DataFrame, out_png) -> None:
    """Bar chart: one group per benchmark, one bar per setting (mean over seeds, sd as error bar)."""
    plt = _pyplot()
    benchmarks = sorted(seeds["benchmark"].unique())
    settings = list(dict.fromkeys(seeds["setting"]))
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(benchmarks)), 4))
    for i, setting in enumerate(settings):
        rows = seeds[seeds["setting"] == setting].set_index("benchmark").reindex(benchmarks)
        xs = [b + (i - (len(settings) - 1) / 2) * width for b in range(len(benchmarks))]
        ax.bar(xs, rows["mean"], width, yerr=rows["sd"].fillna(0), capsize=3, label=setting)
    ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=30, ha="right")
    ax.set_ylabel("headline metric (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize="small")
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
