#!/usr/bin/env python3
"""`prefixkv serve` under load: many concurrent streaming clients, prompts of mixed lengths with
images, one server per KV setting. Measures throughput (generated tokens per second of wall time),
time to first token and inter-token latency (p50, p99), and the largest number of requests running
and queued at once (the server's /metrics, polled). Standard library only; prints a table, writes
JSON (--out); asserts nothing.

  python3 bench/serve_load.py --binary build-gpu/prefixkv --model DIR --clients 64 --requests 256 \
      --settings full snapkv:0.2 prefixkv-online:0.2 --server-args "--device cuda --dtype f16 --max-running 64" \
      --out serve_load.json

Each client sends its requests one after another (a new one when the last ended) until --requests
have been sent in all. A request: one of the --images (PNG/JPEG, sent as base64 data URLs) and a
prompt drawn from PROMPTS, with extra sentences appended so the text part varies from a few to
~--max-extra tokens, `max_tokens` drawn from --gen (min,max), greedy, `ignore_eos` so every request
generates its drawn length (random weights would otherwise stop at random), streamed with usage.
The draw is seeded (--seed): every setting gets the same requests in the same order.

TTFT: from sending the request to the first streamed content. Inter-token latency: the gaps
between consecutive streamed chunks that carry content, pooled over all requests (a chunk may hold
more than one token where the detokeniser held a piece back; the tokens counted are the usage's).
"""
import argparse
import base64
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from soak_server import Server  # noqa: E402 - `prefixkv serve --port 0`, its port and /metrics

PROMPTS = [
    "Describe the image in detail.",
    "What is in the picture?",
    "How many objects are there, and what colours are they?",
    "Is there anything in the top left corner?",
    "List every shape you can see and where it is.",
]
FILLER = ("The answer should be careful and complete. Mention sizes, colours and positions. "
          "Say which cells of the grid are empty. ")


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def make_requests(a, images):
    rng = random.Random(a.seed)
    lo, hi = (int(x) for x in a.gen.split(","))
    reqs = []
    for _ in range(a.requests):
        extra = FILLER * rng.randint(0, a.max_extra // 24)  # FILLER is ~24 tokens
        reqs.append({"image": rng.randrange(len(images)), "prompt": rng.choice(PROMPTS) + " " + extra.strip(),
                     "max_tokens": rng.randint(lo, hi)})
    return reqs


def one_request(port, body):
    """(status, ttft_s, chunk gaps [s], completion tokens, total s, error)"""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return r.status, None, [], 0, time.perf_counter() - t0, r.read()[:300].decode(errors="replace")
        first, last, gaps, tokens, done = None, None, [], 0, False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            if "error" in ev:
                return 200, None, [], 0, time.perf_counter() - t0, json.dumps(ev["error"])[:300]
            if ev.get("usage"):
                tokens = ev["usage"].get("completion_tokens", tokens)
            if any((ch.get("delta") or {}).get("content") for ch in ev.get("choices", [])):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
        if not done:
            return 200, None, [], 0, time.perf_counter() - t0, "stream ended without [DONE]"
        return 200, (first - t0) if first else None, gaps, tokens, time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001 - a failed request is a result here
        return 0, None, [], 0, time.perf_counter() - t0, repr(e)[:300]
    finally:
        c.close()


def run_setting(a, setting, reqs, images):
    policy, _, budget = setting.partition(":")
    log = os.path.join(a.workdir, f"serve_{policy}_{budget or 'full'}.log")
    args = ["--model", a.model, *a.server_args.split()]
    srv = Server(a.binary, args, log, start_timeout=600)  # a 7B checkpoint loads in minutes from a cold disk
    try:
        # one warm-up request (first-use costs: CUDA graphs, allocations) outside the measurement
        one_request(srv.port, body_of(a, reqs[0], images, policy, budget))
        results = [None] * len(reqs)
        nxt = [0]
        lock = threading.Lock()
        peak = {"running": 0, "queued": 0, "kv_used": 0}
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                try:
                    m = srv.metrics()
                    peak["running"] = max(peak["running"], int(m.get("prefixkv_requests_running", 0)))
                    peak["queued"] = max(peak["queued"], int(m.get("prefixkv_requests_queued", 0)))
                    peak["kv_used"] = max(peak["kv_used"], int(m.get("prefixkv_kv_used_bytes", 0)))
                except Exception:  # noqa: BLE001 - a missed poll only loses a sample
                    pass
                stop.wait(0.05)

        def client():
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(reqs):
                    return
                results[i] = one_request(srv.port, body_of(a, reqs[i], images, policy, budget))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        poller.join()
    finally:
        srv.stop()
    ok = [r for r in results if r[0] == 200 and r[5] is None]
    bad = [r for r in results if not (r[0] == 200 and r[5] is None)]
    ttft = [r[1] for r in ok if r[1] is not None]
    gaps = [g for r in ok for g in r[2]]
    tokens = sum(r[3] for r in ok)
    out = {
        "setting": setting, "policy": policy, "budget": float(budget) if budget else 1.0,
        "requests": len(reqs), "completed": len(ok), "failed": len(bad),
        "failures": sorted({f"{r[0]}: {r[5]}" for r in bad})[:5],
        "clients": a.clients, "wall_s": wall, "generated_tokens": tokens,
        "throughput_tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50_ms": 1e3 * pct(ttft, 50) if ttft else None, "ttft_p99_ms": 1e3 * pct(ttft, 99) if ttft else None,
        "itl_p50_ms": 1e3 * pct(gaps, 50) if gaps else None, "itl_p99_ms": 1e3 * pct(gaps, 99) if gaps else None,
        "itl_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else None,
        "max_running": peak["running"], "max_queued": peak["queued"], "max_kv_used_bytes": peak["kv_used"],
        "server_log": os.path.basename(log),
    }
    return out


def body_of(a, req, images, policy, budget):
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": images[req["image"]]}},
        {"type": "text", "text": req["prompt"]}]}],
        "max_tokens": req["max_tokens"], "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}, "kv_policy": policy}
    if budget:
        body["kv_budget"] = float(budget)
    return body


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="build/prefixkv")
    ap.add_argument("--model", default="models/prefixkv-llava-tiny")
    ap.add_argument("--server-args", default="", help="more `prefixkv serve` options, one string")
    ap.add_argument("--images", nargs="+", default=["data/example.png"])
    ap.add_argument("--settings", nargs="+", default=["full", "snapkv:0.2"], help="POLICY[:BUDGET] ...")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--gen", default="32,256", help="max_tokens drawn uniformly from MIN,MAX")
    ap.add_argument("--max-extra", type=int, default=200, help="most filler tokens appended to a prompt")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    images = []
    for p in a.images:
        kind = "jpeg" if p.lower().endswith((".jpg", ".jpeg")) else "png"
        images.append(f"data:image/{kind};base64," + base64.b64encode(open(p, "rb").read()).decode())
    reqs = make_requests(a, images)
    rows = []
    for s in a.settings:
        r = run_setting(a, s, reqs, images)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| setting | clients | requests ok / failed | throughput tok/s | req/s | TTFT p50 / p99 ms | "
          "ITL p50 / p99 ms | max running / queued | max KV used MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        print(f"| {r['setting']} | {r['clients']} | {r['completed']} / {r['failed']} | {f(r['throughput_tokens_per_s'])} | "
              f"{f(r['requests_per_s'], 2)} | {f(r['ttft_p50_ms'], 0)} / {f(r['ttft_p99_ms'], 0)} | "
              f"{f(r['itl_p50_ms'], 1)} / {f(r['itl_p99_ms'], 1)} | {r['max_running']} / {r['max_queued']} | "
              f"{r['max_kv_used_bytes'] / 2**20:.0f} |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"settings": rows, "args": vars(a)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
