#!/usr/bin/env python3
"""Extract natural English prose from installed Debian documentation packages.

Output (deterministic for the same installed package versions):
    .cache/text/corpus.txt       one paragraph per line, a blank line between documents
    .cache/text/corpus.txt.gz    the same, gzip -9 with a zero timestamp (carried to the GPU machine)
    .cache/text/manifest.json    package versions, per-source counts, sha256 of corpus.txt

The language-model stage of tools/train_bundled.py pretrains on this text; tools/make_tokenizer.py
trains the tokenizer on a sample of it.

Usage:
    python3 tools/extract_text.py [--install] [--out .cache/text]

--install runs apt-get for the packages below when some are missing (Debian, root or sudo).
Standard library only (html.parser, gzip, hashlib).
"""

import argparse
import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

PACKAGES = ["python3.11-doc", "debian-reference-en", "developers-reference", "maint-guide",
            "debian-faq", "debian-handbook", "doc-debian", "gnu-standards", "postgresql-doc-15",
            "perl-doc", "fortunes", "fortunes-min", "sqlite3-doc", "git-doc", "vim-doc", "nodejs-doc",
            "gnome-user-docs", "libreoffice-help-en-us"]


def _glob_sorted(root, pattern, exclude=()):
    rx = re.compile(pattern)
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if rx.search(rel) and not any(re.search(e, rel) for e in exclude):
                out.append(p)
    return sorted(out)


def sources():
    """(name, kind, [files]) in a fixed order."""
    py = "/usr/share/doc/python3.11/html"
    return [
        ("python3.11-doc", "html", _glob_sorted(py, r"\.html$",
                                                exclude=(r"^_", r"genindex", r"py-modindex", r"^search\.html",
                                                         r"^download\.html", r"^contents\.html",
                                                         r"^index\.html", r"^license\.html"))),
        ("debian-reference-en", "html", _glob_sorted("/usr/share/doc/debian-reference-en/docs", r"\.en\.html$")),
        ("developers-reference", "html", _glob_sorted("/usr/share/doc/developers-reference/docs", r"^[a-z0-9-]+\.html$",
                                                      exclude=(r"^developers-reference\.html$", r"^search\.html$",
                                                               r"^index\.html$"))),
        ("maint-guide", "html", _glob_sorted("/usr/share/doc/maint-guide/html", r"\.en\.html$")),
        ("debian-faq", "html", _glob_sorted("/usr/share/doc/debian/FAQ", r"\.en\.html$")),
        ("debian-handbook", "html", _glob_sorted("/usr/share/doc/debian-handbook/html/en-US", r"^[a-z0-9-]+\.html$")),
        ("gnu-standards", "html", _glob_sorted("/usr/share/doc/gnu-standards", r"\.html$")),
        ("postgresql-doc-15", "html", _glob_sorted("/usr/share/doc/postgresql-doc-15/html", r"\.html$",
                                                   exclude=(r"^bookindex", r"^release-"))),
        ("doc-debian", "text", [p for p in _glob_sorted("/usr/share/doc/debian", r"^[a-z-]+\.txt(\.gz)?$|manifesto")
                                if re.search(r"(constitution\.txt|social-contract\.txt|manifesto|bug-reporting|"
                                             r"mailing-lists|source-unpack)", p)]),
        ("perl-doc", "pod", _glob_sorted("/usr/share/perl", r"pod/perl[a-z0-9]*\.pod$",
                                         exclude=(r"perl[0-9]+delta", r"perlapi", r"perlintern", r"perlunicook",
                                                  r"perltoc", r"perlfunc", r"perlvar", r"perldiag", r"perlop"))),
        ("sqlite3-doc", "html", _glob_sorted("/usr/share/doc/sqlite3", r"\.html$",
                                             exclude=(r"^releaselog", r"^changes", r"^c3ref", r"^syntax",
                                                      r"^doclist", r"^sitemap", r"^keyword_index", r"^toc"))),
        ("git-doc", "html", _glob_sorted("/usr/share/doc/git-doc", r"\.html$", exclude=(r"RelNotes",))),
        ("vim-doc", "htmlpre", _glob_sorted("/usr/share/doc/vim/html", r"\.html$")),
        ("nodejs-doc", "html", _glob_sorted("/usr/share/doc/nodejs/api", r"\.html$", exclude=(r"^all\.html$",))),
        ("gnome-user-docs", "html", _glob_sorted("/usr/share/help/C", r"\.page$")),
        ("libreoffice-help-en-us", "html", _glob_sorted("/usr/share/libreoffice/help/en-US/text", r"\.html$")),
        ("fortunes", "fortune", _glob_sorted("/usr/share/games/fortunes", r"^[a-z-]+\.u8$",
                                             exclude=(r"^art", r"^ascii-art", r"^translate-me"))),
    ]


# ------------------------------------------------------------------------------------------------
# cleaning and filtering

_TRANS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"',
    "\u201e": '"', "\u2013": "-", "\u2014": " - ", "\u2212": "-", "\u2026": "...", "\u00a0": " ",
    "\u00b6": "", "\u2002": " ", "\u2003": " ", "\u2009": " ", "\u200b": "", "\u00ad": "",
    "\u2022": "", "\t": " ", "\r": " ", "\u00ab": '"', "\u00bb": '"',
})
_CODE_CHARS = set("{}[]<>=_\\|;$@#*~^`/")


def clean(text):
    text = html.unescape(text).translate(_TRANS)
    return " ".join(text.split())


def is_prose(p):
    """Heuristics: a sentence-like, mostly alphabetic ASCII paragraph with little code in it."""
    if len(p) < 60 or len(p) > 6000:
        return False
    if not p.isascii():
        return False
    if "://" in p or "www." in p:
        return False
    words = p.split()
    if len(words) < 10:
        return False
    if not (p[0].isupper() or p[0] in "\"'("):
        return False
    if p[-1] not in ".!?\"'):":
        return False
    letters = sum(c.isalpha() or c == " " for c in p)
    if letters / len(p) < 0.86:
        return False
    code = sum(c in _CODE_CHARS for c in p)
    if code / len(p) > 0.02:
        return False
    # many words with internal dots, underscores, parentheses or CamelCase suggest API names
    techy = sum(1 for w in words if re.search(r"\w\.\w|\(\)|[a-z][A-Z]", w))
    if techy / len(words) > 0.1:
        return False
    lower_words = sum(1 for w in words if w[:1].islower())
    if lower_words / len(words) < 0.5:  # title-like or list of names
        return False
    return True


# ------------------------------------------------------------------------------------------------
# readers

_BLOCK = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "div", "td", "th",
          "tr", "table", "ul", "ol", "dl", "br", "section", "article", "title", "caption", "figcaption",
          "header", "footer", "nav", "form", "hr", "body", "html", "head", "span_block"}
_SKIP = {"script", "style", "pre", "head", "nav", "header", "footer", "form", "table", "select",
         "textarea", "button", "svg", "math"}
_SKIP_CLASS = re.compile(r"(highlight|sphinxsidebar|related|footer|header|navheader|navfooter|"
                         r"toc|breadcrumb|literal-block|doctest|sig|screen|programlisting|synopsis|"
                         r"cmdsynopsis|funcsynopsis|refsynopsisdiv|example|informalexample|"
                         r"admonition-title|versionmodified|headerlink|footnote|citation|"
                         r"navigation|index|copyright|legalnotice|authorgroup)", re.I)
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr"}


class _Para(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []      # (tag, skipping?)
        self.skip_depth = 0
        self.buf = []
        self.paras = []

    def flush(self):
        if self.buf:
            self.paras.append("".join(self.buf))
            self.buf = []

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag in _BLOCK and not self.skip_depth:
                self.flush()
            return
        cls = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role"))
        skip = tag in _SKIP or bool(cls and _SKIP_CLASS.search(cls))
        self.stack.append((tag, skip))
        if skip:
            self.skip_depth += 1
        if tag in _BLOCK and not self.skip_depth:
            self.flush()
        if skip and self.skip_depth == 1:
            self.flush()

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        # pop to the matching tag (tolerates unclosed tags)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for t, s in self.stack[i:]:
                    if s:
                        self.skip_depth -= 1
                del self.stack[i:]
                break
        else:
            return
        if tag in _BLOCK and not self.skip_depth:
            self.flush()

    def handle_data(self, data):
        if not self.skip_depth:
            self.buf.append(data)

    def close(self):
        super().close()
        self.flush()


def read_html(path):
    with open(path, "rb") as f:
        raw = f.read()
    p = _Para()
    p.feed(raw.decode("utf-8", errors="replace"))
    p.close()
    return [clean(x) for x in p.paras]


def _read_text_file(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def read_text(path):
    text = _read_text_file(path)
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        # skip indented / code-like blocks
        if all(l.startswith(("    ", "\t")) for l in lines if l.strip()) and len(lines) > 1:
            continue
        out.append(clean(" ".join(l.strip() for l in lines)))
    return out


_POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+", re.S)
_POD_SIMPLE = re.compile(r"([A-Z])<([^<>]*)>")


def _pod_inline(s):
    s = _POD_CODE.sub(lambda m: m.group(1), s)
    for _ in range(5):
        def rep(m):
            code, body = m.group(1), m.group(2)
            if code == "X" or code == "Z":
                return ""
            if code == "E":
                return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(body, "")
            if code == "L":
                body = body.split("|")[0]
                return body.split("/")[0].strip('"')
            return body
        s2 = _POD_SIMPLE.sub(rep, s)
        if s2 == s:
            break
        s = s2
    return s


def read_pod(path):
    text = _read_text_file(path)
    out = []
    in_begin = False
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        if block.startswith("=begin"):
            in_begin = True
        if block.startswith("=end"):
            in_begin = False
            continue
        if in_begin or block.startswith(("=", " ", "\t")):
            continue
        out.append(clean(_pod_inline(block.replace("\n", " "))))
    return out


def read_fortune(path):
    text = _read_text_file(path)
    out = []
    for f in re.split(r"\n%\n", text):
        lines = [l for l in f.split("\n")]
        if not any(l.strip() for l in lines):
            continue
        out.append(clean(" ".join(l.strip() for l in lines)))
    return out


def read_html_pre(path):
    """HTML whose prose sits in <pre> blocks (vim's help): strip the tags, then read as text."""
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    m = re.search(r"<pre>(.*)</pre>", raw, re.S)
    body = m.group(1) if m else raw
    body = html.unescape(re.sub(r"<[^>]+>", "", body))
    out = []
    for block in re.split(r"\n\s*\n", body):
        lines = [l for l in block.split("\n") if l.strip()]
        if not lines or any(l.startswith(("\t", "    ")) or "\t" in l.strip() for l in lines):
            continue
        t = clean(" ".join(l.strip() for l in lines))
        t = re.sub(r"[*|]([A-Za-z0-9_.:'-]+)[*|]", r"\1", t)
        out.append(t)
    return out


READERS = {"htmlpre": read_html_pre, "html": read_html, "text": read_text, "pod": read_pod, "fortune": read_fortune}


def _fortune_ok(p):
    if len(p) < 30 or len(p) > 1500 or not p.isascii():
        return False
    letters = sum(c.isalpha() or c == " " for c in p)
    return letters / len(p) >= 0.8 and "://" not in p and sum(c in _CODE_CHARS for c in p) <= 2


# ------------------------------------------------------------------------------------------------


def package_versions():
    out = {}
    for p in PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Version}", p], capture_output=True, text=True)
        st, _, ver = r.stdout.partition("|")
        out[p] = ver if "install ok installed" in st else None
    return out


def install_missing():
    missing = [p for p, v in package_versions().items() if v is None]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing,
                   check=True, env=env)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".cache/text")
    ap.add_argument("--install", action="store_true", help="apt-get install missing packages first")
    args = ap.parse_args(argv)
    if args.install:
        install_missing()
    versions = package_versions()
    os.makedirs(args.out, exist_ok=True)
    seen = set()
    docs = []
    stats = {}
    for name, kind, files in sources():
        if versions.get(name) is None and not files:
            print(f"warning: {name} is not installed, skipped", file=sys.stderr)
            stats[name] = {"files": 0, "paragraphs": 0, "bytes": 0}
            continue
        n_par = n_bytes = 0
        for path in files:
            try:
                paras = READERS[kind](path)
            except Exception as e:  # a broken file must not stop the extraction
                print(f"warning: {path}: {e}", file=sys.stderr)
                continue
            ok = _fortune_ok if kind == "fortune" else is_prose
            keep = []
            for p in paras:
                if not ok(p):
                    continue
                h = hashlib.sha1(p.encode()).digest()
                if h in seen:
                    continue
                seen.add(h)
                keep.append(p)
            if kind == "fortune":
                # fortunes are short: one document per 40 fortunes
                for i in range(0, len(keep), 40):
                    docs.append(keep[i:i + 40])
            elif keep:
                docs.append(keep)
            n_par += len(keep)
            n_bytes += sum(len(p) + 1 for p in keep)
        stats[name] = {"files": len(files), "paragraphs": n_par, "bytes": n_bytes}
        print(f"{name:22s} files {len(files):5d}  paragraphs {n_par:7d}  {n_bytes / 1e6:7.2f} MB")
    text = "\n\n".join("\n".join(d) for d in docs) + "\n"
    data = text.encode("utf-8")
    path = os.path.join(args.out, "corpus.txt")
    with open(path, "wb") as f:
        f.write(data)
    with open(path + ".gz", "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(data)
    manifest = {"packages": versions, "sources": stats, "documents": len(docs),
                "paragraphs": sum(len(d) for d in docs), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "gz_bytes": os.path.getsize(path + ".gz")}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {path}: {len(data) / 1e6:.2f} MB, {manifest['paragraphs']} paragraphs in "
          f"{len(docs)} documents; gz {manifest['gz_bytes'] / 1e6:.2f} MB; sha256 {manifest['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
