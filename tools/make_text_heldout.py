#!/usr/bin/env python3
"""Make the text testbed (data/text/heldout.json): held-out documents of the language corpus the
bundled model was pretrained on, each the beginning of a document long enough for a context and its
continuation (prefixkv eval --data data/text/heldout.json: the context's KV cache compressed, the
continuation teacher-forced over it).

Which documents: exactly those the language stage held out (tools/train_bundled.py split_docs,
drawn from np.random.default_rng(seed) with the training run's seed, 0 for the bundled model): the
model never trained on them, only measured its validation loss on them. The corpus must be the one
it trained on (tools/extract_text.py; its sha256 is checked against the model's train_log.json).

Each document's text is kept up to the first paragraph end after `--context` + `--continuation` +
`--margin` tokens (plain SentencePiece counts, which the engine's transformers rule equals on this
whitespace-normalised text), and the tool checks that the kept text's first context + continuation
tokens are those of the whole document. Documents too short, or holding the "<image>" marker, are
left out. Deterministic: the same corpus gives the same file (sha256 printed).

Usage (Debian: python3-numpy, python3-sentencepiece):
    python3 tools/extract_text.py --install          # .cache/text/corpus.txt.gz, as for training
    /usr/bin/python3 tools/make_text_heldout.py      # data/text/heldout.json
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
from train_bundled import read_corpus, split_docs  # noqa: E402  (one home for the corpus and its split)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(ROOT, ".cache/text/corpus.txt.gz"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/prefixkv-llava-tiny"),
                    help="the model folder: tokenizer.model, and train_log.json (corpus sha256 and seed)")
    ap.add_argument("--context", type=int, default=384, help="context tokens, BOS included (context + continuation: the trained 512)")
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--margin", type=int, default=32, help="tokens kept past context + continuation")
    ap.add_argument("--windows", type=int, default=4, help="windows at most per document (0: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "data/text/heldout.json"))
    args = ap.parse_args(argv)
    import sentencepiece as spm

    log = json.load(open(os.path.join(args.model, "train_log.json")))
    docs, sha = read_corpus(args.corpus)
    if sha != log["corpus_sha256"]:
        sys.exit(f"{args.corpus}: sha256 {sha[:16]}... is not the corpus the model trained on "
                 f"({log['corpus_sha256'][:16]}..., train_log.json)")
    seed = int(log["seed"])
    val_docs, _ = split_docs(docs, np.random.default_rng(seed))
    index = {d: i for i, d in enumerate(docs)}
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.model, "tokenizer.model"))
    need = args.context + args.continuation - 1  # the BOS is the context's first token
    out, short, marked = [], 0, 0
    for d in val_docs:
        if "<image>" in d:
            marked += 1
            continue
        paras, first, k = d.split("\n"), 0, 0
        while first < len(paras):  # windows of whole paragraphs, each past the margin
            rest = sp.encode("\n".join(paras[first:]))
            if len(rest) < need + args.margin:
                break
            last = first
            while len(sp.encode("\n".join(paras[first:last + 1]))) < need + args.margin:
                last += 1
            text = "\n".join(paras[first:last + 1])
            if sp.encode(text)[:need] != rest[:need]:
                sys.exit(f"corpus document {index[d]}: window {k} tokenises differently from the document")
            out.append({"id": f"doc{index[d]:05d}.{k}", "text": text})
            first, k = last + 1, k + 1
            if k == args.windows:
                break
        short += k == 0
    res = {
        "testbed": "text",
        "about": "held-out documents of the bundled model's language corpus (never trained on), each cut "
                 "after its first context + continuation tokens; prefixkv eval --data data/text/heldout.json",
        "source": {"tool": "tools/make_text_heldout.py", "corpus": "tools/extract_text.py (.cache/text/corpus.txt)",
                   "corpus_sha256": sha, "corpus_documents": len(docs),
                   "split": f"tools/train_bundled.py split_docs, seed {seed}: {len(val_docs)} held-out documents",
                   "windows_per_document": args.windows,
                   "left_out": {"shorter": short, "image_marker": marked}},
        "context_tokens": args.context,
        "continuation_tokens": args.continuation,
        "documents": out,
    }
    data = (json.dumps(res, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"wrote {args.out}: {len(out)} windows of {len(val_docs) - short - marked} of the {len(val_docs)} held-out "
          f"documents ({short} too short, {marked} with <image>), {len(data) / 1e3:.0f} kB, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
