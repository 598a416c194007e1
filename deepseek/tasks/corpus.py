"""Real English prose available offline, in source families, for long-context haystacks.

Every family comes from text that is installed with Python or with the project's own dependencies, so nothing
is downloaded:

| family | source |
|---|---|
| python-reference | the Python language and library reference topics shipped in the standard library (pydoc_data) |
| stdlib-docstrings | module, class and function docstrings of the standard library's own source files |
| licenses | the licence texts of the installed packages, one copy of each |
| fiction | Jules Verne's "In the Year 2889" (public domain, shipped by reasoning-gym) and the project's own prose |
| package-readmes | the long descriptions (READMEs) of the installed packages: **held out** |

`HELD_OUT` (package-readmes) is kept out of all training and tuning: training draws haystacks from
`TRAIN_FAMILIES` only, and evaluation on real prose uses the held-out family. Disjointness is by construction:
a held-out paragraph that shares any run of `SHINGLE` words with a training family (a README quoting a licence,
say) is dropped from it, and `tests/test_corpus.py` checks that no such run is left.

Text is reduced to prose paragraphs (code blocks, tables, headings and markup dropped), ASCII, one space
between words, so a byte-level model sees one byte per character.

    from deepseek.tasks.corpus import sentences, HELD_OUT
    units = sentences(HELD_OUT)          # consecutive sentences of the held-out family, in document order
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from functools import cache
from importlib import metadata
from pathlib import Path

HELD_OUT = "package-readmes"
SHINGLE = 8  # words: a held-out paragraph sharing a run this long with a training family is dropped
_OWN_DISTRIBUTION = "deepseek-r1-open"
_SENTENCE_RE = re.compile(r"[^.!?]+[.!?]+(?=\s|$)")
_LINK_RE = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # markdown [text](url) -> text
_MARKUP_RE = re.compile(r"[*_`]{1,3}|:[a-z]+:`|<[^>]{1,80}>")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose: blank-line separated, code, tables, headings, lists of links dropped."""
    out, in_fence = [], False
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        lines = block.strip("\n").split("\n")
        if any(line.lstrip().startswith(("```", "~~~")) for line in lines):
            in_fence = not in_fence if sum(line.lstrip().startswith(("```", "~~~")) for line in lines) % 2 else in_fence
            continue
        if in_fence or not lines or lines[0].startswith(("    ", "\t", ">>>", "$ ", "|", "#", "..", "+-", "=")):
            continue
        para = " ".join(line.strip() for line in lines)
        para = _MARKUP_RE.sub("", _LINK_RE.sub(r"\1", para))
        para = " ".join(para.encode("ascii", "ignore").decode().split())
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(para) < 80 or letters < 0.85 * len(para) or para.count(" ") < 12 or "::" in para:
            continue
        out.append(para)
    return out


def _python_reference() -> list[str]:
    from pydoc_data.topics import topics

    return [p for name in sorted(topics) for p in _prose_paragraphs(topics[name])]


def _stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "pydoc_data", "site-packages", "dist-packages", "tkinter", "turtledemo"}
    paras = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paras += _prose_paragraphs(doc)
    return paras


def _distributions():
    by_name = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name and name != _OWN_DISTRIBUTION and name not in by_name:
            by_name[name] = dist
    return [by_name[n] for n in sorted(by_name)]


def _licenses() -> list[str]:
    seen, paras = set(), []
    for dist in _distributions():
        for f in dist.files or []:
            if not re.match(r"(licen[cs]e|copying|notice)", Path(str(f)).name, re.I):
                continue
            try:
                text = Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="ignore")
            except (OSError, ValueError):
                continue
            digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                paras += _prose_paragraphs(text)
    return paras


def _fiction() -> list[str]:
    import reasoning_gym

    from .filler import PROSE

    verne = Path(reasoning_gym.__file__).parent / "data" / "in_the_year_2889.txt"
    return _prose_paragraphs(verne.read_text(encoding="utf-8")) + _prose_paragraphs(PROSE)


def _package_readmes() -> list[str]:
    paras = []
    for dist in _distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        paras += _prose_paragraphs(body if isinstance(body, str) else "")
    return paras


_SOURCES = {"python-reference": _python_reference, "stdlib-docstrings": _stdlib_docstrings,
            "licenses": _licenses, "fiction": _fiction, HELD_OUT: _package_readmes}  # fmt: skip
FAMILIES = tuple(_SOURCES)
TRAIN_FAMILIES = tuple(f for f in FAMILIES if f != HELD_OUT)


def shingles(paragraph: str, n: int = SHINGLE) -> set[str]:
    """Every run of n consecutive (lower-cased) words."""
    words = paragraph.lower().split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _dedup(paras: list[str]) -> list[str]:
    seen, out = set(), []
    for p in paras:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _cache_file(family: str) -> Path:
    """Parsing the standard library takes ~15 s: its paragraphs are kept per Python version and family."""
    root = Path(os.environ.get("DEEPSEEK_CACHE", Path.home() / ".cache" / "deepseek")) / "corpus"
    key = hashlib.sha1(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{family}|1".encode()).hexdigest()[:12]
    return root / f"{family}-{key}.json"


def _load(family: str) -> list[str]:
    if family != "stdlib-docstrings":
        return _SOURCES[family]()
    path = _cache_file(family)
    if path.is_file():
        return json.loads(path.read_text())
    paras = _SOURCES[family]()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(paras))
    tmp.replace(path)
    return paras


@cache
def paragraphs(family: str) -> tuple[str, ...]:
    """The family's prose paragraphs in document order, each once. The held-out family keeps only paragraphs
    that share no SHINGLE-word run with any training family."""
    if family not in _SOURCES:
        raise ValueError(f"unknown prose family {family!r}; choose one of: {', '.join(FAMILIES)}")
    paras = _dedup(_load(family))
    if family == HELD_OUT:
        train = set().union(*(shingles(p) for f in TRAIN_FAMILIES for p in paragraphs(f)))
        paras = [p for p in paras if not shingles(p) & train]
    return tuple(paras)


@cache
def sentences(family: str) -> tuple[str, ...]:
    """The family's sentences in document order (a haystack is a run of consecutive ones)."""
    return tuple(s.strip() for p in paragraphs(family) for s in _SENTENCE_RE.findall(p) if len(s.strip()) > 1)


def size(family: str) -> int:
    """Characters (= bytes) of prose in the family."""
    return sum(len(p) + 1 for p in paragraphs(family))
