rule plot_results:
    input:
        seeds="results/eval_seeds.csv",
        metrics=expand("results/runs/{run}/metrics.csv", run=RUNS),
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
        runs=list(RUNS),
    script:
        "../workflow_scripts/plot_results.py"


rule draw_region_phrases:
    input:
        unpack(picture_inputs),
        checkpoint="results/runs/{run}/checkpoint.pt",
    output:
        png=report(
            "results/runs/{run}/region_phrases.png",
            caption="../report/region_phrases.rst",
            category="Figures",
            subcategory="Regions and phrases",
            labels={"run": "{run}"},
        ),
    log:
        "logs/draw_region_phrases/{run}.log",
    conda:
        "../envs/eval.yaml"
    params:
        grid=config["grid"],
        pictures=config.get("pictures"),
    script:
        "../workflow_scripts/draw_region_phrases.py"
