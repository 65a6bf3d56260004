"""importance, calibrate and evaluate from Python against the prefixkv program's own outputs."""
import json

import numpy as np
import pytest

import prefixkv
from conftest import MODEL, ROOT, cli

CALIB = ROOT / "data" / "calib" / "calib.json"
EVAL = ROOT / "data" / "eval" / "eval.json"


def first_sample(path):
    s = json.loads(path.read_text())[0]
    prompt = s["conversations"][0]["value"].replace("<image>\n", "")
    return s["id"], path.parent / s["image"], prompt


@pytest.mark.parametrize("estimator, window", [("window", 32), ("paper", 32), ("normalized", 32), ("window", 5)])
def test_importance_equals_calibrates_dump(model, tmp_path, estimator, window):
    sid, image, prompt = first_sample(CALIB)
    imp = model.importance(prompt, image=image, estimator=estimator, window=window)
    cli("calibrate", "--model", MODEL, "--data", CALIB, "--samples", 1, "--budgets", "0.5",
        "--kv-importance", estimator, "--kv-window", window, "--dump-importance", tmp_path, "--out",
        tmp_path / "p.json")
    ref = np.load(tmp_path / f"{sid}.npy")
    assert imp.dtype == np.float32 and imp.shape == ref.shape
    assert imp.shape[0] == model.n_layers and imp.shape[1] > model.image_tokens
    np.testing.assert_array_equal(imp, ref)


def without_date(profile_json):
    d = json.loads(profile_json)
    d["source"].pop("date")
    return d


@pytest.mark.parametrize("kw, args", [
    ({}, []),
    ({"estimator": "paper", "allocate_from": "answer", "protected": 3},
     ["--kv-importance", "paper", "--allocate-from", "answer", "--kv-protected", "3"]),
    ({"allocate_by": "cutoff:wov2:floor=0.5:cap=1.5"}, ["--allocate-by", "cutoff:wov2:floor=0.5:cap=1.5"]),
    ({"heads": True}, ["--heads"]),
])
def test_calibrate_equals_cli(model, tmp_path, kw, args):
    prof = prefixkv.calibrate(model, CALIB, samples=3, budgets=[0.5, 0.2], **kw)
    out = tmp_path / "profile.json"
    cli("calibrate", "--model", MODEL, "--data", CALIB, "--samples", 3, "--budgets", "0.2,0.5", "--out", out, *args)
    assert without_date(prof.to_json()) == without_date(out.read_text())
    assert prof.budgets == [0.2, 0.5] and prof.n_layers == model.n_layers
    assert prof.concentration.shape == (model.n_layers,)
    assert np.all((prof.concentration > 0) & (prof.concentration <= 1))
    assert prof.first_token_share.shape == (model.n_layers,)
    assert np.all((prof.first_token_share > 0) & (prof.first_token_share <= prof.concentration))
    np.testing.assert_allclose(prof.keep(0.5).mean(), 0.5, rtol=0, atol=1e-9)
    assert prof.has_head_table == bool(kw.get("heads"))
    if kw.get("heads"):
        # The per-head table: one fraction per layer and KV head (its own search over all the units),
        # rescaled to the budget like the layers' fractions.
        h = prof.head_keep(0.5)
        assert h.shape == (model.n_layers, model.n_kv_heads)
        assert np.all((h >= 0) & (h <= 1))
        np.testing.assert_allclose(h.mean(), 0.5, rtol=0, atol=1e-9)
        assert np.ptp(h) > 0  # the heads of a model are not all alike
    else:
        with pytest.raises(Exception, match="head_keep: this profile has no per-head table"):
            prof.head_keep(0.5)
    # Saved, it is the program's file; loaded back, the same profile.
    prof.save(tmp_path / "again.json")
    assert without_date((tmp_path / "again.json").read_text()) == without_date(out.read_text())
    assert prefixkv.Profile.load(tmp_path / "again.json").to_json() == prof.to_json()


def test_a_profile_object_drives_prefixkv(model, tmp_path):
    prof = prefixkv.calibrate(model, CALIB, samples=2, budgets=[0.3])
    prof.save(tmp_path / "p.json")
    a = model.generate("Describe the image.", image=ROOT / "data" / "example.png", policy="prefixkv", budget=0.3,
                       profile=prof, max_tokens=16, return_stats=True)
    b = model.generate("Describe the image.", image=ROOT / "data" / "example.png", policy="prefixkv", budget=0.3,
                       profile=tmp_path / "p.json", max_tokens=16, return_stats=True)
    assert a["tokens"].tolist() == b["tokens"].tolist()
    assert a["kv"]["prefill_kept_per_layer"].tolist() == b["kv"]["prefill_kept_per_layer"].tolist()


def without_timing(report):
    report = dict(report)
    report.pop("seconds", None)
    return report


def test_evaluate_equals_cli(model, tmp_path):
    kw = dict(policies=["streaming", "uniform-prefix", "prefixkv"], budgets=[0.5, 0.2],
              estimators=["window", "normalized"], limit=2, max_tokens=12)
    res = prefixkv.evaluate(model, EVAL, jobs=2, **kw)
    out = tmp_path / "eval.json"
    cli("eval", "--model", MODEL, "--data", EVAL, "--policies", "streaming,uniform-prefix,prefixkv",
        "--budgets", "0.2,0.5", "--estimators", "window,normalized", "--limit", 2, "--max-tokens", 12, "--jobs", 2,
        "--out", out)
    ref = json.loads(out.read_text())
    assert res["samples"] == 2
    assert without_timing(res) == without_timing(ref)
    # The profile's estimator only for prefixkv: streaming x 2 + uniform-prefix x 2 x 2 + prefixkv x 2.
    assert len(res["records"]) == 8


def test_evaluate_testbeds_equal_cli(model, tmp_path):
    # The no-image control and the answer oracle on conversations.
    res = prefixkv.evaluate(model, EVAL, policies=["uniform-prefix"], budgets=[0.5], estimators=["answer", "window"],
                            limit=1, max_tokens=6, no_image_control=True)
    out = tmp_path / "eval.json"
    cli("eval", "--model", MODEL, "--data", EVAL, "--policies", "uniform-prefix", "--budgets", "0.5",
        "--estimators", "answer,window", "--limit", 1, "--max-tokens", 6, "--no-image-control", "--jobs", 1,
        "--out", out)
    assert without_timing(res) == without_timing(json.loads(out.read_text()))
    assert res["no_image"]["samples"] == 1 and res["records"][0]["estimator"] == "answer"
    # The text testbed.
    text = ROOT / "data" / "text" / "heldout.json"
    res = prefixkv.evaluate(model, text, policies=["streaming", "snapkv"], budgets=[0.3], limit=2, text_context=24,
                            text_continuation=8)
    cli("eval", "--model", MODEL, "--data", text, "--policies", "streaming,snapkv", "--budgets", "0.3", "--limit", 2,
        "--text-context", 24, "--text-continuation", 8, "--jobs", 1, "--out", out)
    assert without_timing(res) == without_timing(json.loads(out.read_text()))
    assert res["testbed"] == "text" and res["settings"]["text"] == {"context_tokens": 24, "continuation_tokens": 8}
    with pytest.raises(prefixkv.Error, match="max_tokens: does not apply to a text testbed"):
        prefixkv.evaluate(model, text, policies=["snapkv"], budgets=[0.3], max_tokens=4)
    with pytest.raises(prefixkv.Error, match="text_context: applies to a text testbed only"):
        prefixkv.evaluate(model, EVAL, policies=["snapkv"], budgets=[0.3], text_context=24)
