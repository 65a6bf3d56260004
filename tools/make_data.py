#!/usr/bin/env python3
"""Write the bundled evaluation and calibration sets (LLaVA conversation format) under data/.

    python3 tools/make_data.py [--out data]

data/eval/   seeds 0..199          eval.json, questions.json, truth.json, images/sceneNNNNNN.png
data/calib/  seeds 10000..10031    calib.json, questions.json, truth.json, images/...
data/example.png                   seed 20000 (the image `make run` describes)

Training uses seeds >= 1_000_000 only (tools/train_bundled.py), so none of these scenes is seen
in training. Everything is deterministic (tools/scenes.py); the PNG bytes depend on the zlib build,
the pixels do not (truth.json records each image's pixel sha256).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenes  # noqa: E402

SETS = {"eval": range(0, 200), "calib": range(10_000, 10_032)}
EXAMPLE_SEED = 20_000


def scene_id(seed):
    return f"scene{seed:06d}"


def save_png(img, path):
    from PIL import Image
    Image.fromarray(img).save(path, format="PNG", optimize=True)


def write_set(out_dir, name, seeds):
    d = os.path.join(out_dir, name)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    desc, questions, truth = [], [], {}
    for seed in seeds:
        sc = scenes.make_scene(seed)
        img = scenes.render(sc)
        sid = scene_id(seed)
        rel = f"images/{sid}.png"
        save_png(img, os.path.join(d, rel))
        prompt = scenes.DESCRIBE_PROMPTS[seed % len(scenes.DESCRIBE_PROMPTS)]
        desc.append({"id": sid, "image": rel, "conversations": [
            {"from": "human", "value": scenes.human_value(prompt)},
            {"from": "gpt", "value": sc.description}]})
        for k, qa in enumerate(sc.questions):
            questions.append({"id": f"{sid}_q{k}", "image": rel, "conversations": [
                {"from": "human", "value": scenes.human_value(qa["question"])},
                {"from": "gpt", "value": qa["answer"]}]})
        t = sc.to_truth()
        t["image"] = rel
        t["image_sha256"] = scenes.image_hash(img)
        t["prompt"] = prompt
        truth[sid] = t
    for fname, obj in ((f"{name}.json", desc), ("questions.json", questions), ("truth.json", truth)):
        with open(os.path.join(d, fname), "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, "images", x)) for x in os.listdir(os.path.join(d, "images")))
    print(f"{name}: {len(desc)} scenes, {len(questions)} questions, images {size / 1e6:.2f} MB")
    return size


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data")
    args = ap.parse_args(argv)
    total = 0
    for name, seeds in SETS.items():
        total += write_set(args.out, name, seeds)
    ex = scenes.make_scene(EXAMPLE_SEED)
    save_png(scenes.render(ex), os.path.join(args.out, "example.png"))
    total += os.path.getsize(os.path.join(args.out, "example.png"))
    print(f"example.png: seed {EXAMPLE_SEED}: {ex.description}")
    print(f"total image bytes {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
