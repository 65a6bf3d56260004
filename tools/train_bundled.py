#!/usr/bin/env python3
"""Train prefixkv's bundled model: a small LLaVA-1.5 made from scratch on one GPU (issue 3).

Architecture (transformers' LlavaForConditionalGeneration, llava-hf layout):
  vision  CLIP ViT, 336 px, patch 14 (576 image tokens), hidden 192, 6 layers, quick_gelu;
          vision_feature_layer -2, strategy "default" (CLS dropped)
  project 2-layer MLP with GELU (192 -> 256 -> 256)
  decoder LLaMA, 12 layers, hidden 256, 8 heads / 4 KV heads, MLP 768, RoPE 10000, 2048 positions,
          vocabulary = tokenizer.model (4000 pieces, <image> = id 3), untied LM head
Recipe (LLaVA's: a decoder pretrained on language first; run 4 changes after runs 2-3 learned no grounding):
  stage 1  language pretraining of the decoder on .cache/text/corpus.txt.gz (packed 512-token windows)
  stage 2a vision warm-up (replaces the frozen-decoder alignment of run 3): vision tower + projector
           only, with a training-only linear head on the projected image tokens: the mean logits of
           each grid cell's 64 tokens predict the shape / colour / size of its object (or "empty"),
           every token predicts the background and its own cell (tools/scenes.py scene_labels). No
           decoder compute, so it is cheap, and the decoder meets image tokens that already carry
           content and position.
  stage 2b vision tower + projector + decoder on synthetic scenes (tools/scenes.py); per scene one
           description sequence "USER: <image>\\n{prompt} ASSISTANT: {description}</s>" (exactly the
           inference prompt) and --qa-seqs multi-turn question sequences in LLaVA v1's multi-turn
           form "USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>..." (first turn =
           the single-turn prompt, ~12 grounded answers per image); loss on answer tokens only
           (mean over description tokens + mean over question-answer tokens + --aux-weight x the
           auxiliary vision loss), every --text-every-th step a text batch; gradients clipped per
           group (decoder / vision+projector / aux head), separate lr for vision+projector.
  vision init: patch embedding scaled to unit output, position embeddings initialised with a 2-D
           sine-cosine table of the same size (the 0.02 normal init left position almost invisible
           after CLIP's pre-LayerNorm, and the patch conv has no bias, so that LayerNorm also
           removed brightness: uniform white and light gray patches had cosine 0.9998 after it).
  diagnostics: every --diag-every steps, on a fixed held-out batch, the scene losses with the right
           images and with the images shifted by one scene ("gap" = how much the image is used) and
           the aux probe accuracies; a quick greedy evaluation on --quick-eval-scenes held-out
           scenes at --quick-eval-at fractions of stage 2b.
  then     greedy evaluation on held-out scenes (seeds 3_000_000..), save in bf16, sharded (<= 12 MB),
           reload check, and packing into at most 8 files for the trip back.

Usage (GPU machine: torch, transformers >= 4.47 or 5.x, sentencepiece, safetensors, numpy, PIL):
  python3 tools/train_bundled.py --corpus .cache/text/corpus.txt.gz \\
      --tokenizer models/prefixkv-llava-tiny/tokenizer.model --out $OUT/model --seed 0
  python3 tools/train_bundled.py ... --smoke --out /tmp/smoke     # 1-2 minute end-to-end check
  /usr/bin/python3 tools/train_bundled.py --dry-run               # data path only, no torch needed
A longer language stage over several calls of one warm machine (issue 13's model (d): the decoder's
shape from --layers / --hidden / --heads / --kv-heads / --intermediate, --max-mb its size cap): each
--lang-only FILE call trains stage 1 for its whole --deadline and leaves its float32 weights in FILE
(on the machine's disk, e.g. under build-train/: the trip back takes 16 MiB a file), the next call
goes on from them with --init-from, the last runs the image stages on them:
  python3 tools/train_bundled.py ... --layers 24 --max-mb 64 --lang-steps 100000 --lang-only build-train/d1.pt \
      --out $OUT/d1
  python3 tools/train_bundled.py ... --layers 24 --max-mb 64 --lang-steps 100000 --lang-only build-train/d2.pt \
      --init-from build-train/d1.pt --out $OUT/d2
  python3 tools/train_bundled.py ... --layers 24 --max-mb 64 --lang-steps 0 --init-from build-train/d2.pt --out $OUT/model
Each --lang-only call also saves the model (bf16, as below; untrained vision): `prefixkv calibrate
--kv-importance paper` on it prints the first token's share per layer, the sink that makes layers differ.

Output in --out (at most 8 files, each <= 16 MiB): model-0000k-of-0000n.safetensors shards,
meta.tar (config.json, generation_config.json, model.safetensors.index.json, tokenizer.model and the
HF tokenizer/processor files, preprocessor_config.json, train_log.json, eval_samples.json) and
train_log.json. Unpack with:
  cp OUT/model/*.safetensors models/prefixkv-llava-tiny/ && tar -xf OUT/model/meta.tar -C models/prefixkv-llava-tiny
"""

import argparse
import collections
import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
import scenes  # noqa: E402  (numpy only; imported by the spawned data workers too)

IMAGE_TOKENS = 576
IMAGE_TOKEN = "<image>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESCALE = 0.00392156862745098  # 1/255 as in llava-hf's preprocessor_config.json
HELDOUT_BASE = 3_000_000
MAX_FILE = 16 * 1024 * 1024
# pixel sha256 of scene 0 where data/ was made (Debian 12, numpy 1.24); a mismatch is only reported
EXPECTED_SCENE0 = "331efcaff77339913354a29f3a4d57707769e3560a83f18216cc26c1887d47e4"
MAX_FILES = 8

ARCH = dict(hidden=256, layers=12, heads=8, kv_heads=4, intermediate=768, max_pos=2048, rope_theta=10000.0,
            v_hidden=192, v_layers=6, v_heads=6, v_intermediate=768, image_size=336, patch=14)


PATCH_GRID = ARCH["image_size"] // ARCH["patch"]  # 24 patches a side
CELL_PATCHES = PATCH_GRID // scenes.GRID          # 8 x 8 patches per grid cell (112 px / 14 px)
# aux head outputs per image token: shape (0 empty), colour (0 empty), size (0 empty), background, cell
AUX_SPLITS = (1 + len(scenes.SHAPES), 1 + len(scenes.COLOR_NAMES), 1 + len(scenes.SIZE_NAMES),
              len(scenes.BACKGROUND_NAMES), scenes.GRID * scenes.GRID)
DIAG_BASE = HELDOUT_BASE + 500    # fixed held-out batch for the loss-gap / probe diagnostics
QUICK_BASE = HELDOUT_BASE + 600   # held-out scenes of the quick greedy evaluations
PRECHECK_BASE = HELDOUT_BASE + 100


def train_scene_seed(train_seed, j):
    return 10_000_000 + 1_000_000 * train_seed + j


def token_cells():
    """Grid cell (row-major, 0..8) of each of the 576 image tokens (CLIP's row-major patch order)."""
    t = np.arange(IMAGE_TOKENS)
    r, c = t // PATCH_GRID, t % PATCH_GRID
    return (r // CELL_PATCHES) * scenes.GRID + c // CELL_PATCHES


def sincos_2d(grid=PATCH_GRID, dim=ARCH["v_hidden"], base=100.0):
    """2-D sine-cosine position table [grid * grid, dim] in row-major patch order (half the
    channels encode the row, half the column); base 100 so that the 24-patch grid spans the
    frequencies (with MAE's 10000 half the channels would be nearly constant). Unit amplitude."""
    assert dim % 4 == 0, dim
    q = dim // 4
    omega = 1.0 / base ** (np.arange(q, dtype=np.float64) / q)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def emb(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([emb(ys), emb(xs)], axis=1).astype(np.float32)


def log(msg, t0=None):
    t = f"[{time.time() - t0:7.1f}s] " if t0 is not None else ""
    print(t + msg, flush=True)


def param_count_formula(vocab, a=ARCH):
    """Parameter count of the architecture above (used by --dry-run, checked against torch)."""
    H, I, L = a["hidden"], a["intermediate"], a["layers"]
    hd = H // a["heads"]
    kv = a["kv_heads"] * hd
    dec = 2 * vocab * H + L * (2 * H * H + 2 * H * kv + 3 * H * I + 2 * H) + H
    Hv, Iv, Lv = a["v_hidden"], a["v_intermediate"], a["v_layers"]
    n_pos = (a["image_size"] // a["patch"]) ** 2 + 1
    vis = 3 * a["patch"] ** 2 * Hv + Hv + n_pos * Hv + 2 * Hv + Lv * (4 * (Hv * Hv + Hv) + 2 * Hv * Iv + Iv + Hv + 4 * Hv) + 2 * Hv
    proj = Hv * H + H + H * H + H
    return {"decoder": dec, "vision": vis, "projector": proj, "total": dec + vis + proj}


# ------------------------------------------------------------------------------------------------
# corpus


def read_corpus(path, limit_bytes=None):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read() if limit_bytes is None else f.read(limit_bytes)
    text = data.decode("utf-8", errors="replace")
    docs = [d for d in text.split("\n\n") if d.strip()]
    return docs, hashlib.sha256(data).hexdigest()


def split_docs(docs, rng):
    """The language stage's held-out documents (the first 2% of a permutation drawn from rng, at least
    5; never trained on, only its validation loss) and its training documents. main_train draws it
    first from np.random.default_rng(--seed); tools/make_text_heldout.py draws it again for the text
    testbed."""
    order = rng.permutation(len(docs))
    n_val = max(5, len(docs) // 50)
    return [docs[i] for i in order[:n_val]], [docs[i] for i in order[n_val:]]


def build_stream(token_lists, bos, eos):
    total = sum(len(t) + 2 for t in token_lists)
    out = np.empty(total, dtype=np.int32)
    k = 0
    for t in token_lists:
        out[k] = bos
        out[k + 1:k + 1 + len(t)] = t
        out[k + 1 + len(t)] = eos
        k += len(t) + 2
    return out


def sample_windows(stream, n, length, rng):
    starts = rng.integers(0, len(stream) - length - 1, size=n)
    return np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# tokenisation: HF (the reference at inference) or SentencePiece (dry run stand-in)


class HFTok:
    """Wraps the transformers tokenizer exactly as LlavaProcessor uses it."""

    def __init__(self, tok):
        self.tok = tok
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.vocab_size = len(tok)

    def encode(self, texts, special=True):
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


class SPTok:
    def __init__(self, path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()
        self.image_id = self.sp.piece_to_id(IMAGE_TOKEN)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, texts, special=True):
        out = self.sp.encode(list(texts))
        return [[self.bos] + x for x in out] if special else out

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i > 2])


class Built:
    """A padded batch of sequences: ids [N, T], targets [N, T] (-100 off the answers), kinds [N, T]
    (-1 off the answers, else the sequence kind: 0 description, 1 question answers), scene [N] (the
    image row of each sequence), spans [N] -> [(start, end)] answer token ranges per turn (eos included)."""

    def __init__(self, ids, tgt, kinds, scene, spans, per_scene):
        self.ids, self.tgt, self.kinds, self.scene, self.spans = ids, tgt, kinds, scene, spans
        self.per_scene = per_scene


class SampleBuilder:
    """Conversations -> padded input ids and next-token targets (answer tokens only).

    Turn 1 is "USER: <image>\\n{q} ASSISTANT: {a}</s>" tokenised as one string with BOS, exactly as
    the single-turn inference prompt is (its prompt ids are checked to be a prefix, and equal the
    processor's); later turns are "USER: {q} ASSISTANT: {a}</s>" tokenised the same way (BOS then dropped,
    so "USER" gets the same dummy-prefix piece as in turn 1) and appended right after the previous
    answer's </s>, as LLaVA v1's multi-turn template writes them (no image in later turns; multi-turn
    prompts are never tokenised as one string, at training or at inference). The image token is expanded to 576."""

    def __init__(self, tok):
        self.tok = tok
        self.prompt_cache = {}
        self.cont_cache = {}
        self.answer_cache = {}

    def prompt_ids(self, prompt):
        """Ids of "USER: <image>\\n{prompt} ASSISTANT:" with the image token expanded to 576."""
        if prompt not in self.prompt_cache:
            ids = self.tok.encode([scenes.chat_prompt(prompt)])[0]
            assert ids[0] == self.tok.bos, ids[:4]
            assert ids.count(self.tok.image_id) == 1, ids
            k = ids.index(self.tok.image_id)
            self.prompt_cache[prompt] = (ids, ids[:k] + [self.tok.image_id] * IMAGE_TOKENS + ids[k + 1:])
        return self.prompt_cache[prompt]

    def cont_ids(self, prompt):
        """Ids of a later turn's "USER: {prompt} ASSISTANT:" (no BOS, no image)."""
        if prompt not in self.cont_cache:
            ids = self._strip_bos(self.tok.encode([scenes.continue_prompt(prompt)]))[0]
            assert self.tok.bos not in ids and self.tok.image_id not in ids and self.tok.eos not in ids, ids
            self.cont_cache[prompt] = ids
        return self.cont_cache[prompt]

    def _strip_bos(self, encs):
        """Later turns are tokenised like turn 1 (with BOS, so the same dummy-prefix rule applies to
        "USER:") and the BOS dropped; this avoids any special-token-free tokenizer path."""
        for e in encs:
            assert e[0] == self.tok.bos, e[:4]
        return [e[1:] for e in encs]

    def _answers(self, turns):
        """Answer ids (with </s>) of (first, question, answer) keys, batch-encoded where not cached."""
        out = {}
        need = [k for k in dict.fromkeys(turns) if k not in self.answer_cache]
        firsts = [k for k in need if k[0]]
        conts = [k for k in need if not k[0]]
        enc_f = self.tok.encode([scenes.chat_prompt(q) + " " + a for _, q, a in firsts]) if firsts else []
        enc_c = self._strip_bos(self.tok.encode([scenes.continue_prompt(q) + " " + a for _, q, a in conts])) if conts else []
        for keys, encs in ((firsts, enc_f), (conts, enc_c)):
            for key, full in zip(keys, encs):
                first, q, a = key
                short = self.prompt_ids(q)[0] if first else self.cont_ids(q)
                if full[:len(short)] != short:
                    raise AssertionError(f"prompt ids are not a prefix of the full ids for {q!r} / {a!r}")
                ans = full[len(short):] + [self.tok.eos]
                if len(ans) < 2 or self.tok.image_id in ans:
                    raise AssertionError(f"bad answer ids for {q!r} / {a!r}: {ans}")
                if len(a) <= 64:  # short answers repeat; descriptions do not
                    self.answer_cache[key] = ans
                out[key] = ans
        return out

    def build_seqs(self, seqs, n_scenes=None, pad_id=0):
        """seqs: [(scene index, kind, [(q, a), ...])], scene-major with the same number per scene."""
        keys = [(t == 0, q, a) for _, _, turns in seqs for t, (q, a) in enumerate(turns)]
        fresh = self._answers(keys)
        rows, spans = [], []
        for si, kind, turns in seqs:
            assert turns, "empty conversation"
            ids, sp = [], []
            for t, (q, a) in enumerate(turns):
                key = (t == 0, q, a)
                ans = fresh[key] if key in fresh else self.answer_cache[key]
                ids += self.prompt_ids(q)[1] if t == 0 else self.cont_ids(q)
                sp.append((len(ids), len(ids) + len(ans)))
                ids += ans
            rows.append(ids)
            spans.append(sp)
        scene = np.asarray([s[0] for s in seqs], dtype=np.int64)
        n = int(scene.max()) + 1 if n_scenes is None else n_scenes
        counts = np.bincount(scene, minlength=n)
        per = int(counts[0])
        # image/sample pairing: scene-major, the same number of sequences for every scene
        assert len(counts) == n and per >= 1 and (counts == per).all(), counts
        assert np.array_equal(scene, np.repeat(np.arange(n), per)), scene
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), pad_id, dtype=np.int64)
        tgt = np.full((len(rows), T), -100, dtype=np.int64)
        kinds = np.full((len(rows), T), -1, dtype=np.int64)
        for i, (r, sp, (_, kind, _)) in enumerate(zip(rows, spans, seqs)):
            ids[i, :len(r)] = r
            for st, en in sp:
                tgt[i, st - 1:en - 1] = r[st:en]
                kinds[i, st - 1:en - 1] = kind
        n_img = (ids == self.tok.image_id).sum(axis=1)
        assert (n_img == IMAGE_TOKENS).all(), n_img
        assert (ids[:, 0] == self.tok.bos).all()
        return Built(ids, tgt, kinds, scene, spans, per)


def check_built(built, seqs, tok, builder, limit=None):
    """Every turn's answer decodes back to its text, ends with </s> and is predicted from the last
    prompt token (":" of ASSISTANT:); turn 1 is exactly the single-turn inference prompt; later turns
    start right after the previous </s> with the same "USER" piece; nothing else is a target.
    Returns (sequences, turns) checked."""
    user_id, n_turns = None, 0
    seqs = seqs if limit is None else seqs[:limit]
    for i, (si, kind, turns) in enumerate(seqs):
        row = built.ids[i]
        _, exp = builder.prompt_ids(turns[0][0])
        assert row[:len(exp)].tolist() == exp, "turn 1 differs from the single-turn prompt"
        user_id = exp[1] if user_id is None else user_id
        assert exp[1] == user_id
        for t, ((q, a), (st, en)) in enumerate(zip(turns, built.spans[i])):
            lab = built.tgt[i, st - 1:en - 1].tolist()
            assert lab == row[st:en].tolist() and lab[-1] == tok.eos, (q, a)
            got = tok.decode(lab[:-1]).strip()
            assert got == a, (got, a)
            assert (built.kinds[i, st - 1:en - 1] == kind).all()
            if t == 0:
                assert st == len(exp)
            else:
                c = builder.cont_ids(q)
                assert row[st - len(c):st].tolist() == c and c[0] == user_id, (q, c[:3], user_id)
                assert row[st - len(c) - 1] == tok.eos
            n_turns += 1
        assert int((built.tgt[i] != -100).sum()) == sum(en - st for st, en in built.spans[i])
        assert int((built.kinds[i] >= 0).sum()) == sum(en - st for st, en in built.spans[i])
    return len(seqs), n_turns


# ------------------------------------------------------------------------------------------------
# scene data in worker processes


class SceneFeeder:
    """Keeps `window` batches of rendered scenes in flight on a process pool, in a fixed order."""

    def __init__(self, pool, train_seed, scenes_per_batch, window, qa_seqs=1, qa_cells=6):
        self.pool, self.train_seed, self.spb = pool, train_seed, scenes_per_batch
        self.qa_seqs, self.qa_cells = qa_seqs, qa_cells
        self.pending = collections.deque()
        self.next_submit = 0
        self.wait_s = 0.0
        for _ in range(window):
            self._submit()

    def _submit(self):
        k = self.next_submit
        seeds = [train_scene_seed(self.train_seed, k * self.spb + i) for i in range(self.spb)]
        self.pending.append(self.pool.apply_async(scenes.training_batch_multi, (seeds, self.qa_seqs, self.qa_cells)))
        self.next_submit += 1

    def get(self):
        t = time.time()
        batch = self.pending.popleft().get(timeout=300)  # (imgs, seqs, labels)
        self.wait_s += time.time() - t
        self._submit()
        return batch


def make_pool(workers):
    import multiprocessing as mp
    return mp.get_context("spawn").Pool(workers)


# ------------------------------------------------------------------------------------------------
# packing for the trip back (at most 8 files of at most 16 MiB)


def pack_outputs(full_dir, out_dir, log_obj):
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(full_dir))
    shards = [n for n in names if n.endswith(".safetensors")]
    small = [n for n in names if n not in shards]
    for n in shards:
        assert os.path.getsize(os.path.join(full_dir, n)) <= MAX_FILE, n
        shutil.copyfile(os.path.join(full_dir, n), os.path.join(out_dir, n))
    tar_path = os.path.join(out_dir, "meta.tar")
    with tarfile.open(tar_path, "w") as tf:
        for n in small:
            tf.add(os.path.join(full_dir, n), arcname=n)
    with open(os.path.join(out_dir, "train_log.json"), "w") as f:
        json.dump(log_obj, f, indent=1)
    files = sorted(os.listdir(out_dir))
    sizes = {n: os.path.getsize(os.path.join(out_dir, n)) for n in files}
    assert len(files) <= MAX_FILES, f"too many files for the trip back: {files}"
    assert all(s <= MAX_FILE for s in sizes.values()), sizes
    return sizes


# ------------------------------------------------------------------------------------------------
# dry run: the data path without torch


def dry_run(args):
    t0 = time.time()
    tok = SPTok(args.tokenizer)
    log(f"tokenizer {args.tokenizer}: {tok.vocab_size} pieces, bos {tok.bos} eos {tok.eos} image {tok.image_id}", t0)
    pc = param_count_formula(tok.vocab_size)
    log(f"parameters (formula): {pc} -> {pc['total'] * 2 / 1e6:.2f} MB in 16 bits", t0)
    assert pc["total"] * 2 <= args.max_mb * 1e6, f"model too large for the {args.max_mb:g} MB budget (--max-mb)"
    docs, sha = read_corpus(args.corpus, limit_bytes=3_000_000)
    toks = tok.encode(docs[:300], special=False)
    stream = build_stream(toks, tok.bos, tok.eos)
    w = sample_windows(stream, 4, args.seq_len, np.random.default_rng(0))
    log(f"corpus sample: {len(docs)} docs in the first 3 MB, stream {len(stream)} tokens, windows {w.shape}", t0)
    log("window text: " + tok.decode(w[0][:60].tolist())[:200], t0)
    pool = make_pool(min(args.workers, 4))
    feeder = SceneFeeder(pool, args.seed, args.scenes_per_batch, window=4, qa_seqs=args.qa_seqs,
                         qa_cells=args.qa_cells)
    builder = SampleBuilder(tok)
    cells = token_cells()
    k = 1 + args.qa_seqs
    for b in range(3):
        imgs, seqs, labels = feeder.get()
        t = time.time()
        built = builder.build_seqs(seqs, n_scenes=len(imgs))
        t_build = time.time() - t
        assert imgs.shape == (args.scenes_per_batch, 336, 336, 3) and imgs.dtype == np.uint8
        assert labels.shape == (args.scenes_per_batch, scenes.N_LABELS)
        assert built.ids.shape[0] == k * args.scenes_per_batch and built.per_scene == k
        n_seq, n_turns = check_built(built, seqs, tok, builder)
        # pairing: sequence i belongs to scene built.scene[i], whose pixels and labels are row
        # built.scene[i] of the batch (re-derived here from the seeds)
        for i in range(0, len(seqs), 7):
            j = int(built.scene[i])
            seed = train_scene_seed(args.seed, b * args.scenes_per_batch + j)
            sc, ss = scenes.training_sequences(seed, args.qa_seqs, args.qa_cells)
            assert ss[i % k][1] == seqs[i][2], "sequence / scene pairing broken"
            assert np.array_equal(labels[j], scenes.scene_labels(sc))
            if i % 21 == 0:
                assert np.array_equal(imgs[j], scenes.render(sc))
            # every object's centre patch is a token of its own cell in token_cells()
            for o in sc.objects:
                tok_i = (o.cy // ARCH["patch"]) * PATCH_GRID + o.cx // ARCH["patch"]
                assert cells[tok_i] == o.row * scenes.GRID + o.col
                assert labels[j][scenes.LABEL_SHAPE + cells[tok_i]] == 1 + scenes.SHAPES.index(o.shape)
        nd = int((built.kinds == 0).sum())
        nq = int((built.kinds == 1).sum())
        turns_per = np.mean([len(t) for _, kind, t in seqs if kind == 1])
        lens = (built.ids != 0).sum(axis=1)
        log(f"batch {b}: ids {built.ids.shape} ({n_seq} sequences, {n_turns} turns checked; {k} per scene), "
            f"answer tokens desc {nd} qa {nq} ({turns_per:.1f} turns per question sequence), lengths "
            f"desc {int(lens[0::k].mean())} qa {int(lens[1::k].mean())} max {lens.max()}, build "
            f"{t_build * 1000:.0f} ms, wait {feeder.wait_s:.2f}s", t0)
    # a readable multi-turn example (image tokens elided)
    i = 1
    row = built.ids[i][:int((built.ids[i] != 0).sum())].tolist()
    pieces = [tok.sp.id_to_piece(x) for x in row if x != tok.image_id]
    log(f"multi-turn example ({len(row)} ids, 576 image tokens elided): " + " ".join(pieces[:120]), t0)
    tab = sincos_2d()
    assert tab.shape == (IMAGE_TOKENS, ARCH["v_hidden"])
    log(f"sincos position table {tab.shape}, rms {float(np.sqrt((tab ** 2).mean())):.3f}, neighbour cosine "
        f"{float((tab[0] * tab[1]).sum() / (tab[0] ** 2).sum()):.3f}, far cosine "
        f"{float((tab[0] * tab[-1]).sum() / (tab[0] ** 2).sum()):.3f}", t0)
    # render throughput on this machine
    t = time.time()
    n = 0
    for _ in range(6):
        imgs, _, _ = feeder.get()
        n += len(imgs)
    log(f"feeder throughput here ({min(args.workers, 4)} workers): {n / (time.time() - t):.0f} scenes/s", t0)
    pool.terminate()
    short, exp = builder.prompt_ids(scenes.DESCRIBE_PROMPTS[0])
    log(f"example prompt ids ({len(exp)} with the image expanded): {short}", t0)
    # packing
    with tempfile.TemporaryDirectory() as d:
        full, out = os.path.join(d, "full"), os.path.join(d, "out")
        os.makedirs(full)
        for k in range(3):
            with open(os.path.join(full, f"model-0000{k + 1}-of-00003.safetensors"), "wb") as f:
                f.write(b"\0" * 10_000_000)
        for n in ("config.json", "model.safetensors.index.json", "tokenizer.model", "preprocessor_config.json"):
            with open(os.path.join(full, n), "w") as f:
                f.write("{}")
        sizes = pack_outputs(full, out, {"dry_run": True})
        log(f"packing ok: {sizes}", t0)
    n_scene = args.scene_steps - (args.scene_steps // args.text_every if args.text_every else 0)
    log(f"planned: stage 1 {args.lang_steps} steps, stage 2a {args.vis_steps} steps x {args.scenes_per_batch} "
        f"images, stage 2b {args.scene_steps} steps ({n_scene} scene steps x {args.scenes_per_batch} scenes x {k} "
        f"sequences = {n_scene * args.scenes_per_batch} scenes; shrunk on the GPU to fit --deadline)", t0)
    log("dry run ok", t0)
    return 0


# ------------------------------------------------------------------------------------------------
# the real thing (torch + transformers)


def lr_at(step, planned, warmup, peak, floor_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, planned - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _tokenizer_config():
    return {"add_bos_token": True, "add_eos_token": False, "legacy": False, "bos_token": "<s>",
            "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 2048,
            "clean_up_tokenization_spaces": False, "padding_side": "left",
            "spaces_between_special_tokens": False}


def hf_tokenizer_official(tokenizer_model, workdir):
    """transformers' own conversion of a llava-hf style folder that has only tokenizer.model."""
    from transformers import AddedToken, AutoTokenizer
    d = os.path.join(workdir, "tok")
    os.makedirs(d, exist_ok=True)
    shutil.copyfile(tokenizer_model, os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(dict(_tokenizer_config(), tokenizer_class="LlamaTokenizer"), f, indent=1)
    tok = AutoTokenizer.from_pretrained(d, legacy=False)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = "<unk>"
    return tok


def _spm_merges(vocab):
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        try:
            from transformers.convert_slow_tokenizer import generate_merges
        except ImportError:
            generate_merges = None
    if generate_merges is not None:
        try:
            return [tuple(m) for m in generate_merges(vocab)]
        except TypeError:
            pass
    merges = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            l, r = piece[:k], piece[k:]
            if l in vocab and r in vocab:
                merges.append((pid, len(l), len(r), vocab[l], vocab[r], l, r))
    merges.sort()
    return [(m[5], m[6]) for m in merges]


def hf_tokenizer_manual(tokenizer_model):
    """The same LLaMA-style fast tokenizer built directly with the tokenizers library (no protobuf)."""
    import sentencepiece as spm
    from tokenizers import AddedToken as TAT, Tokenizer, decoders, models, pre_tokenizers, processors
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        from transformers import TokenizersBackend as PreTrainedTokenizerFast
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    bpe = models.BPE(vocab=vocab, merges=_spm_merges(vocab), unk_token="<unk>", fuse_unk=True,
                     byte_fallback=True, dropout=None)
    tk = Tokenizer(bpe)
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    tk.add_special_tokens([TAT("<unk>", normalized=False, special=True), TAT("<s>", normalized=False, special=True),
                           TAT("</s>", normalized=False, special=True),
                           TAT(IMAGE_TOKEN, normalized=False, special=True)])
    tk.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                      special_tokens=[("<s>", 1)])
    cfg = _tokenizer_config()
    cfg.pop("legacy")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **cfg)
    tok.add_tokens([__import__("transformers").AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                   special_tokens=True)
    return tok


def check_tokenizer(hf, sp_path, corpus_docs, t0):
    """HF ids must be LLaMA-style and (ideally) equal sentencepiece's own encoding."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tok = hf.tok
    assert hf.image_id == sp.piece_to_id(IMAGE_TOKEN) == 3, hf.image_id
    assert hf.bos == 1 and hf.eos == 2, (hf.bos, hf.eos)
    assert hf.vocab_size == sp.get_piece_size(), (hf.vocab_size, sp.get_piece_size())
    ids = hf.encode([scenes.chat_prompt(scenes.DESCRIBE_PROMPTS[0])])[0]
    log(f"HF prompt ids: {ids} = {tok.convert_ids_to_tokens(ids)}", t0)
    assert ids[0] == 1 and ids.count(3) == 1 and ids[-1] != 2, ids
    texts = []
    for s in range(HELDOUT_BASE, HELDOUT_BASE + 60):
        sc = scenes.make_scene(s)
        texts.append(scenes.chat_prompt(scenes.DESCRIBE_PROMPTS[s % 5]) + " " + sc.description)
        for qa in sc.questions:
            texts.append(scenes.chat_prompt(qa["question"]) + " " + qa["answer"])
        # the training-only dense questions, first-turn and later-turn forms
        for q, a in scenes.dense_questions(sc, scenes._rs(s, 5)):
            texts.append(scenes.chat_prompt(q) + " " + a)
            texts.append(scenes.continue_prompt(q) + " " + a)
    paras = [p for d in corpus_docs[:400] for p in d.split("\n")][:3000]
    report = {}
    for name, group in (("scene_text", texts), ("corpus_paragraphs", paras)):
        h = hf.encode(group)
        s = [[1] + x for x in sp.encode(group)]
        bad = [i for i in range(len(group)) if h[i] != s[i]]
        report[name] = {"checked": len(group), "differ": len(bad),
                        "examples": [{"text": group[i][:300], "hf": h[i][:80], "spm": s[i][:80]} for i in bad[:3]]}
        log(f"tokenizer agreement HF vs sentencepiece on {name}: {len(group) - len(bad)}/{len(group)}", t0)
    return report


def choose_tokenizer(tokenizer_model, workdir, docs, t0):
    """transformers' conversion if it reproduces sentencepiece on the scene text, else the manual
    build; the chosen one is saved as tokenizer.json with the model."""
    reports, cands = {}, []
    for name, make in (("official", lambda: hf_tokenizer_official(tokenizer_model, workdir)),
                       ("manual", lambda: hf_tokenizer_manual(tokenizer_model))):
        try:
            hf = HFTok(make())
            rep = check_tokenizer(hf, tokenizer_model, docs, t0)
        except Exception as e:
            import traceback
            traceback.print_exc()
            log(f"tokenizer route '{name}' failed: {e!r}", t0)
            reports[name] = {"error": repr(e)}
            continue
        reports[name] = rep
        cands.append((rep["scene_text"]["differ"], len(cands), name, hf))
        if rep["scene_text"]["differ"] == 0:
            break
    if not cands:
        raise SystemExit(f"no HF tokenizer could be built: {reports}")
    differ, _, name, hf = min(cands)
    if differ:
        log(f"WARNING: the best HF tokenizer ('{name}') still differs from sentencepiece on {differ} scene "
            f"texts; training follows HF (see train_log tokenizer_check)", t0)
    log(f"using the '{name}' HF tokenizer ({type(hf.tok).__name__})", t0)
    return hf, {"route": name, "class": type(hf.tok).__name__, "reports": reports}


def build_model(vocab, image_token_id, args):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    a = ARCH
    kw = dict(vocab_size=vocab, hidden_size=a["hidden"], intermediate_size=a["intermediate"],
              num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
              num_key_value_heads=a["kv_heads"], max_position_embeddings=a["max_pos"],
              rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False, mlp_bias=False,
              initializer_range=0.02)
    import inspect
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters or \
            "rope_parameters" in getattr(LlamaConfig, "__annotations__", {}):  # transformers 5
        text = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": a["rope_theta"]})
    else:
        text = LlamaConfig(**kw, rope_theta=a["rope_theta"])
    vision = CLIPVisionConfig(hidden_size=a["v_hidden"], intermediate_size=a["v_intermediate"],
                              num_hidden_layers=a["v_layers"], num_attention_heads=a["v_heads"],
                              image_size=a["image_size"], patch_size=a["patch"], num_channels=3,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=a["hidden"])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=-2, image_seq_length=IMAGE_TOKENS,
                      multimodal_projector_bias=True, tie_word_embeddings=False)
    got = getattr(cfg, "image_token_id", None)
    if got is None:
        got = getattr(cfg, "image_token_index", None)
    assert got == image_token_id, (got, image_token_id)
    model = None
    for kw2 in ({"attn_implementation": "sdpa", "dtype": torch.float32},
                {"attn_implementation": "sdpa", "torch_dtype": torch.float32},
                {"attn_implementation": "sdpa"}):
        try:
            model = LlavaForConditionalGeneration._from_config(cfg, **kw2)
            break
        except TypeError:
            continue
    if model is None:
        log("_from_config(attn_implementation='sdpa') failed; using the default attention")
        model = LlavaForConditionalGeneration(cfg)
    model = model.float()
    check_rotary(model, a["rope_theta"], a["hidden"] // a["heads"])
    init_weights(model, a["layers"])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb.weight.data_ptr() == head.weight.data_ptr():
        log("untying the LM head from the embeddings")
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
    return model


def check_rotary(model, theta, head_dim):
    import torch
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            want = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            assert buf.numel() == want.numel() and torch.allclose(buf.double().cpu(), want, rtol=1e-5, atol=0), \
                f"rotary inv_freq of {name} does not match theta {theta}"
            return True
    log("WARNING: no inv_freq buffer found; RoPE theta not verified")
    return False


def to_bf16_keep_rope(model):
    """Cast to bf16 but keep the rotary inv_freq buffers in fp32 (as a fresh bf16 load has them)."""
    import torch
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(torch.bfloat16)
    for n, b in keep.items():
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        setattr(mod, n.rsplit(".", 1)[1], b)
        if hasattr(mod, "original_inv_freq"):
            mod.original_inv_freq = b
    return sorted(keep)


def init_weights(model, n_layers, v_layers=ARCH["v_layers"]):
    """GPT-2 style init (llava's own _init_weights is not meant for training from scratch); residual
    output projections scaled by 1/sqrt(2 x layers) of their own stack. The vision embeddings are
    set afterwards by init_vision_embeddings."""
    import torch
    from torch import nn
    std = 0.02
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                nl = v_layers if "vision_tower" in name else n_layers
                s = std / math.sqrt(2 * nl) if name.endswith(("o_proj", "down_proj", "out_proj", "fc2")) else std
                m.weight.normal_(0.0, s)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.Embedding,)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif type(m).__name__.endswith("RMSNorm"):
                m.weight.fill_(1.0)
        for name, p in model.named_parameters():
            if name.endswith("class_embedding"):
                p.normal_(0.0, std)


def vision_embeddings(vt):
    """The CLIP embeddings module (patch_embedding, position_embedding, class_embedding)."""
    for m in vt.modules():
        if hasattr(m, "patch_embedding") and hasattr(m, "position_embedding") and hasattr(m, "class_embedding"):
            return m
    raise RuntimeError("no CLIP embeddings module found in the vision tower")


def init_vision_embeddings(vt, pix, mode="sincos", pos_scale=1.0):
    """Patch conv scaled so that its output has unit rms on real scenes; position table = 2-D
    sine-cosine (row/column) with rms pos_scale ("sincos"), or the old N(0, 0.02) ("normal");
    class embedding N(0, 1). Returns what was measured/set."""
    import torch
    emb = vision_embeddings(vt)
    conv, pos = emb.patch_embedding, emb.position_embedding
    with torch.no_grad():
        x = conv(pix.to(conv.weight.dtype))
        rms0 = float(x.float().pow(2).mean().sqrt())
        res = {"mode": mode, "patch_rms_before": round(rms0, 4)}
        if mode == "normal":
            return res
        conv.weight.mul_(1.0 / max(rms0, 1e-6))
        x = conv(pix.to(conv.weight.dtype))
        res["patch_rms"] = round(float(x.float().pow(2).mean().sqrt()), 4)
        tab = torch.from_numpy(sincos_2d()).to(pos.weight.device, pos.weight.dtype)
        tab = tab * (pos_scale / tab.pow(2).mean().sqrt())
        assert pos.weight.shape == (IMAGE_TOKENS + 1, tab.shape[1]), tuple(pos.weight.shape)
        pos.weight[0].zero_()          # the class token's position
        pos.weight[1:].copy_(tab)
        emb.class_embedding.normal_(0.0, 1.0)
        res["pos_rms"] = round(float(pos.weight[1:].pow(2).mean().sqrt()), 4)
    return res


def submodules(model):
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None) if inner is not None else None
    if lm is None:
        lm = model.language_model
        lm = getattr(lm, "model", lm)
    vt = getattr(inner, "vision_tower", None) or model.vision_tower
    pj = getattr(inner, "multi_modal_projector", None) or model.multi_modal_projector
    return inner, lm, vt, pj, model.get_output_embeddings()


def make_optimizer(groups, lr, wd):
    """AdamW with weight decay on matrices only (not on embeddings, the patch conv included).
    groups: [(group name, [(param name, param)], lr multiplier)]; every optimizer group carries
    "lr_mult" (run_stage applies it to the scheduled lr) and "clip_group"."""
    import torch
    out = []
    for gname, params, mult in groups:
        buckets = collections.defaultdict(list)
        for n, p in params:
            if p.requires_grad:
                buckets[p.dim() >= 2 and "embed" not in n and "embedding" not in n].append(p)
        for decay, ps in sorted(buckets.items()):
            out.append({"params": ps, "weight_decay": wd if decay else 0.0, "lr_mult": mult, "clip_group": gname})
    try:
        return torch.optim.AdamW(out, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except Exception:
        return torch.optim.AdamW(out, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def cell_mean(x):
    """[B, 576, D] -> [B, 9, D]: mean over each grid cell's 8 x 8 tokens."""
    B, G, P = x.shape[0], scenes.GRID, CELL_PATCHES
    return x.reshape(B, G, P, G, P, -1).mean(dim=(2, 4)).reshape(B, G * G, -1)


def aux_terms(aux, feats, lab, cells_t, mode="pooled"):
    """Auxiliary vision loss on projected image tokens feats [B, 576, H] with scene labels
    lab [B, N_LABELS]. Every token predicts the background and its own cell (position); the
    shape / colour / size of each cell's object (0 = empty) are predicted from the cell's mean
    logits ("pooled": the object's few tokens must carry it, the decoder can attend to them) or by
    every token of the cell ("token": far harder, tokens away from the object must gather it).
    Returns (summed mean cross-entropies, logits [B, 576, sum(AUX_SPLITS)])."""
    import torch
    import torch.nn.functional as F
    B = feats.shape[0]
    n9 = scenes.GRID * scenes.GRID
    logits = aux(feats.reshape(B, IMAGE_TOKENS, -1).float()).float()
    parts = torch.split(logits, AUX_SPLITS, dim=-1)
    if mode in ("pooled", "pooled+token-shape"):
        cparts = torch.split(cell_mean(logits), AUX_SPLITS, dim=-1)
        obj = [(cparts[i], lab[:, off:off + n9]) for i, off in
               enumerate((scenes.LABEL_SHAPE, scenes.LABEL_COLOR, scenes.LABEL_SIZE))]
        # colour and size only where there is an object (empty is the shape head's job)
        occ = (lab[:, scenes.LABEL_SHAPE:scenes.LABEL_SHAPE + n9] > 0).reshape(-1)
        loss = F.cross_entropy(obj[0][0].reshape(-1, obj[0][0].shape[-1]), obj[0][1].reshape(-1))
        for p, t in obj[1:]:
            loss = loss + F.cross_entropy(p.reshape(-1, p.shape[-1])[occ], t.reshape(-1)[occ])
        if mode == "pooled+token-shape":
            # and every token names its cell's shape (or empty): shape then sits in each token's
            # features, where attention can find and count it (run 5 counted colours right 95% of
            # the time, shapes 50%: colour is in every patch, shape was only in the cell as a whole)
            loss = loss + F.cross_entropy(parts[0].reshape(-1, parts[0].shape[-1]),
                                          lab[:, scenes.LABEL_SHAPE + cells_t].reshape(-1))
    else:
        tgts = (lab[:, scenes.LABEL_SHAPE + cells_t], lab[:, scenes.LABEL_COLOR + cells_t],
                lab[:, scenes.LABEL_SIZE + cells_t])
        loss = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), t.reshape(-1)) for p, t in zip(parts[:3], tgts))
    loss = loss + F.cross_entropy(parts[3].reshape(-1, parts[3].shape[-1]),
                                  lab[:, scenes.LABEL_BG:scenes.LABEL_BG + 1].expand(B, IMAGE_TOKENS).reshape(-1))
    loss = loss + F.cross_entropy(parts[4].reshape(-1, parts[4].shape[-1]),
                                  cells_t.view(1, -1).expand(B, IMAGE_TOKENS).reshape(-1))
    return loss, logits


def probe_accuracy(logits, lab):
    """Accuracies of the aux head with its logits averaged over each cell's 64 tokens: shape (all
    9 cells, empty included), colour and size (occupied cells), background (whole image), and the
    per-token cell."""
    import torch
    parts = torch.split(cell_mean(logits), AUX_SPLITS, dim=-1)
    n9 = scenes.GRID * scenes.GRID
    occ = lab[:, scenes.LABEL_SHAPE:scenes.LABEL_SHAPE + n9] > 0
    n_occ = occ.sum().clamp(min=1)
    shape = (parts[0].argmax(-1) == lab[:, scenes.LABEL_SHAPE:scenes.LABEL_SHAPE + n9]).float().mean()
    color = ((parts[1].argmax(-1) == lab[:, scenes.LABEL_COLOR:scenes.LABEL_COLOR + n9]) & occ).sum() / n_occ
    size = ((parts[2].argmax(-1) == lab[:, scenes.LABEL_SIZE:scenes.LABEL_SIZE + n9]) & occ).sum() / n_occ
    bg = (parts[3].mean(dim=1).argmax(-1) == lab[:, scenes.LABEL_BG]).float().mean()
    tok_parts = torch.split(logits, AUX_SPLITS, dim=-1)
    cells_t = torch.as_tensor(token_cells(), device=logits.device)
    cellacc = (tok_parts[4].argmax(-1) == cells_t.view(1, -1)).float().mean()
    tshape = (tok_parts[0].argmax(-1) == lab[:, scenes.LABEL_SHAPE + cells_t]).float().mean()
    return {k: round(float(v), 4) for k, v in
            (("shape", shape), ("color", color), ("size", size), ("background", bg), ("cell", cellacc),
             ("shape per token", tshape))}


def seq_losses(inner, head, built, pix_scene, dev, autocast, cap=None, aux=None, labels_t=None, cells_t=None,
               shuffle=False, aux_mode="pooled"):
    """Scene losses of a built batch. pix_scene: one pixel row per scene; sequence i gets row
    built.scene[i] (or, with shuffle, the next scene's row: the image-usage diagnostic). Returns
    {"desc", "qa"[, "aux", "aux_logits"]}; "aux" needs cap (the projector-output capture), aux and
    labels_t, and uses the labels of the images actually fed."""
    import torch
    import torch.nn.functional as F
    n_scenes = pix_scene.shape[0]
    assert int(built.scene.max()) < n_scenes and len(built.scene) == built.ids.shape[0]
    idx = torch.from_numpy(built.scene).to(dev)
    if shuffle:
        assert n_scenes > 1
        idx = (idx + 1) % n_scenes
    pix = pix_scene.index_select(0, idx)
    ids_t = torch.from_numpy(built.ids).to(dev, non_blocking=True)
    tgt_t = torch.from_numpy(built.tgt).to(dev, non_blocking=True)
    kind_t = torch.from_numpy(built.kinds).to(dev, non_blocking=True)
    if cap is not None:
        cap.clear()
    with autocast:
        hid = inner(input_ids=ids_t, pixel_values=pix, use_cache=False).last_hidden_state
        mask = tgt_t != -100
        logits = head(hid[mask])
    nll = F.cross_entropy(logits.float(), tgt_t[mask], reduction="none")
    k = kind_t[mask]
    out = {}
    for name, kv in (("desc", 0), ("qa", 1)):
        sel = (k == kv).float()
        out[name] = (nll * sel).sum() / sel.sum().clamp(min=1.0)
    if aux is not None and cap is not None and "feat" in cap:
        feats = cap["feat"].reshape(len(built.scene), IMAGE_TOKENS, -1)
        out["aux"], out["aux_logits"] = aux_terms(aux, feats, labels_t.index_select(0, idx), cells_t, aux_mode)
    return out


def gpu_pixels(u8, dev):
    """uint8 NHWC -> normalised float32 NCHW on the GPU; for 336 x 336 inputs this is exactly what
    CLIPImageProcessor does in llava-hf's crop mode (resize and crop are identities)."""
    import torch
    x = torch.from_numpy(u8)
    if dev.type == "cuda":
        x = x.pin_memory()
    x = x.to(dev, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float() * RESCALE
    mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
    return (x - mean) / std


def make_processor(tok):
    from transformers import LlavaProcessor
    try:
        from transformers import CLIPImageProcessor as IP
    except ImportError:  # pragma: no cover
        from transformers import CLIPImageProcessorFast as IP
    ip = IP(do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True,
            crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=RESCALE,
            do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    try:
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=ARCH["patch"],
                              vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                              num_additional_image_tokens=1)
    except TypeError:
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=ARCH["patch"],
                              vision_feature_select_strategy="default", image_token=IMAGE_TOKEN)


def check_processor(processor, builder, dev, t0):
    """The processor's ids and pixels for a few scenes must equal the training path's."""
    from PIL import Image
    res = {"ids_equal": 0, "checked": 0, "max_pixel_diff": 0.0}
    for s in range(HELDOUT_BASE + 900, HELDOUT_BASE + 904):
        sc = scenes.make_scene(s)
        img = scenes.render(sc)
        for prompt in (scenes.DESCRIBE_PROMPTS[s % 5], sc.questions[0]["question"]):
            out = processor(images=Image.fromarray(img), text=scenes.chat_prompt(prompt), return_tensors="pt")
            ids = out["input_ids"][0].tolist()
            want = builder.prompt_ids(prompt)[1]
            res["checked"] += 1
            res["ids_equal"] += int(ids == want)
            if ids != want:
                log(f"processor ids differ for {prompt!r}: {len(ids)} vs {len(want)}; "
                    f"{[i for i in ids if i != 3][:40]} vs {[i for i in want if i != 3][:40]}", t0)
            pv = out["pixel_values"].to(dev).float()
            mine = gpu_pixels(img[None], dev)
            res["max_pixel_diff"] = max(res["max_pixel_diff"], float((pv - mine).abs().max()))
    log(f"processor check: ids equal {res['ids_equal']}/{res['checked']}, max pixel diff {res['max_pixel_diff']:.2e}", t0)
    assert res["ids_equal"] == res["checked"], "processor ids differ from the training ids"
    assert res["max_pixel_diff"] < 1e-4, res
    return res


def generate(model, ids_list, pix, max_new, eos):
    """Greedy generation for prompts of equal length (no padding); returns new-token id lists."""
    import torch
    ids = torch.tensor(ids_list, device=pix.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                         max_new_tokens=max_new, do_sample=False, num_beams=1, pad_token_id=0,
                         eos_token_id=eos)
    res = []
    for row in out[:, ids.shape[1]:].tolist():
        res.append(row[:row.index(eos)] if eos in row else row)
    return res


def evaluate(model, hf, builder, dev, seeds, max_new, t0, batch=48, pix_dtype=None, ctx=None, label="eval"):
    """Greedy descriptions (prompt 0) and the scenes' own questions, single-turn, as at inference.
    The saved bf16 model by default; during training pix_dtype=float32 and ctx=autocast."""
    import contextlib
    import torch
    pix_dtype = torch.bfloat16 if pix_dtype is None else pix_dtype
    ctx = contextlib.nullcontext() if ctx is None else ctx
    scs = [scenes.make_scene(s) for s in seeds]
    imgs = np.stack([scenes.render(sc) for sc in scs])
    out = {"scenes": len(seeds), "samples": []}
    scores, exact = [], 0
    _, p_ids = builder.prompt_ids(scenes.DESCRIBE_PROMPTS[0])
    with torch.no_grad(), ctx:
        for i in range(0, len(scs), batch):
            pix = gpu_pixels(imgs[i:i + batch], dev).to(pix_dtype)
            gens = generate(model, [p_ids] * len(pix), pix, max_new, hf.eos)
            for sc, g in zip(scs[i:i + batch], gens):
                text = hf.decode(g).strip()
                rep = scenes.description_report(text, sc)
                scores.append(rep["score"])
                exact += rep["score"] == 1.0
                out["samples"].append({"seed": sc.seed, "kind": "description", "output": text,
                                       "truth": sc.description, "score": rep["score"], "tokens": len(g),
                                       "wrong": [v for v in rep["verdicts"] if not v["correct"]]})
        # questions, grouped by prompt length so that no padding is needed
        groups = collections.defaultdict(list)
        for k, sc in enumerate(scs):
            for qa in sc.questions:
                groups[len(builder.prompt_ids(qa["question"])[1])].append((k, qa))
        q_ok = q_n = 0
        for L, items in sorted(groups.items()):
            for j in range(0, len(items), batch):
                chunk = items[j:j + batch]
                pix = gpu_pixels(imgs[[k for k, _ in chunk]], dev).to(pix_dtype)
                gens = generate(model, [builder.prompt_ids(qa["question"])[1] for _, qa in chunk], pix, 16, hf.eos)
                for (k, qa), g in zip(chunk, gens):
                    text = hf.decode(g).strip()
                    ok = scenes.score_answer(qa["question"], text, scs[k])
                    q_ok += ok
                    q_n += 1
                    out["samples"].append({"seed": scs[k].seed, "kind": "question", "question": qa["question"],
                                           "output": text, "truth": qa["answer"], "correct": bool(ok)})
    out["description_accuracy"] = float(np.mean(scores))
    out["descriptions_exact"] = exact / len(scs)
    out["question_accuracy"] = q_ok / max(1, q_n)
    out["questions"] = q_n
    by_type = collections.defaultdict(lambda: [0, 0])
    for smp in out["samples"]:
        if smp["kind"] == "question":
            typ = " ".join(smp["question"].split()[:3])
            by_type[typ][0] += int(smp["correct"])
            by_type[typ][1] += 1
    out["question_accuracy_by_form"] = {k: f"{a}/{n}" for k, (a, n) in sorted(by_type.items())}
    log(f"{label} on {len(scs)} held-out scenes: description accuracy {out['description_accuracy']:.4f} "
        f"(exact {exact}/{len(scs)}), question accuracy {out['question_accuracy']:.4f} ({q_ok}/{q_n}); "
        f"by form {out['question_accuracy_by_form']}", t0)
    d0 = out["samples"][0]
    log(f"{label} sample (seed {d0['seed']}, score {d0['score']:.2f}): {d0['output'][:400]}", t0)
    return out


def main_train(args):
    t0 = time.time()
    deadline = t0 + args.deadline
    pool = make_pool(args.workers)  # before CUDA is touched; workers import scenes/numpy only
    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    work = tempfile.mkdtemp(prefix="prefixkv_train_")
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    tlog = {"command": " ".join([sys.executable] + sys.argv), "seed": args.seed, "args": vars(args),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__, "gpu": gpu},
            "arch": ARCH, "times": {}, "history": []}
    try:
        import tokenizers
        tlog["versions"]["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    log(f"torch {torch.__version__} transformers {transformers.__version__} on {gpu}; workers {args.workers}", t0)
    with open(args.tokenizer, "rb") as f:
        tlog["tokenizer_sha256"] = hashlib.sha256(f.read()).hexdigest()
    # scene pixels must match the ones rendered when the data/ sets were made
    h = scenes.image_hash(scenes.render(scenes.make_scene(0)))
    tlog["scene0_sha256"] = h
    if args.expect_scene0 and h != args.expect_scene0:
        log(f"WARNING: scene 0 renders differently here ({h[:16]} vs {args.expect_scene0[:16]})", t0)

    # ---- tokenizer and feeders
    feeder = SceneFeeder(pool, args.seed, args.scenes_per_batch, window=args.prefetch, qa_seqs=args.qa_seqs,
                         qa_cells=args.qa_cells)
    docs, corpus_sha = read_corpus(args.corpus, limit_bytes=2_000_000 if args.smoke else None)
    tlog["corpus_sha256"] = corpus_sha
    hf, tlog["tokenizer_check"] = choose_tokenizer(args.tokenizer, work, docs, t0)
    builder = SampleBuilder(hf)
    # every prompt form and many answers through the sample builder before any GPU time is spent
    pre = []
    for j, sd in enumerate(range(PRECHECK_BASE, PRECHECK_BASE + 200)):
        _, ss = scenes.training_sequences(sd, args.qa_seqs, args.qa_cells)
        pre += [(j, kind, turns) for kind, turns in ss]
    for j, p in enumerate(scenes.DESCRIBE_PROMPTS):  # every description prompt, whatever the picks
        pre[j * (1 + args.qa_seqs)] = (j, 0, [(p, pre[j * (1 + args.qa_seqs)][2][0][1])])
    built = builder.build_seqs(pre, n_scenes=200)
    n_seq, n_turns = check_built(built, pre, hf, builder)
    lens = (built.ids != 0).sum(axis=1)
    log(f"sample builder checked on {n_seq} sequences / {n_turns} turns (HF tokenizer): lengths desc "
        f"{int(lens[0::1 + args.qa_seqs].mean())} qa {int(lens[1::1 + args.qa_seqs].mean())} max {int(lens.max())}; "
        f"answer tokens per scene desc {(built.kinds == 0).sum() / 200:.0f} qa {(built.kinds == 1).sum() / 200:.0f}", t0)
    val_docs, train_docs = split_docs(docs, rng)
    init_state = None
    if args.init_from:  # a resumed language stage: other windows than the calls before drew
        init_state = torch.load(args.init_from, map_location="cpu")
        rng = np.random.default_rng([args.seed, int(init_state["lang_steps"])])
    t = time.time()
    train_stream = build_stream(hf.encode(train_docs, special=False), hf.bos, hf.eos)
    val_stream = build_stream(hf.encode(val_docs, special=False), hf.bos, hf.eos)
    tlog["corpus"] = {"docs": len(docs), "train_tokens": int(len(train_stream)), "val_tokens": int(len(val_stream)),
                      "tokenize_s": round(time.time() - t, 1)}
    log(f"corpus: {len(docs)} docs, {len(train_stream)} train / {len(val_stream)} val tokens "
        f"(tokenized in {time.time() - t:.1f}s)", t0)

    # ---- model
    model = build_model(hf.vocab_size, hf.image_id, args).to(dev)
    inner, lm, vt, pj, head = submodules(model)
    n_total = sum(p.numel() for p in model.parameters())
    n_parts = {"decoder": sum(p.numel() for p in lm.parameters()) + head.weight.numel(),
               "vision": sum(p.numel() for p in vt.parameters()),
               "projector": sum(p.numel() for p in pj.parameters()), "total": n_total}
    tlog["parameters"] = n_parts
    tlog["parameters_formula"] = param_count_formula(hf.vocab_size)
    log(f"parameters {n_parts}; 16-bit size {n_total * 2 / 1e6:.2f} MB; attention "
        f"{getattr(model.config, '_attn_implementation', '?')}", t0)
    assert n_total * 2 <= args.max_mb * 1e6, f"model too large for the {args.max_mb:g} MB budget (--max-mb)"
    if init_state is not None:
        model.load_state_dict(init_state["model"])
        state = init_state
        tlog["init_from"] = {"path": args.init_from, "lang_steps_before": state["lang_steps"],
                             "lang_tokens_before": state["lang_tokens"]}
        log(f"initialised from {args.init_from} ({state['lang_steps']} language steps, "
            f"{state['lang_tokens'] / 1e6:.1f}M tokens before)", t0)
    # the fixed held-out diagnostic batch (its pixels also set the vision embedding scale)
    diag_seeds = list(range(DIAG_BASE, DIAG_BASE + args.diag_scenes))
    diag_imgs, diag_seqs, diag_labels = scenes.training_batch_multi(diag_seeds, args.qa_seqs, args.qa_cells)
    diag_built = builder.build_seqs(diag_seqs, n_scenes=len(diag_seeds))
    check_built(diag_built, diag_seqs, hf, builder)
    diag_pix = gpu_pixels(diag_imgs, dev)
    diag_lab = torch.from_numpy(diag_labels).to(dev)
    tlog["vision_init"] = init_vision_embeddings(vt, diag_pix, args.pos_init, args.pos_scale)
    log(f"vision embeddings init: {tlog['vision_init']}", t0)
    processor = None
    try:
        processor = make_processor(hf.tok)
        tlog["processor_check"] = check_processor(processor, builder, dev, t0)
    except Exception as e:  # the model can be trained and saved without it; files are written by hand
        import traceback
        traceback.print_exc()
        log(f"WARNING: processor check failed: {e!r}", t0)
        tlog["processor_check"] = {"error": repr(e)}

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    cells_t = torch.from_numpy(token_cells()).to(dev)
    # training-only auxiliary head on the projected image tokens (never saved)
    aux = torch.nn.Linear(ARCH["hidden"], sum(AUX_SPLITS)).to(dev)
    with torch.no_grad():
        aux.weight.normal_(0.0, 0.02)
        aux.bias.zero_()
    cap = {}  # the projector's latest output: exactly the image tokens the decoder receives
    pj.register_forward_hook(lambda mod, inp, out: cap.__setitem__("feat", out))
    feat_route = {"direct": False}

    def image_feats(pix):
        """Projected image tokens [B, 576, H] through LLaVA's own feature path."""
        cap.clear()
        with autocast:
            if not feat_route["direct"]:
                try:
                    inner.get_image_features(pixel_values=pix)
                except Exception as e:
                    log(f"get_image_features failed ({e!r}); using vision_tower + projector directly", t0)
                    feat_route["direct"] = True
            if feat_route["direct"]:
                hs = vt(pixel_values=pix, output_hidden_states=True).hidden_states[-2][:, 1:]
                pj(hs)
        return cap["feat"].reshape(pix.shape[0], IMAGE_TOKENS, -1)

    def text_loss(w):
        ids = torch.from_numpy(w[:, :-1]).to(dev, non_blocking=True)
        tgt = torch.from_numpy(w[:, 1:]).to(dev, non_blocking=True)
        with autocast:
            hid = lm(input_ids=ids, use_cache=False).last_hidden_state
            logits = head(hid)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.reshape(-1))

    @torch.no_grad()
    def val_loss(n_batches=10):
        model.eval()
        r = np.random.default_rng(1234)
        tot = 0.0
        for _ in range(n_batches):
            tot += float(text_loss(sample_windows(val_stream, args.lang_batch, args.seq_len, r)))
        model.train()
        return tot / n_batches

    tlog["diagnostics"], tlog["quick_evals"] = [], []
    diag_state = {"on": True, "quick_on": True}

    @torch.no_grad()
    def diagnose(stage, step, decoder=True):
        """Held-out losses with the right images vs the images shifted by one scene, and the aux
        probe accuracies; never fatal."""
        if not diag_state["on"]:
            return
        try:
            model.eval()
            rec = {"stage": stage, "step": step, "elapsed_s": round(time.time() - t0, 1)}
            feats = image_feats(diag_pix)
            _, logits = aux_terms(aux, feats, diag_lab, cells_t, args.aux_mode)
            rec["probe"] = probe_accuracy(logits, diag_lab)
            rec["image_token_rms"] = round(float(feats.float().pow(2).mean().sqrt()), 4)
            rec["text_embedding_rms"] = round(float(lm.get_input_embeddings().weight[4:].float().pow(2).mean().sqrt()), 4)
            msg = ""
            if decoder:
                right = seq_losses(inner, head, diag_built, diag_pix, dev, autocast)
                wrong = seq_losses(inner, head, diag_built, diag_pix, dev, autocast, shuffle=True)
                for k in ("desc", "qa"):
                    rec[k], rec[k + "_shuffled"] = round(float(right[k]), 4), round(float(wrong[k]), 4)
                    rec[k + "_gap"] = round(rec[k + "_shuffled"] - rec[k], 4)
                msg = (f"desc {rec['desc']:.4f} vs shuffled images {rec['desc_shuffled']:.4f} (gap "
                       f"{rec['desc_gap']:+.4f}) | qa {rec['qa']:.4f} vs shuffled {rec['qa_shuffled']:.4f} "
                       f"(gap {rec['qa_gap']:+.4f}) | ")
            p = rec["probe"]
            log(f"DIAG {stage} step {step}: {msg}probe shape {p['shape']:.3f} color {p['color']:.3f} size "
                f"{p['size']:.3f} background {p['background']:.3f} cell {p['cell']:.3f} shape/token "
                f"{p['shape per token']:.3f} | image-token rms "
                f"{rec['image_token_rms']:.3f} text-embedding rms {rec['text_embedding_rms']:.3f}", t0)
            tlog["diagnostics"].append(rec)
        except Exception as e:
            import traceback
            traceback.print_exc()
            log(f"WARNING: diagnostics failed ({e!r}); switched off", t0)
            diag_state["on"] = False
        finally:
            model.train()

    quick_seeds = list(range(QUICK_BASE, QUICK_BASE + args.quick_eval_scenes))

    def quick_eval(stage, step):
        if not diag_state["quick_on"] or not quick_seeds:
            return
        te = time.time()
        try:
            model.eval()
            ev = evaluate(model, hf, builder, dev, quick_seeds, args.quick_max_new, t0, batch=len(quick_seeds),
                          pix_dtype=torch.float32, ctx=autocast, label=f"QUICK EVAL {stage} step {step}")
            rec = {k: v for k, v in ev.items() if k != "samples"}
            rec.update(stage=stage, step=step, seconds=round(time.time() - te, 1),
                       first_output=ev["samples"][0]["output"][:300])
            tlog["quick_evals"].append(rec)
        except Exception as e:
            import traceback
            traceback.print_exc()
            log(f"WARNING: quick evaluation failed ({e!r}); switched off", t0)
            diag_state["quick_on"] = False
        finally:
            model.train()
        log(f"quick evaluation took {time.time() - te:.1f}s", t0)

    def run_stage(name, steps, groups, lr, warmup, step_fn, stage_deadline, hook=None, hook_reserve_s=0.0):
        """groups: [(name, [(param name, param)], lr multiplier)]; gradients clipped per group
        (--clip-mode group) or together (global); hook(step, planned) runs after each step and its
        time is kept out of the ms/step used to fit the plan into the deadline."""
        opt = make_optimizer(groups, lr, args.weight_decay)
        clip_sets = collections.OrderedDict()
        for g in opt.param_groups:
            clip_sets.setdefault(g["clip_group"], []).extend(g["params"])
        planned = steps
        sums = collections.defaultdict(float)
        cnt = collections.defaultdict(int)
        last = {}
        model.train()
        aux.train()
        ts = time.time()
        t_mark = None
        hook_s = hook_mark = 0.0
        step = 0
        while step < planned:
            if time.time() > stage_deadline:
                log(f"{name}: deadline reached at step {step}/{planned}; stopping early", t0)
                break
            cur = lr_at(step, planned, warmup, lr, args.lr_floor)
            for g in opt.param_groups:
                g["lr"] = cur * g["lr_mult"]
            losses = step_fn(step)
            losses["loss"].backward()
            if args.clip_mode == "group":
                for gname, ps in clip_sets.items():
                    live = [p for p in ps if p.grad is not None]
                    if live:
                        losses["gn_" + gname] = torch.nn.utils.clip_grad_norm_(live, args.clip)
            else:
                live = [p for ps in clip_sets.values() for p in ps if p.grad is not None]
                losses["gn_all"] = torch.nn.utils.clip_grad_norm_(live, args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in losses.items():
                if k != "loss" and v is not None:
                    sums[k] = sums[k] + v.detach()
                    cnt[k] += 1
            step += 1
            if step == 10:
                sync()
                t_mark, hook_mark = time.time(), hook_s
            if t_mark is not None and step < planned and (step == 40 or (step > 40 and step % args.log_every == 0)):
                sync()
                per = (time.time() - t_mark - (hook_s - hook_mark)) / (step - 10)
                left = stage_deadline - time.time() - max(0.0, hook_reserve_s - hook_s)
                fit = min(steps, step + max(1, int(left / per)))
                if step == 40:
                    log(f"{name}: {per * 1000:.0f} ms/step -> {planned} steps need {per * (planned - step):.0f}s more "
                        f"(+{hook_reserve_s:.0f}s diagnostics; {left:.0f}s left)", t0)
                # fit the plan (and so the cosine schedule) to the deadline; it may grow back up to
                # `steps` if early steps were slow (data waits while the prefetch queue refills)
                if fit < planned * 0.99 or (fit > planned * 1.01 and step < 0.8 * planned):
                    log(f"{name}: {'shrinking' if fit < planned else 'growing'} the plan from {planned} "
                        f"to {fit} steps to meet the deadline ({per * 1000:.0f} ms/step)", t0)
                    planned = fit
            if step % args.log_every == 0 or step == planned:
                vals = {k: float(sums[k]) / cnt[k] for k in sums if cnt[k]}
                last.update(vals)
                el = time.time() - ts - hook_s
                log(f"{name} step {step}/{planned} " + " ".join(f"{k} {v:.4f}" for k, v in vals.items()) +
                    f" lr {cur:.2e} {el / step * 1000:.0f} ms/step data-wait {feeder.wait_s:.1f}s", t0)
                tlog["history"].append({"stage": name, "step": step, "elapsed_s": round(time.time() - t0, 1), **vals})
                sums.clear()
                cnt.clear()
            if hook is not None:
                th = time.time()
                hook(step, planned)
                hook_s += time.time() - th
        sync()
        return {"steps_done": step, "steps_planned": steps, "steps_fitted": planned,
                "seconds": round(time.time() - ts, 1), "diagnostics_s": round(hook_s, 1), "final_losses": last}

    def named(mods):
        ids = {id(p) for m in mods for p in m.parameters()}
        return [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    dec_params = named([lm, head])
    vis_params = named([vt, pj])
    aux_params = [("aux." + n, p) for n, p in aux.named_parameters()]
    assert len(dec_params) + len(vis_params) == len(list(model.parameters())), "parameter groups do not cover the model"
    reserve = args.reserve_s

    # ---- stage 1: language
    def lang_step(step):
        w = sample_windows(train_stream, args.lang_batch, args.seq_len, rng)
        loss = text_loss(w)
        return {"loss": loss, "text": loss.detach()}

    budget = deadline - reserve - time.time()
    s1_deadline = time.time() + budget * args.lang_share
    tlog["stage1"] = run_stage("lang", args.lang_steps, [("decoder", dec_params, 1.0)], args.lr_lang, args.warmup,
                               lang_step, s1_deadline)
    tlog["stage1"]["val_loss"] = val_loss()
    log(f"stage 1 done: {tlog['stage1']}", t0)
    if args.lang_only:
        before = tlog.get("init_from", {})
        steps = before.get("lang_steps_before", 0) + tlog["stage1"]["steps_done"]
        tokens = before.get("lang_tokens_before", 0) + tlog["stage1"]["steps_done"] * args.lang_batch * args.seq_len
        ckpt = args.lang_only
        os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
        torch.save({"model": model.state_dict(), "lang_steps": steps, "lang_tokens": tokens, "arch": ARCH}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
        tlog["stage1"]["total_lang_steps"], tlog["stage1"]["total_lang_tokens"] = steps, tokens
        log(f"wrote {ckpt}: {steps} language steps, {tokens / 1e6:.1f}M tokens in all", t0)

    # ---- stage 2a: vision warm-up on the auxiliary per-cell targets (tower + projector + aux head)
    if args.vis_steps > 0 and not args.lang_only:
        diagnose("vis", 0, decoder=False)

        def vis_step(step):
            imgs, _, labels = feeder.get()
            feats = image_feats(gpu_pixels(imgs, dev))
            loss, _ = aux_terms(aux, feats, torch.from_numpy(labels).to(dev), cells_t, args.aux_mode)
            return {"loss": loss, "aux": loss.detach()}

        def vis_hook(step, planned):
            if step % args.log_every == 0 and step < planned:
                diagnose("vis", step, decoder=False)

        budget2 = deadline - reserve - time.time()
        tlog["stage2a"] = run_stage("vis", args.vis_steps, [("vision", vis_params, 1.0), ("aux", aux_params, 1.0)],
                                    args.lr_vis, args.warmup_vis, vis_step, time.time() + budget2 * args.vis_share,
                                    hook=vis_hook)
        log(f"stage 2a done: {tlog['stage2a']}", t0)
    if not args.lang_only:
        diagnose("vis", "end")  # decoder losses before scene training: the gap should be ~0 here

    # ---- stage 2b: scenes (+ text every --text-every steps)
    def scene_step(step):
        if args.text_every and step % args.text_every == args.text_every - 1:
            loss = text_loss(sample_windows(train_stream, args.lang_batch, args.seq_len, rng))
            return {"loss": loss, "text": loss.detach()}
        imgs, seqs, labels = feeder.get()
        b = builder.build_seqs(seqs, n_scenes=len(imgs))
        use_aux = args.aux_weight > 0
        o = seq_losses(inner, head, b, gpu_pixels(imgs, dev), dev, autocast, cap if use_aux else None,
                       aux if use_aux else None, torch.from_numpy(labels).to(dev) if use_aux else None, cells_t,
                       aux_mode=args.aux_mode)
        loss = o["desc"] + args.qa_weight * o["qa"]
        res = {"desc": o["desc"].detach(), "qa": o["qa"].detach()}
        if use_aux:
            loss = loss + args.aux_weight * o["aux"]
            res["aux"] = o["aux"].detach()
        res["loss"] = loss
        return res

    quick_fracs = sorted(float(x) for x in args.quick_eval_at.split(",") if x.strip())
    pending = list(quick_fracs)

    def scene_hook(step, planned):
        if args.diag_every and step % args.diag_every == 0 and step < planned:
            diagnose("scene", step)
        due = False
        while pending and step >= pending[0] * planned:
            pending.pop(0)
            due = True
        if due and step < planned:
            quick_eval("scene", step)

    groups = [("decoder", dec_params, 1.0), ("vision", vis_params, args.vision_lr_mult)]
    if args.aux_weight > 0:
        groups.append(("aux", aux_params, args.vision_lr_mult))
    hook_reserve = len(quick_fracs) * args.quick_eval_s + (args.scene_steps // max(1, args.diag_every) + 1) * 0.5
    if not args.lang_only:
        tlog["stage2"] = run_stage("scene", args.scene_steps, groups, args.lr_scene, args.warmup, scene_step,
                                   deadline - reserve, hook=scene_hook, hook_reserve_s=hook_reserve)
        diagnose("scene", "end")
        tlog["stage2"]["val_loss"] = val_loss()
        tlog["stage2"]["data_wait_s"] = round(feeder.wait_s, 1)
        log(f"stage 2 done: {tlog['stage2']}", t0)
    pool.terminate()

    # ---- bf16, save first (nothing after this may lose the weights), then evaluate and check
    model.eval()
    to_bf16_keep_rope(model)
    from transformers import GenerationConfig
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = os.path.join(work, "full")
    model.save_pretrained(full, max_shard_size=args.shard_size)
    try:
        processor.save_pretrained(full)
    except Exception as e:
        log(f"WARNING: processor.save_pretrained failed ({e!r}); saving the tokenizer alone", t0)
        try:
            hf.tok.save_pretrained(full)
        except Exception as e2:
            log(f"WARNING: tokenizer.save_pretrained failed too ({e2!r})", t0)
    shutil.copyfile(args.tokenizer, os.path.join(full, "tokenizer.model"))
    fix_processor_config(full)
    pre = os.path.join(full, "preprocessor_config.json")
    if not os.path.exists(pre):
        with open(pre, "w") as f:
            json.dump({"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
                       "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
                       "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD,
                       "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": RESCALE,
                       "size": {"shortest_edge": 336}}, f, indent=2)
    tlog["files"] = {n: os.path.getsize(os.path.join(full, n)) for n in sorted(os.listdir(full))}
    try:
        with open(os.path.join(full, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        tlog["tensor_names"] = sorted(wm)
    except Exception as e:
        tlog["tensor_names_error"] = repr(e)
    ev = {"samples": []}
    try:
        if args.lang_only:  # the image stages did not run: nothing to evaluate
            raise _NoEvaluation()
        te = time.time()
        seeds = list(range(HELDOUT_BASE, HELDOUT_BASE + args.eval_scenes))
        ev = evaluate(model, hf, builder, dev, seeds, args.max_new_tokens, t0)
        tlog["eval"] = {k: v for k, v in ev.items() if k != "samples"}
        tlog["times"]["eval_s"] = round(time.time() - te, 1)
        # reload from disk the way users will, and compare greedy outputs with the in-memory model
        tlog["reload_check"] = reload_check(full, model, hf, builder, dev, ev, t0)
    except _NoEvaluation:
        tlog["eval"] = {"skipped": "--lang-only"}
    except Exception as e:  # keep the weights even if evaluation breaks
        import traceback
        traceback.print_exc()
        tlog["eval_error"] = repr(e)
    tlog["times"]["total_s"] = round(time.time() - t0, 1)
    with open(os.path.join(full, "eval_samples.json"), "w") as f:
        json.dump(ev["samples"], f, indent=1)
    with open(os.path.join(full, "train_log.json"), "w") as f:
        json.dump(tlog, f, indent=1)
    sizes = pack_outputs(full, args.out, tlog)
    log(f"wrote {args.out}: {sizes}", t0)
    e = tlog.get("eval", {})
    log(f"RESULT description accuracy {e.get('description_accuracy')} exact {e.get('descriptions_exact')} "
        f"question accuracy {e.get('question_accuracy')}; total {time.time() - t0:.0f}s", t0)
    log(grounding_verdict(tlog), t0)
    shutil.rmtree(work, ignore_errors=True)
    return 0


class _NoEvaluation(Exception):
    """--lang-only: the run ends after the language stage, without the greedy evaluation."""


def grounding_verdict(tlog):
    """One line from the last held-out diagnostic: is the image used, and does the tower see it?"""
    ds = [d for d in tlog.get("diagnostics", []) if "qa_gap" in d]
    if not ds:
        return "GROUNDING no diagnostics recorded"
    d = ds[-1]
    p = d.get("probe", {})
    used = d["qa_gap"] >= 0.3 and d["desc_gap"] >= 0.03
    sees = p.get("color", 0) >= 0.8 and p.get("shape", 0) >= 0.8
    first = next((x for x in ds if x["stage"] == "scene"), d)
    return (f"GROUNDING {'image USED' if used else 'image NOT used'} by the decoder (held-out gap: qa "
            f"{d['qa_gap']:+.3f}, desc {d['desc_gap']:+.3f}; first scene diagnostic qa {first['qa_gap']:+.3f}); "
            f"tower {'encodes' if sees else 'does NOT encode'} the cells (probe {p})")


def fix_processor_config(full):
    """processor_config.json must carry what LlavaProcessor needs to expand <image> to 576 tokens."""
    path = os.path.join(full, "processor_config.json")
    cfg = {}
    if os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
    want = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": ARCH["patch"],
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    changed = False
    for k, v in want.items():
        if cfg.get(k) is None:
            cfg[k] = v
            changed = True
    if changed:
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def reload_check(full, model, hf, builder, dev, ev, t0):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    proc = AutoProcessor.from_pretrained(full)
    try:
        m2 = LlavaForConditionalGeneration.from_pretrained(full, dtype=torch.bfloat16)
    except TypeError:
        m2 = LlavaForConditionalGeneration.from_pretrained(full, torch_dtype=torch.bfloat16)
    m2.to(dev).eval()
    res = {"same_outputs": 0, "checked": 0, "ids_equal": 0,
           "inv_freq_dtypes": sorted({str(b.dtype) for n, b in m2.named_buffers() if n.endswith("inv_freq")})}
    descs = [s for s in ev["samples"] if s["kind"] == "description"][:4]
    prompt = scenes.chat_prompt(scenes.DESCRIBE_PROMPTS[0])
    for s in descs:
        img = scenes.render(scenes.make_scene(s["seed"]))
        inp = proc(images=Image.fromarray(img), text=prompt, return_tensors="pt").to(dev)
        res["ids_equal"] += int(inp["input_ids"][0].tolist() == builder.prompt_ids(scenes.DESCRIBE_PROMPTS[0])[1])
        with torch.no_grad():
            out = m2.generate(**inp, max_new_tokens=len(hf.tok(s["output"])["input_ids"]) + 8, do_sample=False)
        text = proc.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        res["checked"] += 1
        res["same_outputs"] += int(text == s["output"])
        if text != s["output"]:
            log(f"reload check: output differs for seed {s['seed']}:\n  {text[:200]}\n  {s['output'][:200]}", t0)
    log(f"reload check: {res}", t0)
    return res


def default_workers():
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 4
    return max(1, min(14, n - 2))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".cache/text/corpus.txt.gz")
    ap.add_argument("--tokenizer", default="models/prefixkv-llava-tiny/tokenizer.model")
    ap.add_argument("--out", default="out/model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lang-steps", type=int, default=1500)
    ap.add_argument("--vis-steps", type=int, default=800, help="stage 2a steps (vision tower + projector on the aux targets)")
    ap.add_argument("--scene-steps", type=int, default=5000,
                    help="stage 2b steps at most, text steps included (the plan is fitted to --deadline)")
    ap.add_argument("--lang-batch", type=int, default=32, help="512-token windows per text step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--scenes-per-batch", type=int, default=32,
                    help="scenes per step; each gives 1 description + --qa-seqs question sequences")
    ap.add_argument("--qa-seqs", type=int, default=1, help="multi-turn question sequences per scene")
    ap.add_argument("--qa-cells", type=int, default=6, help="cells asked about per question sequence (<= 9)")
    ap.add_argument("--qa-weight", type=float, default=1.0, help="weight of the mean question-answer token loss")
    ap.add_argument("--aux-weight", type=float, default=0.3, help="weight of the aux vision loss in stage 2b (0: off)")
    ap.add_argument("--aux-mode", choices=["pooled", "pooled+token-shape", "token"], default="pooled+token-shape",
                    help="aux object targets from each cell's mean logits (+ the shape on every token of the "
                         "cell), or all of them on every token of the cell")
    ap.add_argument("--text-every", type=int, default=5, help="every k-th stage-2b step is a text batch")
    ap.add_argument("--lr-lang", type=float, default=1.5e-3)
    ap.add_argument("--lr-vis", type=float, default=2e-3, help="stage 2a peak lr (tower, projector, aux head)")
    ap.add_argument("--lr-scene", type=float, default=1e-3, help="stage 2b peak lr of the decoder")
    ap.add_argument("--vision-lr-mult", type=float, default=1.0,
                    help="stage 2b lr factor for tower + projector (+ aux head)")
    ap.add_argument("--lr-floor", type=float, default=0.05, help="final lr as a fraction of the peak")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--warmup-vis", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--clip-mode", choices=["group", "global"], default="group",
                    help="clip the gradient norm per group (decoder / vision / aux) or over all parameters")
    ap.add_argument("--pos-init", choices=["sincos", "normal"], default="sincos",
                    help="vision position embeddings: 2-D sine-cosine at the patch-embedding scale, or N(0, 0.02)")
    ap.add_argument("--pos-scale", type=float, default=1.0, help="rms of the sincos position table (patch output rms = 1)")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--prefetch", type=int, default=64, help="scene batches in flight")
    ap.add_argument("--eval-scenes", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--diag-every", type=int, default=300, help="stage 2b steps between held-out image-gap checks")
    ap.add_argument("--diag-scenes", type=int, default=16)
    ap.add_argument("--quick-eval-at", default="0.3,0.65", help="fractions of stage 2b with a quick greedy evaluation")
    ap.add_argument("--quick-eval-scenes", type=int, default=16)
    ap.add_argument("--quick-max-new", type=int, default=200)
    ap.add_argument("--quick-eval-s", type=float, default=10.0, help="time budgeted per quick evaluation")
    ap.add_argument("--shard-size", default="12MB")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds from start to the end of everything")
    ap.add_argument("--reserve-s", type=float, default=50.0, help="kept for evaluation and saving")
    ap.add_argument("--lang-share", type=float, default=0.4, help="share of the training time stage 1 may use")
    ap.add_argument("--vis-share", type=float, default=0.1, help="share of the remaining time stage 2a may use")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--expect-scene0", default=EXPECTED_SCENE0, help="pixel sha256 of scene 0 (data/ machine)")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only for testing the loop)")
    ap.add_argument("--layers", type=int, default=ARCH["layers"], help="decoder layers (issue 13's model (d): deeper)")
    ap.add_argument("--hidden", type=int, default=ARCH["hidden"], help="decoder hidden size")
    ap.add_argument("--heads", type=int, default=ARCH["heads"], help="decoder attention heads")
    ap.add_argument("--kv-heads", type=int, default=ARCH["kv_heads"], help="decoder KV heads")
    ap.add_argument("--intermediate", type=int, default=ARCH["intermediate"], help="decoder MLP width")
    ap.add_argument("--max-mb", type=float, default=32.0,
                    help="largest 16-bit model size in MB (32: the bundled model's budget in the repository)")
    ap.add_argument("--lang-only", default=None, metavar="FILE",
                    help="stage 1 only, for the whole --deadline: save the float32 weights to FILE (for "
                         "--init-from; outside --out, whose files must fit the trip back) and the model in --out "
                         "as usual (bf16), without the evaluation")
    ap.add_argument("--init-from", default=None, metavar="FILE",
                    help="start from the float32 weights a --lang-only run saved (same shape), so a long language "
                         "stage can span several calls; each call draws new text windows")
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run (about a minute)")
    ap.add_argument("--dry-run", action="store_true", help="data path only, without torch")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lang_steps, args.vis_steps, args.scene_steps, args.eval_scenes = 30, 30, 60, 4
        args.max_new_tokens, args.log_every, args.warmup, args.warmup_vis = 40, 20, 10, 5
        args.diag_every, args.diag_scenes, args.quick_eval_at, args.quick_eval_scenes = 20, 4, "0.5", 4
        args.quick_max_new, args.quick_eval_s, args.reserve_s, args.prefetch = 40, 5.0, 90, 8
    assert 1 <= args.qa_cells <= 9 and args.qa_seqs >= 0 and args.diag_scenes >= 2
    assert args.hidden % args.heads == 0 and args.heads % args.kv_heads == 0, "hidden / heads / kv-heads"
    ARCH.update(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                intermediate=args.intermediate)
    if args.lang_only:
        args.lang_share = 1.0  # stage 1 takes all the time there is
    return args


def main(argv):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    return main_train(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
