#!/usr/bin/env python3
"""Tests of bench/grid_tables.py and bench/kv_heatmap.py on a committed results file
(docs/results/alloc/bootstrap_20_90.json: 40 scenes, every baseline and the capped cutoff at 20% and
90% kept, with eval's own bootstrap). Standard library only:

    python3 bench/test_grid_tables.py
"""
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
import xml.dom.minidom

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import grid_tables  # noqa: E402

RESULTS = os.path.join(ROOT, "docs/results/alloc/bootstrap_20_90.json")
CUTOFF = "cutoff:wov2:floor=0.5:cap=1.5"


def key(rec):
    return (rec["policy"], rec["budget"])


class GridTables(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(RESULTS) as f:
            cls.res = json.load(f)
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def write(self, name, res):
        with open(self.path(name), "w") as f:
            json.dump(res, f)
        return self.path(name)

    def split(self):
        """The baselines in one file, the cutoff (without its comparisons) in another."""
        a, b = copy.deepcopy(self.res), copy.deepcopy(self.res)
        a["records"] = [r for r in a["records"] if r["policy"] != CUTOFF]
        b["records"] = [r for r in b["records"] if r["policy"] == CUTOFF]
        for r in b["records"]:
            r.pop("vs_best_baseline")
        return a, b

    def merge(self, out, *inputs):
        args = type("A", (), {"inputs": list(inputs), "out": out, "bootstrap": 1000, "seed": 1})
        with contextlib.redirect_stderr(io.StringIO()):
            grid_tables.merge(args)
        return grid_tables.load(out)

    def test_resamples_are_evals(self):
        bs = self.res["bootstrap"]
        comps = grid_tables.compare_all(self.res, bs["resamples"], bs["seed"])
        count = 0
        for rec in self.res["records"]:
            for m, c in comps[id(rec)].items():
                own = rec["vs_best_baseline"][m]
                self.assertEqual(own["against"], c["against"])
                self.assertEqual(own["verdict"], c["verdict"])
                self.assertEqual(own.get("meets_goal"), c.get("meets_goal"))
                self.assertAlmostEqual(own["ci"][0], c["ci"][0], delta=1e-12 * max(1, abs(own["ci"][0])))
                self.assertAlmostEqual(own["ci"][1], c["ci"][1], delta=1e-12 * max(1, abs(own["ci"][1])))
                count += 1
        self.assertEqual(count, 70)  # 14 records x 5 metrics

    def test_merge_recomputes_the_verdicts_across_files(self):
        a, b = self.split()
        merged = self.merge(self.path("m.json.gz"), self.write("a.json", a), self.write("b.json", b))
        want = {key(r): r["vs_best_baseline"] for r in self.res["records"]}
        self.assertEqual(len(merged["records"]), len(self.res["records"]))
        for r in merged["records"]:
            for m, c in r["vs_best_baseline"].items():
                self.assertEqual(c["verdict"], want[key(r)][m]["verdict"], (key(r), m))
                self.assertAlmostEqual(c["diff"], want[key(r)][m]["diff"], delta=1e-12)
        cut = {r["budget"]: r for r in merged["records"] if r["policy"] == CUTOFF}
        self.assertTrue(cut[0.2]["vs_best_baseline"]["ppl"]["meets_goal"])
        self.assertFalse(cut[0.9]["vs_best_baseline"]["ppl"]["meets_goal"])

    def test_labels_name_the_profile_and_the_device_kind(self):
        a, b = self.split()
        b["device"] = "cuda F16 (NVIDIA H100 80GB HBM3)"
        merged = self.merge(self.path("l.json"), self.write("a.json", a), self.write("b.json", b) + "=cutoff profile")
        names = {grid_tables.config_name(r) for r in merged["records"]}
        self.assertIn(CUTOFF + "/window [cutoff profile] [cuda]", names)
        self.assertIn("snapkv", names)  # baselines keep their names

    def test_other_samples_are_refused(self):
        a, b = self.split()
        b["per_sample"] = dict(b["per_sample"], ids=b["per_sample"]["ids"][::-1])
        with self.assertRaises(SystemExit):
            self.merge(self.path("x.json"), self.write("a.json", a), self.write("b.json", b))

    def test_tables_and_plot(self):
        a, b = self.split()
        out = self.path("t.json")
        self.merge(out, self.write("a.json", a), self.write("b.json", b))
        text = subprocess.run([sys.executable, os.path.join(HERE, "grid_tables.py"), "tables", "--kld", out],
                              check=True, capture_output=True, text=True).stdout
        self.assertIn("| " + CUTOFF + "/window | better -0.36 / better +24.2: **met** | tied", text)
        self.assertIn("| *best uniform-budget baseline* | adakv 2.368 | uniform-prefix/window 1.0844 |", text)
        self.assertIn("2.009 [1.902, 2.117]", text)
        svg = self.path("p.svg")
        subprocess.run([sys.executable, os.path.join(HERE, "grid_tables.py"), "plot", out, "--out", svg],
                       check=True, capture_output=True)
        doc = xml.dom.minidom.parse(svg)
        self.assertEqual(len(doc.getElementsByTagName("polyline")), 2 * 7)  # two panels, 7 configs

    def test_gap_ratio(self):
        res = copy.deepcopy(self.res)
        at20 = {r["policy"]: r for r in res["records"] if r["budget"] == 0.2}
        twin = copy.deepcopy(at20["adakv"])  # the best baseline's own numbers under another name: exactly 1
        twin["policy"] = "adakv-twin"
        res["records"].append(twin)
        names = grid_tables.ordered_configs(res)
        by = {(grid_tables.config_name(r), r["budget"]): r for r in res["records"]}
        rows = grid_tables.gap_ratio_table(res, names, [0.2], by, "| config | 20% |", "|---|---|")
        full = res["full"]["ppl"]
        want = (at20[CUTOFF]["ppl"] - full) / (at20["adakv"]["ppl"] - full)
        cut = next(r for r in rows if r.startswith("| " + CUTOFF))
        point, lo, hi = (float(x) for x in cut.split("|")[2].replace("[", "").replace("]", "").replace(",", "").split())
        self.assertAlmostEqual(point, want, places=3)
        self.assertTrue(lo < point < hi)
        self.assertIn("| adakv-twin | 1.000 [1.000, 1.000] |", rows)
        self.assertFalse(any(r.startswith("| adakv |") for r in rows))  # baselines have no row

    def test_heatmap(self):
        svg = self.path("h.svg")
        subprocess.run([sys.executable, os.path.join(HERE, "kv_heatmap.py"), RESULTS, "--out", svg,
                        "--policies", "adakv," + CUTOFF, "--budgets", "0.2"], check=True, capture_output=True)
        doc = xml.dom.minidom.parse(svg)
        cells = [r for r in doc.getElementsByTagName("rect") if r.getElementsByTagName("title")]
        self.assertEqual(len(cells), 2 * 12 * 4)  # 2 panels, 12 layers x 4 KV heads
        titles = [c.getElementsByTagName("title")[0].firstChild.data for c in cells]
        adakv = next(r for r in self.res["records"] if r["policy"] == "adakv" and r["budget"] == 0.2)
        self.assertIn("layer 0, KV head 1: %.1f entries" % adakv["kv_entries_per_head"][0][1], titles[1])


if __name__ == "__main__":
    unittest.main()
