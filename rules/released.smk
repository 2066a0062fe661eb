# Released checkpoints (config `released:`) as evaluation targets: fetched where the internet is, then
# evaluated by eval_benchmark and aggregate_run_eval like the runs (results/released/<name>/eval.csv).
# No `retries:`: the package retries transient network errors itself (powerclip.fetch.http.retry).


localrules:
    fetch_released,


rule fetch_released:
    output:
        folder=directory("resources/released/{released}"),
    log:
        "logs/fetch_released/{released}.log",
    wildcard_constraints:
        released="|".join(map(re.escape, RELEASED))
        or "no-released-checkpoint-is-configured",
    conda:
        "../envs/download.yaml"
    params:
        spec=lambda w: RELEASED[w.released],
    script:
        "../workflow_scripts/fetch_released.py"
