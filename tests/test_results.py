"""powerclip.results: headline metrics, settings over seeds and the paired difference against the baseline setting."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from powerclip.results import COLUMNS, HEADLINE, paired_difference, seed_summary, settings_of
from powerclip.settings import read_run_table

CONFIG = {"segment": {"sources": ["felzenszwalb", "random", "oracle"]}}


def long_table(values: dict[tuple[str, str], float]) -> pd.DataFrame:
    tasks = {"shapes_grounding": "region_grounding", "shapes_cls": "zeroshot_classification"}
    rows = [{"run": run, "benchmark": b, "task": tasks[b], "metric": HEADLINE[tasks[b]], "value": v}
            for (run, b), v in values.items()]  # fmt: skip
    rows.append({"run": "clip", "benchmark": "shapes_cls", "task": "zeroshot_classification", "metric": "acc5", "value": 0.9})
    return pd.DataFrame(rows, columns=COLUMNS)


@pytest.fixture
def runs(tmp_path):
    # columns left out of the table (topk, pools, ...) take their defaults: the rows still group by setting
    table = tmp_path / "runs.tsv"
    table.write_text(
        "run\tmethod\tregions\tsam_loss_ratio\tseed\tdescription\n"
        "clip\tclip\tnone\t0\t0\tbaseline\n"
        "clip-s1\tclip\tnone\t0\t1\tanother seed\n"
        "clip-s2\tclip\tnone\t0\t2\t\n"
        "pc\tpowerclip\tfelzenszwalb\t0.1\t0\t\n"
        "pc-s1\tpowerclip\tfelzenszwalb\t0.1\t1\t\n"
        "pc-s2\tpowerclip\tfelzenszwalb\t0.1\t2\t\n"
        "oracle-s1\tpowerclip\toracle\t0.1\t1\t\n"
        "oracle-s5\tpowerclip\toracle\t0.1\t5\t\n"
    )
    return read_run_table(table, CONFIG)


def test_settings_group_runs_that_differ_only_in_seed(runs):
    names = settings_of(runs)
    assert names == {"clip": "clip", "clip-s1": "clip", "clip-s2": "clip", "pc": "pc", "pc-s1": "pc", "pc-s2": "pc",
                     "oracle-s1": "oracle-s1", "oracle-s5": "oracle-s1"}  # fmt: skip


def test_paired_difference_equals_scipy():
    mine, base = [0.61, 0.58, 0.66, 0.63], [0.55, 0.57, 0.60, 0.64]
    got = paired_difference(mine, base)
    test = stats.ttest_rel(mine, base)
    low, high = test.confidence_interval(0.95)
    assert got["diff_n"] == 4 and got["diff_mean"] == pytest.approx(sum(mine) / 4 - sum(base) / 4)
    assert (got["diff_ci_low"], got["diff_ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert got["diff_p"] == pytest.approx(test.pvalue)
    one = paired_difference([0.7], [0.5])
    assert one["diff_mean"] == pytest.approx(0.2) and one["diff_n"] == 1 and math.isnan(one["diff_ci_low"])


def test_seed_summary_pairs_equal_seeds_with_the_baseline(runs):
    values = {
        ("clip", "shapes_grounding"): 0.40, ("clip-s1", "shapes_grounding"): 0.42, ("clip-s2", "shapes_grounding"): 0.35,
        ("pc", "shapes_grounding"): 0.47, ("pc-s1", "shapes_grounding"): 0.45, ("pc-s2", "shapes_grounding"): 0.44,
        ("oracle-s1", "shapes_grounding"): 0.60, ("oracle-s5", "shapes_grounding"): 0.70,
        ("clip", "shapes_cls"): 0.25, ("pc", "shapes_cls"): 0.30,
    }  # fmt: skip
    out = seed_summary(long_table(values), runs, baseline="clip-s1").set_index(["setting", "benchmark"])
    pc = out.loc[("pc", "shapes_grounding")]
    assert pc["n"] == 3 and pc["runs"] == "pc pc-s1 pc-s2" and pc["baseline"] == "clip"
    assert pc["mean"] == pytest.approx((0.47 + 0.45 + 0.44) / 3)
    expected = stats.ttest_rel([0.47, 0.45, 0.44], [0.40, 0.42, 0.35])
    assert pc["diff_n"] == 3 and pc["diff_mean"] == pytest.approx((0.07 + 0.03 + 0.09) / 3)
    assert (pc["diff_ci_low"], pc["diff_ci_high"]) == tuple(pytest.approx(v) for v in expected.confidence_interval(0.95))
    # only seed 1 is shared with the baseline: one pair, no interval
    oracle = out.loc[("oracle-s1", "shapes_grounding")]
    assert oracle["diff_n"] == 1 and oracle["diff_mean"] == pytest.approx(0.60 - 0.42) and math.isnan(oracle["diff_ci_low"])
    assert out.loc[("pc", "shapes_cls")]["diff_n"] == 1
    csv = seed_summary(long_table(values), runs).to_csv(index=False, float_format="%.4f").splitlines()
    assert csv[1].startswith("clip,shapes_cls,0.2500,,1,clip,clip,,,,,")  # the baseline's own row: no difference
    assert ",0.0500,,,1," in next(line for line in csv if line.startswith("pc,shapes_cls"))  # a count, not 1.0
    base = out.loc[("clip", "shapes_grounding")]
    assert base["baseline"] == "clip" and math.isnan(base["diff_mean"]) and base["n"] == 3
    assert list(seed_summary(long_table(values), runs).columns) == [
        "setting", "benchmark", "mean", "sd", "n", "runs", "baseline", "diff_mean", "diff_ci_low", "diff_ci_high",
        "diff_n", "diff_p",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="evaluation.baseline 'siglip' is not a run"):
        seed_summary(long_table(values), runs, baseline="siglip")


def test_eval_bars_draws_intervals(runs, tmp_path):
    from powerclip.plots import eval_bars, mean_interval

    values = {(r, "shapes_grounding"): 0.4 + 0.01 * (i * 7 % 5) for i, r in enumerate(runs)}
    seeds = seed_summary(long_table(values), runs)
    half = mean_interval(seeds).set_axis(seeds["setting"])
    clip = seeds[seeds["setting"] == "clip"].iloc[0]
    assert half["clip"] == pytest.approx(stats.t.ppf(0.975, 2) * clip["sd"] / math.sqrt(3))
    eval_bars(seeds, tmp_path / "bars.png")
    from PIL import Image

    with Image.open(tmp_path / "bars.png") as image:  # two panels: means, then differences to the baseline
        assert image.height > image.width * 0.9
    eval_bars(seed_summary(long_table(values), runs, baseline=None), tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as image:
        assert image.height < image.width
