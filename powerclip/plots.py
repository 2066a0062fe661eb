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


def training_curves(metrics: Mapping[str, str | Path], out_png) -> None:
    """Loss terms and logit scale against the step, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run, path in sorted(metrics.items()):
        frame = pd.read_csv(path)
        axes[0].plot(frame["step"], frame["contrastive_loss"], label=run)
        axes[1].plot(frame["step"], frame["local_loss"], label=run)
        axes[2].plot(frame["step"], frame["logit_scale"], label=run)
    for ax, title in zip(axes, ("CLIP loss", "region-phrase loss", "logit scale")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
