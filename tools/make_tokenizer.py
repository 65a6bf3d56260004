#!/usr/bin/env python3
"""Train the bundled model's SentencePiece BPE tokenizer (LLaMA-style) with Debian's spm_train.

    python3 tools/extract_text.py            # first: .cache/text/corpus.txt
    python3 tools/make_tokenizer.py          # -> models/prefixkv-llava-tiny/tokenizer.model

Training text (.cache/tokenizer/spm_input.txt, deterministic): every 3rd paragraph of the corpus,
plus the text of the scenes with seeds 1_000_000 .. 1_003_999 (descriptions, every question and
answer, and the full chat prompts "USER: <image> ... ASSISTANT: ..." on one line each).

Pieces: 0 <unk>, 1 <s>, 2 </s>, 3 <image> (user-defined symbol), 4..259 byte fallback <0x00>..<0xFF>,
then BPE merges; 4000 in all. Identity normalisation, spaces kept as they are, a dummy prefix space,
digits split. spm_train runs single-threaded without sampling, so the same input gives the same
model (the script trains twice with --check and compares).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenes  # noqa: E402

VOCAB_SIZE = 4000
TOKENIZER_SEEDS = range(1_000_000, 1_004_000)
SPM_FLAGS = [
    "--model_type=bpe",
    f"--vocab_size={VOCAB_SIZE}",
    "--character_coverage=1.0",
    "--byte_fallback=true",
    "--split_digits=true",
    "--add_dummy_prefix=true",
    "--normalization_rule_name=identity",
    "--remove_extra_whitespaces=false",
    "--user_defined_symbols=<image>",
    "--unk_id=0", "--bos_id=1", "--eos_id=2", "--pad_id=-1",
    "--unk_piece=<unk>", "--bos_piece=<s>", "--eos_piece=</s>",
    "--num_threads=1",
    "--input_sentence_size=0",
    "--shuffle_input_sentence=false",
    "--max_sentence_length=8192",
    "--random_seed=1",
    "--minloglevel=1",
]


def scene_lines(seeds):
    for s in seeds:
        sc = scenes.make_scene(s)
        prompt = scenes.DESCRIBE_PROMPTS[s % len(scenes.DESCRIBE_PROMPTS)]
        yield f"USER: <image> {prompt} ASSISTANT: {sc.description}"
        for qa in sc.questions:
            yield f"USER: <image> {qa['question']} ASSISTANT: {qa['answer']}"


def build_input(corpus, path, every=3):
    n_c = n_s = 0
    with open(path, "w", encoding="utf-8") as out:
        with open(corpus, encoding="utf-8") as f:
            k = 0
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if k % every == 0:
                    out.write(line + "\n")
                    n_c += 1
                k += 1
        for line in scene_lines(TOKENIZER_SEEDS):
            out.write(line + "\n")
            n_s += 1
    return n_c, n_s


def train(workdir):
    """Runs in workdir with relative names: the model stores its input and prefix names, so
    fixed names keep tokenizer.model byte-identical between runs and machines."""
    cmd = ["spm_train", "--input=spm_input.txt", "--model_prefix=spm"] + SPM_FLAGS
    subprocess.run(cmd, check=True, cwd=workdir)
    return os.path.join(workdir, "spm.model")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_model(path):
    import sentencepiece as spm  # python3-sentencepiece (Debian) or pip
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == VOCAB_SIZE, sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<image>"]
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
    assert sp.piece_to_id("<0x0A>") == 14, sp.piece_to_id("<0x0A>")
    ids = sp.encode("USER: <image>\nDescribe the image in detail. ASSISTANT:")
    assert 3 in ids and 14 in ids, ids
    print("pieces:", [sp.id_to_piece(i) for i in ids])
    print("digits:", sp.encode("There are 12 stars.", out_type=str))
    return sp


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".cache/text/corpus.txt")
    ap.add_argument("--work", default=".cache/tokenizer")
    ap.add_argument("--out", default="models/prefixkv-llava-tiny/tokenizer.model")
    ap.add_argument("--check", action="store_true", help="train twice and compare the outputs")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    inp = os.path.join(args.work, "spm_input.txt")
    n_c, n_s = build_input(args.corpus, inp)
    print(f"training text: {n_c} corpus paragraphs + {n_s} scene lines, sha256 {sha256(inp)[:16]}")
    model = train(args.work)
    if args.check:
        again = os.path.join(args.work, "again")
        os.makedirs(again, exist_ok=True)
        shutil.copyfile(inp, os.path.join(again, "spm_input.txt"))
        a, b = sha256(model), sha256(train(again))
        assert a == b, f"spm_train is not deterministic here: {a} != {b}"
        print("deterministic: two trainings gave identical model files")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    shutil.copyfile(model, args.out)
    print(f"wrote {args.out} sha256 {sha256(args.out)}")
    try:
        check_model(args.out)
    except ImportError:
        print("(python sentencepiece not installed: model not checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
