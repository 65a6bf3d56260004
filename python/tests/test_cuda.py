"""device="cuda" against the prefixkv program on the GPU: the same tokens. Runs only in a build with
the CUDA back end, on a machine with a GPU (a CPU-only build has no device to compare)."""
import numpy as np
import pytest

import prefixkv
from conftest import IMAGE, MODEL, cli, cli_json
from test_analysis import CALIB, first_sample
from test_generate import PROMPT, assert_same_as_cli

pytestmark = pytest.mark.skipif(not prefixkv.have_cuda(), reason="this build has no CUDA back end")


@pytest.fixture(scope="module")
def gpu_model():
    return prefixkv.Model(MODEL, device="cuda", kv_memory_mb=256)


@pytest.mark.parametrize("policy_kw, policy_args", [
    ({}, []),
    ({"policy": "prefixkv", "budget": 0.2}, ["--kv-policy", "prefixkv", "--kv-budget", "0.2"]),
    ({"policy": "elastic", "budget": 0.3}, ["--kv-policy", "elastic", "--kv-budget", "0.3"]),
])
def test_cuda_generation_equals_cli(gpu_model, policy_kw, policy_args):
    assert gpu_model.device.startswith("cuda")
    out = gpu_model.generate(PROMPT, image=IMAGE, max_tokens=40, return_stats=True, **policy_kw)
    ref = cli_json("run", "--device", "cuda", "--model", MODEL, "--image", IMAGE, "--prompt", PROMPT,
                   "--max-tokens", 40, *policy_args)
    assert_same_as_cli(out, ref)
    streamed = "".join(gpu_model.generate(PROMPT, image=IMAGE, max_tokens=40, stream=True, **policy_kw))
    assert streamed == out["text"]


def test_cuda_importance_equals_calibrates_dump(gpu_model, tmp_path):
    sid, image, prompt = first_sample(CALIB)
    imp = gpu_model.importance(prompt, image=image)
    cli("calibrate", "--device", "cuda", "--model", MODEL, "--data", CALIB, "--samples", 1, "--budgets", "0.5",
        "--dump-importance", tmp_path, "--out", tmp_path / "p.json")
    np.testing.assert_array_equal(imp, np.load(tmp_path / f"{sid}.npy"))
