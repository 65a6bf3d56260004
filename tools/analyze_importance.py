#!/usr/bin/env python3
"""Why do (or don't) PrefixKV's adaptive layer budgets help? Per-layer statistics from the
importance that `prefixkv calibrate --dump-importance DIR` writes ([layers, prompt tokens] .npy per
sample), for two sources of the same samples:

  --prompt DIR   the estimator the policies rank with at inference (e.g. the window estimator)
  --answer DIR   the attention the reference answer actually pays each prompt token (teacher-forced,
                 full cache: `prefixkv calibrate --allocate-from answer --dump-importance DIR`)

For budgets b it prints, per layer and averaged over samples:
  - concentration: the share of each source's mass on the top 10% of the prompt tokens;
  - k_l: the layer's keep fraction from METHOD.md section 2's search on each source;
  - the share of the answer's attention mass that the kept entries hold, for uniform budgets and for
    the prompt-searched budgets (both selecting by the prompt scores), and for the answer-searched
    budgets (selecting by the prompt scores: what an answer-calibrated profile gives).
The last row is the layer mean. Writes JSON with --out.

    python3 tools/analyze_importance.py --prompt imp_window --answer imp_answer --budgets 0.1,0.2,0.5
"""
import argparse
import glob
import json
import os
import sys

import numpy as np


def load_dir(d):
    files = sorted(glob.glob(os.path.join(d, "*.npy")))
    if not files:
        sys.exit(f"analyze_importance: no .npy files in {d}")
    return {os.path.basename(f)[:-4]: np.load(f).astype(np.float64) for f in files}


def counts_at(sorted_cum, p, protect, N):
    """Entries per layer for retention level p: first index where the cumulative share >= p, + 1."""
    n = np.array([int(np.searchsorted(c, p - 1e-12)) + 1 for c in sorted_cum])
    return np.clip(n, min(protect, N), N)


def prefix_budgets(scores, total, protect):
    """METHOD.md section 2: per-layer counts whose sum is `total` (binary search on p, then the
    remainder spread by largest fractional need; exact like src/kv/prefix_search)."""
    L, N = scores.shape
    cum = []
    for s in scores:
        v = np.sort(s)[::-1]
        t = v.sum()
        cum.append(np.cumsum(v) / t if t > 0 else np.linspace(1.0 / N, 1.0, N))
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if counts_at(cum, mid, protect, N).sum() > total:
            hi = mid
        else:
            lo = mid
    n = counts_at(cum, lo, protect, N)
    # fix the remainder one entry at a time: add where the next entry holds the most mass
    while n.sum() < total:
        gain = [cum[l][n[l]] - cum[l][n[l] - 1] if n[l] < N else -1 for l in range(L)]
        n[int(np.argmax(gain))] += 1
    while n.sum() > total:
        loss = [cum[l][n[l] - 1] - cum[l][n[l] - 2] if n[l] > max(protect, 1) else 9 for l in range(L)]
        n[int(np.argmin(loss))] -= 1
    return n


def kept_set(score, n, protect_idx):
    """Indices kept: the protected ones plus the top-scoring others, n in all."""
    order = np.argsort(-score, kind="stable")
    keep = list(protect_idx)
    for i in order:
        if len(keep) >= n:
            break
        if i not in protect_idx:
            keep.append(int(i))
    return np.array(keep[:n], dtype=np.int64)


def top10_share(s):
    v = np.sort(s)[::-1]
    k = int(np.ceil(0.1 * len(v)))
    return v[:k].sum() / max(v.sum(), 1e-30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--answer", required=True)
    ap.add_argument("--budgets", default="0.1,0.2,0.5")
    ap.add_argument("--protected", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    P, A = load_dir(args.prompt), load_dir(args.answer)
    ids = sorted(set(P) & set(A))
    if not ids:
        sys.exit("analyze_importance: the two folders share no sample")
    budgets = [float(b) for b in args.budgets.split(",")]
    L = P[ids[0]].shape[0]
    conc = {"prompt": np.zeros(L), "answer": np.zeros(L)}
    res = {b: {k: np.zeros(L) for k in ("k_prompt", "k_answer", "held_uniform", "held_prompt", "held_answer",
                                          "held_oracle_uniform")} for b in budgets}
    for sid in ids:
        p, a = P[sid], A[sid]
        if p.shape != a.shape:
            sys.exit(f"analyze_importance: {sid}: shapes differ {p.shape} vs {a.shape}")
        N = p.shape[1]
        prot = [0, N - 1][:args.protected]
        for l in range(L):
            conc["prompt"][l] += top10_share(p[l])
            conc["answer"][l] += top10_share(a[l])
        amass = a.sum(axis=1)
        for b in budgets:
            total = int(round(b * N * L))
            n_p = prefix_budgets(p, total, args.protected)
            n_a = prefix_budgets(a, total, args.protected)
            n_u = np.full(L, int(round(b * N)))
            r = res[b]
            for l in range(L):
                def held(n, score):
                    return a[l][kept_set(score, int(n), prot)].sum() / max(amass[l], 1e-30)
                r["k_prompt"][l] += n_p[l] / N
                r["k_answer"][l] += n_a[l] / N
                r["held_uniform"][l] += held(n_u[l], p[l])
                r["held_prompt"][l] += held(n_p[l], p[l])
                r["held_answer"][l] += held(n_a[l], p[l])
                r["held_oracle_uniform"][l] += held(n_u[l], a[l])
    n = len(ids)
    out = {"samples": n, "layers": L, "concentration_top10": {k: (v / n).tolist() for k, v in conc.items()},
           "budgets": {}}
    print(f"{n} samples, {L} layers; importance: prompt = {args.prompt}, answer = {args.answer}\n")
    print("| layer | top-10% share, prompt | top-10% share, answer |")
    print("|---|---|---|")
    for l in range(L):
        print(f"| {l} | {conc['prompt'][l] / n:.3f} | {conc['answer'][l] / n:.3f} |")
    for b in budgets:
        r = {k: v / n for k, v in res[b].items()}
        out["budgets"][str(b)] = {k: v.tolist() for k, v in r.items()}
        print(f"\nbudget {b}: keep fraction per layer, and the share of the answer's attention the kept entries hold")
        print("(selection by the prompt scores unless said)\n")
        print("| layer | k_l prompt-searched | k_l answer-searched | held, uniform | held, prompt-searched "
              "| held, answer-searched | held, uniform + answer selection (oracle) |")
        print("|---|---|---|---|---|---|---|")
        for l in range(L):
            print(f"| {l} | {r['k_prompt'][l]:.3f} | {r['k_answer'][l]:.3f} | {r['held_uniform'][l]:.3f} | "
                  f"{r['held_prompt'][l]:.3f} | {r['held_answer'][l]:.3f} | {r['held_oracle_uniform'][l]:.3f} |")
        print(f"| mean | {r['k_prompt'].mean():.3f} | {r['k_answer'].mean():.3f} | {r['held_uniform'].mean():.3f} | "
              f"{r['held_prompt'].mean():.3f} | {r['held_answer'].mean():.3f} | {r['held_oracle_uniform'].mean():.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
