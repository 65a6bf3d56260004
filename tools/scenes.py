#!/usr/bin/env python3
"""Deterministic synthetic scenes for the bundled prefixkv model (issue 3).

A scene is a 336 x 336 RGB image with 3 to 7 objects on a 3 x 3 grid (at most one object per
cell, so every position phrase is unambiguous), a textured background with faint clutter, a detailed
description that names every object in row-major reading order, and 3 to 5 short questions with
checkable answers. Everything is a pure function of an integer seed (0 <= seed < 2**32).

Determinism: only numpy's legacy RandomState (whose streams numpy freezes) with integer draws and
uniform doubles is used, and pixels are computed with + - * / and comparisons only (no libm calls,
no floating-point reductions), so the same seed gives bit-identical pixels and text with any numpy
version on any machine. `python3 tools/scenes.py --hash 0 1 2` prints pixel hashes to compare.

Seed ranges used by the project (documented in docs/MODEL.md):
    eval 0..199, calib 10_000..10_031, example image 20_000 (tools/make_data.py);
    training >= 1_000_000: tokenizer text 1_000_000..1_003_999 (tools/make_tokenizer.py),
    held-out check during training 3_000_000..3_000_999, training scenes
    10_000_000 + 1_000_000 * train_seed + j (tools/train_bundled.py).

Library use:
    from scenes import make_scene, render, score_description, score_answer
    sc = make_scene(5); img = render(sc)            # uint8 (336, 336, 3)
    sc.description, sc.questions                     # str, [{"question", "answer", "type"}]
    score_description(text, sc)  -> fraction of objects described correctly (sc may be truth dict)
    score_answer(question, answer, sc) -> bool

CLI:
    python3 tools/scenes.py --selftest
    python3 tools/scenes.py --seed 7 --png /tmp/s7.png     # prints the ground truth JSON
    python3 tools/scenes.py --hash 0 1 2
    python3 tools/scenes.py --score preds.json --truth data/eval/truth.json
        (preds: {id: text} or [{"id", "text"}]; ids "<scene>_q<k>" are questions)
"""

import hashlib
import json
import re
import sys

import numpy as np

IMAGE_SIZE = 336
GRID = 3
CELL = IMAGE_SIZE // GRID  # 112

SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "cross": "crosses"}
COLORS = {
    "red": (214, 38, 38),
    "orange": (243, 133, 26),
    "yellow": (238, 204, 26),
    "green": (38, 150, 58),
    "blue": (38, 78, 214),
    "purple": (132, 56, 172),
    "pink": (242, 120, 182),
    "black": (32, 32, 32),
}
COLOR_NAMES = list(COLORS)
SIZES = {"small": 16, "medium": 27, "large": 40}  # half extent in pixels
SIZE_NAMES = list(SIZES)
BACKGROUNDS = {
    "white": (246, 246, 244),
    "light gray": (214, 214, 214),
    "cream": (244, 234, 208),
    "pale blue": (208, 224, 244),
    "pale green": (214, 238, 214),
}
BACKGROUND_NAMES = list(BACKGROUNDS)
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Prompts in the style of LLaVA-Description's detail_1k; the first is the evaluation default.
DESCRIBE_PROMPTS = [
    "Describe the image in detail.",
    "Describe the following image in detail.",
    "Give a detailed description of the image.",
    "What do you see in this image? Describe every object.",
    "Describe every object in this picture and where it is.",
]

# Unit star polygon (outer radius 1, inner 0.45), vertically centred; constants, not computed, so
# that no libm call is involved in rendering.
_STAR = [(0.0, -0.904508), (0.264503, -0.268566), (0.951057, -0.213525), (0.427975, 0.23455),
         (0.587785, 0.904509), (0.0, 0.545492), (-0.587785, 0.904509), (-0.427975, 0.23455),
         (-0.951057, -0.213525), (-0.264503, -0.268566)]
_TRIANGLE = [(0.0, -0.92), (0.96, 0.78), (-0.96, 0.78)]


def position_name(row, col):
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


POSITIONS = [position_name(r, c) for r in range(GRID) for c in range(GRID)]


class Obj:
    __slots__ = ("row", "col", "shape", "color", "size", "cx", "cy", "radius", "rgb")

    def __init__(self, row, col, shape, color, size, cx, cy, radius, rgb):
        self.row, self.col, self.shape, self.color, self.size = row, col, shape, color, size
        self.cx, self.cy, self.radius, self.rgb = cx, cy, radius, rgb

    @property
    def position(self):
        return position_name(self.row, self.col)

    @property
    def phrase(self):
        return f"{self.size} {self.color} {self.shape}"

    def to_dict(self):
        return {"row": self.row, "col": self.col, "position": self.position, "shape": self.shape,
                "color": self.color, "size": self.size}


class Scene:
    def __init__(self, seed):
        self.seed = int(seed)
        self.background = None
        self.bg_rgb = None
        self.objects = []
        self.clutter = {}
        self.description = ""
        self.questions = []

    def object_at(self, row, col):
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None

    def to_truth(self):
        return {"seed": self.seed, "background": self.background,
                "objects": [o.to_dict() for o in self.objects],
                "description": self.description, "questions": self.questions}


def _rs(seed, stream):
    return np.random.RandomState([int(seed) & 0xFFFFFFFF, int(stream)])


def _pick(rs, items, weights=None):
    """Deterministic choice: one uniform double against cumulative integer weights."""
    if weights is None:
        return items[int(rs.randint(0, len(items)))]
    total = sum(weights)
    u = rs.random_sample() * total
    acc = 0
    for it, w in zip(items, weights):
        acc += w
        if u < acc:
            return it
    return items[-1]


# ----------------------------------------------------------------------------------------------
# layout


def make_scene(seed):
    """Layout, description and questions of scene `seed` (the image comes from render())."""
    sc = Scene(seed)
    rs = _rs(seed, 0)
    sc.background = BACKGROUND_NAMES[int(rs.randint(0, len(BACKGROUND_NAMES)))]
    sc.bg_rgb = BACKGROUNDS[sc.background]
    n = int(rs.randint(3, 8))
    cells = sorted(int(c) for c in rs.permutation(GRID * GRID)[:n])
    for cell in cells:
        row, col = divmod(cell, GRID)
        shape = SHAPES[int(rs.randint(0, len(SHAPES)))]
        color = COLOR_NAMES[int(rs.randint(0, len(COLOR_NAMES)))]
        size = SIZE_NAMES[int(rs.randint(0, len(SIZE_NAMES)))]
        radius = SIZES[size] + int(rs.randint(-1, 2))
        slack = min(12, CELL // 2 - radius - 4)
        cx = col * CELL + CELL // 2 + int(rs.randint(-slack, slack + 1))
        cy = row * CELL + CELL // 2 + int(rs.randint(-slack, slack + 1))
        base = COLORS[color]
        rgb = tuple(max(0, min(255, v + int(rs.randint(-10, 11)))) for v in base)
        sc.objects.append(Obj(row, col, shape, color, size, cx, cy, radius, rgb))
    sc.description = _describe(sc, _rs(seed, 2))
    sc.questions = _make_questions(sc, _rs(seed, 3))
    return sc


# ----------------------------------------------------------------------------------------------
# rendering (numpy only, bit-exact)

_SS = 4  # supersampling per axis for object edges


def _inside_polygon(dx, dy, poly):
    """Even-odd test of the grid dx (columns, 1-D) x dy (rows, 1-D) against a polygon."""
    inside = np.zeros((dy.shape[0], dx.shape[0]), dtype=bool)
    m = len(poly)
    for i in range(m):
        xi, yi = poly[i]
        xj, yj = poly[i - 1]
        if yi == yj:
            continue
        slope = (xj - xi) / (yj - yi)
        cond = (yi > dy) != (yj > dy)                  # per row
        xcross = slope * (dy - yi) + xi                # per row
        inside ^= cond[:, None] & (dx[None, :] < xcross[:, None])
    return inside


def _coverage(shape, dx, dy, r):
    """dx: 1-D sample offsets along x, dy: along y; returns bool (len(dy), len(dx))."""
    X = dx[None, :]
    Y = dy[:, None]
    if shape == "circle":
        return X * X + Y * Y <= r * r
    if shape == "square":
        h = r * 0.84
        return ((X >= -h) & (X <= h)) & ((Y >= -h) & (Y <= h))
    if shape == "cross":
        a, b = r * 0.96, r * 0.34
        ax, ay = np.abs(X), np.abs(Y)
        return ((ax <= a) & (ay <= b)) | ((ax <= b) & (ay <= a))
    if shape == "triangle":
        return _inside_polygon(dx, dy, [(x * r, y * r) for x, y in _TRIANGLE])
    if shape == "star":
        return _inside_polygon(dx, dy, [(x * r * 1.08, y * r * 1.08) for x, y in _STAR])
    raise ValueError(shape)


def _blend(img, x0, y0, alpha, rgb):
    h, w = alpha.shape
    region = img[y0:y0 + h, x0:x0 + w]
    a = alpha[:, :, None]
    region[...] = region * (1.0 - a) + np.asarray(rgb, dtype=np.float64)[None, None, :] * a


def render(scene):
    """The scene's image as uint8 (336, 336, 3)."""
    rs = _rs(scene.seed, 1)
    S = IMAGE_SIZE
    base = np.asarray(scene.bg_rgb, dtype=np.float64)
    # smooth gradient (integer-valued coefficients keep it exact)
    gx = int(rs.randint(-12, 13))
    gy = int(rs.randint(-12, 13))
    ramp = (np.arange(S, dtype=np.float64) - (S - 1) / 2.0) / (S - 1)
    img = base[None, None, :] + (gx * ramp)[None, :, None] + (gy * ramp)[:, None, None]
    img = np.broadcast_to(img, (S, S, 3)).copy()
    # grainy luminance noise on 2 x 2 pixel blocks (integers; coarse so that PNGs stay small)
    grain = rs.randint(-6, 7, size=(S // 2, S // 2)).astype(np.float64)
    img += np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)[:, :, None]
    # faint straight lines (computed inside their bounding boxes)
    n_lines = int(rs.randint(2, 6))
    for _ in range(n_lines):
        x1, y1, x2, y2 = (float(v) for v in rs.randint(0, S, size=4))
        if x1 == x2 and y1 == y2:
            x2 += 1.0
        half_w = 0.5 + 0.25 * int(rs.randint(0, 4))
        shade = int(rs.randint(18, 46)) * (1 if rs.randint(0, 3) else -1)
        bx0, bx1 = int(max(0.0, min(x1, x2) - 3)), int(min(float(S), max(x1, x2) + 4))
        by0, by1 = int(max(0.0, min(y1, y2) - 3)), int(min(float(S), max(y1, y2) + 4))
        xx = np.arange(bx0, bx1, dtype=np.float64)[None, :] + 0.5
        yy = np.arange(by0, by1, dtype=np.float64)[:, None] + 0.5
        ex, ey = x2 - x1, y2 - y1
        L2 = ex * ex + ey * ey
        t = ((xx - x1) * ex + (yy - y1) * ey) / L2
        t = np.minimum(np.maximum(t, 0.0), 1.0)
        qx = xx - (x1 + t * ex)
        qy = yy - (y1 + t * ey)
        d = np.sqrt(qx * qx + qy * qy)
        a = np.minimum(np.maximum(half_w + 0.5 - d, 0.0), 1.0) * 0.8
        img[by0:by1, bx0:bx1, :] -= (shade * a)[:, :, None]
    # speckles: small dots, darker or lighter than the background
    n_speck = int(rs.randint(40, 121))
    sp_xy = rs.randint(0, S - 2, size=(n_speck, 2))
    sp_sz = rs.randint(1, 3, size=n_speck)
    sp_shade = rs.randint(25, 70, size=n_speck) * (rs.randint(0, 2, size=n_speck) * 2 - 1)
    for (x, y), sz, shade in zip(sp_xy.tolist(), sp_sz.tolist(), sp_shade.tolist()):
        img[y:y + sz, x:x + sz, :] -= float(shade)
    # a few faint blotches (low-contrast rectangles of texture)
    n_blot = int(rs.randint(1, 4))
    bl = rs.randint(0, S - 40, size=(n_blot, 2))
    bw = rs.randint(12, 40, size=(n_blot, 2))
    bs = rs.randint(-14, 15, size=n_blot)
    for (x, y), (w, h), sh in zip(bl.tolist(), bw.tolist(), bs.tolist()):
        img[y:y + h, x:x + w, :] += float(sh)
    np.minimum(np.maximum(img, 0.0, out=img), 255.0, out=img)
    # objects
    offs = (np.arange(_SS, dtype=np.float64) + 0.5) / _SS
    for o in scene.objects:
        r = float(o.radius)
        x0 = max(0, o.cx - o.radius - 2)
        x1 = min(S, o.cx + o.radius + 3)
        y0 = max(0, o.cy - o.radius - 2)
        y1 = min(S, o.cy + o.radius + 3)
        px = (np.arange(x0, x1, dtype=np.float64)[:, None] + offs[None, :]).reshape(-1)
        py = (np.arange(y0, y1, dtype=np.float64)[:, None] + offs[None, :]).reshape(-1)
        cov = _coverage(o.shape, px - (o.cx + 0.5), py - (o.cy + 0.5), r)
        cov = cov.reshape(y1 - y0, _SS, x1 - x0, _SS)
        count = cov.sum(axis=(1, 3), dtype=np.int64)  # integer sum: exact
        alpha = count.astype(np.float64) / float(_SS * _SS)
        _blend(img, x0, y0, alpha, o.rgb)
    return np.rint(img).astype(np.uint8)


def image_hash(img):
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# text


def _cap(s):
    return s[:1].upper() + s[1:]


def _pos_phrase(o, rs):
    """'the top left corner' | 'the top left' | 'the center' (only a surface variation)."""
    p = o.position
    if p == "center":
        return "the center"
    if o.row != 1 and o.col != 1:  # corner
        return "the " + p + (" corner" if _pick(rs, [1, 0], [4, 1]) else "")
    return "the " + p


def _join(items):
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# Each slot has one dominant phrasing (so greedy decoding is stable) and some variety.
_OBJ_TEMPLATES = [
    ("In {pos} there is a {obj}.", 12),
    ("At {pos}, there is a {obj}.", 2),
    ("{Pos} contains a {obj}.", 2),
    ("A {obj} is located in {pos}.", 2),
    ("In {pos}, we can see a {obj}.", 2),
]
_INTRO_TEMPLATES = [
    ("The image shows {n} objects on a {bg} background, arranged on a three by three grid.", 12),
    ("This picture contains {n} shapes placed on a {bg} background in a three by three grid.", 4),
    ("There are {n} objects in this image, set against a {bg} background.", 4),
]
_SUMMARY_TEMPLATES = [
    ("In total there {are} {counts}.", 12),
    ("Altogether the image contains {counts}.", 4),
    ("Counting all of them, there {are} {counts}.", 4),
]
_COLOR_TEMPLATES = [
    ("The colors that appear are {colors}.", 12),
    ("The objects are colored {colors}.", 4),
]
_EMPTY_TEMPLATES = [
    ("{Places} {verb} empty.", 12),
    ("Nothing is placed in {places}.", 4),
]
_CLOSING_TEMPLATES = [
    ("The background is covered with faint lines and small speckles, but there are no other objects.", 12),
    ("Apart from these objects, only faint lines and speckles are visible.", 4),
    ("Some faint lines and speckles cross the background, and nothing else is in the image.", 4),
]


def _tpick(rs, templates):
    return _pick(rs, [t for t, _ in templates], [w for _, w in templates])


def _describe(sc, rs):
    parts = []
    n = len(sc.objects)
    parts.append(_tpick(rs, _INTRO_TEMPLATES).format(n=NUMBER_WORDS[n], bg=sc.background))
    for o in sc.objects:  # already in row-major order
        t = _tpick(rs, _OBJ_TEMPLATES)
        pos = _pos_phrase(o, rs)
        parts.append(t.format(pos=pos, Pos=_cap(pos), obj=o.phrase))
    counts = []
    for s in SHAPES:
        k = sum(1 for o in sc.objects if o.shape == s)
        if k:
            counts.append(f"{NUMBER_WORDS[k]} {s if k == 1 else PLURAL[s]}")
    are = "is" if counts[0].startswith("one ") else "are"
    parts.append(_tpick(rs, _SUMMARY_TEMPLATES).format(counts=_join(counts), are=are))
    colors = [c for c in COLOR_NAMES if any(o.color == c for o in sc.objects)]
    parts.append(_tpick(rs, _COLOR_TEMPLATES).format(colors=_join(colors)))
    empty = ["the " + position_name(r, c) for r in range(GRID) for c in range(GRID)
             if sc.object_at(r, c) is None]
    places = _join(empty)
    parts.append(_tpick(rs, _EMPTY_TEMPLATES).format(
        places=places, Places=_cap(places), verb="is" if len(empty) == 1 else "are"))
    parts.append(_tpick(rs, _CLOSING_TEMPLATES))
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# questions


def _q_pos(p):
    return "the center" if p == "center" else "the " + p


def _make_questions(sc, rs):
    n_q = int(rs.randint(3, 6))
    kinds = ["count_shape", "count_color", "count_all", "what_at", "exists", "color_at", "where",
             "size_at"]
    weights = [3, 2, 1, 3, 3, 2, 2, 2]
    out, seen = [], set()
    tries = 0
    while len(out) < n_q and tries < 100:
        tries += 1
        kind = _pick(rs, kinds, weights)
        q = a = None
        if kind == "count_shape":
            s = SHAPES[int(rs.randint(0, len(SHAPES)))]
            q = f"How many {PLURAL[s]} are there?"
            a = str(sum(1 for o in sc.objects if o.shape == s))
        elif kind == "count_color":
            c = COLOR_NAMES[int(rs.randint(0, len(COLOR_NAMES)))]
            q = f"How many {c} objects are there?"
            a = str(sum(1 for o in sc.objects if o.color == c))
        elif kind == "count_all":
            q = "How many objects are there in the image?"
            a = str(len(sc.objects))
        elif kind == "what_at":
            if rs.randint(0, 4) == 0:
                empty = [(r, c) for r in range(GRID) for c in range(GRID) if sc.object_at(r, c) is None]
                r, c = empty[int(rs.randint(0, len(empty)))]
                q, a = f"What is in {_q_pos(position_name(r, c))}?", "Nothing"
            else:
                o = sc.objects[int(rs.randint(0, len(sc.objects)))]
                q, a = f"What is in {_q_pos(o.position)}?", f"A {o.phrase}"
        elif kind == "exists":
            if rs.randint(0, 2):
                o = sc.objects[int(rs.randint(0, len(sc.objects)))]
                c, s = o.color, o.shape
            else:
                c = COLOR_NAMES[int(rs.randint(0, len(COLOR_NAMES)))]
                s = SHAPES[int(rs.randint(0, len(SHAPES)))]
            q = f"Is there a {c} {s}?"
            a = "Yes" if any(o.color == c and o.shape == s for o in sc.objects) else "No"
        elif kind == "color_at":
            o = sc.objects[int(rs.randint(0, len(sc.objects)))]
            q, a = f"What color is the {o.shape} in {_q_pos(o.position)}?", _cap(o.color)
        elif kind == "where":
            o = sc.objects[int(rs.randint(0, len(sc.objects)))]
            if sum(1 for p in sc.objects if p.color == o.color and p.shape == o.shape) != 1:
                continue
            q, a = f"Where is the {o.color} {o.shape}?", "In " + _q_pos(o.position)
        elif kind == "size_at":
            o = sc.objects[int(rs.randint(0, len(sc.objects)))]
            q, a = f"What size is the {o.shape} in {_q_pos(o.position)}?", _cap(o.size)
        if q in seen:
            continue
        seen.add(q)
        out.append({"question": q, "answer": a, "type": kind})
    return out


# ----------------------------------------------------------------------------------------------
# checker

_SIZE_RE = "|".join(SIZE_NAMES)
_COLOR_RE = "|".join(COLOR_NAMES)
_SHAPE_RE = "|".join(sorted(SHAPES + list(PLURAL.values()), key=len, reverse=True))
_OBJ_RX = re.compile(rf"\b({_SIZE_RE})\s+({_COLOR_RE})\s+({_SHAPE_RE})\b")
_POS2_RX = re.compile(r"\b(top|upper|middle|center|centre|bottom|lower)[\s-]+(left|right|center|centre|middle)\b")
_POS1_RX = re.compile(r"\b(center|centre|middle)\b")
_ROWMAP = {"top": 0, "upper": 0, "middle": 1, "center": 1, "centre": 1, "bottom": 2, "lower": 2}
_COLMAP = {"left": 0, "center": 1, "centre": 1, "middle": 1, "right": 2}
_SINGULAR = {v: k for k, v in PLURAL.items()}
_WORD_NUM = {w: i for i, w in enumerate(NUMBER_WORDS)}


def _norm(text):
    return " ".join(text.lower().replace("\n", " ").split())


def find_positions(text):
    """All (row, col) cells named in a piece of text, in order of appearance."""
    t = _norm(text)
    found = []
    spans = []
    for m in _POS2_RX.finditer(t):
        r, c = _ROWMAP[m.group(1)], _COLMAP[m.group(2)]
        found.append((m.start(), (r, c)))
        spans.append((m.start(), m.end()))
    for m in _POS1_RX.finditer(t):
        if any(a <= m.start() < b for a, b in spans):
            continue
        found.append((m.start(), (1, 1)))
    return [p for _, p in sorted(found)]


def find_objects(text):
    """All (size, color, shape) mentions in a piece of text, in order."""
    out = []
    for m in _OBJ_RX.finditer(_norm(text)):
        shape = _SINGULAR.get(m.group(3), m.group(3))
        out.append((m.group(1), m.group(2), shape))
    return out


def _split_sentences(text):
    return [s for s in re.split(r"(?<=[.!?;])\s+|\n+", text) if s.strip()]


def _truth_objects(scene):
    if isinstance(scene, Scene):
        return [o.to_dict() for o in scene.objects]
    if isinstance(scene, dict):
        return scene["objects"]
    raise TypeError("scene must be a Scene or a truth dict")


def description_report(text, scene):
    """Per-object verdicts: a ground-truth object is correct when some sentence names exactly its
    cell and exactly one object, and that object has the right size, colour and shape. Extra or
    hallucinated objects are reported but not penalised."""
    claims = {}
    for sent in _split_sentences(text):
        pos = find_positions(sent)
        objs = find_objects(sent)
        if len(set(pos)) == 1 and len(objs) == 1:
            claims.setdefault(pos[0], []).append(objs[0])
    truth = _truth_objects(scene)
    verdicts = []
    for o in truth:
        key = (o["row"], o["col"])
        want = (o["size"], o["color"], o["shape"])
        got = claims.get(key, [])
        verdicts.append({"position": o["position"], "want": " ".join(want),
                         "got": [" ".join(g) for g in got],
                         "correct": len(got) >= 1 and all(g == want for g in got)})
    occupied = {(o["row"], o["col"]) for o in truth}
    extra = sorted(position_name(*k) for k in claims if k not in occupied)
    return {"verdicts": verdicts, "extra_positions": extra,
            "score": sum(v["correct"] for v in verdicts) / max(1, len(verdicts))}


def score_description(text, scene):
    """Fraction of the scene's objects described correctly (position, size, colour, shape)."""
    return description_report(text, scene)["score"]


def _first_number(t):
    m = re.search(r"\b(\d+)\b", t)
    if m:
        return int(m.group(1))
    for w in re.findall(r"[a-z]+", t):
        if w in _WORD_NUM:
            return _WORD_NUM[w]
        if w in ("no", "none"):
            return 0
    return None


def expected_answer(question, scene):
    """(kind, expected value) for a templated question, computed from the ground truth."""
    truth = _truth_objects(scene)
    q = _norm(question)
    m = re.fullmatch(r"how many objects are there in the image\?", q)
    if m:
        return "count", len(truth)
    m = re.fullmatch(r"how many (\w+) objects are there\?", q)
    if m and m.group(1) in COLORS:
        return "count", sum(1 for o in truth if o["color"] == m.group(1))
    m = re.fullmatch(r"how many (\w+) are there\?", q)
    if m and m.group(1) in _SINGULAR:
        return "count", sum(1 for o in truth if o["shape"] == _SINGULAR[m.group(1)])
    m = re.fullmatch(r"what is in (.+)\?", q)
    if m:
        pos = find_positions(m.group(1))
        if len(pos) == 1:
            o = [o for o in truth if (o["row"], o["col"]) == pos[0]]
            return "object", (o[0]["size"], o[0]["color"], o[0]["shape"]) if o else None
    m = re.fullmatch(r"is there an? (\w+) (\w+)\?", q)
    if m:
        return "yesno", any(o["color"] == m.group(1) and o["shape"] == m.group(2) for o in truth)
    m = re.fullmatch(r"what color is the (\w+) in (.+)\?", q)
    if m:
        pos = find_positions(m.group(2))
        o = [o for o in truth if (o["row"], o["col"]) == pos[0]] if len(pos) == 1 else []
        return "color", o[0]["color"] if o else None
    m = re.fullmatch(r"what size is the (\w+) in (.+)\?", q)
    if m:
        pos = find_positions(m.group(2))
        o = [o for o in truth if (o["row"], o["col"]) == pos[0]] if len(pos) == 1 else []
        return "size", o[0]["size"] if o else None
    m = re.fullmatch(r"where is the (\w+) (\w+)\?", q)
    if m:
        o = [o for o in truth if o["color"] == m.group(1) and o["shape"] == m.group(2)]
        return "where", (o[0]["row"], o[0]["col"]) if len(o) == 1 else None
    raise ValueError(f"unknown question form: {question!r}")


def score_answer(question, answer, scene):
    """True when the answer to a templated question is right for the scene."""
    kind, want = expected_answer(question, scene)
    a = _norm(answer)
    if kind == "count":
        return _first_number(a) == want
    if kind == "yesno":
        w = re.findall(r"[a-z]+", a)
        return bool(w) and w[0] in ("yes", "no") and (w[0] == "yes") == want
    if kind == "object":
        objs = find_objects(a)
        if want is None:
            return not objs and bool(re.search(r"\b(nothing|empty|no object|none)\b", a))
        return len(objs) == 1 and objs[0] == want
    if kind == "color":
        found = re.findall(rf"\b({_COLOR_RE})\b", a)
        return want is not None and found[:1] == [want] and len(set(found)) == 1
    if kind == "size":
        found = re.findall(rf"\b({_SIZE_RE})\b", a)
        return want is not None and found[:1] == [want] and len(set(found)) == 1
    if kind == "where":
        pos = find_positions(a)
        return want is not None and len(set(pos)) == 1 and pos[0] == want
    return False


# ----------------------------------------------------------------------------------------------
# training samples


def training_pair(seed):
    """(scene, description prompt, one question dict) for training scene `seed`."""
    sc = make_scene(seed)
    rs = _rs(seed, 4)
    prompt = _pick(rs, DESCRIBE_PROMPTS, [4, 1, 1, 1, 1])
    qa = sc.questions[int(rs.randint(0, len(sc.questions)))]
    return sc, prompt, qa


def training_batch(seeds):
    """Rendered images (uint8 [n, 336, 336, 3]) and 2n (prompt, answer) samples: for scene i,
    sample 2i is its description and sample 2i+1 one of its questions. Runs in worker processes."""
    imgs = np.empty((len(seeds), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    samples = []
    for i, seed in enumerate(seeds):
        sc, prompt, qa = training_pair(seed)
        imgs[i] = render(sc)
        samples.append((prompt, sc.description))
        samples.append((qa["question"], qa["answer"]))
    return imgs, samples


def human_value(prompt):
    """The 'human' turn of the LLaVA conversation format."""
    return "<image>\n" + prompt


def chat_prompt(prompt):
    """The LLaVA v1 prompt, as given to the processor / engine (generation starts after it)."""
    return "USER: " + human_value(prompt) + " ASSISTANT:"


# ----------------------------------------------------------------------------------------------
# dense training data (training only: nothing above, and so nothing in data/, depends on it)
#
# Per training scene: the description (one turn, exactly the inference prompt) and one or more
# multi-turn question sequences in LLaVA v1's multi-turn form
#     USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...
# whose first turn is the scene's own question (an evaluation form, as training_pair picks it) and
# whose later turns ask about distinct cells / facts, so that nearly every answer token depends on
# the image. Random streams 5, 6, ... of the scene seed (0-4 are used above).

BACKGROUND_QUESTION = "What color is the background?"
# scene_labels layout: shape id per cell (0 empty, 1 + SHAPES index), colour id per cell (0 empty,
# 1 + COLOR_NAMES index), size id per cell (0 empty, 1 + SIZE_NAMES index), background index
LABEL_SHAPE, LABEL_COLOR, LABEL_SIZE, LABEL_BG = 0, GRID * GRID, 2 * GRID * GRID, 3 * GRID * GRID
N_LABELS = 3 * GRID * GRID + 1


def continue_prompt(prompt):
    """A later turn of the LLaVA v1 conversation (it follows the previous answer's </s>)."""
    return "USER: " + prompt + " ASSISTANT:"


def scene_labels(sc):
    """Per-cell targets for an auxiliary vision loss: int64 [N_LABELS] (layout above)."""
    lab = np.zeros(N_LABELS, dtype=np.int64)
    for o in sc.objects:
        cell = o.row * GRID + o.col
        lab[LABEL_SHAPE + cell] = 1 + SHAPES.index(o.shape)
        lab[LABEL_COLOR + cell] = 1 + COLOR_NAMES.index(o.color)
        lab[LABEL_SIZE + cell] = 1 + SIZE_NAMES.index(o.size)
    lab[LABEL_BG] = BACKGROUND_NAMES.index(sc.background)
    return lab


def dense_questions(sc, rs, n_cells=6):
    """Grounded (question, answer) turns about one scene: first, in random order, the aggregation
    turns (one present and one absent colour+shape pair, two shape counts, a colour count, sometimes
    the total, and where up to two unique objects are), then n_cells distinct cells (one question
    each: what / colour / size / shape / empty) and the background, in random order. Answers use the
    evaluation forms where a form exists (score_answer accepts them)."""
    out = []
    cells = [int(c) for c in rs.permutation(GRID * GRID)[:n_cells]]
    for cell in cells:
        r, c = divmod(cell, GRID)
        pos = _q_pos(position_name(r, c))
        o = sc.object_at(r, c)
        if o is None:
            if _pick(rs, [0, 1], [2, 1]) == 0:
                out.append((f"What is in {pos}?", "Nothing"))
            else:
                out.append((f"Is {pos} empty?", "Yes"))
            continue
        kind = _pick(rs, ["what_at", "color_at", "size_at", "shape_at", "empty"], [3, 2, 2, 2, 1])
        if kind == "what_at":
            out.append((f"What is in {pos}?", f"A {o.phrase}"))
        elif kind == "color_at":
            out.append((f"What color is the {o.shape} in {pos}?", _cap(o.color)))
        elif kind == "size_at":
            out.append((f"What size is the {o.shape} in {pos}?", _cap(o.size)))
        elif kind == "shape_at":
            out.append((f"What shape is the object in {pos}?", _cap(o.shape)))
        else:
            out.append((f"Is {pos} empty?", "No"))
    # Aggregation turns (existence, counts, where) come before the per-cell ones: the evaluation
    # asks them single-turn, so they must be answered from the image, not from earlier answers.
    agg = []
    # existence: a pair that is there, and one that is not (half the time built from a colour and a
    # shape that are both in the image, so that colour and shape must be bound to one object)
    o = sc.objects[int(rs.randint(0, len(sc.objects)))]
    agg.append((f"Is there a {o.color} {o.shape}?", "Yes"))
    present = {(p.color, p.shape) for p in sc.objects}
    hard = [(cc, ss) for cc in COLOR_NAMES for ss in SHAPES if (cc, ss) not in present
            and any(p.color == cc for p in sc.objects) and any(p.shape == ss for p in sc.objects)]
    if hard and rs.randint(0, 2):
        cc, ss = hard[int(rs.randint(0, len(hard)))]
    else:
        while True:
            cc = COLOR_NAMES[int(rs.randint(0, len(COLOR_NAMES)))]
            ss = SHAPES[int(rs.randint(0, len(SHAPES)))]
            if (cc, ss) not in present:
                break
    agg.append((f"Is there a {cc} {ss}?", "No"))
    # counts (run 4 asked one per sequence and counted one shape right only 53% of the time): two
    # shapes (one in the image, one drawn as the evaluation draws it, possibly absent), one colour,
    # and a third of the time all objects
    def count_shape(s):
        return (f"How many {PLURAL[s]} are there?", str(sum(1 for p in sc.objects if p.shape == s)))

    def count_color(c):
        return (f"How many {c} objects are there?", str(sum(1 for p in sc.objects if p.color == c)))

    agg.append(count_shape(sc.objects[int(rs.randint(0, len(sc.objects)))].shape))
    agg.append(count_shape(SHAPES[int(rs.randint(0, len(SHAPES)))]))
    agg.append(count_color(sc.objects[int(rs.randint(0, len(sc.objects)))].color if rs.randint(0, 3)
                           else COLOR_NAMES[int(rs.randint(0, len(COLOR_NAMES)))]))
    if rs.randint(0, 3) == 0:
        agg.append(("How many objects are there in the image?", str(len(sc.objects))))
    # where, for up to two objects with a unique colour+shape in cells not asked about above
    cands = [p for p in sc.objects if p.row * GRID + p.col not in cells
             and sum(1 for q in sc.objects if q.color == p.color and q.shape == p.shape) == 1]
    for i in [int(i) for i in rs.permutation(len(cands))[:2]]:
        p = cands[i]
        agg.append((f"Where is the {p.color} {p.shape}?", "In " + _q_pos(p.position)))
    out.append((BACKGROUND_QUESTION, _cap(sc.background)))
    seen, first = set(), []
    for i in [int(i) for i in rs.permutation(len(agg))]:
        if agg[i][0] not in seen:
            seen.add(agg[i][0])
            first.append(agg[i])
    return first + [out[i] for i in [int(i) for i in rs.permutation(len(out))]]


def training_sequences(seed, qa_seqs=1, n_cells=6):
    """(scene, [(kind, turns)]) for training scene `seed`: kind 0 is the description (one turn,
    the prompt training_pair picks), kind 1 a multi-turn question sequence; the first question
    sequence starts with training_pair's question, so its first turn is an evaluation form."""
    sc, prompt, qa = training_pair(seed)
    seqs = [(0, [(prompt, sc.description)])]
    for k in range(qa_seqs):
        turns = [(qa["question"], qa["answer"])] if k == 0 else []
        seen = {t[0] for t in turns}
        for q, a in dense_questions(sc, _rs(seed, 5 + k), n_cells):
            if q not in seen:
                seen.add(q)
                turns.append((q, a))
        seqs.append((1, turns))
    return sc, seqs


def training_batch_multi(seeds, qa_seqs=1, n_cells=6):
    """Rendered images (uint8 [n, 336, 336, 3]), sequences [(scene index, kind, turns)] (1 + qa_seqs
    per scene, scene-major) and labels (int64 [n, N_LABELS]). Runs in worker processes."""
    imgs = np.empty((len(seeds), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty((len(seeds), N_LABELS), dtype=np.int64)
    seqs = []
    for i, seed in enumerate(seeds):
        sc, ss = training_sequences(seed, qa_seqs, n_cells)
        imgs[i] = render(sc)
        labels[i] = scene_labels(sc)
        seqs += [(i, kind, turns) for kind, turns in ss]
    return imgs, seqs, labels


def _dense_answer_ok(q, a, sc):
    """Checks the training-only question forms (the evaluation forms go through score_answer)."""
    if q == BACKGROUND_QUESTION:
        return a == _cap(sc.background)
    m = re.fullmatch(r"Is (.+) empty\?", q)
    if m:
        pos = find_positions(m.group(1))
        return len(pos) == 1 and a == ("Yes" if sc.object_at(*pos[0]) is None else "No")
    m = re.fullmatch(r"What shape is the object in (.+)\?", q)
    if m:
        pos = find_positions(m.group(1))
        o = sc.object_at(*pos[0]) if len(pos) == 1 else None
        return o is not None and a == _cap(o.shape)
    return score_answer(q, a, sc)


def dense_selftest(seeds=range(200)):
    n = 0
    for seed in seeds:
        sc, seqs = training_sequences(10_000_000 + seed, qa_seqs=2)
        assert seqs[0][0] == 0 and seqs[0][1][0][1] == sc.description
        lab = scene_labels(sc)
        assert sum(1 for c in range(9) if lab[c]) == len(sc.objects)
        for kind, turns in seqs[1:]:
            qs = [q for q, _ in turns]
            assert len(qs) == len(set(qs)) and len(turns) >= 6, turns
            for q, a in turns:
                assert _dense_answer_ok(q, a, sc), (seed, q, a)
                n += 1
        assert seqs[1][1][0] == (training_pair(10_000_000 + seed)[2]["question"],
                                 training_pair(10_000_000 + seed)[2]["answer"])
    imgs, seqs, labels = training_batch_multi([5, 6, 7], qa_seqs=1)
    assert imgs.shape == (3, 336, 336, 3) and labels.shape == (3, N_LABELS)
    assert [s[0] for s in seqs] == [0, 0, 1, 1, 2, 2] and [s[1] for s in seqs] == [0, 1] * 3
    assert np.array_equal(imgs[1], render(make_scene(6)))
    return n


# ----------------------------------------------------------------------------------------------
# self-test and CLI


def _corrupt(text, sc):
    o = sc.objects[0]
    other = COLOR_NAMES[(COLOR_NAMES.index(o.color) + 1) % len(COLOR_NAMES)]
    return text.replace(o.phrase, f"{o.size} {other} {o.shape}", 1)


def selftest():
    n_obj, n_q = 0, 0
    for seed in list(range(60)) + [1_000_000, 2_000_000 + 17, 4_000_000_000]:
        sc = make_scene(seed)
        assert 3 <= len(sc.objects) <= 7
        cells = [(o.row, o.col) for o in sc.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        truth = json.loads(json.dumps(sc.to_truth()))
        assert score_description(sc.description, sc) == 1.0, sc.description
        assert score_description(sc.description, truth) == 1.0
        bad = _corrupt(sc.description, sc)
        assert score_description(bad, sc) < 1.0, bad
        assert score_description("", sc) == 0.0
        # swapping the order of sentences does not matter; dropping one object does
        sents = _split_sentences(sc.description)
        assert score_description(" ".join(reversed(sents)), sc) == 1.0
        rep = description_report(" ".join(sents[:len(sc.objects)] + sents[len(sc.objects) + 1:]), sc)
        assert abs(rep["score"] - (len(sc.objects) - 1) / len(sc.objects)) < 1e-9
        assert 3 <= len(sc.questions) <= 5
        for qa in sc.questions:
            assert score_answer(qa["question"], qa["answer"], sc), qa
            assert score_answer(qa["question"], qa["answer"], truth), qa
            assert score_answer(qa["question"], qa["answer"].lower() + ".", sc), qa
            wrong = {"count_shape": str(int(qa["answer"]) + 1) if qa["answer"].isdigit() else "x",
                     "count_color": "9", "count_all": "9", "exists": "No" if qa["answer"] == "Yes" else "Yes",
                     "what_at": "A large black circle" if qa["answer"] != "A large black circle" else "Nothing",
                     "color_at": "Pink" if qa["answer"] != "Pink" else "Red",
                     "size_at": "Large" if qa["answer"] != "Large" else "Small",
                     "where": "In the bottom right" if "bottom right" not in qa["answer"] else "In the top left",
                     }[qa["type"]]
            assert not score_answer(qa["question"], wrong, sc), (qa, wrong)
            n_q += 1
        n_obj += len(sc.objects)
    # determinism: same seed, same pixels; different seeds differ
    a, b = render(make_scene(3)), render(make_scene(3))
    assert a.shape == (336, 336, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, render(make_scene(4)))
    # position parser
    assert find_positions("In the top left corner there is") == [(0, 0)]
    assert find_positions("the top center and the center") == [(0, 1), (1, 1)]
    assert find_positions("the middle right") == [(1, 2)]
    n_dense = dense_selftest()
    print(f"selftest ok: {n_obj} objects, {n_q} questions checked; {n_dense} dense training answers checked")
    return 0


def score_predictions(preds, truth):
    """preds: {id: text} or a list of {"id", "text"|"answer"|"output"}; ids "<scene>_q<k>" are
    questions (see data/*/questions.json), other ids are descriptions. truth: {scene id: truth}."""
    if isinstance(preds, list):
        preds = {p["id"]: p.get("text", p.get("answer", p.get("output", ""))) for p in preds}
    desc, qs, per = [], [], {}
    for pid, text in sorted(preds.items()):
        m = re.fullmatch(r"(.+)_q(\d+)", pid)
        if m and m.group(1) in truth:
            sc = truth[m.group(1)]
            qa = sc["questions"][int(m.group(2))]
            ok = score_answer(qa["question"], text, sc)
            qs.append(ok)
            per[pid] = ok
        elif pid in truth:
            r = description_report(text, truth[pid])
            desc.append(r["score"])
            per[pid] = r["score"]
        else:
            raise KeyError(f"unknown id {pid}")
    out = {"descriptions": len(desc), "questions": len(qs), "per_id": per}
    if desc:
        out["description_accuracy"] = sum(desc) / len(desc)
        out["descriptions_exact"] = sum(1 for d in desc if d == 1.0) / len(desc)
    if qs:
        out["question_accuracy"] = sum(qs) / len(qs)
    return out


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--png", help="write the image of --seed here")
    ap.add_argument("--hash", type=int, nargs="*", help="print pixel sha256 of these seeds")
    ap.add_argument("--score", metavar="PRED_JSON", help="score predictions against --truth")
    ap.add_argument("--truth", metavar="TRUTH_JSON", help="e.g. data/eval/truth.json")
    args = ap.parse_args(argv)
    if args.selftest:
        return selftest()
    if args.score:
        with open(args.score) as f:
            preds = json.load(f)
        with open(args.truth) as f:
            truth = json.load(f)
        res = score_predictions(preds, truth)
        res.pop("per_id")
        print(json.dumps(res, indent=1))
        return 0
    if args.hash:
        for s in args.hash:
            print(s, image_hash(render(make_scene(s))))
        return 0
    if args.seed is None:
        ap.print_help()
        return 2
    sc = make_scene(args.seed)
    if args.png:
        from PIL import Image
        Image.fromarray(render(sc)).save(args.png, optimize=True)
    print(json.dumps(sc.to_truth(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
