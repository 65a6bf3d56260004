#!/usr/bin/env python3
"""Soak and abuse test of `prefixkv serve`, and the timing of its cost-limit refusals. Runs on the
development machine, not in CI (minutes); standard library only. docs/RELIABILITY.md has the numbers.

  python3 scripts/soak_server.py soak  [--binary build-soak/prefixkv] [--requests 10000] [--clients 64]
  python3 scripts/soak_server.py costs [--binary build-soak/prefixkv] [--repeat 5]

soak starts its own server (--port 0) and, in order:
  1. computes the expected greedy answer of every good request kind once with `prefixkv run --json`
     (same prompt, image, policy and max_tokens);
  2. sends one image request and reads the server's VmRSS (/proc/PID/status): the reference level;
  3. opens streams, watches /metrics until they run, disconnects them, and times how long the
     running count and the KV reservation take to return to 0 (a client gone releases its KV);
  4. the load: --requests requests from --clients concurrent clients, --bad-fraction of them bad
     (malformed or truncated JSON, wrong types, a body over --max-body-mb, 100000 nested '[', a PNG
     claiming 100000 x 100000 pixels, truncated and random image data, bad base64, 70-scan JPEGs,
     2049 messages, unknown model, too many tokens), while fault clients run beside them: streams
     dropped midway, slow readers (4 kB receive buffer, 1 kB every 50 ms), slow writers (the request
     in pieces over seconds), writers that stall or hang up mid-body, readers that never read.
     Every good answer must equal `prefixkv run`'s; every bad one must get its status and code. A
     503 is retried after its Retry-After (and counted);
  5. checks /metrics (running, queued, KV reserved and used back to 0) and the VmRSS against step 2
     (within 10%);
  6. SIGTERM with requests running and queued: new connections must be refused, the requests in
     flight must complete with their whole answers, the server must exit 0.
It prints a summary and writes it as JSON (--out). Exit status 1 when a check failed.

costs starts a server and times the refusal of each cost limit (JSON depth and values, messages,
content parts, body size, image pixels by header, JPEG scans, text longer than the context) over
HTTP, the median of --repeat; and, for scale, what `prefixkv run` takes to decode a progressive
JPEG with many scans (what the scan limit refuses). Prints a table; asserts nothing.
"""
import argparse
import base64
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "prefixkv-llava-tiny")


# ---------------------------------------------------------------- images, made with the standard library

def png_bytes(width, height, channels=3, seed=0):
    """An 8-bit RGB (3) or grey (1) PNG of a pattern."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            for c in range(channels):
                row.append((x * 7 + y * 13 + c * 50 + seed * 31) & 0xFF)
        rows.append(bytes(row))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color = 2 if channels == 3 else 0
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def png_header_only(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", crc)


# The standard luminance Huffman tables (JPEG Annex K.3), as DHT payloads.
DC_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
DC_VALS = list(range(12))
AC_BITS = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]
AC_VALS = bytes.fromhex(
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435"
    "363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798"
    "999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4"
    "f5f6f7f8f9fa")


def progressive_jpeg(width, height, scans):
    """A grey progressive JPEG of width x height: a DC scan, then `scans - 1` AC scans (the first one
    repeated). The AC scans carry no data: libjpeg warns and goes on, and each is still a pass over
    every block. What the server's scan limit (--max-jpeg-scans) is for."""
    def seg(marker, payload):
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    out = b"\xff\xd8"
    out += seg(0xDB, bytes([0]) + bytes([1] * 64))                      # DQT: table 0, all ones
    out += seg(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0]))  # SOF2, one component
    out += seg(0xC4, bytes([0x00] + DC_BITS) + bytes(DC_VALS))           # DHT DC 0
    out += seg(0xC4, bytes([0x10] + AC_BITS) + AC_VALS)                  # DHT AC 0
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    # DC first scan: every block "difference 0" (code 00), padded with ones.
    bits = "00" * blocks
    bits += "1" * (-len(bits) % 8)
    data = bytearray()
    for i in range(0, len(bits), 8):
        b = int(bits[i:i + 8], 2)
        data.append(b)
        if b == 0xFF:
            data.append(0)
    out += seg(0xDA, bytes([1, 1, 0x00, 0, 0, 0x00])) + bytes(data)      # Ss=0 Se=0 Ah=0 Al=0
    ac = seg(0xDA, bytes([1, 1, 0x00, 1, 63, 0x00]))                     # Ss=1 Se=63, no data
    out += ac * (scans - 1)
    return out + b"\xff\xd9"


def data_uri(data, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---------------------------------------------------------------- the server process

class Server:
    """`prefixkv serve --port 0` with its log in log_path (bench/serve_load.py uses it too)."""

    def __init__(self, binary, args, log_path, start_timeout=120):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([binary, "serve", "--port", "0", *args], stdout=self.log, stderr=subprocess.STDOUT)
        self.port = None
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", open(log_path).read())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("the server did not start:\n" + open(log_path).read())

    def rss(self):
        """VmRSS, RssAnon, RssFile in bytes."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        m = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                m[k] = float(v)
        return m

    def text_log(self):
        return open(self.log_path).read()

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---------------------------------------------------------------- requests

def chat_body(kind, stream=False):
    content = kind["prompt"]
    if kind.get("image"):
        content = [{"type": "image_url", "image_url": {"url": kind["uri"]}}, {"type": "text", "text": kind["prompt"]}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": kind["max_tokens"], "temperature": 0}
    if kind.get("ignore_eos"):
        body["ignore_eos"] = True
    if kind.get("policy"):
        body["kv_policy"] = kind["policy"]
        body["kv_budget"] = kind["budget"]
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def post(port, body, timeout=300, headers=None):
    """(status, headers dict, body bytes); status 0 with the error when there was no answer."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request("POST", "/v1/chat/completions", body, h)
        r = c.getresponse()
        data = r.read()
        hd = {k.lower(): v for k, v in r.getheaders()}
        c.close()
        return r.status, hd, data
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        return 0, {}, repr(e).encode()


def answer_text(status, data, stream):
    """The answer's text, or None when the body is not a complete answer."""
    if status != 200:
        return None
    try:
        if not stream:
            return json.loads(data)["choices"][0]["message"]["content"]
        text, done = "", False
        for line in data.decode().split("\n"):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return None
            for ch in ev.get("choices", []):
                text += ch.get("delta", {}).get("content", "") or ""
        return text if done else None
    except Exception:  # noqa: BLE001
        return None


def expected_answers(binary, kinds):
    for k in kinds:
        cmd = [binary, "run", "--model", MODEL, "--prompt", k["prompt"], "--max-tokens", str(k["max_tokens"]), "--json"]
        if k.get("image"):
            cmd += ["--image", k["image"]]
        if k.get("policy"):
            cmd += ["--kv-policy", k["policy"], "--kv-budget", str(k["budget"])]
        if k.get("ignore_eos"):
            cmd += ["--ignore-eos"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        k["expected"] = json.loads(out)["text"]


def good_kinds(tmp):
    images = {
        "example.png": (os.path.join(ROOT, "data", "example.png"), "image/png"),
        "tall.jpg": (os.path.join(ROOT, "tests", "data", "images", "tall.jpg"), "image/jpeg"),
    }
    for name, (w, h, ch) in {"made_48x32.png": (48, 32, 3), "made_grey_20x28.png": (20, 28, 1)}.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(png_bytes(w, h, ch, seed=w))
        images[name] = (path, "image/png")
    kinds = []
    for prompt in ["Hello there.", "Tell me about shapes.", "What colour is the sky?", "Count to five."]:
        for n in (4, 8, 12):
            kinds.append({"name": f"text {n}", "prompt": prompt, "max_tokens": n})
    for name, (path, mime) in images.items():
        kinds.append({"name": "image " + name, "prompt": "Describe the image.", "max_tokens": 6, "image": path,
                      "uri": data_uri(open(path, "rb").read(), mime)})
    kinds.append({"name": "snapkv 0.3", "prompt": "Tell me about shapes.", "max_tokens": 8, "policy": "snapkv",
                  "budget": 0.3})
    kinds.append({"name": "streaming 0.5 image", "prompt": "Describe the image.", "max_tokens": 6,
                  "image": images["example.png"][0], "uri": data_uri(open(images["example.png"][0], "rb").read(),
                                                                     "image/png"),
                  "policy": "streaming", "budget": 0.5})
    return kinds


def bad_kinds(max_body_mb):
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    good = json.dumps(hi).encode()

    def with_image(data, mime):
        return json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(data, mime)}}, {"type": "text", "text": "What?"}]}],
            "max_tokens": 2}).encode()

    random_bytes = bytes(random.Random(5).getrandbits(8) for _ in range(3000))
    example = open(os.path.join(ROOT, "data", "example.png"), "rb").read()
    many_msgs = {"messages": [{"role": "user", "content": "x"}] * 2049}
    return [
        ("malformed JSON", b'{"messages": [{"role": "user", "content": "hi"}', 400, "invalid_json"),
        ("truncated JSON", good[: len(good) // 2], 400, "invalid_json"),
        ("wrong type", json.dumps({**hi, "max_tokens": "8"}).encode(), 400, "invalid_type"),
        ("body over the limit", json.dumps({**hi, "user": "a" * ((max_body_mb << 20) + 4096)}).encode(), 413,
         "request_too_large"),
        ("100000 nested [", b"[" * 100000, 400, "json_too_deep"),
        ("PNG claiming 100000x100000", with_image(png_header_only(100000, 100000), "image/png"), 400, "image_too_large"),
        ("truncated PNG", with_image(example[:300], "image/png"), 400, "invalid_image"),
        ("random bytes as image", with_image(random_bytes, "image/png"), 400, "invalid_image"),
        ("JPEG with 70 scans", with_image(progressive_jpeg(64, 64, 70), "image/jpeg"), 400, "invalid_image"),
        ("bad base64", json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}).encode(), 400, "invalid_value"),
        ("2049 messages", json.dumps(many_msgs).encode(), 400, "too_many_messages"),
        ("unknown model", json.dumps({**hi, "model": "gpt-9"}).encode(), 404, "model_not_found"),
        ("too many tokens", json.dumps({**hi, "max_tokens": 100000}).encode(), 400, "context_length_exceeded"),
    ]


# ---------------------------------------------------------------- fault clients (raw sockets)

def raw_connect(port, rcvbuf=None, timeout=60):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def request_bytes(body, extra=""):
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def read_all(s, pace=None):
    """Everything until the server closes; pace = (bytes, seconds) reads slowly."""
    got = bytearray()
    while True:
        try:
            b = s.recv(pace[0] if pace else 65536)
        except (socket.timeout, ConnectionError):
            break
        if not b:
            break
        got += b
        if pace:
            time.sleep(pace[1])
    return bytes(got)


def busy_503(raw):
    """A 503 server_overloaded with its Retry-After header."""
    head = raw.partition(b"\r\n\r\n")[0].lower()
    return raw.startswith(b"HTTP/1.1 503") and b"retry-after: " in head and b"server_overloaded" in raw


def parse_raw(raw):
    """(status, body) of a raw HTTP/1.1 response, the chunked body decoded."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.1 (\d+)", head)
    if not m:
        return 0, b""
    if b"chunked" in head.lower():
        body, i = bytearray(), 0
        while True:
            j = rest.find(b"\r\n", i)
            if j < 0:
                break
            n = int(rest[i:j], 16)
            if n == 0:
                break
            body += rest[j + 2:j + 2 + n]
            i = j + 2 + n + 2
        rest = bytes(body)
    return int(m.group(1)), rest


class Faults:
    """Runs the fault clients in threads until stop(); counts what happened."""

    def __init__(self, port, kinds, max_body_mb):
        self.port, self.kinds, self.max_body_mb = port, kinds, max_body_mb
        self.stats = {}
        self.problems = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = []

    def count(self, what, ok=True, detail="", busy=False):
        """busy: refused with 503 and a Retry-After (the queue was full), a right answer too (these
        clients do not retry: they are here for what they do to the server)."""
        with self.lock:
            s = self.stats.setdefault(what, {"tried": 0, "ok": 0, "busy_503": 0})
            s["tried"] += 1
            s["busy_503"] += 1 if busy else 0
            ok = ok or busy
            s["ok"] += 1 if ok else 0
            if not ok:
                self.problems.append(f"{what}: {detail[:300]}")

    def loop(self, fn, pause):
        rng = random.Random(hash(fn.__name__) & 0xFFFF)
        while not self.stopping.is_set():
            try:
                fn(rng)
            except Exception as e:  # noqa: BLE001
                self.count(fn.__name__, False, repr(e))
            self.stopping.wait(pause)

    def text_kind(self, rng):
        return rng.choice([k for k in self.kinds if not k.get("image") and not k.get("policy")])

    def drop_stream(self, rng):
        """A stream of 400 tokens, dropped after its first pieces."""
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
                           "ignore_eos": True, "stream": True}).encode()
        s = raw_connect(self.port)
        s.sendall(request_bytes(body))
        got = b""
        while got.count(b"data: ") < 3:
            b = s.recv(4096)
            if not b:
                break
            got += b
        if rng.random() < 0.5:  # an abrupt reset instead of a close
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        self.count("drop_stream", got.count(b"data: ") >= 3, got[:200].decode(errors="replace"), busy_503(got))

    def slow_reader(self, rng):
        """A streamed answer read 1 kB every 50 ms through a 4 kB receive buffer."""
        k = self.text_kind(rng)
        s = raw_connect(self.port, rcvbuf=4096)
        s.sendall(request_bytes(chat_body(k, stream=True)))
        status, body = parse_raw(read_all(s, pace=(1024, 0.05)))
        s.close()
        text = answer_text(status, body, True)
        self.count("slow_reader", text == k["expected"], f"{status} {body[:200]!r}", status == 503)

    def slow_writer(self, rng):
        """A good request sent in 6 to 12 pieces, 0.3 to 0.8 s apart (each gap within the server's 5 s
        read timeout): the answer must still be right."""
        k = self.text_kind(rng)
        data = request_bytes(chat_body(k))
        s = raw_connect(self.port)
        pieces = rng.randint(6, 12)
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
            time.sleep(rng.uniform(0.3, 0.8))
        raw = read_all(s)
        s.close()
        status, body = parse_raw(raw)
        self.count("slow_writer", answer_text(status, body, False) == k["expected"], f"{status} {body[:200]!r}",
                   busy_503(raw))

    def stalled_writer(self, rng):
        """Headers and half the body, then nothing: the server must give up (its read timeout) and
        close; then the client closes."""
        k = self.text_kind(rng)
        data = request_bytes(chat_body(k))
        s = raw_connect(self.port, timeout=30)
        s.sendall(data[: len(data) - 20])
        t0 = time.time()
        raw = read_all(s)
        s.close()
        waited = time.time() - t0
        status, _ = parse_raw(raw)
        # httplib answers 400 or just closes; either way within its 5 s read timeout (+ slack).
        self.count("stalled_writer", waited < 15 and status in (0, 400), f"{status} after {waited:.1f} s")

    def hangup_writer(self, rng):
        """Half a body, then the connection closed."""
        k = self.text_kind(rng)
        data = request_bytes(chat_body(k))
        s = raw_connect(self.port)
        s.sendall(data[: len(data) // 2])
        s.close()
        self.count("hangup_writer")

    def stalled_reader(self, rng):
        """A 1000-token stream through a 4 kB receive buffer that is never read: the server's writes
        block, time out (5 s), and the request is cancelled."""
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
                           "ignore_eos": True, "stream": True}).encode()
        s = raw_connect(self.port, rcvbuf=4096)
        s.sendall(request_bytes(body))
        self.stopping.wait(12)
        s.close()
        self.count("stalled_reader")

    def start(self):
        plan = [(self.drop_stream, 0.3, 2), (self.slow_reader, 0.5, 2), (self.slow_writer, 0.5, 2),
                (self.stalled_writer, 1.0, 1), (self.hangup_writer, 0.5, 1), (self.stalled_reader, 1.0, 1)]
        for fn, pause, n in plan:
            for _ in range(n):
                t = threading.Thread(target=self.loop, args=(fn, pause), daemon=True)
                t.start()
                self.threads.append(t)

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(60)


# ---------------------------------------------------------------- soak

def wait_metric(server, pred, timeout=30, step=0.01):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = server.metrics()
        if pred(m):
            return time.time() - t0, m
        time.sleep(step)
    return None, server.metrics()


def soak(a):
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp(prefix="pkv_soak_")
    summary = {"machine": "2-core x86_64 Debian 12 development machine", "checks": {}}
    failures = []

    def check(name, ok, detail=""):
        summary["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"[soak] {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    kinds = good_kinds(tmp)
    t0 = time.time()
    expected_answers(a.binary, kinds)
    print(f"[soak] {len(kinds)} expected answers from `prefixkv run --json` in {time.time() - t0:.1f} s", flush=True)
    more = [{"name": "text 128", "prompt": p, "max_tokens": 128, "ignore_eos": True}
            for p in ("Tell me about shapes.", "Count to five.")]
    expected_answers(a.binary, more)
    bads = bad_kinds(a.max_body_mb)

    server_args = ["--max-body-mb", str(a.max_body_mb), "--max-running", "16", "--max-queue", "64",
                   "--kv-memory", "256", "--shutdown-grace", "60"]
    srv = Server(a.binary, server_args, os.path.join(tmp, "server.log"))
    summary["server"] = " ".join(["prefixkv serve --port 0", *server_args])
    try:
        # 2. The reference level: after the first request (one with an image: every part of the model
        # has run once, its weights are paged in).
        first = kinds[[k["name"] for k in kinds].index("image example.png")]
        st, _, data = post(srv.port, chat_body(first))
        check("first request", answer_text(st, data, False) == first["expected"], f"status {st}")
        time.sleep(1.0)  # the idle trim
        rss_first = srv.rss()
        summary["rss_after_first_request"] = rss_first

        # A second reference: after one burst of --clients concurrent requests (every connection thread
        # and its allocator cache used once), to tell a warm-up from a leak.
        burst = [threading.Thread(target=post, args=(srv.port, chat_body(kinds[i % 12], i % 2 == 0)))
                 for i in range(a.clients)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        time.sleep(2.0)
        rss_warm = srv.rss()
        summary["rss_after_warmup_burst"] = rss_warm

        # 3. Disconnects mid-stream release the KV at once.
        socks = []
        long_stream = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                                  "max_tokens": 1500, "ignore_eos": True, "stream": True}).encode()
        for _ in range(8):
            s = raw_connect(srv.port)
            s.sendall(request_bytes(long_stream))
            socks.append(s)
        took, m = wait_metric(srv, lambda m: m["prefixkv_requests_running"] == 8 and m["prefixkv_kv_used_bytes"] > 0)
        running_before, reserved_before, used_before = (m["prefixkv_requests_running"], m["prefixkv_kv_reserved_bytes"],
                                                        m["prefixkv_kv_used_bytes"])
        t_close = time.time()
        for s in socks:
            s.close()
        released, m = wait_metric(srv, lambda m: m["prefixkv_requests_running"] == 0
                                  and m["prefixkv_kv_reserved_bytes"] == 0 and m["prefixkv_kv_used_bytes"] == 0)
        summary["disconnect"] = {"streams": 8, "running_before": running_before, "kv_reserved_before": reserved_before,
                                 "kv_used_before": used_before,
                                 "released_ms": None if released is None else round(1000 * (time.time() - t_close))}
        check("disconnect releases KV", took is not None and released is not None,
              f"8 streams running ({reserved_before / 2**20:.1f} MiB reserved, {used_before / 2**20:.1f} MiB used); "
              f"all released {summary['disconnect']['released_ms']} ms after the clients closed")

        # 4. The load, with the fault clients beside it.
        n_bad = int(round(a.requests * a.bad_fraction))
        plan = [("bad", bads[i % len(bads)]) for i in range(n_bad)]
        good_pool = [k for k in kinds if not k.get("image")]
        image_pool = [k for k in kinds if k.get("image")]
        for i in range(a.requests - n_bad):
            k = rng.choice(image_pool) if rng.random() < a.image_fraction else rng.choice(good_pool)
            plan.append(("good", (k, rng.random() < 0.3)))
        rng.shuffle(plan)
        results = {"good": 0, "good_equal": 0, "good_wrong": 0, "bad": 0, "bad_right": 0, "bad_wrong": 0,
                   "no_answer": 0, "retried_503": 0, "retry_after_missing": 0}
        by_bad = {}
        wrong = []
        lock = threading.Lock()
        nxt, limit = [0], [len(plan)]

        def client():
            while True:
                with lock:
                    if nxt[0] >= limit[0]:
                        return
                    what, item = plan[nxt[0]]
                    nxt[0] += 1
                if what == "good":
                    k, stream = item
                    for _ in range(50):
                        st, hd, data = post(srv.port, chat_body(k, stream))
                        if st != 503:
                            break
                        with lock:
                            results["retried_503"] += 1
                            if "retry-after" not in hd:
                                results["retry_after_missing"] += 1
                        time.sleep(float(hd.get("retry-after", "1")))
                    text = answer_text(st, data, stream)
                    with lock:
                        results["good"] += 1
                        if st == 0:
                            results["no_answer"] += 1
                        if text == k["expected"]:
                            results["good_equal"] += 1
                        else:
                            results["good_wrong"] += 1
                            wrong.append(f"{k['name']} stream={stream}: {st} {data[:300]!r} expected {k['expected']!r}")
                else:
                    name, body, want_status, want_code = item
                    st, hd, data = post(srv.port, body)
                    try:
                        code = json.loads(data)["error"]["code"]
                    except Exception:  # noqa: BLE001
                        code = None
                    ok = st == want_status and code == want_code
                    with lock:
                        results["bad"] += 1
                        if st == 0:
                            results["no_answer"] += 1
                        results["bad_right" if ok else "bad_wrong"] += 1
                        b = by_bad.setdefault(name, {"sent": 0, "right": 0, "status": want_status, "code": want_code})
                        b["sent"] += 1
                        b["right"] += 1 if ok else 0
                        if not ok:
                            wrong.append(f"bad {name}: {st} {data[:300]!r}")

        # In two halves, each with its fault clients, the server idle between them: a leak shows as
        # growth of the idle anonymous memory from the first half to the second.
        peak = {"running": 0, "queued": 0, "rss": 0}
        rss_series = []  # (seconds, requests sent, VmRSS MiB) every 10 s
        fault_stats, fault_problems, rss_halves = {}, [], []
        t_load = time.time()
        for half in (1, 2):
            limit[0] = len(plan) * half // 2
            faults = Faults(srv.port, kinds, a.max_body_mb)
            faults.start()
            threads = [threading.Thread(target=client) for _ in range(a.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(0.5)
                try:
                    m = srv.metrics()
                    peak["running"] = max(peak["running"], m["prefixkv_requests_running"])
                    peak["queued"] = max(peak["queued"], m["prefixkv_requests_queued"])
                    peak["rss"] = max(peak["rss"], srv.rss()["VmRSS"])
                except Exception:  # noqa: BLE001
                    pass
                with lock:
                    done = nxt[0]
                if not rss_series or time.time() - t_load - rss_series[-1][0] >= 10:
                    try:
                        rss_series.append((round(time.time() - t_load), done, round(srv.rss()["VmRSS"] / 2**20, 1)))
                    except Exception:  # noqa: BLE001
                        pass
                    if len(rss_series) % 3 == 1:
                        print(f"[soak] {done}/{len(plan)} sent, {time.time() - t_load:.0f} s, VmRSS "
                              f"{rss_series[-1][2]} MiB", flush=True)
            for t in threads:
                t.join()
            faults.stop()
            for k, v in faults.stats.items():
                f = fault_stats.setdefault(k, {"tried": 0, "ok": 0, "busy_503": 0})
                for x in f:
                    f[x] += v[x]
            fault_problems += faults.problems
            wait_metric(srv, lambda m: m["prefixkv_requests_running"] == 0 and m["prefixkv_requests_queued"] == 0, 60, 0.1)
            time.sleep(2.0)
            rss_halves.append(srv.rss())
        load_s = time.time() - t_load
        summary["load"] = {"requests": len(plan), "bad": n_bad, "clients": a.clients, "seconds": round(load_s, 1),
                           **results, "bad_kinds": by_bad, "faults": fault_stats, "peak": peak,
                           "rss_series": rss_series, "rss_after_each_half": rss_halves}
        alive = srv.proc.poll() is None
        check("no crash", alive, f"server {'running' if alive else 'ended with ' + str(srv.proc.returncode)}")
        check("every good request answered and equal to `prefixkv run`",
              results["good_equal"] == a.requests - n_bad,
              f"{results['good_equal']}/{a.requests - n_bad} equal, {results['retried_503']} retries after 503 "
              f"({results['retry_after_missing']} without Retry-After); {load_s:.0f} s")
        check("every bad request refused with its status and code", results["bad_right"] == n_bad,
              f"{results['bad_right']}/{n_bad}")
        bad_faults = {k: v for k, v in fault_stats.items() if v["ok"] != v["tried"]}
        check("fault clients", not bad_faults, json.dumps(fault_stats))
        for w in (wrong + fault_problems)[:10]:
            print("   ", w)

        # 5. Back to idle.
        idle, m = wait_metric(srv, lambda m: m["prefixkv_requests_running"] == 0 and m["prefixkv_requests_queued"] == 0
                              and m["prefixkv_kv_reserved_bytes"] == 0 and m["prefixkv_kv_used_bytes"] == 0, 60, 0.1)
        gauges = {k: m[k] for k in ("prefixkv_requests_running", "prefixkv_requests_queued",
                                    "prefixkv_kv_reserved_bytes", "prefixkv_kv_used_bytes")}
        summary["final_gauges"] = gauges
        check("gauges back to 0", idle is not None, json.dumps(gauges))
        time.sleep(2.0)
        rss_end = srv.rss()
        summary["rss_after_load"] = rss_end
        ratio = rss_end["VmRSS"] / rss_first["VmRSS"]
        check("RSS within 10% of its value after the first request", abs(ratio - 1) <= 0.10,
              f"{rss_first['VmRSS'] / 2**20:.1f} MiB after the first request, {rss_end['VmRSS'] / 2**20:.1f} MiB "
              f"after the load ({100 * (ratio - 1):+.1f}%; anonymous {rss_first['RssAnon'] / 2**20:.1f} -> "
              f"{rss_end['RssAnon'] / 2**20:.1f} MiB); peak during the load {peak['rss'] / 2**20:.1f} MiB")
        grow = rss_halves[1]["RssAnon"] - rss_halves[0]["RssAnon"]
        check("no leak: idle anonymous RSS after the second half within 1 MiB of after the first",
              abs(grow) <= 1 << 20,
              f"{rss_halves[0]['RssAnon'] / 2**20:.2f} -> {rss_halves[1]['RssAnon'] / 2**20:.2f} MiB over "
              f"{len(plan) - len(plan) // 2} requests (VmRSS {rss_halves[0]['VmRSS'] / 2**20:.1f} -> "
              f"{rss_halves[1]['VmRSS'] / 2**20:.1f}; after the warm-up burst {rss_warm['VmRSS'] / 2**20:.1f})")
        summary["http_statuses"] = {k: v for k, v in srv.metrics().items() if k.startswith("prefixkv_http_requests_total")}

        # 6. SIGTERM with requests running and queued.
        in_flight = []
        flight_results = [None] * 24
        for i in range(24):
            k = more[i % 2]
            stream = i % 3 == 0

            def go(i=i, k=k, stream=stream):
                st, _, data = post(srv.port, chat_body(k, stream))
                flight_results[i] = (answer_text(st, data, stream) == k["expected"], st)

            t = threading.Thread(target=go)
            t.start()
            in_flight.append(t)
        took, m = wait_metric(srv, lambda m: m["prefixkv_requests_running"] + m["prefixkv_requests_queued"] == 24, 30)
        running, queued = m["prefixkv_requests_running"], m["prefixkv_requests_queued"]
        t_sig = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(500):
            try:
                c = socket.create_connection(("127.0.0.1", srv.port), timeout=2)
                c.close()
            except OSError as e:
                refused = f"{type(e).__name__} {round(1000 * (time.time() - t_sig))} ms after SIGTERM"
                break
            time.sleep(0.005)
        for t in in_flight:
            t.join(120)
        rc = srv.proc.wait(120)
        exit_s = time.time() - t_sig
        completed = sum(1 for r in flight_results if r and r[0])
        summary["sigterm"] = {"in_flight": 24, "running": running, "queued": queued, "refused": refused,
                              "completed_equal": completed, "exit_status": rc, "exit_seconds": round(exit_s, 2)}
        check("SIGTERM: new connections refused", refused is not None, str(refused))
        check("SIGTERM: the requests in flight complete", completed == 24,
              f"{completed}/24 complete and equal to `prefixkv run` ({int(running)} were running, {int(queued)} "
              f"queued); exit status {rc} after {exit_s:.1f} s")
        check("SIGTERM: exit status 0", rc == 0, str(rc))
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        summary["server_log_tail"] = srv.text_log()[-2000:]
    summary["failures"] = failures
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"[soak] {'PASS' if not failures else 'FAIL: ' + ', '.join(failures)}")
    return 0 if not failures else 1


# ---------------------------------------------------------------- costs

def costs(a):
    tmp = tempfile.mkdtemp(prefix="pkv_costs_")
    srv = Server(a.binary, ["--max-body-mb", str(a.max_body_mb)], os.path.join(tmp, "server.log"))
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def with_image(data, mime):
        return json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(data, mime)}}]}], "max_tokens": 2}).encode()

    limit = a.max_body_mb << 20
    fill = limit - 4096
    sof_late = b"\xff\xd8" + (b"\xff\xfe\xff\xff" + b"c" * 65533) * (fill * 3 // 4 // 65537 - 1) \
        + b"\xff\xc0\x00\x0b\x08\x4e\x20\x4e\x20\x01\x01\x11\x00\xff\xd9"
    cases = [
        ("JSON depth: 100000 '['", b"[" * 100000, "json_too_deep"),
        (f"JSON depth: {fill / 2**20:.1f} MiB of '['", b"[" * fill, "json_too_deep"),
        (f"JSON values: {fill / 2**20:.1f} MiB of [0,0,...]", (b'{"a":[' + b"0," * (fill // 2) + b"0]}"),
         "json_too_large"),
        ("messages: 2049", json.dumps({"messages": [{"role": "user", "content": "x"}] * 2049}).encode(),
         "too_many_messages"),
        ("content parts: 2049", json.dumps({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}] * 2049}]}).encode(), "too_many_content_parts"),
        (f"body over the limit: {(limit >> 20) + 1} MiB (limit {limit >> 20})", json.dumps({**hi, "user": "a" * (limit + (1 << 20))}).encode(),
         "request_too_large"),
        ("PNG header 100000x100000", with_image(png_header_only(100000, 100000), "image/png"), "image_too_large"),
        (f"JPEG SOF after {len(sof_late) / 2**20:.1f} MiB of comments, 20000x20000", with_image(sof_late, "image/jpeg"),
         "image_too_large"),
        ("progressive JPEG 4096x4096, 65 scans", with_image(progressive_jpeg(4096, 4096, 65), "image/jpeg"),
         "invalid_image"),
        ("progressive JPEG 4096x4096, 100000 scans", with_image(progressive_jpeg(4096, 4096, 100000), "image/jpeg"),
         "invalid_image"),
        (f"text over the context: {fill / 2**20:.1f} MiB", json.dumps({**hi, "messages": [
            {"role": "user", "content": "red square " * (fill // 12)}]}).encode(), "context_length_exceeded"),
    ]
    rows = []
    try:
        for name, body, code in cases:
            times, got = [], None
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                st, _, data = post(srv.port, body)
                times.append(time.perf_counter() - t0)
                try:
                    got = (st, json.loads(data)["error"]["code"])
                except Exception:  # noqa: BLE001
                    got = (st, data[:80])
            rows.append((name, len(body), got, statistics.median(times)))
            print(f"[costs] {name}: {got} {1000 * statistics.median(times):.1f} ms", flush=True)
        rss = srv.rss()["VmRSS"]
        # A flood of header lines: httplib 0.11.4 (Debian 12's) bounds each line (8 kB) but not their
        # number, and keeps them all; nothing of prefixkv runs before they are read. Measured, not fixed.
        flood = []
        for lines in (100000, 1000000):
            hwm0 = srv.rss()["VmHWM"]
            s = raw_connect(srv.port)
            head = b"".join(b"X-Flood-%d: 1\r\n" % i for i in range(lines))
            body = json.dumps(hi).encode()
            t0 = time.perf_counter()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head
                      + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            status, _ = parse_raw(read_all(s))
            s.close()
            flood.append((lines, len(head), status, time.perf_counter() - t0, srv.rss()["VmHWM"] - hwm0))
            print(f"[costs] header flood {lines} lines: {status}, VmHWM +{flood[-1][4] / 2**20:.1f} MiB", flush=True)
    finally:
        srv.stop()
    # For scale: decoding what the scan limit refuses (`prefixkv run` has no scan limit).
    decode = []
    for scans in (10, 65, 1000):
        path = os.path.join(tmp, f"scans_{scans}.jpg")
        with open(path, "wb") as f:
            f.write(progressive_jpeg(4096, 4096, scans))
        t0 = time.perf_counter()
        r = subprocess.run([a.binary, "run", "--model", MODEL, "--image", path, "--prompt", "x", "--max-tokens", "1"],
                           capture_output=True, text=True)
        decode.append((scans, os.path.getsize(path), r.returncode, time.perf_counter() - t0))
    print()
    print("| refused input | body bytes | status, code | median time (ms) |")
    print("| --- | ---: | --- | ---: |")
    for name, n, got, t in rows:
        print(f"| {name} | {n} | {got[0]} {got[1]} | {1000 * t:.1f} |")
    print(f"\nserver VmRSS after all refusals: {rss / 2**20:.1f} MiB")
    print("\n| header lines in one request (not refused: httplib keeps them all) | header bytes | status | seconds "
          "| server peak RSS growth (MiB) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for lines, n, status, t, grow in flood:
        print(f"| {lines} | {n} | {status} | {t:.2f} | {grow / 2**20:.1f} |")
    print("\n| `prefixkv run` on a 4096x4096 progressive JPEG | file bytes | exit | seconds (decode + 1 token) |")
    print("| --- | ---: | ---: | ---: |")
    for scans, size, rc, t in decode:
        print(f"| {scans} scans | {size} | {rc} | {t:.2f} |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["soak", "costs"])
    ap.add_argument("--binary", default=os.path.join(ROOT, "build-soak", "prefixkv"))
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--bad-fraction", type=float, default=0.1)
    ap.add_argument("--image-fraction", type=float, default=0.02, help="of the good requests")
    ap.add_argument("--max-body-mb", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="write the summary as JSON here")
    a = ap.parse_args()
    if not os.path.exists(a.binary):
        sys.exit(f"soak_server.py: no {a.binary} (build it: ninja -C build-soak prefixkv)")
    return soak(a) if a.mode == "soak" else costs(a)


if __name__ == "__main__":
    sys.exit(main())
