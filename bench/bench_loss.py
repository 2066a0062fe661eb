"""Powerset region–phrase scoring: NLA (O(M)) vs brute-force enumeration of all 2^M subsets (O(2^M)).

    .venv/bin/python bench/bench_loss.py [--batch 32] [--phrases 8] [--dim 64] [--ms 5 10 16] [--tau 0.001]

Workload: one batch of B images x B texts (all B*B pairs), P phrases per text, M regions per image,
D-dim unit features, float32 on CPU, all slots valid.

* NLA  = ``nla_scores`` on the whole batch (similarity einsum + softplus aggregation + T2R/R2T), timed
  forward and forward+backward (grad w.r.t. region and phrase features); ms/pair = time / (B*B).
* exact = ``exact_powerset`` (vectorised over pairs: one (2^M x M) subset-indicator matmul per chunk of
  pairs, then logsumexp) + the pair-score combination, float32 like NLA, on the similarities x of the first
  ``n`` pairs of the same batch: all B*B pairs when the (n, 2^M, P) subset-score tensor is small, otherwise
  n = max(8, 2^22 / 2^M) pairs, and ms/pair = time / n (extrapolated per pair; stated in the table).
  Its similarity einsum is *not* timed (favours exact).
* max|Δ| = largest |NLA score − exact score| over the timed pairs (a correctness check on the way).

Linearity: NLA time at M = max / time at M = min, to compare with max/min; a second table sweeps M for NLA
only, on a larger batch so that per-call overhead does not hide the O(M) term. Reports medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.loss import exact_powerset, nla_scores, region_phrase_similarity  # noqa: E402


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make_batch(b: int, m: int, p: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rf = F.normalize(torch.randn(b, m, d, generator=g), dim=-1)
    pf = F.normalize(torch.randn(b, p, d, generator=g), dim=-1)
    return rf, torch.ones(b, m, dtype=torch.bool), pf, torch.ones(b, p, dtype=torch.bool)


def exact_scores(x: torch.Tensor, tau: float, alpha: float, topk: int, chunk_elems: int = 2**24) -> torch.Tensor:
    """Exact pair scores for x (n, M, P), in chunks of pairs so that (chunk, 2^M, P) stays bounded."""
    n, m, p = x.shape
    per = max(1, chunk_elems // (2**m * p))
    out = []
    for s in range(0, n, per):
        a, r2t = exact_powerset(x[s : s + per], tau, dtype=torch.float32)
        out.append((alpha * a.mean(-1) + (1 - alpha) * r2t) / topk)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--phrases", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ms", type=int, nargs="+", default=[5, 10, 16])
    ap.add_argument("--tau", type=float, default=0.001)
    ap.add_argument("--alpha", type=float, default=0.75)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep-batch", type=int, default=128)
    ap.add_argument("--sweep-ms", type=int, nargs="+", default=[5, 10, 16, 32, 64])
    args = ap.parse_args()
    b, p, d, tau, alpha = args.batch, args.phrases, args.dim, args.tau, args.alpha
    n_all = b * b
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32 CPU; "
          f"B={b}x{b} pairs, P={p}, D={d}, tau={tau}\n")

    rows = []
    for m in args.ms:
        rf, rm, pf, pm = make_batch(b, m, p, d)
        nla = lambda: nla_scores(rf, rm, pf, pm, tau=tau, alpha=alpha, topk=m)  # noqa: E731

        rf_g, pf_g = rf.clone().requires_grad_(True), pf.clone().requires_grad_(True)

        def nla_fb() -> None:
            s, _, _ = nla_scores(rf_g, rm, pf_g, pm, tau=tau, alpha=alpha, topk=m)
            s.sum().backward()
            rf_g.grad = pf_g.grad = None

        t_nla = timeit(nla, args.repeats)
        t_nla_fb = timeit(nla_fb, args.repeats)

        x = region_phrase_similarity(rf, pf).reshape(n_all, m, p)
        n_ex = n_all if 2**m * n_all <= 2**22 else max(8, 2**22 // 2**m)
        xs = x[:n_ex].contiguous()
        t_ex = timeit(lambda: exact_scores(xs, tau, alpha, m), max(1, min(args.repeats, 3)))
        diff = (nla()[0].reshape(-1)[:n_ex] - exact_scores(xs, tau, alpha, m)).abs().max().item()
        rows.append((m, t_nla / n_all * 1e3, t_nla_fb / n_all * 1e3, n_ex, t_ex / n_ex * 1e3, diff))

    print("| M | NLA fwd ms/pair | NLA fwd+bwd ms/pair | exact: pairs timed | exact ms/pair | exact / NLA | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for m, nla_ms, fb_ms, n_ex, ex_ms, diff in rows:
        how = f"{n_ex} (all)" if n_ex == n_all else f"{n_ex} (extrapolated)"
        print(f"| {m} | {nla_ms:.5f} | {fb_ms:.5f} | {how} | {ex_ms:.4f} | {ex_ms / nla_ms:,.0f}x | {diff:.1e} |")
    (m0, t0, *_), (m1, t1, *_) = rows[0], rows[-1]
    print(f"\nNLA fwd time M={m1} / M={m0}: {t1 / t0:.2f} (linear would be {m1 / m0:.2f})\n")

    # NLA alone on a larger batch: slope of time vs M once fixed per-call overhead is amortised.
    sb = args.sweep_batch
    print(f"NLA-only sweep, B={sb}x{sb} pairs, P={p}, D={d}:\n")
    print("| M | NLA fwd ms (batch) | µs/pair | ms per region (batch) |")
    print("|---|---|---|---|")
    sweep = []
    for m in args.sweep_ms:
        rf, rm, pf, pm = make_batch(sb, m, p, d)
        t = timeit(lambda: nla_scores(rf, rm, pf, pm, tau=tau, alpha=alpha, topk=m), args.repeats)
        sweep.append((m, t))
        print(f"| {m} | {t * 1e3:.2f} | {t / sb**2 * 1e6:.3f} | {t * 1e3 / m:.3f} |")
    (ma, ta), (mb, tb) = sweep[0], sweep[-1]
    print(f"\nsweep time M={mb} / M={ma}: {tb / ta:.2f} (linear would be {mb / ma:.2f})")


if __name__ == "__main__":
    main()
