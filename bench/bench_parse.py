"""Parse-tree throughput: powerclip's phrase extraction vs raw spaCy ``nlp.pipe`` on the same captions.

    .venv/bin/python bench/bench_parse.py [--captions 4000] [--repeats 3]

Both sides run the same pipeline (en_core_web_sm without ner/lemmatizer) with the same batch size; ours
adds cleaning, CLIP tokenisation, constituent extraction and alignment. Reports medians (captions/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.phrases import PhraseExtractor, load_spacy, result_of  # noqa: E402
from powerclip.synthetic import ShapesConfig, ShapesGenerator  # noqa: E402


def captions(n: int) -> list[str]:
    gen = ShapesGenerator(ShapesConfig(), seed=123)
    return [gen.sample(0, i)["caption"] for i in range(n)]


def _job(args):
    """One 'shard job': load the pipeline, then time parsing its captions (load time excluded)."""
    kind, texts, batch_size = args
    if kind == "raw":
        nlp = load_spacy("auto")
        list(nlp.pipe(texts[:100]))
        start = time.perf_counter()
        for _doc in nlp.pipe(texts, batch_size=batch_size):
            pass
    else:
        extractor = PhraseExtractor()
        list(extractor.pipe(texts[:100]))
        start = time.perf_counter()
        for doc in extractor.pipe(texts, batch_size=batch_size):
            result_of(doc)
    return time.perf_counter() - start


def parallel_jobs(kind: str, texts: list[str], jobs: int, batch_size: int) -> float:
    """captions/s of `jobs` single-process jobs side by side (how Snakemake runs parse_shard on N cores)."""
    import multiprocessing as mp

    chunks = [texts[i::jobs] for i in range(jobs)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        times = pool.map(_job, [(kind, chunk, batch_size) for chunk in chunks])
    return len(texts) / max(times)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    texts = captions(args.captions)
    nlp = load_spacy("auto")  # the raw pipeline
    extractor = PhraseExtractor()  # the same model + the phrase component
    list(nlp.pipe(texts[:200]))  # warm-up
    results = {}
    for n_process in (1, 2):

        def raw():
            for _doc in nlp.pipe(texts, batch_size=args.batch_size, n_process=n_process):
                pass

        def ours():
            for doc in extractor.pipe(texts, batch_size=args.batch_size, n_process=n_process):
                result_of(doc)

        t_raw, t_ours = timed(raw, args.repeats), timed(ours, args.repeats)
        results[n_process] = {
            "raw_captions_per_s": len(texts) / t_raw,
            "powerclip_captions_per_s": len(texts) / t_ours,
            "ratio": t_raw / t_ours,
        }
    raw_jobs = statistics.median(parallel_jobs("raw", texts, 2, args.batch_size) for _ in range(args.repeats))
    ours_jobs = statistics.median(parallel_jobs("ours", texts, 2, args.batch_size) for _ in range(args.repeats))
    results["2 jobs x 1 process"] = {
        "raw_captions_per_s": raw_jobs,
        "powerclip_captions_per_s": ours_jobs,
        "ratio": ours_jobs / raw_jobs,
    }
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"{len(texts)} captions, {words:.1f} words on average, batch {args.batch_size}, median of {args.repeats}")
    print("| configuration | raw nlp.pipe (captions/s) | powerclip phrases (captions/s) | ratio |")
    print("|---|---|---|---|")
    for n_process, r in results.items():
        name = n_process if isinstance(n_process, str) else f"1 job, n_process={n_process}"
        print(f"| {name} | {r['raw_captions_per_s']:.0f} | {r['powerclip_captions_per_s']:.0f} | {r['ratio']:.2f} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
