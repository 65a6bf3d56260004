#!/usr/bin/env python3
"""Generate the parity fixtures of prefixkv: tiny checkpoints, test images, tokenizer
cases and reference outputs computed with HF transformers.

Run once on a machine with Python 3.12, torch, transformers 5.x, sentencepiece,
safetensors, numpy and PIL (no GPU and no network needed; everything runs in float32
on the CPU):

    python3 tools/make_fixtures.py --out tests/data \
        --llama2-tokenizer PATH/TO/llama2/tokenizer.model

Everything is deterministic (fixed seeds, single-threaded sentencepiece training).
The output layout under --out is:

    tokenizer/fixture_sp.model       tiny SentencePiece BPE model trained here
    tokenizer/llama2_ids.json        sentencepiece vs transformers ids, real LLaMA-2 model
    tokenizer/fixture_ids.json       the same for fixture_sp.model
    images/*.png|jpg                 synthetic test images
    fixtures/<name>/                 tiny checkpoints in every naming scheme
    ref/<case>/*.npy                 reference tensors (float32, C order)
    ref/pixels/<name>.npy            pixel-only references (preprocessing tests)
    ref/decoded/*.npy                decoded pixels of the JPEG (uint8, HWC)
    ref/manifest.json                describes everything above

The script checks itself as it goes (reloads what it wrote with transformers, compares
the two ways of computing the LLaVA prefill, verifies greedy decoding with and
without the KV cache, ...). Each check is printed as CHECK OK / CHECK FAIL and stored
in the manifest; the exit status is 1 when a check failed.

Steps can be run separately with --steps (tokenizer,images,models); the models step
reads the tokenizer and images written by the earlier steps.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import traceback
import zlib

import numpy as np
from PIL import Image

# Never try to reach the hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_MARKER = -200  # IMAGE_TOKEN_INDEX of the original LLaVA code
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
FIXTURE_SP_VOCAB = 384
N_GREEDY = 32
MIN_MARGIN = 5e-3  # smallest top-1/top-2 logit gap accepted along the greedy path


# --------------------------------------------------------------------------------------
# Logging and self-checks
# --------------------------------------------------------------------------------------


class FixtureError(RuntimeError):
    pass


class Report:
    """Collects warnings and named checks; everything is also printed at once."""

    def __init__(self):
        self.warnings: list[str] = []
        self.checks: list[dict] = []

    def info(self, msg: str) -> None:
        print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"WARNING: {msg}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"CHECK {'OK  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]


R = Report()


def _py(obj):
    """Converts numpy / torch scalars and containers into plain JSON-able Python."""
    if isinstance(obj, dict):
        return {str(k): _py(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_py(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def _fmt_json(obj, indent: int = 0) -> str:
    """JSON with one key per line but lists of scalars on a single line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad} {json.dumps(str(k))}: {_fmt_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return json.dumps(obj, allow_nan=False)
        items = [f"{pad} {_fmt_json(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_fmt_json(_py(obj)) + "\n")


def save_npy(path: str, arr) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    np.save(path, arr)
    return path


# --------------------------------------------------------------------------------------
# 1. Tokenizers
# --------------------------------------------------------------------------------------

# A few KB of plain English, written for this script, to train the fixture tokenizer.
TRAINING_TEXT = """\
USER: Describe the image in detail. ASSISTANT: The image shows a small red house next to a green field.
USER: What is in this picture? ASSISTANT: There is a cat sitting on a wooden table near a window.
USER: What is a cat? ASSISTANT: A cat is a small animal with soft fur, sharp claws and a long tail.
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
A picture can hold many colors: red, orange, yellow, green, blue, purple, black, white and gray.
In the morning the light is soft and warm; by noon it is bright, and in the evening it turns gold.
The camera was placed on a tripod, and the photographer waited for the clouds to move away.
She wrote 12 letters in 3 days, then mailed them from the post office on 45th Street.
Numbers such as 7, 19, 256 and 1024 appear in the table, along with a few dates like 2023-05-17.
On the left side of the image there is a tall tree; on the right side there is a bicycle.
The sky is blue with a few white clouds, and the sun is shining over the quiet lake.
Children were playing with a ball in the park while their parents talked on a bench.
A large bowl of fruit sits on the kitchen counter: apples, bananas, grapes and two lemons.
The city street is busy with cars, buses, people walking, and a man selling fresh bread.
An old map hangs on the wall, showing rivers, mountains, roads and the names of small towns.
The model looks at the picture, finds the objects, and then writes a short answer in plain words.
What color is the car? The car is dark blue, and it is parked in front of a yellow building.
How many people are in the photo? There are four people, and two of them are wearing hats.
Please answer the question with a single word or a short phrase.
The bird on the branch has bright feathers and a short orange beak.
If you look closely, you can see a small boat far away on the water.
The room is clean and simple, with a bed, a desk, a lamp and a shelf full of books.
Snow covers the ground, the trees are bare, and the path leads into the dark forest.
The text on the sign says "Open every day from 9 to 5", written in large letters.
A plate of pasta with tomato sauce, cheese and fresh basil is served on a white plate.
The train arrives at the station at 10:30, and the passengers step onto the platform.
Describe the scene: a beach at sunset, with waves, sand, and a few people walking slowly.
The dog is running across the grass with a stick in its mouth, looking very happy.
This is a photo of a kitchen. There is a stove, a sink, a fridge and a window.
The mountains in the distance are covered with snow, and the valley below is green.
Is there a person in the image? Yes, a woman is standing near the door, holding an umbrella.
The painting uses strong lines and bright colors to show a busy market in the old town.
A close view of a flower shows its petals, a yellow center and a small bee on the edge.
The chart has two lines: one goes up over time, and the other stays almost flat.
Why is the man smiling? He has just won a race and is holding a small trophy.
The window is open, the curtains move in the wind, and rain falls on the street outside.
Two cats sleep on the sofa, curled up next to each other under a soft blanket.
The answer is short, clear and polite, and it explains what can be seen in the picture.
"""


def train_fixture_sp(out_path: str) -> str:
    """Trains the tiny LLaMA-style SentencePiece BPE model (byte fallback, ids 0/1/2)."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        text_path = os.path.join(tmp, "train.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(TRAINING_TEXT)
        prefix = os.path.join(tmp, "fixture_sp")
        options = dict(
            input=text_path,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=FIXTURE_SP_VOCAB,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
        )
        try:
            spm.SentencePieceTrainer.train(**options, minloglevel=1)
        except Exception:  # noqa: BLE001 - older/newer builds without that flag
            spm.SentencePieceTrainer.train(**options)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        shutil.copyfile(prefix + ".model", out_path)
    sp = spm.SentencePieceProcessor(model_file=out_path)
    pieces = [sp.id_to_piece(i) for i in range(3)]
    R.check("fixture_sp special ids", pieces == ["<unk>", "<s>", "</s>"], str(pieces))
    R.check("fixture_sp vocab size", sp.get_piece_size() == FIXTURE_SP_VOCAB, str(sp.get_piece_size()))
    R.check("fixture_sp has no <image> piece", sp.piece_to_id("<image>") == UNK_ID)
    R.info(f"fixture tokenizer: {out_path} ({sp.get_piece_size()} pieces); "
           f"'USER: Describe the image.' -> {sp.encode('USER: Describe the image.', out_type=str)}")
    return out_path


def build_token_test_strings(n_total: int = 300) -> list[str]:
    """About 300 varied strings: hand-written edge cases plus seeded random mixtures."""
    fixed = [
        "", " ", "  ", "   ", "a", "A", "I", "x", "xy", ".", ",", "?", "-", "_", "'", '"',
        "\n", "\t", "\n\n", " \n ", "\r\n", "hello", "Hello", " hello", "hello ", "  hello  world  ",
        "Hello world", "Hello, world!", "HELLO WORLD", "hElLo WoRlD", "The the THE tHe",
        "The quick brown fox jumps over the lazy dog.",
        "USER: Describe the image in detail. ASSISTANT:", "USER:", "ASSISTANT:",
        "A chat between a curious human and an artificial intelligence assistant.",
        "line one\nline two", "tab\tseparated\tvalues", "trailing newline\n", "\nleading newline",
        "windows\r\nline end", "multiple   spaces   between", "ends with two spaces  ",
        "  starts with two spaces", "\n\n\nthree newlines", "mixed \t \n whitespace",
        "0", "7", "42", "123456789", "3.14159", "1,000,000", "-273.15", "2024-01-31", "10:45 PM",
        "$19.99", "50%", "1e-5", "0x1F", "+1 (555) 010-9999", "v1.2.3", "No. 5", "1st 2nd 3rd 4th",
        "!?.,;:", "...", "\u2014", "--", "(parentheses) [brackets] {braces}", "\"quoted\" 'single'",
        "\u201csmart quotes\u201d \u2018single\u2019", "a/b\\c|d", "#hashtag @mention", "~`^*_+=<>",
        "\u00ab guillemets \u00bb", "\u00bfQu\u00e9? \u00a1S\u00ed!",
        "def foo(x):\n    return x + 1\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "if x == 1 and y != 2:", "#include <stdio.h>", "print(\"hello\")",
        "SELECT * FROM users WHERE id = 42;", "const f = () => { return null; };",
        "<div class=\"a\">text</div>", "{\"key\": [1, 2, 3]}", "a && b || !c", "x**2 + y**2",
        "    indented four spaces", "\tindented tab",
        "https://example.com/path?query=1&b=2#frag", "http://www.test.org", "user@example.com",
        "ftp://files.example.net/a_b-c.txt", "www.google.com", "C:\\Windows\\System32",
        "/usr/local/bin/python3", "~/.bashrc",
        "caf\u00e9", "na\u00efve", "r\u00e9sum\u00e9", "Cr\u00e8me br\u00fbl\u00e9e", "\u00c5ngstr\u00f6m",
        "Z\u00fcrich", "S\u00e3o Paulo", "\u0141\u00f3d\u017a", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
        "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u044f\u0437\u044b\u043a", "\u00c7a va?",
        "d\u00e9j\u00e0 vu", "pi\u00f1ata", "fa\u00e7ade", "e\u0301", "\ufb01nance",
        "\u4f60\u597d", "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
        "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "\u4e2d\u6587 and English mixed", "\u6771\u4eac\u30bf\u30ef\u30fc",
        "\u6f22\u5b57\u304b\u306a\u30ab\u30ca", "\uff21\uff22\uff23\uff11\uff12\uff13",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e", "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22",
        "Ti\u1ebfng Vi\u1ec7t",
        "\U0001f642", "\U0001f600\U0001f603\U0001f604", "\U0001f44d\U0001f3fd", "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "I \u2764\ufe0f NY",
        "\u2b50 rating: \u2605\u2605\u2605\u2606\u2606", "\U0001f431 cat", "\U0001f98a fox",
        # Not here on purpose: "<s>", "</s>", "<unk>" typed as text (transformers turns them into
        # the special ids, sentencepiece does not) and a literal U+2581 (sentencepiece decodes
        # it as a space, so it does not round-trip).
        "<image>", "[INST] hi [/INST]", "<0x0A>", "<s", "s>", "</",
        "\u00a0nbsp", "zero\u200bwidth", "soft\u00adhyphen", "\u3000ideographic space", "del\x7fchar",
        "a" * 50, "ab" * 20, "don't can't won't it's", "U.S.A.", "e.g. i.e. etc.", "Mr. Smith",
        "What is a cat?", "The quick brown fox", "Describe the image in detail.",
    ]
    words = [
        "the", "image", "cat", "dog", "picture", "shows", "a", "an", "red", "blue", "green", "of",
        "in", "on", "with", "and", "is", "are", "Describe", "What", "USER", "ASSISTANT", "detail",
        "window", "table", "tree", "sky", "colors", "New", "York", "Paris", "caf\u00e9", "\u00fcber",
        "ni\u00f1o", "\u4e2d\u6587", "\u6771\u4eac", "\ud55c\uad6d", "\U0001f642", "\U0001f408", "42", "3.5", "2024",
        "x_1", "foo()", "a+b", "C++", "e-mail", "don't", "\u0416", "\u03a9", "\u00e6", "\u00df",
    ]
    seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ". ", "-", "", " \n", ": ", "! ", "? "]
    rng = random.Random(20240601)
    out: list[str] = []
    seen: set[str] = set()
    for s in fixed:
        if s not in seen:
            seen.add(s)
            out.append(s)
    while len(out) < n_total:
        n = rng.randint(1, 12)
        parts = []
        for _ in range(n):
            w = rng.choice(words)
            roll = rng.random()
            if roll < 0.15:
                w = w.upper()
            elif roll < 0.25:
                w = w.capitalize()
            elif roll < 0.32:
                w = str(rng.randint(0, 99999))
            parts.append(w)
            parts.append(rng.choice(seps))
        s = "".join(parts)
        if rng.random() < 0.2:
            s = " " * rng.randint(1, 3) + s
        if rng.random() < 0.2:
            s = s.rstrip(" ") if rng.random() < 0.5 else s + " "
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out[:n_total] if len(out) > n_total else out


HF_TOKENIZER_CONFIG = {
    # What llava-hf/llava-1.5-7b-hf ships (tokenizer_config.json), less the added tokens,
    # which are added afterwards so that their ids are known.
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "padding_side": "left",
    "model_max_length": 4096,
}


def describe_hf_tokenizer(tok) -> dict:
    """Class and the settings that decide how text turns into ids."""
    info = {"class": type(tok).__name__, "module": type(tok).__module__}
    for attr in ("legacy", "add_prefix_space", "add_bos_token", "add_eos_token", "backend",
                 "split_special_tokens", "vocab_size"):
        try:
            val = getattr(tok, attr)
            info[attr] = val if isinstance(val, (bool, int, str, type(None))) else str(val)
        except Exception:  # noqa: BLE001 - attribute may not exist in this version
            pass
    try:
        info["len"] = len(tok)
    except Exception:  # noqa: BLE001
        pass
    try:
        backend = json.loads(tok.backend_tokenizer.to_str())
        info["normalizer"] = backend.get("normalizer")
        info["pre_tokenizer"] = backend.get("pre_tokenizer")
        info["post_processor_type"] = (backend.get("post_processor") or {}).get("type")
        model = backend.get("model") or {}
        info["model"] = {k: model.get(k) for k in ("type", "byte_fallback", "fuse_unk", "ignore_merges")}
    except Exception as exc:  # noqa: BLE001
        info["backend_tokenizer"] = f"unavailable ({type(exc).__name__})"
    return info


def load_hf_tokenizer(sp_path: str, workdir: str, style: str):
    """A transformers tokenizer built from a bare tokenizer.model.

    style "llava-hf": the directory also holds the tokenizer_config.json that llava-hf
    ships (LlamaTokenizer, add_bos_token, legacy false) and AutoTokenizer loads it.
    style "default": only tokenizer.model, LlamaTokenizer.from_pretrained with defaults.
    """
    import sentencepiece as spm
    import transformers

    d = tempfile.mkdtemp(prefix=f"hftok_{style}_", dir=workdir)
    shutil.copyfile(sp_path, os.path.join(d, "tokenizer.model"))
    attempts = []
    if style == "llava-hf":
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(HF_TOKENIZER_CONFIG, f)
        attempts.append(("AutoTokenizer.from_pretrained", lambda: transformers.AutoTokenizer.from_pretrained(d)))
    attempts.append(("LlamaTokenizer.from_pretrained", lambda: transformers.LlamaTokenizer.from_pretrained(d)))
    if hasattr(transformers, "LlamaTokenizerFast"):
        attempts.append(("LlamaTokenizerFast.from_pretrained",
                         lambda: transformers.LlamaTokenizerFast.from_pretrained(d)))
    tok, how, errors = None, None, []
    for name, fn in attempts:
        try:
            tok, how = fn(), name
            break
        except Exception as exc:  # noqa: BLE001 - report and try the next way
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    if tok is None:
        raise FixtureError("could not build a transformers tokenizer from "
                           f"{sp_path}: {errors}")
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    probe = "Hello world, this is a test of 123 tokens."
    got = tok(probe, add_special_tokens=False)["input_ids"]
    want = sp.encode(probe)
    if got != want:
        raise FixtureError(f"transformers tokenizer ({how}) disagrees with sentencepiece on {probe!r}: "
                           f"{got} vs {want}. If SentencePiece extraction failed, install 'protobuf'.")
    if len(tok) != sp.get_piece_size():
        R.warn(f"transformers tokenizer from {sp_path} has {len(tok)} tokens, "
               f"sentencepiece has {sp.get_piece_size()}")
    info = describe_hf_tokenizer(tok)
    info["built_with"] = how
    info["style"] = style
    if style == "llava-hf":
        info["tokenizer_config"] = dict(HF_TOKENIZER_CONFIG)
    return tok, info


def add_special_token(tok, content: str) -> int:
    """Adds content as a special added token (like llava-hf's <image>) and returns its id."""
    try:
        from tokenizers import AddedToken
    except ImportError:  # pragma: no cover
        from transformers import AddedToken
    token = AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
    try:
        tok.add_tokens([token], special_tokens=True)
    except TypeError:
        tok.add_special_tokens({"additional_special_tokens": [token]})
    return int(tok.convert_tokens_to_ids(content))


def llava_orig_ids(sp, text: str) -> list[int]:
    """The original LLaVA rule (tokenizer_image_token): split on <image>, encode each chunk
    with sentencepiece (dummy prefix included), BOS before the first chunk only, and the
    marker -200 between chunks."""
    ids = [BOS_ID]
    for i, chunk in enumerate(text.split("<image>")):
        if i > 0:
            ids.append(IMAGE_MARKER)
        ids.extend(sp.encode(chunk))
    return ids


def sp_encode_no_dummy_prefix(sp, text: str) -> list[int]:
    """sentencepiece ids of text as if add_dummy_prefix were off (the trick transformers'
    legacy=False slow tokenizer uses: encode '<unk>'+text and drop the '<unk>' pieces)."""
    if not text:
        return []
    head = sp.encode("<unk>")
    ids = sp.encode("<unk>" + text)
    return ids[len(head):]


def llava_hf_rule_ids(sp, text: str, image_id: int) -> list[int]:
    """What transformers' LlamaTokenizer with legacy=False and <image> as an added special
    token should give: BOS, then each piece between <image> tokens encoded with the dummy
    prefix only when it starts the text."""
    ids = [BOS_ID]
    for i, chunk in enumerate(text.split("<image>")):
        if i > 0:
            ids.append(image_id)
        ids.extend(sp.encode(chunk) if i == 0 else sp_encode_no_dummy_prefix(sp, chunk))
    return ids


class RuleTokenizer:
    """Stand-in used only when transformers cannot build a tokenizer from the
    sentencepiece model: ids by the legacy=False rule of llava_hf_rule_ids."""

    def __init__(self, sp, image_id: int | None):
        self.sp = sp
        self.image_id = image_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        if self.image_id is None:
            ids = [BOS_ID] + self.sp.encode(text)
        else:
            ids = llava_hf_rule_ids(self.sp, text, self.image_id)
        return {"input_ids": ids if add_special_tokens else ids[1:]}


CHAT_PROMPTS = [
    "USER: <image>\nDescribe the image in detail. ASSISTANT:",
    "USER: <image>\nWhat is shown in this picture? ASSISTANT:",
    "USER: <image>\nWhat is a cat? Answer briefly. ASSISTANT:",
    "<image>\nUSER: What is this? ASSISTANT:",
    "USER: Compare <image> and <image> please. ASSISTANT:",
    "USER: <image>\n ASSISTANT:",
    "USER: What is a cat? ASSISTANT:",
]


def tokenizer_cases(sp_path: str, strings: list[str], workdir: str, have_hf: bool) -> dict:
    """ids from sentencepiece and from transformers for every string, plus chat prompts."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_path)
    result: dict = {"sentencepiece_model": os.path.basename(sp_path),
                    "sentencepiece_version": spm.__version__,
                    "vocab_size": sp.get_piece_size()}
    tok = tok_default = None
    if have_hf:
        try:
            tok, info = load_hf_tokenizer(sp_path, workdir, "llava-hf")
            result["tokenizer_class"] = info["class"]
            result["settings"] = info
        except FixtureError as exc:
            R.check(f"{os.path.basename(sp_path)}: transformers tokenizer builds", False, str(exc))
            result["tokenizer_class"] = None
            result["settings"] = {"error": str(exc)}
        try:
            tok_default, info_default = load_hf_tokenizer(sp_path, workdir, "default")
            result["settings_default_construction"] = info_default
        except FixtureError as exc:
            R.warn(f"default LlamaTokenizer construction failed: {exc}")
    else:
        result["tokenizer_class"] = None
        result["settings"] = {"note": "transformers not available when this file was made"}
    cases = []
    n_equal = n_default_diff = 0
    mismatches = []
    for idx, s in enumerate(strings):
        case = {"text": s, "sp_ids": sp.encode(s)}
        if tok is not None:
            hf = tok(s, add_special_tokens=True)["input_ids"]
            case["hf_ids"] = hf
            body = hf[1:] if hf[:1] == [BOS_ID] else hf
            if body == case["sp_ids"] and hf[:1] == [BOS_ID]:
                n_equal += 1
            else:
                mismatches.append(idx)
            if tok_default is not None:
                hd = tok_default(s, add_special_tokens=True)["input_ids"]
                if hd != hf:
                    case["hf_default_ids"] = hd
                    n_default_diff += 1
        cases.append(case)
    result["summary"] = {
        "n_cases": len(cases),
        "hf_equals_bos_plus_sp": n_equal if tok is not None else None,
        "hf_mismatch_indices": mismatches if tok is not None else None,
        "n_default_construction_differs": n_default_diff if tok_default is not None else None,
    }
    result["cases"] = cases
    if tok is not None:
        R.info(f"{os.path.basename(sp_path)}: transformers ids == [BOS]+sentencepiece ids for "
               f"{n_equal}/{len(cases)} strings; mismatches at {mismatches[:20]}"
               + (" ..." if len(mismatches) > 20 else ""))
        for idx in mismatches[:8]:
            c = cases[idx]
            R.info(f"   mismatch {idx}: {c['text']!r}: sp={c['sp_ids']} hf={c['hf_ids']}")
    # Chat prompts with <image> as an added special token (id = sentencepiece vocab size).
    chat = []
    if tok is not None:
        image_id = add_special_token(tok, "<image>")
        pad_id = add_special_token(tok, "<pad>")
        result["image_token"] = {"content": "<image>", "id": image_id, "pad_id": pad_id}
        R.check(f"{os.path.basename(sp_path)} <image> id == vocab size", image_id == sp.get_piece_size(),
                f"{image_id} vs {sp.get_piece_size()}")
        for text in CHAT_PROMPTS:
            hf = tok(text, add_special_tokens=True)["input_ids"]
            rule = llava_hf_rule_ids(sp, text, image_id)
            chat.append({"text": text, "hf_ids": hf, "llava_orig_ids": llava_orig_ids(sp, text),
                         "hf_equals_legacy_false_rule": hf == rule})
            if hf != rule:
                R.warn(f"chat prompt {text!r}: transformers ids {hf} differ from the legacy=False rule {rule}")
    else:
        for text in CHAT_PROMPTS:
            chat.append({"text": text, "hf_ids": None, "llava_orig_ids": llava_orig_ids(sp, text)})
    result["chat_cases"] = chat
    return result


def write_token_json(path: str, data: dict) -> None:
    """Writes the tokenizer cases with one case per line (readable diffs, small file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    head = {k: v for k, v in data.items() if k not in ("cases", "chat_cases")}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f" {json.dumps(k)}: {json.dumps(_py(v), ensure_ascii=True, allow_nan=False)},")
    for key in ("chat_cases", "cases"):
        items = data.get(key, [])
        lines.append(f" {json.dumps(key)}: [")
        for i, c in enumerate(items):
            sep = "," if i + 1 < len(items) else ""
            lines.append("  " + json.dumps(_py(c), ensure_ascii=True, allow_nan=False) + sep)
        lines.append(" ]" + ("," if key == "chat_cases" else ""))
    lines.append("}")
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")
    json.load(open(path, encoding="ascii"))  # make sure it parses


def step_tokenizer(args, have_hf: bool) -> dict:
    out_tok = os.path.join(args.out, "tokenizer")
    os.makedirs(out_tok, exist_ok=True)
    sp_path = train_fixture_sp(os.path.join(out_tok, "fixture_sp.model"))
    strings = build_token_test_strings()
    R.info(f"{len(strings)} tokenizer test strings")
    with tempfile.TemporaryDirectory() as work:
        llama2 = tokenizer_cases(args.llama2_tokenizer, strings, work, have_hf)
        llama2["source"] = "the real LLaMA-2 tokenizer.model passed with --llama2-tokenizer"
        write_token_json(os.path.join(out_tok, "llama2_ids.json"), llama2)
        fixture = tokenizer_cases(sp_path, strings, work, have_hf)
        fixture["source"] = "tokenizer/fixture_sp.model"
        write_token_json(os.path.join(out_tok, "fixture_ids.json"), fixture)
    return {"llama2": {k: llama2.get(k) for k in ("tokenizer_class", "settings", "summary", "image_token")},
            "fixture": {k: fixture.get(k) for k in ("tokenizer_class", "summary", "image_token")}}


# --------------------------------------------------------------------------------------
# 2. Images
# --------------------------------------------------------------------------------------


def synth_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, hard-edged shapes, fine stripes and a little noise, so
    that the resampling filter and the crop offsets visibly matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = xx / max(width - 1, 1), yy / max(height - 1, 1)
    ph = rng.uniform(0, 2 * math.pi, size=3)
    r = 40 + 170 * u + 25 * np.sin(2 * math.pi * 2.5 * v + ph[0])
    g = 30 + 150 * v + 35 * np.cos(2 * math.pi * 1.7 * (u + v) + ph[1])
    b = 210 - 150 * np.hypot(u - 0.5, v - 0.5) + 20 * np.sin(2 * math.pi * 3.1 * u + ph[2])
    img = np.stack([r, g, b], axis=-1)
    # A rectangle.
    x0, y0 = int(width * rng.uniform(0.05, 0.2)), int(height * rng.uniform(0.08, 0.2))
    img[y0:y0 + height // 4, x0:x0 + width // 4] = (230, 40, 60)
    # A disc.
    cx, cy = width * rng.uniform(0.55, 0.75), height * rng.uniform(0.5, 0.7)
    rad = 0.17 * min(width, height)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= rad ** 2] = (30, 200, 90)
    # Fine vertical stripes (period 4 px) in a band: aliasing-sensitive.
    sx0, sx1 = int(width * 0.45), int(width * 0.95)
    sy0, sy1 = int(height * 0.04), int(height * 0.2)
    stripes = ((xx[sy0:sy1, sx0:sx1].astype(int) // 2) % 2) == 0
    band = img[sy0:sy1, sx0:sx1]
    band[stripes] = (20, 20, 20)
    band[~stripes] = (245, 245, 240)
    # A small checkerboard (3 px squares).
    cy0, cy1 = int(height * 0.75), int(height * 0.95)
    cx0, cx1 = int(width * 0.05), int(width * 0.3)
    check = ((xx[cy0:cy1, cx0:cx1].astype(int) // 3 + yy[cy0:cy1, cx0:cx1].astype(int) // 3) % 2) == 0
    patch = img[cy0:cy1, cx0:cx1]
    patch[check] = (250, 220, 30)
    patch[~check] = (40, 30, 120)
    # A thin diagonal line.
    line = np.abs((yy / height) - (xx / width) * 0.8 - 0.1) < (1.2 / height)
    img[line] = (255, 255, 255)
    img += rng.normal(0.0, 2.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


IMAGE_SPECS = {
    # name: (width, height, mode, seed)
    "wide.png": (400, 300, "RGB", 11),
    "tall.jpg": (240, 360, "RGB", 12),
    "square.png": (336, 336, "RGB", 13),
    "gray.png": (200, 150, "L", 14),
    "rgba.png": (180, 240, "RGBA", 15),
}


def step_images(args) -> dict:
    out_img = os.path.join(args.out, "images")
    os.makedirs(out_img, exist_ok=True)
    info = {}
    for name, (w, h, mode, seed) in IMAGE_SPECS.items():
        rgb = synth_rgb(w, h, seed)
        path = os.path.join(out_img, name)
        if mode == "RGB":
            img = Image.fromarray(rgb, "RGB")
        elif mode == "L":
            img = Image.fromarray(rgb, "RGB").convert("L")
        else:
            # Alpha: a left-to-right ramp from 40 to 255, fully transparent disc top-left.
            yy, xx = np.mgrid[0:h, 0:w]
            alpha = 40 + (215 * xx / max(w - 1, 1))
            alpha[(xx - w * 0.25) ** 2 + (yy - h * 0.3) ** 2 <= (0.12 * w) ** 2] = 0
            rgba = np.dstack([rgb, np.clip(np.round(alpha), 0, 255).astype(np.uint8)])
            img = Image.fromarray(rgba, "RGBA")
        if name.endswith(".jpg"):
            # Baseline JPEG, quality 90, 4:4:4 chroma (no chroma upsampling differences
            # between decoders; the IDCT may still differ by a level or so).
            img.save(path, "JPEG", quality=90, subsampling=0, optimize=False, progressive=False)
        else:
            img.save(path, "PNG")
        check = Image.open(path)
        info[name] = {"width": check.size[0], "height": check.size[1], "mode": check.mode,
                      "bytes": os.path.getsize(path)}
        R.info(f"image {name}: {check.size[0]}x{check.size[1]} {check.mode}, {os.path.getsize(path)} bytes")
    # How PIL decodes the JPEG, so that decoder differences can be told from resampling ones.
    decoded = np.asarray(Image.open(os.path.join(out_img, "tall.jpg")).convert("RGB"), dtype=np.uint8)
    dpath = os.path.join(args.out, "ref", "decoded", "tall_jpg_rgb_uint8.npy")
    os.makedirs(os.path.dirname(dpath), exist_ok=True)
    np.save(dpath, np.ascontiguousarray(decoded))
    info["tall.jpg"]["pil_decoded"] = "ref/decoded/tall_jpg_rgb_uint8.npy"
    return info


# --------------------------------------------------------------------------------------
# 3. Image preprocessing (transformers processors + LLaVA's expand2square)
# --------------------------------------------------------------------------------------


def expand2square(img: Image.Image, background: tuple) -> Image.Image:
    """LLaVA's pad mode: paste the image centred on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return result


def composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def processor_kind(proc) -> str:
    backend = getattr(proc, "backend", None)
    if isinstance(backend, str):
        return "pil" if "pil" in backend.lower() else backend.lower()
    name = type(proc).__name__
    if name.endswith("Pil"):
        return "pil"
    if name.endswith("Fast"):
        return "torchvision"
    return "pil"  # transformers 4.x slow processors are PIL/numpy based


class Preprocess:
    """The CLIP image processor of the installed transformers, both backends if present.
    'slow' is the PIL/numpy backend (primary reference), 'fast' the torchvision one."""

    def __init__(self, size: int):
        import transformers

        self.size = size
        self.kwargs = dict(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                           crop_size={"height": size, "width": size}, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                           image_std=list(CLIP_STD), do_convert_rgb=True)
        candidates = []
        for name in ("CLIPImageProcessorPil", "CLIPImageProcessor", "CLIPImageProcessorFast"):
            cls = getattr(transformers, name, None)
            if cls is None:
                try:
                    mod = __import__("transformers.models.clip", fromlist=[name])
                    cls = getattr(mod, name, None)
                except Exception:  # noqa: BLE001
                    cls = None
            if cls is None:
                continue
            try:
                candidates.append(cls(**self.kwargs))
            except Exception as exc:  # noqa: BLE001 - e.g. torchvision missing
                R.info(f"  {name} unavailable: {type(exc).__name__}: {exc}")
        self.slow = next((p for p in candidates if processor_kind(p) == "pil"), None)
        self.fast = next((p for p in candidates if processor_kind(p) != "pil"), None)
        if self.slow is None and self.fast is None:
            raise FixtureError("no CLIP image processor could be built")
        self.slow_name = type(self.slow).__name__ if self.slow is not None else None
        self.fast_name = type(self.fast).__name__ if self.fast is not None else None
        if self.slow is None:
            R.warn("no PIL-backend CLIP image processor: the torchvision one is the primary reference")

    @staticmethod
    def _run(proc, img) -> np.ndarray:
        out = proc(images=img, return_tensors="pt")["pixel_values"]
        arr = out[0] if isinstance(out, (list, tuple)) else out[0]
        arr = arr.detach().cpu().float().numpy() if hasattr(arr, "detach") else np.asarray(arr, np.float32)
        return np.ascontiguousarray(arr.astype(np.float32))

    def primary(self, img) -> np.ndarray:
        return self._run(self.slow if self.slow is not None else self.fast, img)

    def secondary(self, img):
        if self.slow is None or self.fast is None:
            return None
        return self._run(self.fast, img)

    def describe(self) -> dict:
        return {"primary": self.slow_name or self.fast_name,
                "primary_backend": "pil" if self.slow is not None else "torchvision",
                "secondary_fast": self.fast_name if self.slow is not None else None,
                "settings": {k: v for k, v in self.kwargs.items()}}


def load_image_for_mode(path: str, mode: str) -> Image.Image:
    """crop: the file as decoded (the processor converts to RGB); pad: LLaVA's way,
    convert('RGB') then expand2square with the mean colour."""
    img = Image.open(path)
    img.load()
    if mode == "pad":
        background = tuple(int(x * 255) for x in CLIP_MEAN)
        img = expand2square(img.convert("RGB"), background)
    return img


def pad_cross_check(path: str, size: int, primary: np.ndarray) -> dict | None:
    """Compares our expand2square + CLIP processor with transformers' own LLaVA image
    processor with do_pad=True, when this version has one."""
    import transformers

    for name in ("LlavaImageProcessorPil", "LlavaImageProcessor"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            proc = cls(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                       crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                       do_convert_rgb=True, do_pad=True)
            if processor_kind(proc) != "pil":
                continue
            img = Image.open(path).convert("RGB")
            out = Preprocess._run(proc, img)
            return {"processor": name, "max_abs_diff": float(np.abs(out - primary).max())}
        except Exception as exc:  # noqa: BLE001
            return {"processor": name, "error": f"{type(exc).__name__}: {exc}"}
    return None


# --------------------------------------------------------------------------------------
# 4. Models
# --------------------------------------------------------------------------------------

TEXT_MHA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, head_dim=None, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=2048)
FIXTURES = {
    "llava_hf_mha": dict(
        layout="llava_hf", seed=1001, storage_dtype="float32",
        text=dict(TEXT_MHA),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        vision_feature_layer=-2, strategy="default", projector_hidden_act="gelu"),
    "llava_v5_gqa": dict(
        layout="llava_v5", seed=2002, storage_dtype="bfloat16",
        text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=1024),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    image_size=112, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
        vision_feature_layer=-1, strategy="full", projector_hidden_act="gelu"),
    "llava_orig_sharded": dict(
        layout="llava_orig", seed=3003, storage_dtype="float16",
        text=dict(TEXT_MHA),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    image_size=112, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        vision_feature_layer=-2, strategy="default", projector_hidden_act="gelu"),
    "llama_text": dict(
        layout="llama", seed=4004, storage_dtype="float32",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=None, rms_norm_eps=1e-6, rope_theta=20000.0,
                  max_position_embeddings=2048, tie_word_embeddings=True)),
}

CASES = [
    dict(name="hf_mha_wide_crop", fixture="llava_hf_mha", image="images/wide.png", mode="crop",
         template="llava_v1", prompt="Describe the image in detail."),
    dict(name="hf_mha_tall_crop", fixture="llava_hf_mha", image="images/tall.jpg", mode="crop",
         template="llava_v1", prompt="What is in this picture?"),
    dict(name="hf_mha_wide_pad", fixture="llava_hf_mha", image="images/wide.png", mode="pad",
         template="llava_v1", prompt="Describe the image in detail."),
    dict(name="hf_mha_text_only", fixture="llava_hf_mha", image=None, mode=None,
         template="llava_v1", prompt="What is a cat?"),
    dict(name="v5_gqa_tall_pad", fixture="llava_v5_gqa", image="images/tall.jpg", mode="pad",
         template="llava_v1", prompt="Describe the image in detail."),
    dict(name="v5_gqa_rgba_crop", fixture="llava_v5_gqa", image="images/rgba.png", mode="crop",
         template="llava_v1", prompt="What colors do you see?"),
    dict(name="orig_wide_pad", fixture="llava_orig_sharded", image="images/wide.png", mode="pad",
         template="llava_v1", prompt="Describe the image in detail."),
    dict(name="orig_gray_pad", fixture="llava_orig_sharded", image="images/gray.png", mode="pad",
         template="llava_v1", prompt="Is this image in color?"),
    dict(name="llama_raw", fixture="llama_text", image=None, mode=None, template="raw",
         prompt="The quick brown fox"),
    dict(name="llama_chat", fixture="llama_text", image=None, mode=None, template="llava_v1",
         prompt="What is a cat?"),
]

# Pixel-only references (preprocessing tests): (name, image, mode, size).
PIXEL_CASES = [
    ("square_crop_112", "images/square.png", "crop", 112),
    ("gray_crop_112", "images/gray.png", "crop", 112),
    ("rgba_pad_112", "images/rgba.png", "pad", 112),
]


def apply_template(template: str, prompt: str, has_image: bool) -> str:
    if template == "raw":
        return prompt
    if template == "llava_v1":
        return f"USER: <image>\n{prompt} ASSISTANT:" if has_image else f"USER: {prompt} ASSISTANT:"
    raise ValueError(template)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def tensor_seed(base: int, name: str) -> int:
    return zlib.crc32(f"{base}/{name}".encode()) & 0x7FFFFFFF


def make_tensor(base_seed: int, canonical: str, shape) -> "torch.Tensor":
    """Random values for one weight, seeded by its canonical name.

    Linear weights: N(0, (1.5/sqrt(fan_in))^2), i.e. std 0.1-0.3 here; lm_head 2.5/sqrt(fan_in)
    so that logits are spread (no near-ties); norms 1 + 0.1 N(0,1); biases 0.1 N(0,1);
    token embeddings and the CLIP class embedding N(0,1); position embeddings 0.5 N(0,1)."""
    import torch

    g = torch.Generator().manual_seed(tensor_seed(base_seed, canonical))
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    lname = canonical.lower()
    leaf = lname.rsplit(".", 1)[-1]
    is_norm = any(s in lname for s in ("norm", "layrnorm"))
    if leaf == "class_embedding":
        return x
    if "position_embedding" in lname:
        return 0.5 * x
    if "embed_tokens" in lname:
        return x
    if leaf == "bias":
        return 0.1 * x
    if len(shape) == 1 and is_norm:
        return 1.0 + 0.1 * x
    if len(shape) == 2:
        gain = 2.5 if "lm_head" in lname else 1.5
        return x * (gain / math.sqrt(shape[1]))
    if len(shape) == 4:
        return x * (1.5 / math.sqrt(int(np.prod(shape[1:]))))
    raise FixtureError(f"no init rule for {canonical} {tuple(shape)}")


def llava_key_to_canonical(key: str) -> str:
    """In-memory LlavaForConditionalGeneration key (any transformers version) -> the
    llava-hf hub name, which this script uses as the canonical name of a weight."""
    k = key
    if k.startswith("model.") and not k.startswith("model.model."):
        k = k[len("model."):]
    if k.startswith("lm_head."):
        return "language_model." + k
    if k.startswith("language_model."):
        rest = k[len("language_model."):]
        if rest.startswith(("model.", "lm_head.")):
            return k
        return "language_model.model." + rest
    if k.startswith("vision_tower."):
        rest = k[len("vision_tower."):]
        return k if rest.startswith("vision_model.") else "vision_tower.vision_model." + rest
    if k.startswith("multi_modal_projector."):
        return k
    raise FixtureError(f"unexpected LLaVA parameter name {key}")


def init_model_weights(model, to_canonical, base_seed: int, storage_dtype: str,
                       special_rows: dict[str, tuple[list[int], float]],
                       scales: dict[str, float] | None = None) -> dict:
    """Fills every parameter of model with seeded values rounded to storage_dtype (so the
    float32 reference equals the stored weights upcast) and returns {canonical: tensor}.
    Tied parameters get one value; buffers are left alone. special_rows scales some rows
    of the tensors whose canonical name ends with the key; scales scales whole tensors."""
    import torch

    try:
        params = dict(model.named_parameters(remove_duplicate=False))
    except TypeError:  # torch < 2.0
        params = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod._parameters.items():
                if p is not None:
                    params[f"{mname}.{pname}" if mname else pname] = p
    groups: dict[int, list[str]] = {}
    for name, p in params.items():
        groups.setdefault(id(p), []).append(name)
    state = model.state_dict()
    new_state = {}
    canonical: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    dt = torch_dtype(storage_dtype)
    for key, value in state.items():
        if key not in params:
            new_state[key] = value.clone()
            continue
        pid = id(params[key])
        if pid not in done:
            names = sorted(groups[pid], key=lambda n: ("lm_head" in n, n))  # embeddings first
            canon = to_canonical(names[0])
            t = make_tensor(base_seed, canon, value.shape)
            for suffix, scale in (scales or {}).items():
                if canon.endswith(suffix):
                    t = t * scale
            for suffix, (rows, scale) in special_rows.items():
                if canon.endswith(suffix):
                    for r in rows:
                        if 0 <= r < t.shape[0]:
                            t[r] *= scale
            if dt != torch.float32:
                t = t.to(dt).to(torch.float32)
            done[pid] = t
            canonical[canon] = t
        new_state[key] = done[pid]
    model.load_state_dict(new_state, strict=True)
    return canonical


def instantiate(cls, cfg):
    """Builds a float32 eval model with eager attention."""
    import torch

    model = None
    for kw in ({"attn_implementation": "eager", "dtype": torch.float32},
               {"attn_implementation": "eager", "torch_dtype": torch.float32},
               {"attn_implementation": "eager"}):
        try:
            model = cls._from_config(cfg, **kw)
            break
        except TypeError:
            continue
    if model is None:
        model = cls(cfg)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - not essential
            pass
    return model.float().eval()


def hf_from_pretrained(cls, path: str):
    """cls.from_pretrained in float32 with eager attention; returns (model, loading_info)."""
    import torch

    last = None
    for kw in ({"dtype": torch.float32, "output_loading_info": True},
               {"torch_dtype": torch.float32, "output_loading_info": True},
               {"dtype": torch.float32}, {"torch_dtype": torch.float32}):
        try:
            res = cls.from_pretrained(path, attn_implementation="eager", **kw)
            model, info = res if isinstance(res, tuple) else (res, {})
            return model.float().eval(), info
        except TypeError as exc:
            last = exc
    raise last


def make_llama_config(t: dict, vocab: int, tie: bool, pad_id):
    """LlamaConfig for this transformers version; rope theta through rope_parameters when
    the class takes it (transformers 5), else rope_theta."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab, hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
              num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
              num_key_value_heads=t["num_key_value_heads"], hidden_act="silu",
              max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"],
              tie_word_embeddings=tie, attention_bias=False, mlp_bias=False, bos_token_id=BOS_ID,
              eos_token_id=EOS_ID, pad_token_id=pad_id, initializer_range=0.02)
    if t.get("head_dim"):
        kw["head_dim"] = t["head_dim"]
    theta = float(t["rope_theta"])
    takes_rope_parameters = "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters or \
        "rope_parameters" in getattr(LlamaConfig, "__annotations__", {})
    if takes_rope_parameters:
        cfg = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    else:
        cfg = LlamaConfig(**kw, rope_theta=theta)
    return cfg


def check_rotary(model, theta: float, head_dim: int, label: str) -> None:
    """The model's RoPE inverse frequencies must be theta^(-2i/head_dim)."""
    import torch

    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            want = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            ok = buf.numel() == want.numel() and torch.allclose(buf.double(), want, rtol=1e-5, atol=0)
            R.check(f"{label}: rotary inv_freq matches theta={theta:g}, head_dim={head_dim}", ok, name)
            return
    R.warn(f"{label}: no inv_freq buffer found; RoPE theta not verified")


def build_llava(spec: dict, text_vocab: int, image_token_id: int, pad_id):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tcfg = make_llama_config(spec["text"], text_vocab, tie=False, pad_id=pad_id)
    v = spec["vision"]
    vcfg = CLIPVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                            num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                            num_channels=3, image_size=v["image_size"], patch_size=v["patch_size"],
                            hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"],
                            attention_dropout=0.0, projection_dim=64)
    n_patches = (v["image_size"] // v["patch_size"]) ** 2
    n_img = n_patches + (1 if spec["strategy"] == "full" else 0)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_token_id,
                      projector_hidden_act=spec["projector_hidden_act"],
                      vision_feature_select_strategy=spec["strategy"],
                      vision_feature_layer=spec["vision_feature_layer"], image_seq_length=n_img,
                      multimodal_projector_bias=True, tie_word_embeddings=False, pad_token_id=pad_id)
    for attr in ("image_token_id", "image_token_index"):
        if getattr(cfg, attr, image_token_id) != image_token_id:
            setattr(cfg, attr, image_token_id)
    model = instantiate(LlavaForConditionalGeneration, cfg)
    return model, n_img


def llava_parts(model):
    holder = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
    return holder.vision_tower, holder.multi_modal_projector


def clip_layers(vision_tower):
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        try:
            return vision_tower.get_submodule(path)
        except AttributeError:
            continue
    raise FixtureError("cannot find the CLIP encoder layers")


def vision_forward(model, spec: dict, pixel: np.ndarray, label: str, check_semantics: bool):
    """Vision features (hidden_states[vision_feature_layer] after the select strategy) and
    the projector output, both [n_img, dim]."""
    import torch

    vt, proj = llava_parts(model)
    captured = []
    pre_ln = []
    hooks = []
    if check_semantics:
        for layer in clip_layers(vt):
            hooks.append(layer.register_forward_hook(
                lambda _m, _i, o: captured.append((o[0] if isinstance(o, (tuple, list)) else o).detach())))
        for path in ("vision_model.pre_layrnorm", "pre_layrnorm"):
            try:
                mod = vt.get_submodule(path)
            except AttributeError:
                continue
            hooks.append(mod.register_forward_hook(lambda _m, _i, o: pre_ln.append(o.detach())))
            break
    try:
        out = vt(pixel_values=torch.from_numpy(pixel)[None], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    n_layers = spec["vision"]["num_hidden_layers"]
    if check_semantics:
        ok = len(hs) == n_layers + 1 and len(captured) == n_layers and len(pre_ln) == 1 and \
            torch.equal(hs[0], pre_ln[0]) and all(torch.equal(hs[i + 1], captured[i]) for i in range(n_layers))
        R.check(f"{label}: CLIP hidden_states = [pre_layrnorm(embeddings), layer_0 .. layer_{n_layers - 1}]",
                ok, f"len(hidden_states)={len(hs)}, layers={n_layers}")
    sel = hs[spec["vision_feature_layer"]][0]
    if spec["strategy"] == "default":
        sel = sel[1:]
    projected = proj(sel)
    return sel.detach(), projected.detach()


def top2_margin(row) -> float:
    import torch

    v = torch.topk(row.double(), 2).values
    return float(v[0] - v[1])


def greedy_decode(model, first_kwargs: dict, n_new: int):
    """Prefill with first_kwargs, then n_new greedy steps with the KV cache."""
    import torch

    out = model(**first_kwargs, use_cache=True)
    prefill = out.logits[0].float()
    past = out.past_key_values
    tokens, margins, step_logits = [], [], []
    row = prefill[-1]
    for step in range(n_new):
        nxt = int(torch.argmax(row))
        tokens.append(nxt)
        margins.append(top2_margin(row))
        step_logits.append(row.clone())
        if step + 1 == n_new:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        row = out.logits[0, -1].float()
    return prefill, tokens, margins, step_logits


class Fixture:
    """One built model plus what the cases need to know about it."""

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.spec = spec
        self.model = None
        self.canonical: dict = {}
        self.n_img = 0
        self.image_token_id = None
        self.pad_id = None
        self.text_vocab = None
        self.info: dict = {"layout": spec["layout"], "storage_dtype": spec["storage_dtype"],
                           "seed": spec["seed"]}


def prefill_inputs_spliced(model, marked_ids: list[int], projected, marker: int):
    """inputs_embeds with the image features spliced at the marker position(s); positions
    stay contiguous (what the original LLaVA code does)."""
    import torch

    emb_layer = model.get_input_embeddings()
    pieces = []
    text_run: list[int] = []
    for tid in marked_ids:
        if tid == marker:
            if text_run:
                pieces.append(emb_layer(torch.tensor([text_run]))[0])
                text_run = []
            pieces.append(projected)
        else:
            text_run.append(tid)
    if text_run:
        pieces.append(emb_layer(torch.tensor([text_run]))[0])
    return torch.cat(pieces, dim=0)[None]


def run_model_case(fx: Fixture, case: dict, tok_hf, sp, pre: Preprocess | None, data_dir: str,
                   ref_dir: str) -> dict:
    """Computes every reference tensor of one case and writes them."""
    import torch

    spec = fx.spec
    layout = spec["layout"]
    has_image = case["image"] is not None
    text = apply_template(case["template"], case["prompt"], has_image)
    entry = {k: case[k] for k in ("name", "fixture", "image", "mode", "template", "prompt")}
    entry["prompt_text"] = text
    entry["eos_token_id"] = EOS_ID
    entry["reference_path"] = {
        "llava_orig": "LlavaForConditionalGeneration(inputs_embeds): text embeddings with the projector "
                      "output spliced at the -200 marker (original LLaVA), positions 0..T-1",
        "llava_hf": "LlavaForConditionalGeneration(input_ids with the image token repeated, pixel_values)",
        "llava_v5": "LlavaForConditionalGeneration(input_ids with the image token repeated, pixel_values), "
                    "float32 model holding the bf16-rounded weights",
        "llama": "LlamaForCausalLM(input_ids)"}[layout]
    files = {}
    shapes = {}
    cdir = os.path.join(ref_dir, case["name"])

    # --- token ids ---
    if layout == "llava_orig":
        marked = llava_orig_ids(sp, text)
        entry["input_ids_marked"] = marked
        entry["image_marker"] = IMAGE_MARKER
        # No token id exists for the image positions of the original layout: input_ids
        # holds the marker once per image token (the sequence the features are spliced into).
        pos = marked.index(IMAGE_MARKER) if IMAGE_MARKER in marked else None
        entry["input_ids"] = marked if pos is None else \
            marked[:pos] + [IMAGE_MARKER] * fx.n_img + marked[pos + 1:]
        ids_for_model = None
    else:
        ids = tok_hf(text, add_special_tokens=True)["input_ids"]
        if ids[:1] != [BOS_ID]:
            R.warn(f"{case['name']}: transformers tokenizer did not add BOS; prepending it")
            ids = [BOS_ID] + ids
        if layout == "llama":
            want = [BOS_ID] + sp.encode(text)
            R.check(f"{case['name']}: text ids == [BOS]+sentencepiece", ids == want, f"{ids} vs {want}")
        n_marks = ids.count(fx.image_token_id) if fx.image_token_id is not None else 0
        R.check(f"{case['name']}: image tokens in prompt", n_marks == (1 if has_image else 0), str(n_marks))
        if has_image:
            pos = ids.index(fx.image_token_id)
            ids_for_model = ids[:pos] + [fx.image_token_id] * fx.n_img + ids[pos + 1:]
            entry["input_ids_unexpanded"] = ids
            rule = llava_hf_rule_ids(sp, text, fx.image_token_id)
            entry["unexpanded_equals_legacy_false_rule"] = ids == rule
        else:
            ids_for_model = ids
        entry["input_ids"] = ids_for_model

    # --- pixels ---
    pixel = None
    if has_image:
        size = spec["vision"]["image_size"]
        img_path = os.path.join(data_dir, case["image"])
        img = load_image_for_mode(img_path, case["mode"])
        pixel = pre.primary(img)
        fast = pre.secondary(img)
        files["pixel_values"] = os.path.relpath(save_npy(os.path.join(cdir, "pixel_values.npy"), pixel), data_dir)
        shapes["pixel_values"] = list(pixel.shape)
        entry["pixel_processor"] = pre.describe()
        entry["image_size"] = size
        if case["mode"] == "pad":
            entry["pad_background"] = [int(x * 255) for x in CLIP_MEAN]
            cross = pad_cross_check(img_path, size, pixel)
            if cross is not None:
                entry["pad_cross_check"] = cross
                if "max_abs_diff" in cross:
                    R.check(f"{case['name']}: expand2square + CLIP == {cross['processor']}(do_pad=True)",
                            cross["max_abs_diff"] < 1e-5, f"max abs diff {cross['max_abs_diff']:.3g}")
        if fast is not None:  # the torchvision backend's pixels: only how far they are (size budget)
            entry["pixel_values_fast_max_abs_diff"] = float(np.abs(fast - pixel).max())
            entry["pixel_values_fast_mean_abs_diff"] = float(np.abs(fast - pixel).mean())
        if case["image"].endswith("rgba.png") and case["mode"] == "crop":
            raw = Image.open(img_path)
            ref_white = pre.primary(composite_on_white(raw))
            ref_drop = pre.primary(raw.convert("RGB"))
            entry["rgba_to_rgb"] = {
                "max_abs_diff_vs_alpha_composite_on_white": float(np.abs(ref_white - pixel).max()),
                "max_abs_diff_vs_drop_alpha": float(np.abs(ref_drop - pixel).max())}
            R.info(f"  {case['name']}: RGBA conversion check {entry['rgba_to_rgb']}")

    def full_pipeline(pix, want_files: bool):
        """vision -> projector -> prefill -> greedy; returns a dict of results."""
        res = {}
        projected = None
        if pix is not None:
            feats, projected = vision_forward(fx.model, spec, pix, f"{fx.name}/{case['name']}",
                                              check_semantics=want_files)
            res["vision_features"] = feats
            res["projector_output"] = projected
        if layout == "llava_orig":
            if projected is None:
                raise FixtureError("original-layout cases need an image here")
            embeds = prefill_inputs_spliced(fx.model, marked, projected, IMAGE_MARKER)
            first = {"inputs_embeds": embeds}
            all_ids_prefix = None
        else:
            first = {"input_ids": torch.tensor([ids_for_model])}
            if projected is not None:
                first["pixel_values"] = torch.from_numpy(pix)[None]
            all_ids_prefix = ids_for_model
        out = fx.model(**first, use_cache=False)
        if projected is not None and layout != "llava_orig":
            ihs = getattr(out, "image_hidden_states", None)
            if isinstance(ihs, (list, tuple)):
                ihs = torch.cat([x.reshape(-1, x.shape[-1]) for x in ihs], dim=0) if ihs else None
            if ihs is not None and want_files:
                ihs = ihs.reshape(-1, ihs.shape[-1])
                diff = float((ihs - projected).abs().max())
                R.check(f"{case['name']}: our projector output == transformers' image_hidden_states",
                        diff < 1e-5, f"max abs diff {diff:.3g}")
        prefill, tokens, margins, step_logits = greedy_decode(fx.model, first, N_GREEDY)
        res["logits"] = prefill
        res["tokens"] = tokens
        res["margins"] = margins
        res["prefill_direct_vs_cached_max_abs"] = float((out.logits[0].float() - prefill).abs().max())
        res["first"] = first
        res["all_ids_prefix"] = all_ids_prefix
        res["projected"] = projected
        res["step_logits"] = step_logits
        return res

    with torch.no_grad():
        main = full_pipeline(pixel, want_files=True)
        if has_image:
            files["vision_features"] = os.path.relpath(
                save_npy(os.path.join(cdir, "vision_features.npy"), main["vision_features"].numpy()), data_dir)
            files["projector_output"] = os.path.relpath(
                save_npy(os.path.join(cdir, "projector_output.npy"), main["projector_output"].numpy()), data_dir)
            shapes["vision_features"] = list(main["vision_features"].shape)
            shapes["projector_output"] = list(main["projector_output"].shape)
            entry["n_image_tokens"] = int(main["projector_output"].shape[0])
        logits = main["logits"]
        files["logits"] = os.path.relpath(save_npy(os.path.join(cdir, "logits.npy"), logits.numpy()), data_dir)
        shapes["logits"] = list(logits.shape)
        entry["seq_len"] = int(logits.shape[0])
        entry["greedy_tokens"] = main["tokens"]
        entry["greedy_text"] = sp.decode([t for t in main["tokens"] if t < sp.get_piece_size()])
        entry["greedy_min_top2_margin"] = min(main["margins"])
        entry["prefill_last_top2_margin"] = main["margins"][0]
        R.check(f"{case['name']}: cached prefill logits == uncached",
                main["prefill_direct_vs_cached_max_abs"] < 1e-5, f"{main['prefill_direct_vs_cached_max_abs']:.3g}")
        if has_image:
            if layout == "llava_orig":
                entry["image_token_start"] = marked.index(IMAGE_MARKER)
            else:
                entry["image_token_index"] = fx.image_token_id
                entry["image_token_start"] = ids_for_model.index(fx.image_token_id)
            R.check(f"{case['name']}: sequence length", entry["seq_len"] == (
                len(marked) - 1 + entry["n_image_tokens"] if layout == "llava_orig" else len(ids_for_model)),
                str(entry["seq_len"]))

        # Spliced inputs_embeds path == transformers' own image-token path (llava-hf layouts).
        if has_image and layout in ("llava_hf", "llava_v5"):
            marked_hf = entry["input_ids_unexpanded"]
            embeds = prefill_inputs_spliced(fx.model, [IMAGE_MARKER if t == fx.image_token_id else t
                                                       for t in marked_hf], main["projector_output"], IMAGE_MARKER)
            alt = fx.model(inputs_embeds=embeds, use_cache=False).logits[0].float()
            diff = float((alt - logits).abs().max())
            R.check(f"{case['name']}: spliced inputs_embeds logits == transformers image-token logits",
                    diff < 1e-4, f"max abs diff {diff:.3g}")

        # The greedy tokens again, without the KV cache (one full forward).
        toks = main["tokens"]
        if layout == "llava_orig":
            extra = fx.model.get_input_embeddings()(torch.tensor([toks[:-1]]))
            full = fx.model(inputs_embeds=torch.cat([main["first"]["inputs_embeds"], extra], dim=1),
                            use_cache=False).logits[0].float()
        else:
            kw = dict(main["first"])
            kw["input_ids"] = torch.tensor([main["all_ids_prefix"] + toks[:-1]])
            full = fx.model(**kw, use_cache=False).logits[0].float()
        t0 = logits.shape[0] - 1
        rows = full[t0:t0 + len(toks)]
        argmax_ok = [int(i) for i in torch.argmax(rows, dim=-1)] == toks
        step_diff = float(max((rows[i] - main["step_logits"][i]).abs().max() for i in range(len(toks))))
        R.check(f"{case['name']}: greedy tokens == argmax of uncached logits step by step", argmax_ok,
                f"max |cached - uncached| step logits {step_diff:.3g}")
        entry["greedy_cached_vs_uncached_max_abs"] = step_diff
        if EOS_ID in toks:
            R.warn(f"{case['name']}: EOS appears in the greedy tokens at {toks.index(EOS_ID)}")

        # transformers' generate() must give the same tokens.
        if layout != "llava_orig":
            try:
                gkw = {k: v for k, v in main["first"].items()}
                gkw["attention_mask"] = torch.ones_like(gkw["input_ids"])
                gen = fx.model.generate(**gkw, do_sample=False, num_beams=1, max_new_tokens=N_GREEDY,
                                        min_new_tokens=N_GREEDY, pad_token_id=EOS_ID)
                gen_tokens = gen[0, gkw["input_ids"].shape[1]:].tolist()
                R.check(f"{case['name']}: generate() tokens == greedy loop", gen_tokens == toks,
                        "" if gen_tokens == toks else f"{gen_tokens} vs {toks}")
                entry["generate_matches"] = gen_tokens == toks
            except Exception as exc:  # noqa: BLE001
                R.warn(f"{case['name']}: generate() failed: {type(exc).__name__}: {exc}")

        # How robust are the tokens to preprocessing differences? (informational)
        if has_image:
            if "pixel_values_fast_max_abs_diff" in entry:
                alt = full_pipeline(pre.secondary(img), want_files=False)
                entry["greedy_tokens_with_fast_pixels_equal"] = alt["tokens"] == toks
            noise = np.random.default_rng(7).uniform(-0.02, 0.02, size=pixel.shape).astype(np.float32)
            alt = full_pipeline(pixel + noise, want_files=False)
            entry["greedy_tokens_stable_under_2e-2_pixel_noise"] = alt["tokens"] == toks

    entry["files"] = files
    entry["shapes"] = shapes
    return entry


# --- checkpoint writers -----------------------------------------------------------------


def save_safetensors(path: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, path, metadata={"format": "pt"})


def save_sharded(directory: str, tensors: dict, groups: list[list[str]]) -> dict:
    """Writes model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    n = len(groups)
    weight_map, total = {}, 0
    assert sorted(k for g in groups for k in g) == sorted(tensors), "shard groups must cover every tensor once"
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors(os.path.join(directory, fname), {k: tensors[k] for k in names})
        for k in names:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(os.path.join(directory, "model.safetensors.index.json"), index)
    return index


def read_checkpoint(directory: str) -> dict:
    """{name: (dtype string, shape, file)} of every tensor in a directory's safetensors."""
    from safetensors import safe_open

    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(directory, fname), framework="pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    out[k] = (str(t.get_dtype()), list(t.get_shape()), fname)
    return out


def load_checkpoint_tensors(directory: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, fname)))
    return out


def clip_config_dict(v: dict, architectures: bool) -> dict:
    d = {"model_type": "clip_vision_model", "hidden_size": v["hidden_size"],
         "intermediate_size": v["intermediate_size"], "num_hidden_layers": v["num_hidden_layers"],
         "num_attention_heads": v["num_attention_heads"], "num_channels": 3, "image_size": v["image_size"],
         "patch_size": v["patch_size"], "hidden_act": v["hidden_act"], "layer_norm_eps": v["layer_norm_eps"],
         "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
         "projection_dim": 64}
    if architectures:
        d = {"architectures": ["CLIPVisionModel"], **d, "torch_dtype": "float32"}
    return d


def text_config_dict(t: dict, vocab: int, tie: bool, pad_id, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
            "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
            "num_key_value_heads": t["num_key_value_heads"], "hidden_act": "silu",
            "max_position_embeddings": t["max_position_embeddings"], "rms_norm_eps": t["rms_norm_eps"],
            "rope_theta": t["rope_theta"], "rope_scaling": None, "tie_word_embeddings": tie,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "pad_token_id": pad_id, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
            "torch_dtype": dtype}


def preprocessor_config_hf(size: int) -> dict:
    """llava-hf style preprocessor_config.json (CLIPImageProcessor, crop mode)."""
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
            "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD),
            "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size}}


def preprocessor_config_openai(size: int) -> dict:
    """The older format of openai/clip-vit-large-patch14-336 (integer sizes)."""
    return {"crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "resample": 3, "size": size}


def tokenizer_config_hf(image_id: int, pad_id: int) -> dict:
    def added(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    cfg = dict(HF_TOKENIZER_CONFIG)
    cfg["added_tokens_decoder"] = {"0": added("<unk>"), "1": added("<s>"), "2": added("</s>"),
                                   str(image_id): added("<image>"), str(pad_id): added("<pad>")}
    cfg["pad_token"] = "<pad>"
    cfg["processor_class"] = "LlavaProcessor"
    return cfg


def reload_check(label: str, cls, directory: str, run_fn) -> dict:
    """Loads a written fixture with transformers and compares run_fn(model) to the reference."""
    res = {}
    try:
        model, info = hf_from_pretrained(cls, directory)
        missing = list(info.get("missing_keys", []) or []) if isinstance(info, dict) else []
        unexpected = list(info.get("unexpected_keys", []) or []) if isinstance(info, dict) else []
        res["missing_keys"] = missing
        res["unexpected_keys"] = unexpected
        R.check(f"{label}: transformers loads every tensor (no missing keys)", not missing, str(missing[:8]))
        if unexpected:
            R.warn(f"{label}: transformers reports unexpected keys {unexpected[:8]}")
        diff = run_fn(model)
        res["max_abs_diff"] = diff
        R.check(f"{label}: reloaded model reproduces the reference", diff < 1e-5, f"max abs diff {diff:.3g}")
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"
        R.check(f"{label}: transformers can load the fixture", False, res["error"])
        traceback.print_exc()
    return res


def logits_fn(input_ids, pixel=None):
    def run(model):
        import torch

        kw = {"input_ids": torch.tensor([input_ids])}
        if pixel is not None:
            kw["pixel_values"] = torch.from_numpy(pixel)[None]
        with torch.no_grad():
            return model(**kw).logits[0].float()

    return run


def compare_stored(label: str, directory: str, canonical: dict) -> None:
    """Every tensor save_pretrained wrote, upcast to float32, must equal the reference
    weight of the same canonical name (and every reference weight must be stored)."""
    import torch

    stored = load_checkpoint_tensors(directory)
    unmapped, differ, seen = [], [], set()
    for key, val in stored.items():
        try:
            canon = llava_key_to_canonical(key)
        except FixtureError:
            unmapped.append(key)
            continue
        seen.add(canon)
        if canon not in canonical or not torch.equal(val.float(), canonical[canon]):
            differ.append(key)
    missing = sorted(set(canonical) - seen)
    R.check(f"{label}: stored tensors == reference weights (upcast, exact)",
            not (unmapped or differ or missing),
            f"unmapped={unmapped[:5]} differ={differ[:5]} missing={missing[:5]}")


def step_models(args) -> dict:
    import sentencepiece as spm
    import torch
    import transformers

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    data_dir = args.out
    fix_root = os.path.join(data_dir, "fixtures")
    ref_dir = os.path.join(data_dir, "ref")
    sp_path = os.path.join(data_dir, "tokenizer", "fixture_sp.model")
    if not os.path.isfile(sp_path):
        raise FixtureError(f"{sp_path} missing: run the tokenizer step first")
    for name in IMAGE_SPECS:
        if not os.path.isfile(os.path.join(data_dir, "images", name)):
            raise FixtureError(f"images/{name} missing: run the images step first")
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    sp_vocab = sp.get_piece_size()
    image_id, pad_id = sp_vocab, sp_vocab + 1  # like llava-hf's 32000 / 32001
    special_lm_head = [UNK_ID, BOS_ID, EOS_ID, image_id, pad_id]

    # Old reference cases are removed; fixture directories this script owns are rebuilt.
    for sub in [c["name"] for c in CASES] + ["pixels", "manifest.json"]:
        p = os.path.join(ref_dir, sub)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.isfile(p):
            os.remove(p)
    for fname in ("llava_hf_mha", "llava_v5_gqa", "llava_v5_native", "llava_orig_sharded",
                  "llava_orig_nocip", "clip_separate", "llama_text"):
        p = os.path.join(fix_root, fname)
        if os.path.isdir(p):
            shutil.rmtree(p)

    work = tempfile.mkdtemp(prefix="mkfix_")
    try:
        tok_plain, tok_info = load_hf_tokenizer(sp_path, work, "llava-hf")
        tok_img, _ = load_hf_tokenizer(sp_path, work, "llava-hf")
        got_image = add_special_token(tok_img, "<image>")
        got_pad = add_special_token(tok_img, "<pad>")
        if (got_image, got_pad) != (image_id, pad_id):
            raise FixtureError(f"<image>/<pad> got ids {got_image}/{got_pad}, expected {image_id}/{pad_id}")
    except FixtureError as exc:
        R.check("models: transformers tokenizer for the fixtures", False,
                f"{exc}; input ids come from the legacy=False rule instead")
        tok_plain, tok_img = RuleTokenizer(sp, None), RuleTokenizer(sp, image_id)
        tok_info = {"class": "RuleTokenizer (fallback)", "error": str(exc)}

    pre_cache: dict[int, Preprocess] = {}

    def preprocess(size: int) -> Preprocess:
        if size not in pre_cache:
            pre_cache[size] = Preprocess(size)
            R.info(f"image processors for {size}px: {pre_cache[size].describe()['primary']} (primary), "
                   f"{pre_cache[size].describe()['secondary_fast']} (secondary)")
        return pre_cache[size]

    manifest_fixtures: dict = {}
    manifest_cases: list = []

    def build_fixture(name: str, attempt: int) -> Fixture:
        spec = dict(FIXTURES[name])
        spec["seed"] = FIXTURES[name]["seed"] + 100 * attempt
        fx = Fixture(name, spec)
        if spec["layout"] == "llama":
            from transformers import LlamaForCausalLM

            t = spec["text"]
            cfg = make_llama_config(t, sp_vocab, tie=True, pad_id=None)
            fx.model = instantiate(LlamaForCausalLM, cfg)
            fx.text_vocab = sp_vocab
            # Tied embeddings: std 0.3 so that the layers, not the input token's own
            # embedding, dominate the last hidden state (otherwise greedy just repeats).
            fx.canonical = init_model_weights(fx.model, lambda k: k, spec["seed"], spec["storage_dtype"],
                                              {"embed_tokens.weight": ([UNK_ID, BOS_ID, EOS_ID], 0.3)},
                                              scales={"embed_tokens.weight": 0.3})
            tied = fx.model.get_output_embeddings().weight.data_ptr() == \
                fx.model.get_input_embeddings().weight.data_ptr()
            R.check(f"{name}: lm_head is tied to embed_tokens", tied)
            check_rotary(fx.model, t["rope_theta"], t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                         name)
        else:
            if spec["layout"] == "llava_orig":
                fx.text_vocab, fx.image_token_id, fx.pad_id = sp_vocab, sp_vocab, None
            else:
                fx.text_vocab, fx.image_token_id, fx.pad_id = sp_vocab + 2, image_id, pad_id
            fx.model, fx.n_img = build_llava(spec, fx.text_vocab, fx.image_token_id, fx.pad_id)
            R.check(f"{name}: lm_head is not tied", fx.model.get_output_embeddings().weight.data_ptr()
                    != fx.model.get_input_embeddings().weight.data_ptr())
            fx.canonical = init_model_weights(
                fx.model, llava_key_to_canonical, spec["seed"], spec["storage_dtype"],
                {"language_model.lm_head.weight": ([r for r in special_lm_head if r < fx.text_vocab], 0.05)})
            t = spec["text"]
            check_rotary(fx.model, t["rope_theta"], t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                         name)
        fx.info["attn_implementation"] = getattr(fx.model.config, "_attn_implementation", None)
        fx.info["text"] = dict(spec["text"])
        if "vision" in spec:
            fx.info["vision"] = dict(spec["vision"])
            fx.info["vision_feature_layer"] = spec["vision_feature_layer"]
            fx.info["vision_feature_select_strategy"] = spec["strategy"]
            fx.info["projector_hidden_act"] = spec["projector_hidden_act"]
        fx.info["in_memory_keys_sample"] = sorted(fx.model.state_dict().keys())[:6]
        return fx

    def run_cases(fx: Fixture) -> list[dict]:
        entries = []
        for case in [c for c in CASES if c["fixture"] == fx.name]:
            R.info(f"-- case {case['name']} ({fx.name})")
            pre = preprocess(fx.spec["vision"]["image_size"]) if case["image"] else None
            tok = tok_plain if fx.spec["layout"] == "llama" else tok_img
            entries.append(run_model_case(fx, case, tok, sp, pre, data_dir, ref_dir))
        return entries

    def build_with_margin(name: str):
        """Builds the fixture and its cases; a new seed is drawn (deterministically) when a
        greedy step has a near-tie or produces EOS."""
        for attempt in range(10):
            fx = build_fixture(name, attempt)
            entries = run_cases(fx)
            worst = min(e["greedy_min_top2_margin"] for e in entries)
            eos = any(EOS_ID in e["greedy_tokens"] for e in entries)
            if worst >= MIN_MARGIN and not eos:
                fx.info["seed"] = fx.spec["seed"]
                fx.info["greedy_min_top2_margin"] = worst
                return fx, entries
            R.warn(f"{name}: attempt {attempt} has min margin {worst:.3g} / EOS {eos}; reseeding")
        raise FixtureError(f"{name}: could not find a seed without near-ties")

    # ---------------- (a) llava_hf_mha: llava-hf hub names, old config, fp32 -------------
    fx, entries = build_with_margin("llava_hf_mha")
    d = os.path.join(fix_root, "llava_hf_mha")
    save_safetensors(os.path.join(d, "model.safetensors"), fx.canonical)
    spec = fx.spec
    cfg_json = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
        "image_token_index": image_id, "pad_token_id": pad_id, "projector_hidden_act": "gelu",
        "vision_feature_layer": spec["vision_feature_layer"],
        "vision_feature_select_strategy": spec["strategy"], "image_seq_length": fx.n_img,
        "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": fx.text_vocab,
        "text_config": text_config_dict(spec["text"], fx.text_vocab, False, pad_id, "float32"),
        "vision_config": clip_config_dict(spec["vision"], architectures=False),
    }
    write_json(os.path.join(d, "config.json"), cfg_json)
    write_json(os.path.join(d, "preprocessor_config.json"), preprocessor_config_hf(spec["vision"]["image_size"]))
    write_json(os.path.join(d, "tokenizer_config.json"), tokenizer_config_hf(image_id, pad_id))
    shutil.copyfile(sp_path, os.path.join(d, "tokenizer.model"))
    fx.info.update({"dir": "fixtures/llava_hf_mha", "config_style": "llava-hf (rope_theta in text_config)",
                    "image_token_index": image_id, "pad_token_id": pad_id, "text_vocab_size": fx.text_vocab,
                    "n_image_tokens": fx.n_img, "image_mode_default": "crop"})
    first_img = next(e for e in entries if e["image"])
    fx.info["reload_check"] = reload_check(
        "llava_hf_mha", transformers.LlavaForConditionalGeneration, d,
        lambda m: float((logits_fn(first_img["input_ids"], np.load(os.path.join(data_dir, first_img["files"]["pixel_values"])))(m)
                         - torch.from_numpy(np.load(os.path.join(data_dir, first_img["files"]["logits"])))).abs().max()))
    manifest_fixtures["llava_hf_mha"] = fx.info
    manifest_cases += entries
    del fx

    # ---------------- (b) llava_v5_gqa: save_pretrained of this version, bf16, sharded ------
    fx, entries = build_with_margin("llava_v5_gqa")
    d = os.path.join(fix_root, "llava_v5_gqa")
    shard = "200KB"
    to_save = copy.deepcopy(fx.model).to(torch.bfloat16)
    to_save.save_pretrained(d, max_shard_size=shard)
    keys = read_checkpoint(d)
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    R.check("llava_v5_gqa: sharded into >= 2 files with an index",
            len(files) >= 2 and os.path.isfile(os.path.join(d, "model.safetensors.index.json")), str(files))
    R.check("llava_v5_gqa: every stored tensor is bf16",
            all(v[0] in ("bfloat16", "BF16", "torch.bfloat16") for v in keys.values()),
            str(sorted({v[0] for v in keys.values()})))
    R.info("llava_v5_gqa: save_pretrained wrote these tensors:")
    for k in sorted(keys):
        R.info(f"   {k}  {keys[k][0]} {keys[k][1]}  [{keys[k][2]}]")
    with open(os.path.join(d, "config.json")) as f:
        saved_cfg = json.load(f)
    R.info("llava_v5_gqa: config.json written by save_pretrained:\n" + json.dumps(saved_cfg, indent=1))
    tc = saved_cfg.get("text_config", {})
    R.check("llava_v5_gqa: config.json text_config has rope_parameters", "rope_parameters" in tc,
            str(sorted(tc.keys())))
    R.check("llava_v5_gqa: config.json text_config has head_dim", tc.get("head_dim") == spec_hd(fx), str(tc.get("head_dim")))
    write_json(os.path.join(d, "preprocessor_config.json"), preprocessor_config_hf(fx.spec["vision"]["image_size"]))
    write_json(os.path.join(d, "tokenizer_config.json"), tokenizer_config_hf(image_id, pad_id))
    shutil.copyfile(sp_path, os.path.join(d, "tokenizer.model"))
    # The stored bf16 values, upcast, must be the in-memory float32 values (the reference).
    compare_stored("llava_v5_gqa", d, fx.canonical)
    fx.info.update({"dir": "fixtures/llava_v5_gqa", "save_pretrained_max_shard_size": shard,
                    "saved_files": files, "saved_keys": sorted(keys), "image_token_index": image_id,
                    "pad_token_id": pad_id, "text_vocab_size": fx.text_vocab, "n_image_tokens": fx.n_img,
                    "image_mode_default": "crop", "transformers_version": transformers.__version__,
                    "config_text_config_keys": sorted(tc.keys())})
    case_b = next(e for e in entries if e["image"])
    ref_fn = (lambda m: float((logits_fn(case_b["input_ids"], np.load(os.path.join(data_dir, case_b["files"]["pixel_values"])))(m)
                               - torch.from_numpy(np.load(os.path.join(data_dir, case_b["files"]["logits"])))).abs().max()))
    fx.info["reload_check"] = reload_check("llava_v5_gqa", transformers.LlavaForConditionalGeneration, d, ref_fn)
    # The runtime layout too, when this version can write it (save_original_format=False).
    native_info = None
    if "save_original_format" in inspect.signature(to_save.save_pretrained).parameters:
        dn = os.path.join(fix_root, "llava_v5_native")
        to_save.save_pretrained(dn, max_shard_size=shard, save_original_format=False)
        nkeys = read_checkpoint(dn)
        if sorted(nkeys) == sorted(keys):
            R.info("llava_v5_native: save_original_format=False writes the same names; not kept")
            shutil.rmtree(dn)
        else:
            R.info("llava_v5_native: save_pretrained(save_original_format=False) wrote:")
            for k in sorted(nkeys):
                R.info(f"   {k}  {nkeys[k][0]} {nkeys[k][1]}")
            write_json(os.path.join(dn, "preprocessor_config.json"),
                       preprocessor_config_hf(fx.spec["vision"]["image_size"]))
            write_json(os.path.join(dn, "tokenizer_config.json"), tokenizer_config_hf(image_id, pad_id))
            shutil.copyfile(sp_path, os.path.join(dn, "tokenizer.model"))
            native_info = {"layout": "llava_v5_native", "dir": "fixtures/llava_v5_native",
                           "storage_dtype": "bfloat16", "same_weights_as": "llava_v5_gqa",
                           "same_refs_as": "llava_v5_gqa",
                           "saved_files": sorted(f for f in os.listdir(dn) if f.endswith(".safetensors")),
                           "saved_keys": sorted(nkeys)}
            compare_stored("llava_v5_native", dn, fx.canonical)
            native_info["reload_check"] = reload_check("llava_v5_native", transformers.LlavaForConditionalGeneration,
                                                       dn, ref_fn)
    else:
        R.info("save_pretrained has no save_original_format parameter in this version")
    del to_save
    manifest_fixtures["llava_v5_gqa"] = fx.info
    if native_info:
        manifest_fixtures["llava_v5_native"] = native_info
    manifest_cases += entries
    if native_info:
        for e in [e for e in entries if e["image"]]:
            alias = copy.deepcopy(e)
            alias["name"] = e["name"].replace("v5_gqa", "v5_native")
            alias["fixture"] = "llava_v5_native"
            alias["same_refs_as"] = e["name"]
            manifest_cases.append(alias)
    del fx

    # ---------------- (c) llava_orig_sharded + (d) llava_orig_nocip + clip_separate --------
    fx, entries = build_with_margin("llava_orig_sharded")
    spec = fx.spec
    v = spec["vision"]

    def orig_name(canon: str) -> str:
        if canon.startswith("language_model.model."):
            return "model." + canon[len("language_model.model."):]
        if canon == "language_model.lm_head.weight":
            return "lm_head.weight"
        if canon.startswith("multi_modal_projector.linear_1."):
            return "model.mm_projector.0." + canon.rsplit(".", 1)[1]
        if canon.startswith("multi_modal_projector.linear_2."):
            return "model.mm_projector.2." + canon.rsplit(".", 1)[1]
        if canon.startswith("vision_tower.vision_model."):
            return "model.vision_tower.vision_tower." + canon[len("vision_tower."):]
        raise FixtureError(canon)

    orig = {orig_name(k): t.to(torch.float16) for k, t in fx.canonical.items()}
    d = os.path.join(fix_root, "llava_orig_sharded")
    text_names = sorted(k for k in orig if not k.startswith("model.vision_tower."))
    first_shard = [k for k in text_names if k.startswith("model.embed_tokens") or k.startswith("model.layers.0.")]
    second_shard = [k for k in text_names if k not in first_shard]
    vision_shard = sorted(k for k in orig if k.startswith("model.vision_tower."))
    index = save_sharded(d, orig, [first_shard, second_shard, vision_shard])
    t = spec["text"]
    orig_cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
        "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_key_value_heads"],
        "num_hidden_layers": t["num_hidden_layers"], "hidden_act": "silu", "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t["rope_theta"], "rope_scaling": None, "vocab_size": sp_vocab,
        "max_position_embeddings": t["max_position_embeddings"], "max_length": t["max_position_embeddings"],
        "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": 0,
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float16",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": v["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": spec["vision_feature_layer"],
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "use_mm_proj": True,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "tokenizer_model_max_length": t["max_position_embeddings"], "tokenizer_padding_side": "right",
    }
    cfg_with_tower = dict(orig_cfg)
    # The tiny tower is not openai/clip-vit-large-patch14-336: its shape is given here
    # (a key this project adds; real checkpoints take it from the named CLIP model).
    cfg_with_tower["mm_vision_tower_config"] = clip_config_dict(v, architectures=False)
    write_json(os.path.join(d, "config.json"), cfg_with_tower)
    shutil.copyfile(sp_path, os.path.join(d, "tokenizer.model"))
    back = load_checkpoint_tensors(d)
    R.check("llava_orig_sharded: shards hold exactly the fp16 reference weights",
            sorted(back) == sorted(orig) and all(torch.equal(back[k], orig[k]) for k in orig))
    fx.info.update({"dir": "fixtures/llava_orig_sharded", "saved_files": sorted(set(index["weight_map"].values())),
                    "vision_config_key": "mm_vision_tower_config", "text_vocab_size": sp_vocab,
                    "n_image_tokens": fx.n_img, "image_marker": IMAGE_MARKER, "image_mode_default": "pad",
                    "note": "computed as LlavaForConditionalGeneration with inputs_embeds built by the "
                            "original LLaVA rule (features spliced at the -200 marker, positions contiguous)"})
    manifest_fixtures["llava_orig_sharded"] = fx.info
    manifest_cases += entries

    # (d) the same without the tower, plus the tower as a CLIPVisionModel directory.
    dn = os.path.join(fix_root, "llava_orig_nocip")
    save_safetensors(os.path.join(dn, "model.safetensors"),
                     {k: t_ for k, t_ in orig.items() if not k.startswith("model.vision_tower.")})
    write_json(os.path.join(dn, "config.json"), orig_cfg)
    shutil.copyfile(sp_path, os.path.join(dn, "tokenizer.model"))
    dc = os.path.join(fix_root, "clip_separate")
    clip_tensors = {"vision_model." + k[len("vision_tower.vision_model."):]: t_.clone()
                    for k, t_ in fx.canonical.items() if k.startswith("vision_tower.vision_model.")}
    n_pos = (v["image_size"] // v["patch_size"]) ** 2 + 1
    # Older CLIP checkpoints carry this int64 buffer; readers must skip or accept it.
    clip_tensors["vision_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    save_safetensors(os.path.join(dc, "model.safetensors"), clip_tensors)
    write_json(os.path.join(dc, "config.json"), clip_config_dict(v, architectures=True))
    write_json(os.path.join(dc, "preprocessor_config.json"), preprocessor_config_openai(v["image_size"]))
    manifest_fixtures["llava_orig_nocip"] = {
        "layout": "llava_orig", "dir": "fixtures/llava_orig_nocip", "storage_dtype": "float16",
        "vision_tower_dir": "fixtures/clip_separate", "same_weights_as": "llava_orig_sharded",
        "same_refs_as": "llava_orig_sharded", "text_vocab_size": sp_vocab, "image_marker": IMAGE_MARKER}
    manifest_fixtures["clip_separate"] = {
        "layout": "clip_vision", "dir": "fixtures/clip_separate", "storage_dtype": "float32",
        "note": "CLIPVisionModel naming (vision_model.*); the values are the fp16-rounded tower of "
                "llava_orig_sharded; includes an int64 vision_model.embeddings.position_ids buffer"}
    for e in entries:
        alias = copy.deepcopy(e)
        alias["name"] = e["name"].replace("orig_", "orig_nocip_")
        alias["fixture"] = "llava_orig_nocip"
        alias["vision_tower_dir"] = "fixtures/clip_separate"
        alias["same_refs_as"] = e["name"]
        manifest_cases.append(alias)
    # transformers' CLIPVisionModel must read clip_separate and give the same hidden states.
    case_c = entries[0]
    pix_c = np.load(os.path.join(data_dir, case_c["files"]["pixel_values"]))
    vf_c = torch.from_numpy(np.load(os.path.join(data_dir, case_c["files"]["vision_features"])))

    def clip_run(model):
        with torch.no_grad():
            hs = model(pixel_values=torch.from_numpy(pix_c)[None], output_hidden_states=True).hidden_states
        return float((hs[spec["vision_feature_layer"]][0][1:] - vf_c).abs().max())

    manifest_fixtures["clip_separate"]["reload_check"] = reload_check(
        "clip_separate", transformers.CLIPVisionModel, dc, clip_run)
    del fx

    # ---------------- (e) llama_text: LlamaForCausalLM, tied, GQA, old config ---------------
    fx, entries = build_with_margin("llama_text")
    d = os.path.join(fix_root, "llama_text")
    tensors = {k: t_ for k, t_ in fx.canonical.items() if k != "lm_head.weight"}
    R.check("llama_text: no lm_head tensor (tied)", "lm_head.weight" not in tensors, str(sorted(tensors)[:4]))
    save_safetensors(os.path.join(d, "model.safetensors"), tensors)
    write_json(os.path.join(d, "config.json"),
               text_config_dict(fx.spec["text"], sp_vocab, True, None, "float32"))
    shutil.copyfile(sp_path, os.path.join(d, "tokenizer.model"))
    fx.info.update({"dir": "fixtures/llama_text", "text_vocab_size": sp_vocab,
                    "config_style": "LlamaForCausalLM, rope_theta at top level", "tie_word_embeddings": True})
    case_e = entries[0]
    fx.info["reload_check"] = reload_check(
        "llama_text", transformers.LlamaForCausalLM, d,
        lambda m: float((logits_fn(case_e["input_ids"])(m)
                         - torch.from_numpy(np.load(os.path.join(data_dir, case_e["files"]["logits"])))).abs().max()))
    manifest_fixtures["llama_text"] = fx.info
    manifest_cases += entries
    del fx

    # ---------------- pixel-only references ------------------------------------------------
    pixel_cases = []
    for name, image, mode, size in PIXEL_CASES:
        pre = preprocess(size)
        img = load_image_for_mode(os.path.join(data_dir, image), mode)
        pix = pre.primary(img)
        entry = {"name": name, "image": image, "mode": mode, "size": size,
                 "files": {"pixel_values": os.path.relpath(
                     save_npy(os.path.join(ref_dir, "pixels", f"{name}.npy"), pix), data_dir)},
                 "processor": pre.describe()}
        fast = pre.secondary(img)
        if fast is not None:  # not stored (size budget); the difference is recorded
            entry["fast_max_abs_diff"] = float(np.abs(fast - pix).max())
            entry["fast_mean_abs_diff"] = float(np.abs(fast - pix).mean())
        pixel_cases.append(entry)

    shutil.rmtree(work, ignore_errors=True)
    return {"fixtures": manifest_fixtures, "cases": manifest_cases, "pixel_cases": pixel_cases,
            "tokenizer_hf": tok_info}


def spec_hd(fx: Fixture) -> int:
    t = fx.spec["text"]
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


# --------------------------------------------------------------------------------------
# 5. Driver
# --------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "PIL": Image.__version__}
    for mod in ("torch", "transformers", "sentencepiece", "safetensors", "tokenizers", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def summary_table(root: str) -> None:
    rows = []
    for dirpath, _dirs, fnames in os.walk(root):
        for f in fnames:
            p = os.path.join(dirpath, f)
            rows.append((os.path.relpath(p, root), os.path.getsize(p)))
    rows.sort()
    width = max((len(r[0]) for r in rows), default=10)
    print("\n" + "=" * (width + 14))
    print(f"{'file':<{width}}  {'bytes':>10}")
    print("-" * (width + 14))
    for name, size in rows:
        print(f"{name:<{width}}  {size:>10}")
    print("-" * (width + 14))
    per_top: dict[str, int] = {}
    for name, size in rows:
        top = name.split(os.sep)[0]
        per_top[top] = per_top.get(top, 0) + size
    for top, size in sorted(per_top.items()):
        print(f"{top + '/':<{width}}  {size:>10}")
    total = sum(s for _, s in rows)
    print(f"{'TOTAL':<{width}}  {total:>10}  ({total / 1e6:.2f} MB)")
    if total > 12.5e6:
        print(f"WARNING: total output {total / 1e6:.2f} MB is above the ~12 MB budget")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (tests/data)")
    ap.add_argument("--llama2-tokenizer", required=True, help="the real LLaMA-2 tokenizer.model")
    ap.add_argument("--steps", default="tokenizer,images,models",
                    help="comma-separated subset of tokenizer,images,models (default: all)")
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads (default 4)")
    args = ap.parse_args()
    steps = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = steps - {"tokenizer", "images", "models"}
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}")
    if not os.path.isfile(args.llama2_tokenizer):
        ap.error(f"--llama2-tokenizer {args.llama2_tokenizer} is not a file")
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)

    try:
        import transformers  # noqa: F401

        have_hf = True
    except ImportError:
        have_hf = False
        if "models" in steps:
            ap.error("the models step needs torch, transformers and safetensors")
        R.warn("transformers is not installed: only sentencepiece ids are written")

    vers = versions()
    R.info(f"versions: {vers}")
    manifest_path = os.path.join(args.out, "ref", "manifest.json")
    manifest: dict = {}
    if os.path.isfile(manifest_path) and steps != {"tokenizer", "images", "models"}:
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest["generator"] = "tools/make_fixtures.py"
    manifest["versions"] = vers
    manifest["conventions"] = {
        "paths": "relative to the directory passed with --out (tests/data)",
        "npy": "float32, C order; pixel_values [3,H,W]; vision_features [n_img, vision_hidden]; "
               "projector_output [n_img, text_hidden]; logits [T, vocab] for every prefill position",
        "greedy_tokens": f"{N_GREEDY} tokens, argmax at every step (EOS never wins with these weights)",
        "llava_v1_template": "USER: <image>\\n{prompt} ASSISTANT:  (text-only: USER: {prompt} ASSISTANT:)",
        "image_marker": IMAGE_MARKER,
        "input_ids": "the exact ids fed to the model with the image positions expanded: llava_hf/llava_v5 "
                     "repeat image_token_index n_image_tokens times; llava_orig repeats the marker -200 "
                     "(input_ids_marked has it once, as the original code does)",
        "tokenization": "llava_hf, llava_v5, llama: transformers LlamaTokenizer (legacy=False, add_bos_token) "
                        "with <image> as an added special token = BOS + sentencepiece(first chunk) + for each "
                        "chunk after <image> sentencepiece WITHOUT the dummy prefix; llava_orig: BOS + "
                        "sentencepiece(chunk) with the dummy prefix for every chunk, -200 between chunks",
        "pad_mode": "image.convert('RGB'), expand2square with background tuple(int(255*m) for m in "
                    "image_mean), paste offset ((w-h)//2) on the short side, then the CLIP processor",
        "crop_mode": "CLIP processor: resize shortest edge (bicubic, PIL), center crop, rescale 1/255, "
                     "normalize; RGBA/L inputs are converted by the processor itself",
    }
    for step in ("tokenizer", "images", "models"):
        if step not in steps:
            continue
        R.info(f"\n===== step: {step} =====")
        try:
            if step == "tokenizer":
                manifest["tokenizer"] = step_tokenizer(args, have_hf)
            elif step == "images":
                manifest["images"] = step_images(args)
            else:
                res = step_models(args)
                manifest["tokenizer_hf_for_fixtures"] = res["tokenizer_hf"]
                manifest["fixtures"] = res["fixtures"]
                manifest["cases"] = res["cases"]
                manifest["pixel_cases"] = res["pixel_cases"]
        except Exception as exc:  # noqa: BLE001 - report, keep going with the next step
            traceback.print_exc()
            R.check(f"step {step} completed", False, f"{type(exc).__name__}: {exc}")
    manifest["checks"] = R.checks
    manifest["warnings"] = R.warnings
    write_json(manifest_path, manifest)
    summary_table(args.out)
    print(f"\n{len(R.checks) - len(R.failed)}/{len(R.checks)} checks passed, {len(R.warnings)} warnings")
    for c in R.failed:
        print(f"FAILED: {c['name']}: {c['detail']}")
    for w in R.warnings:
        print(f"WARNING: {w}")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
