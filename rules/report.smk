rule plot_results:
    input:
        seeds="results/eval_seeds.csv",
        metrics=expand("results/runs/{run}/metrics.csv", run=runs.index),
    output:
        bars=report(
            "results/plots/eval_bars.png",
            caption="../report/eval_bars.rst",
            category="Figures",
        ),
        curves=report(
            "results/plots/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
        ),
    log:
        "logs/plot_results/plot_results.log",
    conda:
        "../envs/eval.yaml"
    params:
        runs=list(runs.index),
    script:
        "../workflow_scripts/plot_results.py"
