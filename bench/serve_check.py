#!/usr/bin/env python3
"""Sends chat completions to a running `prefixkv serve` and compares each greedy answer with the
answer `prefixkv run` gave for the same image, prompt, policy and max_tokens (the JSON of `prefixkv
run --json`). Used by bench/gpu_machine_perf.sh's serve phase; standard library only.

  python3 bench/serve_check.py --port N --image data/example.png --max-tokens 48 \
      full=run_full.json snapkv:0.5=run_snapkv.json ...

Sends all requests at once (one thread each, so the server batches them) and prints one line per
request; exits 1 when an answer differs or a request fails."""
import argparse, base64, json, sys, threading, time, urllib.request


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Describe the image in detail.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("cases", nargs="+", help="POLICY[:BUDGET]=RUN_JSON")
    a = ap.parse_args()
    url = f"data:image/png;base64,{base64.b64encode(open(a.image, 'rb').read()).decode()}"
    results, threads = {}, []

    def send(i, policy, budget):
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": a.prompt}]}],
                "max_tokens": a.max_tokens, "temperature": 0, "kv_policy": policy}
        if budget is not None:
            body["kv_budget"] = budget
        req = urllib.request.Request(f"http://127.0.0.1:{a.port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.time()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                results[i] = (json.load(r), time.time() - t0)
        except Exception as e:  # noqa: BLE001 - reported per request
            results[i] = (e, time.time() - t0)

    cases = []
    for c in a.cases:
        spec, path = c.split("=", 1)
        policy, _, budget = spec.partition(":")
        cases.append((policy, float(budget) if budget else None, json.load(open(path))))
    for i, (policy, budget, _) in enumerate(cases):
        threads.append(threading.Thread(target=send, args=(i, policy, budget)))
        threads[-1].start()
    for t in threads:
        t.join()
    bad = 0
    for i, (policy, budget, ref) in enumerate(cases):
        got, secs = results[i]
        if isinstance(got, Exception):
            print(f"serve_check: {policy} {budget}: request failed: {got}")
            bad += 1
            continue
        text = got["choices"][0]["message"]["content"]
        same = text == ref["text"]
        bad += 0 if same else 1
        print(f"serve_check: {policy} {budget if budget is not None else ''}: {got['usage']['completion_tokens']} tokens "
              f"in {secs:.2f} s, same as prefixkv run: {'yes' if same else 'NO'}")
        if not same:
            print(f"  serve: {text!r}\n  run:   {ref['text']!r}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
