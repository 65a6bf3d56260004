#!/usr/bin/env python3
"""Compares two `prefixkv eval` runs of the same grid, typically the CPU's and the GPU's.

    python3 bench/compare_eval.py CPU.json GPU.json [--answers CPU.jsonl GPU.jsonl] [--out FILE.json]

Records: for every policy/estimator/budget present in both, the ratio of the PPLs, the differences
of KLD, ROUGE-L and accuracy. Answers (the --answers files of both runs): how many greedy answers
differ, and for each the first token where they part and the gap between the two largest logits
there on each device. A device that rounds differently (the GPU keeps K/V and activations in 16
bits, the CPU in float32) can only flip a choice whose top two logits are about as close as the
rounding moves them, so answers that part at small gaps are near-ties; the gaps of all tokens are
given beside them for scale.
"""
import argparse
import json
import statistics
import sys


def load_records(path):
    with open(path) as f:
        r = json.load(f)
    recs = {}
    for x in r["records"]:
        key = x["policy"] + ("/" + x["estimator"] if x.get("estimator") else "") + "@%g" % x["budget"]
        recs[key] = x
    return r, recs


def load_answers(path):
    out = {}
    with open(path) as f:
        for line in f:
            a = json.loads(line)
            out[(a["sample"], a["config"])] = (a["tokens"], a["margins"])
    return out


def share_below(values, t):
    return sum(1 for v in values if v < t) / len(values) if values else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--answers", nargs=2, metavar=("A_JSONL", "B_JSONL"))
    ap.add_argument("--out")
    args = ap.parse_args()
    ra, a = load_records(args.a)
    rb, b = load_records(args.b)
    res = {"a": {"file": args.a, "device": ra.get("device"), "seconds": ra.get("seconds")},
           "b": {"file": args.b, "device": rb.get("device"), "seconds": rb.get("seconds")}}
    if ra["samples"] != rb["samples"]:
        print("different sample counts: %d vs %d" % (ra["samples"], rb["samples"]), file=sys.stderr)
    full_ratio = rb["full"]["ppl"] / ra["full"]["ppl"]
    rows = []
    for k in a:
        if k not in b:
            continue
        x, y = a[k], b[k]
        rows.append({"config": k, "ppl_a": x["ppl"], "ppl_b": y["ppl"], "ppl_ratio": y["ppl"] / x["ppl"],
                     "kld_a": x["kld"], "kld_b": y["kld"], "rouge_a": x["rouge_l"], "rouge_b": y["rouge_l"],
                     "acc_a": x.get("accuracy"), "acc_b": y.get("accuracy")})
    dev = [abs(r["ppl_ratio"] - 1) for r in rows]
    res["full_ppl"] = {"a": ra["full"]["ppl"], "b": rb["full"]["ppl"], "ratio": full_ratio}
    res["records"] = rows
    res["ppl_ratio"] = {"records": len(rows), "max_abs_dev": max(dev) if dev else None,
                        "median_abs_dev": statistics.median(dev) if dev else None,
                        "within_1pct": sum(1 for d in dev if d <= 0.01)}
    print("full cache PPL: %.5f vs %.5f (ratio %.5f)" % (ra["full"]["ppl"], rb["full"]["ppl"], full_ratio))
    if rows:
        print("records: %d; |PPL ratio - 1|: median %.4f, max %.4f, within 1%%: %d of %d" % (
            len(rows), statistics.median(dev), max(dev), res["ppl_ratio"]["within_1pct"], len(rows)))
        worst = sorted(rows, key=lambda r: -abs(r["ppl_ratio"] - 1))[:5]
        for r in worst:  # the text testbed makes no greedy answers: ROUGE-L is null there
            rouge = "" if r["rouge_a"] is None else "  ROUGE-L %.3f vs %.3f" % (r["rouge_a"], r["rouge_b"])
            print("  %-36s PPL %.4f vs %.4f  KLD %.4f vs %.4f%s" % (
                r["config"], r["ppl_a"], r["ppl_b"], r["kld_a"], r["kld_b"], rouge))
        dr = [abs(r["rouge_b"] - r["rouge_a"]) for r in rows if r["rouge_a"] is not None]
        if dr:
            print("  |ROUGE-L difference|: median %.4f, max %.4f" % (statistics.median(dr), max(dr)))
        accs = [(r["acc_a"], r["acc_b"]) for r in rows if r["acc_a"] is not None and r["acc_b"] is not None]
        if accs:
            da = [abs(x - y) for x, y in accs]
            print("  |accuracy difference|: median %.4f, max %.4f" % (statistics.median(da), max(da)))
    if args.answers:
        xa, xb = load_answers(args.answers[0]), load_answers(args.answers[1])
        both = [k for k in xa if k in xb]
        differ, parts, all_gaps = 0, [], []
        for k in both:
            ta, ga = xa[k]
            tb, gb = xb[k]
            all_gaps.extend(ga)
            if ta == tb:
                continue
            differ += 1
            i = 0
            while i < min(len(ta), len(tb)) and ta[i] == tb[i]:
                i += 1
            if i < len(ga) and i < len(gb):
                parts.append({"sample": k[0], "config": k[1], "token": i, "gap_a": ga[i], "gap_b": gb[i]})
            else:  # one answer is a prefix of the other: it stopped (length) where the other went on
                parts.append({"sample": k[0], "config": k[1], "token": i, "gap_a": None, "gap_b": None})
        gaps = [p["gap_a"] for p in parts if p["gap_a"] is not None]
        thresholds = [0.05, 0.1, 0.25, 0.5, 1.0]
        res["answers"] = {"compared": len(both), "differ": differ, "first_differences": parts,
                          "gap_at_difference_share_below": {str(t): share_below(gaps, t) for t in thresholds},
                          "gap_all_tokens_share_below": {str(t): share_below(all_gaps, t) for t in thresholds},
                          "gap_at_difference_median": statistics.median(gaps) if gaps else None,
                          "gap_at_difference_max": max(gaps) if gaps else None}
        print("answers: %d compared, %d differ" % (len(both), differ))
        if gaps:
            print("  top-two logit gap (device a) where they part: median %.3f, max %.3f" % (
                statistics.median(gaps), max(gaps)))
            for t in thresholds:
                print("  gap < %-4g: %5.1f%% of the partings, %5.1f%% of all tokens" % (
                    t, 100 * share_below(gaps, t), 100 * share_below(all_gaps, t)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
