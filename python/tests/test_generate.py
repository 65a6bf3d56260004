"""Generation from Python against `prefixkv run --json` on the same inputs: the same tokens, text,
and KV statistics, streamed or not, for every way of giving an image."""
import gc
import struct
import threading
import time
import zlib

import numpy as np
import pytest

import prefixkv
from conftest import IMAGE, MODEL, cli_json

PROMPT = "Describe the image in detail."


def run_args(policy_args=(), **kw):
    args = ["run", "--model", MODEL, "--image", kw.get("image", IMAGE), "--prompt", kw.get("prompt", PROMPT),
            "--max-tokens", kw.get("max_tokens", 48)]
    return args + list(policy_args)


def assert_same_as_cli(out, ref):
    assert out["text"] == ref["text"]
    assert out["tokens"].tolist() == ref["tokens"]
    assert out["prompt_tokens"] == ref["prompt_tokens"]
    assert out["image_tokens"] == ref["image_tokens"]
    assert out["stop_reason"] == ref["stop_reason"]
    for key in ("policy", "budget", "bytes"):
        assert out["kv"][key] == ref["kv"][key], key
    for key in ("prefill_kept_per_layer", "bytes_per_layer", "entries_per_layer"):
        assert out["kv"][key].tolist() == ref["kv"][key], key


@pytest.mark.parametrize("policy_kw, policy_args", [
    ({}, []),
    ({"policy": "prefixkv", "budget": 0.2}, ["--kv-policy", "prefixkv", "--kv-budget", "0.2"]),
    ({"policy": "h2o", "budget_tokens": 40}, ["--kv-policy", "h2o", "--kv-budget-tokens", "40"]),
    ({"policy": "uniform-prefix", "budget": 0.3, "estimator": "paper", "prefix_pool": 0, "protected": 3},
     ["--kv-policy", "uniform-prefix", "--kv-budget", "0.3", "--kv-importance", "paper", "--kv-prefix-pool", "0",
      "--kv-protected", "3"]),
    ({"policy": "snapkv", "budget": 0.25, "window": 8, "decode": "cap"},
     ["--kv-policy", "snapkv", "--kv-budget", "0.25", "--kv-window", "8", "--kv-decode", "cap"]),
])
def test_greedy_equals_cli(model, policy_kw, policy_args):
    out = model.generate(PROMPT, image=IMAGE, max_tokens=48, return_stats=True, **policy_kw)
    assert_same_as_cli(out, cli_json(*run_args(policy_args)))
    assert out["timings"]["prefill_ms"] > 0


def test_f16_kv_cache_equals_cli():
    # kv_dtype="f16": the KV cache in 16 bits, as `prefixkv run --kv-dtype f16` keeps it: the same
    # tokens and statistics as the program, half the float32 cache's bytes.
    m16 = prefixkv.Model(MODEL, kv_dtype="f16")
    assert m16.device == "cpu, f16 KV cache"
    out = m16.generate(PROMPT, image=IMAGE, max_tokens=48, return_stats=True)
    assert_same_as_cli(out, cli_json(*run_args(["--kv-dtype", "f16"])))
    assert out["kv"]["bytes"] * 2 == cli_json(*run_args())["kv"]["bytes"]


def test_sampling_and_stop_equal_cli(model):
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    out = model.generate(PROMPT, image=IMAGE, max_tokens=40, return_stats=True, **kw)
    ref = cli_json(*run_args(["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7"],
                             max_tokens=40))
    assert_same_as_cli(out, ref)
    # A stop string cuts the answer where the program cuts it.
    full = model.generate(PROMPT, image=IMAGE, max_tokens=48)
    stop = full.split()[3]
    out = model.generate(PROMPT, image=IMAGE, max_tokens=48, stop=[stop], return_stats=True)
    assert_same_as_cli(out, cli_json(*run_args(["--stop", stop])))
    assert out["stop_reason"] == "stop" and stop not in out["text"]


def test_text_only_prompt_equals_cli(model):
    out = model.generate("The color of the sky is", template="raw", max_tokens=12, return_stats=True)
    ref = cli_json("run", "--model", MODEL, "--prompt", "The color of the sky is", "--template", "raw",
                   "--max-tokens", 12)
    assert_same_as_cli(out, ref)


def test_stream_gives_the_same_answer(model):
    ref = model.generate(PROMPT, image=IMAGE, policy="prefixkv", budget=0.2, max_tokens=48, return_stats=True)
    stream = model.generate(PROMPT, image=IMAGE, policy="prefixkv", budget=0.2, max_tokens=48, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == ref["text"]
    assert stream.result["tokens"].tolist() == ref["tokens"].tolist()
    assert stream.result["kv"]["entries_per_layer"].tolist() == ref["kv"]["entries_per_layer"].tolist()
    assert list(stream) == []  # ended


def test_stream_stopped_early_frees_and_leaves_no_thread(model):
    threads = threading.active_count()
    for _ in range(3):
        stream = model.generate(PROMPT, image=IMAGE, max_tokens=200, stream=True)
        first = next(stream)
        assert first
        del stream
    gc.collect()
    closed = model.generate(PROMPT, image=IMAGE, max_tokens=200, stream=True)
    next(closed)
    closed.close()
    with pytest.raises(StopIteration):
        next(closed)
    assert closed.result is None
    assert threading.active_count() == threads
    # The model still answers as before.
    assert model.generate(PROMPT, image=IMAGE, max_tokens=16) == model.generate(PROMPT, image=IMAGE, max_tokens=16)


def png_bytes(rgb):
    """A PNG file of an 8-bit RGB array (no filter, zlib), written by hand: no imaging library needed."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_images_as_path_bytes_and_array(model, tmp_path):
    rng = np.random.default_rng(3)
    rgb = np.zeros((40, 56, 3), np.uint8)
    rgb[:, :] = (200, 220, 250)
    rgb[8:24, 10:30] = (220, 30, 40)
    rgb += rng.integers(0, 8, rgb.shape, dtype=np.uint8)
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(rgb))
    ref = cli_json(*run_args(image=path, max_tokens=24))
    for image in (path, str(path), path.read_bytes(), rgb, np.asfortranarray(rgb)):
        out = model.generate(PROMPT, image=image, max_tokens=24, return_stats=True)
        assert_same_as_cli(out, ref)
    with open(IMAGE, "rb") as f:
        assert model.generate(PROMPT, image=f.read(), max_tokens=24) == model.generate(PROMPT, image=IMAGE,
                                                                                      max_tokens=24)


def test_the_gil_is_released_during_generation(model):
    # Another Python thread ticks every millisecond while a generation runs. Were the GIL held for the
    # call, no tick could happen inside it: the longest gap between ticks would be at least the
    # call's own duration (its prefill + decode time). It must stay far below that.
    done = threading.Event()
    result = {}

    def work():
        result["out"] = model.generate(PROMPT, image=IMAGE, max_tokens=160, ignore_eos=True, return_stats=True)
        done.set()
    ticks = []
    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.monotonic())
        time.sleep(0.001)
    worker.join()
    t = result["out"]["timings"]
    engine_s = (t["prefill_ms"] + t["decode_ms"]) / 1000
    gaps = np.diff(ticks)
    assert engine_s > 0.2, "the generation is too short to tell"
    assert len(ticks) > 20
    assert gaps.max() < engine_s / 2, (gaps.max(), engine_s)
