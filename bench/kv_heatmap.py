#!/usr/bin/env python3
"""Heat maps of the KV budgets per layer and KV head, from a `prefixkv eval` results JSON (one eval's,
or bench/grid_tables.py's merged one): one panel per chosen config and budget, a row per layer
(0 at the top), a column per KV head, each cell the entries that head kept after the prefill's
compression (`kv_entries_per_head`, the mean over the samples) and coloured by its ratio to the
uniform share at that budget (the config's mean over all layers and heads: 1 = uniform, blue below,
red above, on a log scale from 1/4 to 4). Python 3 standard library only.

    python3 bench/kv_heatmap.py RESULTS.json --out heatmap.svg [--policies A,B] [--budgets 0.2,0.5] \
        [--config POLICY@BUDGET ...]

The results may be gzipped (a name ending in .gz). Without --policies every config of the file; without --budgets every budget; --config (repeatable)
names single panels instead (POLICY as the policy field, or the whole name as in the tables, with
"/ESTIMATOR" and a merge's " [LABEL]" where the record has them, e.g. "prefixkv/window [cutoff profile]@0.2"). A config that is not in the file is named on stderr and skipped.
"""
import argparse
import gzip
import json
import math
import sys

CELL_W, CELL_H = 30, 16
RATIO_RANGE = 4.0  # the colour scale's ends: 1/4 and 4 times the uniform share


def config_name(rec):  # as bench/grid_tables.py names it, with the label a merge gave it
    return rec["policy"] + ("/" + rec["estimator"] if rec.get("estimator") else "") + rec.get("label", "")


def esc(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#39;"))


def colour(ratio):
    """Diverging: white at 1, blue towards 1/RATIO_RANGE, red towards RATIO_RANGE (log scale)."""
    if not (ratio > 0):
        return "#cccccc"
    t = max(-1.0, min(1.0, math.log(ratio) / math.log(RATIO_RANGE)))
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    a = abs(t)
    r, g, b = (round(255 + (e - 255) * a) for e in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def select(res, policies, budgets, configs):
    recs = res["records"]
    out = []
    if configs:
        for spec in configs:
            name, _, b = spec.rpartition("@")
            hit = [r for r in recs if name in (config_name(r), r["policy"]) and b and abs(r["budget"] - float(b)) < 1e-9]
            if not hit:
                print(f"kv_heatmap: {spec} not in the results", file=sys.stderr)
            out += hit[:1]
        return out
    for p in policies or []:
        if not any(r["policy"] == p or config_name(r) == p for r in recs):
            print(f"kv_heatmap: {p} not in the results", file=sys.stderr)
    for r in recs:
        if policies and r["policy"] not in policies and config_name(r) not in policies:
            continue
        if budgets and not any(abs(r["budget"] - b) < 1e-9 for b in budgets):
            continue
        out.append(r)
    if policies:  # in the order asked for, then by budget
        order = {p: i for i, p in enumerate(policies)}
        out.sort(key=lambda r: (order.get(r["policy"], order.get(config_name(r), 0)), r["budget"]))
    return out


def panel(rec, x0, y0):
    heads = rec.get("kv_entries_per_head") or []
    if not heads or not heads[0]:  # a result from before the per-head counts: the layers' counts
        heads = [[v] for v in rec.get("kv_entries_per_layer") or []]
    layers, nh = len(heads), max((len(h) for h in heads), default=0)
    cells = [v for h in heads for v in h]
    uniform = sum(cells) / len(cells) if cells else float("nan")
    lo, hi = (min(cells), max(cells)) if cells else (0, 0)
    title = f"{config_name(rec)}, {round(100 * rec['budget'])}% kept"
    e = [f'<text x="{x0}" y="{y0 + 12}" font-weight="bold" font-size="12">{esc(title)}</text>',
         f'<text x="{x0}" y="{y0 + 26}" font-size="10">uniform share {uniform:.1f} entries; '
         f'{lo:.0f}-{hi:.0f} ({lo / uniform:.2f}-{hi / uniform:.2f}x)</text>']
    gx, gy = x0 + 28, y0 + 48
    for h in range(nh):
        e.append(f'<text x="{gx + h * CELL_W + CELL_W / 2}" y="{gy - 4}" font-size="9" text-anchor="middle">h{h}</text>')
    for l, row in enumerate(heads):
        y = gy + l * CELL_H
        e.append(f'<text x="{gx - 4}" y="{y + CELL_H - 4}" font-size="9" text-anchor="end">{l}</text>')
        for h, v in enumerate(row):
            ratio = v / uniform if uniform > 0 else float("nan")
            x = gx + h * CELL_W
            e.append(f'<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{colour(ratio)}" '
                     f'stroke="#fff" stroke-width="0.5"><title>layer {l}, KV head {h}: {v:.1f} entries '
                     f'({ratio:.2f}x the uniform share)</title></rect>')
            if CELL_W >= 24:
                dark = abs(math.log(ratio) / math.log(RATIO_RANGE)) > 0.6 if ratio > 0 else False
                e.append(f'<text x="{x + CELL_W / 2}" y="{y + CELL_H - 4}" font-size="8" text-anchor="middle" '
                         f'fill="{"#fff" if dark else "#000"}">{v:.0f}</text>')
    width = max(28 + nh * CELL_W, 7 * len(title)) + 20
    height = 48 + layers * CELL_H + 16
    e.append(f'<text x="{x0}" y="{gy + layers * CELL_H + 12}" font-size="9">rows: layers; columns: KV heads</text>')
    return e, width, height


def legend(x0, y0):
    e = [f'<text x="{x0}" y="{y0 + 10}" font-size="10">entries / uniform share</text>']
    steps = 9
    for i in range(steps):
        t = -1 + 2 * i / (steps - 1)
        ratio = RATIO_RANGE ** t
        e.append(f'<rect x="{x0 + i * 28}" y="{y0 + 16}" width="28" height="12" fill="{colour(ratio)}"/>')
        if i % 2 == 0:
            e.append(f'<text x="{x0 + i * 28 + 14}" y="{y0 + 40}" font-size="9" text-anchor="middle">'
                     f'{ratio:.2g}</text>')
    return e


def render(res, recs, columns):
    parts, sizes = [], []
    for r in recs:
        e, w, h = panel(r, 0, 0)
        parts.append(e)
        sizes.append((w, h))
    colw = max((w for w, _ in sizes), default=200)
    rowh = max((h for _, h in sizes), default=100)
    cols = max(1, min(columns, len(recs)))
    rows = math.ceil(len(recs) / cols) if recs else 0
    top = 30
    body = []
    for k, e in enumerate(parts):
        x, y = 10 + (k % cols) * colw, top + (k // cols) * rowh
        body.append(f'<g transform="translate({x},{y})">' + "".join(e) + "</g>")
    head = f"{res.get('testbed', '')}: KV entries kept per layer and KV head after the prefill ({res.get('samples')} samples)"
    width = max(20 + cols * colw, 320)
    height = top + rows * rowh + 50
    body.append(f'<text x="10" y="18" font-weight="bold" font-size="13">{esc(head)}</text>')
    body += legend(10, top + rows * rowh)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    ap.add_argument("--policies", help="comma-separated policy (or policy/estimator) names")
    ap.add_argument("--budgets", help="comma-separated kept fractions")
    ap.add_argument("--config", action="append", default=[], help="POLICY@BUDGET, repeatable")
    ap.add_argument("--columns", type=int, default=4, help="panels per row (default 4)")
    a = ap.parse_args()
    with (gzip.open(a.results, "rt") if a.results.endswith(".gz") else open(a.results)) as f:
        res = json.load(f)
    policies = [p for p in a.policies.split(",") if p] if a.policies else None
    budgets = [float(b) for b in a.budgets.split(",")] if a.budgets else None
    recs = select(res, policies, budgets, a.config)
    if not recs:
        sys.exit("kv_heatmap: no config selected")
    with open(a.out, "w") as f:
        f.write(render(res, recs, a.columns))
    print(f"kv_heatmap: {len(recs)} panels -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
