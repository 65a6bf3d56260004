"""Bad input is a prefixkv.Error (a ValueError) carrying the engine's message, naming what was wrong."""
import numpy as np
import pytest

import prefixkv
from conftest import IMAGE, MODEL, ROOT


def raises(match):
    return pytest.raises(prefixkv.Error, match=match)


def test_error_is_a_value_error():
    assert issubclass(prefixkv.Error, ValueError)


def test_model_errors(tmp_path):
    with raises("config.json"):
        prefixkv.Model(tmp_path)
    with raises("--device: must be cpu or cuda, got 'tpu'"):
        prefixkv.Model(MODEL, device="tpu")
    with raises("--gpu-dtype: only applies with --device cuda"):
        prefixkv.Model(MODEL, gpu_dtype="f16")
    with raises("kv_memory_mb: only applies with device='cuda'"):
        prefixkv.Model(MODEL, kv_memory_mb=64)
    with raises("--kv-dtype: must be f32, f16 or bf16, got 'f8'"):
        prefixkv.Model(MODEL, kv_dtype="f8")


def test_cuda_device_says_what_is_missing():
    # A build without the CUDA back end says so; one with it runs on the GPU or says that there is none.
    if not prefixkv.have_cuda():
        with raises("--device cuda: this prefixkv was built without the CUDA back end"):
            prefixkv.Model(MODEL, device="cuda")
        return
    try:
        assert prefixkv.Model(MODEL, device="cuda", kv_memory_mb=64).device.startswith("cuda")
    except prefixkv.Error as e:
        assert "no CUDA device is available" in str(e)


@pytest.mark.parametrize("kw, match", [
    ({"policy": "lru"}, "unknown policy 'lru' \\(available: full, streaming"),
    ({"policy": "h2o", "budget": 1.5}, "--kv-budget: must be in \\(0, 1\\]"),
    ({"policy": "h2o", "budget": 0.2, "budget_tokens": 10}, "budget_tokens: give either budget or budget_tokens"),
    ({"policy": "uniform-prefix", "estimator": "psychic"}, "unknown estimator 'psychic'"),
    ({"policy": "uniform-prefix", "estimator": "answer"}, "--kv-importance answer: ranks by the reference answer"),
    ({"policy": "snapkv", "window": 0}, "--kv-window: must be at least 1"),
    ({"decode": "sometimes"}, "decode: must be proportional or cap, got 'sometimes'"),
    ({"prefix_pool": -1}, "prefix_pool: must not be negative"),
    ({"policy": "prefixkv", "profile": "/nonexistent/profile.json"}, "/nonexistent/profile.json"),
    ({"policy": "prefixkv", "profile": 3}, "profile: must be a path or a prefixkv.Profile, got int"),
    ({"max_tokens": 0}, "max_tokens: must be at least 1"),
    ({"temperature": -1.0}, "temperature: must not be negative"),
    ({"top_p": 0.0}, "top_p: must be in \\(0, 1\\]"),
    ({"template": "chatml"}, "template: must be llava or raw, got 'chatml'"),
    ({"image_mode": "stretch"}, "image_mode: must be pad or crop"),
    ({"image": "/nonexistent.png"}, "/nonexistent.png"),
    ({"image": b"not an image"}, "image bytes"),
    ({"image": np.zeros((4, 4), np.uint8)}, "uint8 of shape \\[height, width, 3\\].*\\[4, 4\\]"),
    ({"image": np.zeros((4, 4, 3), np.float32)}, "got float32"),
    ({"image": 42}, "image: must be a path, PNG/JPEG bytes or a uint8 array"),
])
def test_generate_errors(model, kw, match):
    kw = {"image": IMAGE, **kw}
    for stream in (False, True):
        with raises(match):
            model.generate("Describe the image.", stream=stream, **kw)


def test_prompt_required_without_image(model):
    with raises("prompt: is required when no image is given"):
        model.generate()


def test_calibrate_and_evaluate_errors(model, tmp_path):
    with raises("nonexistent.json"):
        prefixkv.calibrate(model, tmp_path / "nonexistent.json")
    with raises("budgets: 2.000000 is not a budget"):
        prefixkv.calibrate(model, ROOT / "data" / "calib" / "calib.json", budgets=[0.2, 2])
    with raises("allocate_from: must be prompt or answer"):
        prefixkv.calibrate(model, ROOT / "data" / "calib" / "calib.json", allocate_from="question")
    with raises("unknown policy 'lru'"):
        prefixkv.evaluate(model, ROOT / "data" / "eval" / "eval.json", policies=["lru"])
    with raises("policies: nothing to evaluate"):
        prefixkv.evaluate(model, ROOT / "data" / "eval" / "eval.json", policies=["full"])
    with raises("needs a profile: none at /nonexistent"):
        prefixkv.evaluate(model, ROOT / "data" / "eval" / "eval.json", policies=["prefixkv"], profile="/nonexistent")


def test_an_error_leaves_the_model_usable(model):
    with raises("unknown policy"):
        model.generate("hi", policy="lru")
    assert model.generate("hi", template="raw", max_tokens=4)
