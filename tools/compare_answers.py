#!/usr/bin/env python3
"""Runs the C++ engine (build/prefixkv run, greedy, full cache) on a conversation data set, scores the
answers with the scene checker, and, given transformers' answers (tools/hf_reference_answers.py),
reports how many are identical and shows the ones that differ.

    /usr/bin/python3 tools/compare_answers.py --data data/eval/eval.json --truth data/eval/truth.json \
        [--hf hf_answers.json] [--model models/prefixkv-llava-tiny] [--out answers.json] [--jobs 2]
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenes  # noqa: E402


def run_one(binary, model, base, e, max_tokens):
    human = next(t["value"] for t in e["conversations"] if t["from"] == "human")
    prompt = human.replace("<image>\n", "").replace("<image>", "")
    r = subprocess.run([binary, "run", "--model", model, "--image", os.path.join(base, e["image"]), "--prompt", prompt,
                        "--max-tokens", str(max_tokens), "--json", "--threads", "1"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{e['id']}: {r.stderr.strip()}")
    j = json.loads(r.stdout)
    return {"id": e["id"], "text": j["text"].strip(), "tokens": j["tokens"], "prompt": prompt}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--hf", default="")
    ap.add_argument("--model", default="models/prefixkv-llava-tiny")
    ap.add_argument("--binary", default="build/prefixkv")
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    data = json.load(open(a.data))
    if a.limit:
        data = data[:a.limit]
    truth = json.load(open(a.truth))
    base = os.path.dirname(a.data)
    with cf.ThreadPoolExecutor(a.jobs) as ex:
        ours = list(ex.map(lambda e: run_one(a.binary, a.model, base, e, a.max_tokens), data))
    desc_scores, q_ok, q_n = [], 0, 0
    for o in ours:
        sid = o["id"]
        if "_q" in sid:
            scene_id, k = sid.rsplit("_q", 1)
            t = truth[scene_id]
            q = t["questions"][int(k)]["question"]
            ok = scenes.score_answer(q, o["text"], t)
            o["correct"] = bool(ok)
            q_ok += ok
            q_n += 1
        else:
            s = scenes.score_description(o["text"], truth[sid])
            o["score"] = s
            desc_scores.append(s)
    report = {"samples": len(ours)}
    if desc_scores:
        report["description_accuracy"] = sum(desc_scores) / len(desc_scores)
        report["descriptions_exact"] = sum(1 for s in desc_scores if s == 1.0) / len(desc_scores)
    if q_n:
        report["question_accuracy"] = q_ok / q_n
    if a.hf:
        hf = {x["id"]: x for x in json.load(open(a.hf))["answers"]}
        same, diff = 0, []
        for o in ours:
            h = hf.get(o["id"])
            if h is None:
                continue
            if h["tokens"] == o["tokens"]:
                same += 1
            else:
                n = next((i for i, (x, y) in enumerate(zip(h["tokens"], o["tokens"])) if x != y),
                         min(len(h["tokens"]), len(o["tokens"])))
                diff.append({"id": o["id"], "first_difference_at_token": n, "ours": o["text"], "transformers": h["text"]})
        report["identical_to_transformers"] = same
        report["compared"] = same + len(diff)
        report["identical_rate"] = same / max(1, same + len(diff))
        report["differences"] = diff
    print(json.dumps({k: v for k, v in report.items() if k != "differences"}, indent=1))
    for d in report.get("differences", [])[:10]:
        print(f"\n{d['id']} (first different token {d['first_difference_at_token']}):\n  ours: {d['ours']}\n  hf:   {d['transformers']}")
    if a.out:
        json.dump({"report": report, "answers": ours}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
