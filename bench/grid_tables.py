#!/usr/bin/env python3
"""One testbed's grid from several `prefixkv eval` results (bench/gpu_grid.sh's phases): merged into
one results JSON, written as markdown tables and plotted. Python 3 standard library only.

    python3 bench/grid_tables.py merge --out grid_desc.json desc_lo.json desc_mid.json \\
        "desc_cutoff_profile.json=cutoff profile" ...
    python3 bench/grid_tables.py tables grid_desc.json [--kld] > tables.md
    python3 bench/grid_tables.py plot grid_desc.json --out grid_desc.svg
    python3 bench/grid_tables.py check RESULTS.json     # the bootstrap recomputed against eval's own

Inputs and the merged file may be gzipped (a name ending in .gz). merge: every input must be the
same testbed on the same samples (the per-sample ids); the full cache and its intervals are the first
input's (the others' full-cache PPL is compared with it and the largest relative difference printed).
`FILE=LABEL` gives that file's configs that are no uniform-budget baseline the label " [LABEL]" (a
record's "label", part of its name in the tables: two runs with different --kv-profile both have a
`prefixkv`); a file measured on another kind of device than the first gets " [cpu]" or " [cuda]" the
same way. A config that two inputs both hold is taken from the first. Each config's paired interval
against the best uniform-budget baseline at its budget (`vs_best_baseline`) is then recomputed over
the baselines of all inputs, exactly as `prefixkv eval` computes it within one run (src/eval/bootstrap.cc: the same
splitmix64 resamples of the same seed, the same metrics from the per-sample sums, the same
percentiles and verdicts, issue 13's rule in `meets_goal`); the per-cell intervals (`ci`) are the
inputs' own. `check` recomputes one eval's comparisons and reports how far they are from its own.
"""
import argparse
import gzip
import json
import math
import sys

BASELINES = ["streaming", "h2o", "snapkv", "pyramidkv", "elastic", "adakv", "uniform-prefix"]
LOWER_IS_BETTER = {"ppl", "kld"}
MASK64 = (1 << 64) - 1


def is_baseline(rec):
    return rec["policy"] in BASELINES and rec.get("estimator") != "answer"


def config_name(rec):
    """policy[/estimator][ [label]...]: the label a merge gave the config (its profile, its device)."""
    return rec["policy"] + ("/" + rec["estimator"] if rec.get("estimator") else "") + rec.get("label", "")


def resamples(n, count, seed):
    """src/eval/bootstrap.cc's Resamples: splitmix64, multiply-shift to [0, n)."""
    state = seed & MASK64
    sets = []
    for _ in range(count):
        s = []
        for _ in range(n):
            state = (state + 0x9E3779B97F4A7C15) & MASK64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
            z ^= z >> 31
            s.append((z * n) >> 64)
        sets.append(s)
    return sets


def percentile(values, q):
    v = sorted(x for x in values if x == x)
    if not v:
        return float("nan")
    pos = min(max(q, 0.0), 1.0) * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    frac = pos - lo
    if frac == 0 or v[lo] == v[hi]:
        return v[lo]
    return v[lo] + frac * (v[hi] - v[lo])


def verdict(ci, metric):
    lo, hi = ci
    if not (lo == lo and hi == hi):
        return "tied"
    if metric in LOWER_IS_BETTER:
        return "better" if hi < 0 else "worse" if lo > 0 else "tied"
    return "better" if lo > 0 else "worse" if hi < 0 else "tied"


class Member:
    """One member's per-sample sums (bootstrap.h's SampleStats) and its metric on index sets."""

    def __init__(self, ps, tokens, full=False):
        n = len(tokens)
        self.tokens = tokens
        self.nll = ps["nll"]
        self.kld = [0.0] * n if full else ps.get("kld")
        self.top1 = [float(t) for t in tokens] if full else ps.get("top1")
        self.rouge = [1.0] * n if full else ps.get("rouge_l")
        acc = ps.get("accuracy")
        self.acc = [0.0 if a is None else a for a in acc] if acc is not None else None
        self.scored = [0 if a is None else 1 for a in acc] if acc is not None else None
        self._cache = {}

    def value(self, idx, metric):
        get = lambda arr: sum(map(arr.__getitem__, idx))  # noqa: E731
        if metric in ("ppl", "kld", "top1_agreement"):
            arr = {"ppl": self.nll, "kld": self.kld, "top1_agreement": self.top1}[metric]
            if arr is None:
                return float("nan")
            tokens = get(self.tokens)
            if not tokens:
                return float("nan")
            s = get(arr)
            return math.exp(s / tokens) if metric == "ppl" else s / tokens
        if metric == "rouge_l":
            return get(self.rouge) / len(idx) if self.rouge is not None and idx else float("nan")
        if metric == "accuracy":
            if self.acc is None:
                return float("nan")
            count = get(self.scored)
            return get(self.acc) / count if count else float("nan")
        raise ValueError(metric)

    def point(self, metric):
        return self.value(range(len(self.tokens)), metric)

    def over(self, sets, metric):
        if metric not in self._cache:
            self._cache[metric] = [self.value(s, metric) for s in sets]
        return self._cache[metric]


def report_metrics(res):
    greedy = res.get("answer_tokens") is not None and res.get("testbed") != "text"
    ms = ["ppl"]
    if greedy:
        ms.append("rouge_l")
        acc = res["full"].get("per_sample", {}).get("accuracy")
        if acc and any(a is not None for a in acc):
            ms.append("accuracy")
    return ms + ["kld", "top1_agreement"]


def compare_all(res, count, seed):
    """vs_best_baseline of every record, as add_bootstrap in src/eval/evaluate.cc computes it."""
    tokens = res["per_sample"]["tokens"]
    n = len(tokens)
    sets = resamples(n, count, seed)
    members = {}

    def member(rec):
        key = id(rec)
        if key not in members:
            members[key] = Member(rec["per_sample"], tokens)
        return members[key]

    out = {}
    for m in report_metrics(res):
        sign = 1 if m in LOWER_IS_BETTER else -1
        best = {}
        for rec in res["records"]:
            if not is_baseline(rec) or len(rec["per_sample"]["nll"]) != n:
                continue
            v = member(rec).point(m)
            if v != v:
                continue
            b = rec["budget"]
            if b not in best or sign * v < sign * member(best[b]).point(m):
                best[b] = rec
        for rec in res["records"]:
            b = rec["budget"]
            if b not in best or len(rec["per_sample"]["nll"]) != n:
                continue
            base = best[b]
            a, bb = member(rec), member(base)
            diffs = [x - y for x, y in zip(a.over(sets, m), bb.over(sets, m))]
            ci = [percentile(diffs, 0.025), percentile(diffs, 0.975)]
            c = {"against": config_name(base), "diff": a.point(m) - bb.point(m), "ci": ci, "verdict": verdict(ci, m)}
            off_full = base.get("vs_full", {}).get(m, {}).get("verdict", "tied") != "tied"
            c["against_off_full"] = off_full
            if not is_baseline(rec):
                c["meets_goal"] = c["verdict"] != "worse" and (c["verdict"] == "better" or not off_full)
            out.setdefault(id(rec), {})[m] = c
    return out


def load(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return json.load(f)


def merge(args):
    srcs = []
    for spec in args.inputs:
        path, _, label = spec.partition("=")
        srcs.append((path, label, load(path)))
    first = srcs[0][2]
    ids = first["per_sample"]["ids"]
    merged = {k: first[k] for k in ("testbed", "model", "data", "samples", "skipped", "answer_tokens", "per_sample",
                                     "bootstrap", "full") if k in first}
    merged["sources"] = []
    records, seen, worst_full = [], set(), 0.0
    for i, (path, label, r) in enumerate(srcs):
        if r["testbed"] != first["testbed"] or r.get("data") != first.get("data"):
            sys.exit(f"{path}: testbed {r['testbed']} ({r.get('data')}), not {first['testbed']} ({first.get('data')})")
        if r["per_sample"]["ids"] != ids:
            sys.exit(f"{path}: other samples than {srcs[0][0]} ({len(r['per_sample']['ids'])} against {len(ids)})")
        worst_full = max(worst_full, abs(r["full"]["ppl"] / first["full"]["ppl"] - 1))
        if "no_image" in r and "no_image" not in merged:
            merged["no_image"] = r["no_image"]
        kind = (r.get("device") or "?").split()[0]  # cpu or cuda; the full string stays in "sources"
        if r.get("device") != first.get("device") and kind == (first.get("device") or "?").split()[0]:
            print(f"merge: {path} ran on {r.get('device')}, {srcs[0][0]} on {first.get('device')}", file=sys.stderr)
        tags = ([label] if label else []) + ([kind] if kind != (first.get("device") or "?").split()[0] else [])
        suffix = "".join(f" [{t}]" for t in tags)
        merged["sources"].append({"file": path, "label": label, "device": r.get("device"), "seconds": r.get("seconds"),
                                  "full_ppl": r["full"]["ppl"], "settings": r.get("settings")})
        for rec in r["records"]:
            rec = dict(rec)
            if suffix and not is_baseline(rec):
                rec["label"] = suffix
            key = (config_name(rec), rec["budget"])
            if key in seen:
                print(f"merge: {config_name(rec)} at {rec['budget']:g} in {path} as well; the first is kept",
                      file=sys.stderr)
                continue
            seen.add(key)
            rec["source"] = i
            records.append(rec)
    merged["records"] = records
    bs = first.get("bootstrap") or {}
    count, seed = bs.get("resamples", args.bootstrap), bs.get("seed", args.seed)
    merged["bootstrap"] = {"resamples": count, "seed": seed, "level": 0.95, "method": "percentile"}
    before = {id(rec): rec.get("vs_best_baseline", {}) for rec in records}
    comps = compare_all(merged, count, seed)
    changed = 0
    for rec in records:
        new = comps.get(id(rec), {})
        old = before[id(rec)]
        changed += sum(1 for m, c in new.items() if m in old and old[m].get("against") != c["against"])
        rec["vs_best_baseline"] = new
    merged["merged_note"] = ("vs_best_baseline recomputed over the baselines of all sources "
                             "(bench/grid_tables.py, the resamples of prefixkv eval's seed)")
    with (gzip.open(args.out, "wt") if args.out.endswith(".gz") else open(args.out, "w")) as f:
        json.dump(merged, f, separators=(",", ":"))
        f.write("\n")
    print(f"merge: {len(records)} configs x budgets from {len(srcs)} files -> {args.out}; full-cache PPL of the "
          f"inputs within {worst_full:.2e} of the first's; best baseline changed by the merge in {changed} "
          f"comparisons", file=sys.stderr)


def check(args):
    """Recomputes an eval's own vs_best_baseline and reports the largest difference."""
    r = load(args.results)
    bs = r.get("bootstrap")
    if not bs:
        sys.exit(f"{args.results}: no bootstrap")
    comps = compare_all(r, bs["resamples"], bs["seed"])
    worst, count, disagree = 0.0, 0, []
    for rec in r["records"]:
        for m, c in comps.get(id(rec), {}).items():
            own = rec.get("vs_best_baseline", {}).get(m)
            if own is None:
                continue
            count += 1
            scale = max(1e-12, abs(own["ci"][1] - own["ci"][0]))
            d = max(abs(own["diff"] - c["diff"]), abs(own["ci"][0] - c["ci"][0]), abs(own["ci"][1] - c["ci"][1]))
            worst = max(worst, d / scale)
            for k in ("against", "verdict", "meets_goal", "against_off_full"):
                if own.get(k) != c.get(k):
                    disagree.append(f"{config_name(rec)} {rec['budget']:g} {m} {k}: eval {own.get(k)}, here {c.get(k)}")
    print(f"check: {count} comparisons recomputed; largest difference {worst:.2e} of the interval's width; "
          f"{len(disagree)} disagree")
    for d in disagree:
        print("  " + d)
    return 1 if disagree or worst > 1e-6 else 0


# ---- tables ----------------------------------------------------------------------------------------

TESTBED_TITLES = {"descriptions": "(a) Descriptions", "questions": "(b) Short questions", "text": "(c) Held-out text"}


def ppl_format(v):  # 4 decimals near the full cache, where the differences are small
    return "%.4f" if v < 1.5 else "%.3f" if v < 10 else "%.2f"


def fmt_ppl(v):
    return ppl_format(v) % v if v == v else "-"


def cell(rec, m):
    if rec is None or rec.get(m) is None:
        return ""
    v = rec[m]
    ci = rec.get("ci", {}).get(m)
    if m == "accuracy":
        s = "%.1f%%" % (100 * v)
        return s + (" [%.1f, %.1f]" % (100 * ci[0], 100 * ci[1]) if ci else "")
    f = {"ppl": lambda x: ppl_format(v) % x, "kld": lambda x: "%.3g" % x, "top1_agreement": lambda x: "%.3f" % x,
         "rouge_l": lambda x: "%.3f" % x}[m]
    return f(v) + (" [%s, %s]" % (f(ci[0]), f(ci[1])) if ci else "")


def ordered_configs(res):
    names = []
    for rec in res["records"]:
        if config_name(rec) not in names:
            names.append(config_name(rec))
    base = [n for b in BASELINES for n in names if n.split("/")[0] == b and
            any(is_baseline(r) for r in res["records"] if config_name(r) == n)]
    return base + [n for n in names if n not in base]


def tables(args):
    res = load(args.merged)
    budgets = sorted({r["budget"] for r in res["records"]})
    by = {(config_name(r), r["budget"]): r for r in res["records"]}
    names = ordered_configs(res)
    ms = report_metrics(res)
    quality = "accuracy" if "accuracy" in ms else "top1_agreement"
    title = TESTBED_TITLES.get(res["testbed"], res["testbed"])
    sources = res.get("sources") or [{"device": res.get("device"), "seconds": res.get("seconds")}]  # one eval's JSON
    devices = sorted({s["device"] for s in sources if s.get("device")})
    secs = sum(s.get("seconds") or 0 for s in sources)
    out = [f"### {title}: {res['samples']} samples, {res.get('data')}", ""]
    full = res["full"]
    line = f"Full cache: PPL {cell(full, 'ppl')}"
    if full.get("accuracy") is not None:
        line += f", accuracy {cell(full, 'accuracy')}"
    if "no_image" in res:
        ni = res["no_image"]
        line += f"; no-image control: PPL {cell(ni, 'ppl')}"
        if ni.get("accuracy") is not None:
            line += f", accuracy {cell(ni, 'accuracy')}"
    bs = res.get("bootstrap", {})
    line += (f". Brackets: 95% percentile bootstrap intervals over the samples ({bs.get('resamples')} resamples). "
             f"Devices: {', '.join(devices) or '?'}; {secs / 60:.1f} min of evaluation in {len(sources)} "
             f"runs.")
    out += [line, ""]
    shown = [("PPL", "ppl"), ("accuracy" if quality == "accuracy" else "top-1 agreement with the full cache", quality)]
    if args.kld:
        shown.append(("KLD against the full cache (nats/token)", "kld"))
    head = "| config | " + " | ".join(f"{round(100 * b)}%" for b in budgets) + " |"
    rule = "|---|" + "---|" * len(budgets)
    for label, m in shown:
        out += [f"**{label}**", "", head, rule]
        for n in names:
            out.append(f"| {n} | " + " | ".join(cell(by.get((n, b)), m) for b in budgets) + " |")
        best = []
        for b in budgets:
            cands = [r for r in res["records"] if r["budget"] == b and is_baseline(r) and r.get(m) is not None]
            if not cands:
                best.append("")
                continue
            pick = (min if m in LOWER_IS_BETTER else max)(cands, key=lambda r: r[m])
            v = "%.1f%%" % (100 * pick[m]) if m == "accuracy" else fmt_ppl(pick[m]) if m == "ppl" else "%.3g" % pick[m]
            best.append(f"{config_name(pick)} {v}")
        out += ["| *best uniform-budget baseline* | " + " | ".join(best) + " |", ""]
    goal = ["ppl"] + (["accuracy"] if quality == "accuracy" else [])
    out += [f"**Against the best uniform-budget baseline at each budget** (verdicts of the paired 95% interval of "
            f"the difference and the difference itself: {' / '.join('PPL' if g == 'ppl' else 'accuracy (points)' for g in goal)}; issue 13's rule "
            f"**met** where none is worse and each is better wherever that baseline is off the full cache)", "",
            head, rule]
    for n in names:
        cells = []
        for b in budgets:
            r = by.get((n, b))
            if r is None or is_baseline(r) or not r.get("vs_best_baseline"):
                cells.append("")
                continue
            vs = r["vs_best_baseline"]
            parts = [("%s %+.3g" % (vs[g]["verdict"], vs[g]["diff"] * (100 if g == "accuracy" else 1)))
                     if g in vs else "?" for g in goal]
            met = all(vs.get(g, {}).get("meets_goal", False) for g in goal)
            cells.append(" / ".join(parts) + (": **met**" if met else ": not met"))
        if any(cells):
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    out.append("")
    out += gap_ratio_table(res, names, budgets, by, head, rule)
    print("\n".join(out))


def gap_ratio_table(res, names, budgets, by, head, rule):
    """Issue 13's figure on the descriptions: each adaptive config's PPL gap to the full cache as a share
    of the best baseline's (PPL - full PPL over the best baseline's PPL - full PPL; the baseline with
    the lowest PPL at that budget), with its 95% percentile interval over the same resamples (each
    resample's ratio from its own three PPLs)."""
    bs = res.get("bootstrap") or {}
    tokens = res["per_sample"]["tokens"]
    n = len(tokens)
    if not bs.get("resamples") or "nll" not in res["full"].get("per_sample", {}):
        return []
    sets = resamples(n, bs["resamples"], bs["seed"])
    full = Member(res["full"]["per_sample"], tokens, full=True)
    f_pt, f_rs = full.point("ppl"), full.over(sets, "ppl")
    rows = {}
    for b in budgets:
        cands = [r for r in res["records"] if r["budget"] == b and is_baseline(r) and len(r["per_sample"]["nll"]) == n]
        if not cands:
            continue
        base = min(cands, key=lambda r: r["ppl"])
        bm = Member(base["per_sample"], tokens)
        b_pt, b_rs = bm.point("ppl"), bm.over(sets, "ppl")
        if b_pt - f_pt <= 0:
            continue
        for nm in names:
            r = by.get((nm, b))
            if r is None or is_baseline(r) or len(r["per_sample"]["nll"]) != n:
                continue
            m = Member(r["per_sample"], tokens)
            ratios = [(c - f) / (x - f) for c, x, f in zip(m.over(sets, "ppl"), b_rs, f_rs) if x - f > 0]
            rows.setdefault(nm, {})[b] = ((m.point("ppl") - f_pt) / (b_pt - f_pt), percentile(ratios, 0.025),
                                          percentile(ratios, 0.975))
    if not rows:
        return []
    out = ["**PPL gap to the full cache as a share of the best baseline's** ((PPL - full) / (best baseline's "
           "PPL - full), the best baseline by PPL at each budget; brackets: 95% interval over the resamples; "
           "issue 13 asks at most 0.6 at 20% on the descriptions)", "", head, rule]
    for nm in names:
        if nm in rows:
            out.append(f"| {nm} | " + " | ".join("%.3f [%.3f, %.3f]" % rows[nm][b] if b in rows[nm] else ""
                                                 for b in budgets) + " |")
    return out + [""]


# ---- plot ------------------------------------------------------------------------------------------

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
DASHES = ["", "6,3", "2,2", "8,3,2,3"]


def esc(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#39;"))


def nice_ticks(lo, hi, log):
    if log:
        ticks, d = [], 10 ** math.floor(math.log10(lo))
        while d <= hi * 1.0001:
            for m in (1, 2, 5):
                if lo * 0.9999 <= m * d <= hi * 1.0001:
                    ticks.append(m * d)
            d *= 10
        if len(ticks) < 2:
            ticks = [lo, hi]
        return ticks
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= 6:
            step *= m
            break
    t = math.ceil(lo / step - 1e-9) * step
    ticks = []
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def panel(x0, w, h, title, ylabel, series, log, full):
    """One panel's SVG elements at x offset x0: series = [(label, [(x, y)...])]; full: a dashed line."""
    ml, mr, mt, mb = 60, 10, 30, 40
    pts = [p for _, ps in series for p in ps if p[1] == p[1] and (p[1] > 0 or not log)]
    ys = [p[1] for p in pts] + ([full] if full is not None else [])
    if not ys:
        return [f'<text x="{x0 + w / 2}" y="{h / 2}" text-anchor="middle">{esc(title)}: no data</text>']
    ylo, yhi = min(ys), max(ys)
    if ylo == yhi:
        ylo, yhi = ylo * 0.95 if log else ylo - 0.5, yhi * 1.05 if log else yhi + 0.5
    if log:
        ylo, yhi = ylo / 1.03, yhi * 1.03
    else:
        pad = (yhi - ylo) * 0.04
        ylo, yhi = ylo - pad, yhi + pad
    xs = [p[0] for p in pts]
    xlo, xhi = min(xs + [0.1]), max(xs + [0.9])
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    px = lambda x: x0 + ml + (x - xlo) / ((xhi - xlo) or 1) * (w - ml - mr)  # noqa: E731
    py = lambda y: mt + (f(yhi) - f(y)) / ((f(yhi) - f(ylo)) or 1) * (h - mt - mb)  # noqa: E731
    e = [f'<text x="{x0 + w / 2}" y="18" text-anchor="middle" font-weight="bold">{esc(title)}</text>',
         f'<rect x="{x0 + ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" fill="none" stroke="#444"/>']
    for t in nice_ticks(ylo, yhi, log):
        y = py(t)
        e.append(f'<line x1="{x0 + ml}" x2="{x0 + w - mr}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        e.append(f'<text x="{x0 + ml - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
    for t in sorted(set(xs)):
        x = px(t)
        e.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{h - mb}" stroke="#eee"/>')
        e.append(f'<text x="{x:.1f}" y="{h - mb + 14}" text-anchor="middle" font-size="11">{round(100 * t)}%</text>')
    e.append(f'<text x="{x0 + (ml + w - mr) / 2}" y="{h - 8}" text-anchor="middle" font-size="12">kept</text>')
    e.append(f'<text x="{x0 + 14}" y="{(mt + h - mb) / 2}" text-anchor="middle" font-size="12" '
             f'transform="rotate(-90 {x0 + 14} {(mt + h - mb) / 2})">{esc(ylabel)}</text>')
    if full is not None:
        y = py(full)
        e.append(f'<line x1="{x0 + ml}" x2="{x0 + w - mr}" y1="{y:.1f}" y2="{y:.1f}" stroke="#000" '
                 f'stroke-dasharray="3,3"><title>full cache {full:g}</title></line>')
    for k, (label, ps) in enumerate(series):
        ps = [p for p in ps if p[1] == p[1] and (p[1] > 0 or not log)]
        if not ps:
            continue
        col, dash = PALETTE[k % len(PALETTE)], DASHES[(k // len(PALETTE)) % len(DASHES)]
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in ps)
        e.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="1.6"'
                 + (f' stroke-dasharray="{dash}"' if dash else "") + f'><title>{esc(label)}</title></polyline>')
        for x, y in ps:
            e.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{col}"/>')
    return e


def plot(args):
    res = load(args.merged)
    names = ordered_configs(res)
    ms = report_metrics(res)
    quality = "accuracy" if "accuracy" in ms else "top1_agreement"
    series = {m: [] for m in ("ppl", quality)}
    for n in names:
        recs = sorted((r for r in res["records"] if config_name(r) == n), key=lambda r: r["budget"])
        for m in series:
            series[m].append((n, [(r["budget"], r[m] if r.get(m) is not None else float("nan")) for r in recs]))
    w, h = 440, 340
    legend = max(300, 40 + 7 * max((len(n) for n in names), default=0))  # about 6.5 px a character at 11 px
    full = res["full"]
    e = panel(0, w, h, "PPL of the reference answers" if quality == "accuracy" else "PPL of the continuation", "PPL",
              series["ppl"], True, full.get("ppl"))
    e += panel(w, w, h, "accuracy" if quality == "accuracy" else "top-1 agreement with the full cache",
               "accuracy" if quality == "accuracy" else "top-1", series[quality], False,
               full.get("accuracy") if quality == "accuracy" else 1.0)
    lx = 2 * w + 10
    e.append(f'<text x="{lx}" y="18" font-weight="bold">{esc(TESTBED_TITLES.get(res["testbed"], res["testbed"]))}, '
             f'{res["samples"]} samples</text>')
    for k, n in enumerate(names):
        y = 38 + 16 * k
        col, dash = PALETTE[k % len(PALETTE)], DASHES[(k // len(PALETTE)) % len(DASHES)]
        e.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{y - 4}" y2="{y - 4}" stroke="{col}" stroke-width="2"'
                 + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        e.append(f'<text x="{lx + 30}" y="{y}" font-size="11">{esc(n)}</text>')
    y = 38 + 16 * len(names)
    e.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{y - 4}" y2="{y - 4}" stroke="#000" stroke-dasharray="3,3"/>')
    e.append(f'<text x="{lx + 30}" y="{y}" font-size="11">full cache</text>')
    height = max(h, y + 12)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + legend}" height="{height}" '
           f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(e) + "\n</svg>\n")
    with open(args.out, "w") as f:
        f.write(svg)
    print(f"plot: {len(names)} configs -> {args.out}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="several results of one testbed -> one results JSON")
    m.add_argument("inputs", nargs="+", help="results JSON, or FILE=LABEL")
    m.add_argument("--out", required=True)
    m.add_argument("--bootstrap", type=int, default=1000, help="resamples where the first input has none")
    m.add_argument("--seed", type=int, default=20261207, help="seed where the first input has none")
    t = sub.add_parser("tables", help="markdown tables of a (merged) results JSON")
    t.add_argument("merged")
    t.add_argument("--kld", action="store_true", help="a KLD table too")
    p = sub.add_parser("plot", help="PPL and accuracy (text: top-1) against budget, SVG")
    p.add_argument("merged")
    p.add_argument("--out", required=True)
    c = sub.add_parser("check", help="recompute an eval's own comparisons")
    c.add_argument("results")
    a = ap.parse_args()
    if a.cmd == "merge":
        merge(a)
    elif a.cmd == "tables":
        tables(a)
    elif a.cmd == "plot":
        plot(a)
    else:
        sys.exit(check(a))


if __name__ == "__main__":
    main()
