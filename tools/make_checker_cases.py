#!/usr/bin/env python3
"""Golden cases for the C++ scene checker (src/eval/checker.cc, tests/unit/test_checker.cc).

    python3 tools/make_checker_cases.py [--out tests/data/checker_cases.json]

Scores texts and answers against data/eval/truth.json with score_description / score_answer of
tools/scenes.py, the reference the C++ port must equal exactly. The texts are the reference
descriptions and answers with one thing changed (an object's colour, shape, size or position, an
object dropped, the text empty, ...), surface variants the checker must accept or reject, texts
with non-ASCII characters next to the keywords (Python's \\b, \\s, \\d and lower() are Unicode-aware),
and seeded random word edits. Deterministic: the same truth gives the same file.
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenes  # noqa: E402
from scenes import COLOR_NAMES, SHAPES, SIZE_NAMES, PLURAL, score_answer, score_description  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sentences(text):
    return scenes._split_sentences(text)


def other(items, x, k=1):
    return items[(items.index(x) + k) % len(items)]


def description_cases(truth):
    cases = []

    def add(sid, text, note):
        cases.append({"scene": sid, "text": text, "note": note, "score": score_description(text, truth[sid])})

    ids = sorted(truth)
    for sid in ids[:3]:
        sc = truth[sid]
        ref = sc["description"]
        objs = sc["objects"]
        o = objs[len(objs) // 2]
        phrase = f'{o["size"]} {o["color"]} {o["shape"]}'
        add(sid, ref, "reference")
        add(sid, ref.replace(phrase, f'{o["size"]} {other(COLOR_NAMES, o["color"])} {o["shape"]}', 1), "colour changed")
        add(sid, ref.replace(phrase, f'{o["size"]} {o["color"]} {other(SHAPES, o["shape"])}', 1), "shape changed")
        add(sid, ref.replace(phrase, f'{other(SIZE_NAMES, o["size"])} {o["color"]} {o["shape"]}', 1), "size changed")
        sents = sentences(ref)
        # position changed: the sentence of object o names another cell (an empty one when there is one)
        occupied = {(p["row"], p["col"]) for p in objs}
        free = [scenes.position_name(r, c) for r in range(3) for c in range(3) if (r, c) not in occupied]
        target = free[0] if free else objs[0]["position"]
        moved = [s for s in sents]
        for i, s in enumerate(moved):
            if phrase in s:
                moved[i] = f"In the {target} there is a {phrase}." if target != "center" else f"In the center there is a {phrase}."
                break
        add(sid, " ".join(moved), "position changed")
        # one object dropped (its sentence removed), first and last
        obj_sents = [i for i, s in enumerate(sents) if any(
            f'{p["size"]} {p["color"]} {p["shape"]}' in s for p in objs)]
        add(sid, " ".join(s for i, s in enumerate(sents) if i != obj_sents[0]), "first object dropped")
        add(sid, " ".join(s for i, s in enumerate(sents) if i != obj_sents[-1]), "last object dropped")
        add(sid, "", "empty")
        add(sid, " ".join(reversed(sents)), "sentences reversed")
        add(sid, ref.upper(), "upper case")
        add(sid, "\n".join(sents), "one sentence per line")
        add(sid, ".".join(s.rstrip(".") for s in sents) + ".", "no space after full stops (sentences merge)")
        add(sid, ref.replace(phrase, phrase + "s", 1), "plural shape")
        add(sid, ref.replace(". ", "; "), "semicolons")
        add(sid, ref.replace(". ", "!\n\n  "), "exclamations and blank lines")
        add(sid, ref.replace("top left", "top-left").replace("bottom right", "bottom - right")
            .replace("middle left", "middle  \t left"), "hyphens and odd spacing")
        add(sid, ref.replace("center", "centre"), "british spelling")
        add(sid, ref.replace("top ", "upper ").replace("bottom ", "lower "), "upper / lower")
        # a second, conflicting claim about o's cell
        add(sid, ref + f" In the {o['position']} there is a small {other(COLOR_NAMES, o['color'], 3)} circle."
            if o["position"] != "center" else ref + " In the center there is a small pink star.", "conflicting claim")
        add(sid, ref + f" In the {o['position']} there is a {phrase}." if o["position"] != "center"
            else ref + f" In the center there is a {phrase}.", "repeated claim")
        # two objects in one sentence: neither counts
        if len(objs) >= 2:
            a, b = objs[0], objs[1]
            pa = f'{a["size"]} {a["color"]} {a["shape"]}'
            pb = f'{b["size"]} {b["color"]} {b["shape"]}'
            add(sid, f"In the {a['position']} there is a {pa} and a {pb}.", "two objects one sentence")
            add(sid, f"There is a {pa} in the {a['position']} and the {b['position']} is empty.",
                "two positions one sentence")
        add(sid, ref.replace(phrase, phrase.replace(" ", "  "), 1), "double spaces inside the phrase")

    # non-ASCII around the keywords, on the first object whose phrase has a 'k' (Kelvin sign case)
    sid, o = next((i, p) for i in ids for p in truth[i]["objects"]
                  if "k" in p["color"] and "i" in p["shape"])
    ref = truth[sid]["description"]
    phrase = f'{o["size"]} {o["color"]} {o["shape"]}'

    add(sid, ref.replace(phrase, "\u00e9" + phrase, 1), "letter glued before the size (no word boundary)")
    add(sid, ref.replace(phrase, phrase + "\u00e9", 1), "letter glued after the shape")
    add(sid, ref.replace(phrase, phrase + "\u0301", 1), "combining mark after the shape (not a word char)")
    add(sid, ref.replace(phrase, phrase.replace(" ", "\u00a0"), 1), "no-break spaces in the phrase")
    add(sid, ref.replace(phrase, phrase.replace(" ", "\u3000"), 1), "ideographic spaces in the phrase")
    add(sid, ref.replace(". ", ".\u2028"), "line separators after full stops")
    add(sid, ref.replace(". ", ".\u00a0"), "no-break spaces after full stops")
    add(sid, ref.replace(phrase, phrase + "\u2014", 1), "em dash after the shape")
    add(sid, ref.replace(phrase, phrase + "_x", 1), "underscore after the shape")
    add(sid, ref.replace(phrase, phrase + "2", 1), "digit after the shape")
    add(sid, ref.replace(phrase, phrase.replace("k", "\u212a"), 1), "Kelvin sign (lower() gives k)")
    add(sid, ref.replace(phrase, phrase.upper().replace("I", "\u0130"), 1), "dotted capital I")
    add(sid, ref.replace(phrase, "\u00ab" + phrase + "\u00bb", 1), "guillemets")
    add(sid, ref.replace("the", "th\u00eb"), "diaeresis in 'the'")
    add(sid, "\U0001F600 " + ref, "emoji first")
    add(sid, ref.replace(phrase, phrase + "\u00b2", 1), "superscript two after the shape (a \\w char)")
    add(sid, ref.replace(phrase, phrase + "\u0663", 1), "Arabic-Indic digit after the shape")

    # random word edits
    rng = random.Random(20240611)
    vocab = (SIZE_NAMES + COLOR_NAMES + SHAPES + list(PLURAL.values()) +
             ["top", "middle", "bottom", "left", "right", "center", "centre", "upper", "lower",
              "and", "a", "the", ".", ",", ";", "\n", "-", "in", "corner", "there", "is"])
    for k in range(30):
        sid = ids[rng.randrange(len(ids))]
        words = truth[sid]["description"].split(" ")
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            i = rng.randrange(len(words))
            if op == 0:
                words[i] = rng.choice(vocab)
            elif op == 1 and len(words) > 1:
                del words[i]
            else:
                words.insert(i, rng.choice(vocab))
        add(sid, " ".join(words), f"random edits {k}")
    return cases


def answer_cases(truth):
    cases = []

    def add(sid, q, a, note):
        try:
            ok = score_answer(q, a, truth[sid])
            cases.append({"scene": sid, "question": q, "answer": a, "note": note, "correct": ok})
        except ValueError:
            cases.append({"scene": sid, "question": q, "answer": a, "note": note, "error": True})

    ids = sorted(truth)
    for sid in ids[:8]:
        sc = truth[sid]
        for qa in sc["questions"]:
            q, a, kind = qa["question"], qa["answer"], qa["type"]
            add(sid, q, a, "reference")
            add(sid, q, a.lower() + ".", "lower case with full stop")
            add(sid, q.upper(), a.upper(), "upper case question and answer")
            if kind.startswith("count"):
                n = int(a)
                add(sid, q, str(n + 1), "count off by one")
                add(sid, q, f"There are {scenes.NUMBER_WORDS[n]} of them.", "count in words")
                add(sid, q, f"{n}rd", "digits glued to letters")
                add(sid, q, f"I see {n}.{n + 1}", "decimal point")
                add(sid, q, "None" if n else "Some", "none / some")
                add(sid, q, "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"[n], "Arabic-Indic digit")
                add(sid, q, f"0{n} objects", "leading zero")
                add(sid, q, f"someone said {n}", "number after a word containing 'one'")
                add(sid, q, "99999999999999999999999", "huge number")
            elif kind == "exists":
                add(sid, q, "Yes, there is." if a == "Yes" else "No, there is not.", "sentence")
                add(sid, q, "No" if a == "Yes" else "Yes", "flipped")
                add(sid, q, "Nope", "other word")
                add(sid, q, "", "empty")
                add(sid, q, "1. " + a, "leading number")
            elif kind == "what_at":
                add(sid, q, "Nothing" if a != "Nothing" else "A large black circle", "wrong")
                add(sid, q, "It is empty.", "empty")
                add(sid, q, "No object.", "no object")
                add(sid, q, "There are no objects.", "no objects (plural does not count)")
                add(sid, q, "none", "none")
                add(sid, q, "Nothing here, but a small red circle elsewhere.", "nothing and an object")
                add(sid, q, "A small red circle and a large blue square.", "two objects")
                if a != "Nothing":
                    add(sid, q, a + "s", "plural")
                    add(sid, q, a.replace(" ", "-"), "hyphenated")
            elif kind in ("color_at", "size_at"):
                names = COLOR_NAMES if kind == "color_at" else SIZE_NAMES
                w = a.lower()
                add(sid, q, other(names, w).capitalize(), "wrong")
                add(sid, q, f"It is {w}, clearly {w}.", "repeated")
                add(sid, q, f"{w} and {other(names, w)}", "two values")
                add(sid, q, f"{w}dish", "glued suffix")
                add(sid, q, f"-{w}-", "dashes")
            elif kind == "where":
                add(sid, q, "In the bottom right" if "bottom right" not in a else "In the top left", "wrong")
                add(sid, q, a.replace(" ", "-"), "hyphenated")
                add(sid, q, a + " corner", "corner")
                add(sid, q, a + " and the center", "two positions")
                add(sid, q, a + ", " + a.lower(), "same position twice")
                add(sid, q, "Middle", "middle only")
    # question forms the generator does not produce, or does not know
    sid = ids[0]
    for q, a in [
        ("What is in the middle?", "A large red square"),
        ("What is in the centre?", "a large red square"),
        ("What is in the top left and bottom right?", "A small red circle"),
        ("What is in the top left ?", "A small red circle"),
        ("What is in the top left??", "A small red circle"),
        ("How many big objects are there?", "2"),
        ("How many hexagons are there?", "0"),
        ("How many circles are there", "1"),
        ("Is there an red circle?", "Yes"),
        ("Is there a red  circle?", "Yes"),
        ("Is there a purple hexagon?", "No"),
        ("Is there anred circle?", "Yes"),
        ("Where is the red square?", "In the center"),
        ("Where is the red circle?", "In the top left"),
        ("Where is the pink star?", "In the top left"),
        ("What color is the blob in the top left?", "Red"),
        ("What color is the circle in the middle left and the center?", "Green"),
        ("What color is the big circle in the top left?", "Red"),
        ("What size is the square in the centre?", "Large"),
        ("What size is the square in the bottom right?", "Large"),
        ("What is the answer?", "42"),
        ("", "Yes"),
        ("  how   MANY\nobjects are there in the image?  ", "five"),
    ]:
        add(sid, q, a, "custom form")
    return cases


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", default=os.path.join(ROOT, "data/eval/truth.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/data/checker_cases.json"))
    args = ap.parse_args(argv)
    with open(args.truth) as f:
        truth = json.load(f)
    desc = description_cases(truth)
    ans = answer_cases(truth)
    import unicodedata
    with open(args.out, "w", encoding="utf-8") as f:
        # one case per line, so that diffs stay readable
        f.write("{\n")
        f.write(f' "made_by": "python3 tools/make_checker_cases.py (Python {sys.version.split()[0]}, '
                f'Unicode {unicodedata.unidata_version})",\n')
        f.write(' "truth": "data/eval/truth.json",\n')
        f.write(' "descriptions": [\n')
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=True) for c in desc))
        f.write("\n ],\n")
        f.write(' "answers": [\n')
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=True) for c in ans))
        f.write("\n ]\n}\n")
    json.load(open(args.out))  # well-formed
    print(f"{args.out}: {len(desc)} descriptions, {len(ans)} answers "
          f"({sum(1 for c in ans if c.get('correct'))} correct, {sum(1 for c in ans if c.get('error'))} errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
