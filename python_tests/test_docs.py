"""The documentation the repository cites is in the repository (issue 12).

* Every tracked file that names a markdown document (``docs/DESIGN.md §4``, ``docs/OPS.md``,
  ``README.md``) names one that is tracked: a path from the repository root, or, inside a
  markdown file, a path relative to that file. A bare ``DESIGN.md`` in a code comment is an
  error: the design is ``docs/DESIGN.md``.
* Every relative link of README.md and docs/*.md points at a tracked file or folder.

Needs a git checkout (the tracked files come from ``git ls-files``); skips without one.
"""
from __future__ import annotations

import posixpath
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its examples are wrong on purpose

# Markdown files the code *writes* (reports), named as outputs, not cited as documents.
GENERATED = {"stages.md"}

# A markdown file name, possibly with a path: `docs/OPS.md`, `README.md`, `../README.md`.
_MD_NAME = re.compile(r"(?<![\w./-])([\w./-]*[\w-]\.md)\b")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# Inline links and images, [text](target) / ![alt](target), and reference definitions.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.decode().split("\0") if p]


def _exists(path: str, tracked: set[str], folders: set[str]) -> bool:
    path = posixpath.normpath(path)
    return path in tracked or path in folders


def _folders(tracked: set[str]) -> set[str]:
    out = {"."}
    for p in tracked:
        parts = p.split("/")[:-1]
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def missing_citations(path: str, text: str, tracked: set[str]) -> list[str]:
    """`line: name` for each markdown document `text` (the file at `path`) names that is not
    tracked: names resolve from the repository root, and in a markdown file also from the
    file's folder (where its links resolve)."""
    folders = _folders(tracked)
    here = posixpath.dirname(path)
    bad = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in _MD_NAME.finditer(_URL.sub(" ", line)):
            name = match.group(1)
            if posixpath.basename(name) in GENERATED:
                continue
            bases = [""] + ([here] if path.endswith(".md") else [])
            if not any(_exists(posixpath.join(b, name), tracked, folders) for b in bases):
                bad.append(f"{path}:{lineno}: {name}")
    return bad


def broken_links(path: str, text: str, tracked: set[str]) -> list[str]:
    """`link` for each relative link of the markdown file `path` whose target is not tracked."""
    folders = _folders(tracked)
    here = posixpath.dirname(path)
    bad = []
    for target in _LINK.findall(text) + _REF_DEF.findall(text):
        if _URL.match(target) or target.startswith(("#", "mailto:")):
            continue
        file = target.split("#", 1)[0].split("?", 1)[0]
        resolved = posixpath.normpath(posixpath.join(here, file))
        if resolved.startswith("..") or not _exists(resolved, tracked, folders):
            bad.append(f"{path}: ({target})")
    return bad


def _text(path: str):
    try:
        return (ROOT / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None  # binary, or deleted in the working tree


def test_cited_markdown_documents_exist():
    files = _tracked()
    tracked = set(files)
    bad = []
    for path in files:
        text = _text(path) if path != SELF else None
        if text is not None:
            bad += missing_citations(path, text, tracked)
    assert not bad, "markdown documents cited but not in the repository:\n" + "\n".join(bad)


def test_relative_links_of_the_docs_resolve():
    files = _tracked()
    tracked = set(files)
    docs = [p for p in files if p == "README.md" or re.fullmatch(r"docs/[^/]+\.md", p)]
    assert "README.md" in docs and "docs/DESIGN.md" in docs
    bad = []
    for path in docs:
        bad += broken_links(path, _text(path) or "", tracked)
    assert not bad, "broken relative links:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_are_for():
    """The checkers themselves: a bare or misspelt citation and a dead link are reported."""
    tracked = {"README.md", "docs/DESIGN.md", "docs/OPS.md", "src/a.py"}
    comment = ("# DESIGN.md §6, docs/DESIGN.md §6, docs/DESIGN.md, docs/OPS.md, README.md,\n"
               "# docs/OPS, docs/OSP.md, see https://example.org/NOTES.md, out/stages.md\n")
    assert missing_citations("src/a.py", comment, tracked) == [
        "src/a.py:1: DESIGN.md", "src/a.py:2: docs/OSP.md"]
    # In a markdown file, names are relative to its folder too (a sibling doc, ../README.md).
    assert missing_citations("docs/OPS.md", "DESIGN.md §4, ../README.md, CUDA.md", tracked) == [
        "docs/OPS.md:1: CUDA.md"]
    page = ("[design](DESIGN.md#4) [up](../README.md) [gone](GONE.md) [web](https://x.org/a.md)\n"
            "![plot](../src/a.py) [anchor](#top) [out](../../README.md)\n[ref]: ./NOPE.md\n")
    assert broken_links("docs/OPS.md", page, tracked) == [
        "docs/OPS.md: (GONE.md)", "docs/OPS.md: (../../README.md)", "docs/OPS.md: (./NOPE.md)"]
