"""Evaluation: loading models (ours and released), metrics, the clip-benchmark runner, the local suites and
the fetchers of evaluation data. Kept free of imports so that any submodule can be used on its own."""
