"""Sphinx configuration: MyST Markdown pages, numpydoc API reference, MathJax."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "src"))

# Kernels import triton; without CUDA it must run under the interpreter, chosen before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnprec  # noqa: E402

project = "attnprec"
author = "attnprec developers"
copyright = "2026, attnprec developers"
release = attnprec.__version__
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "README.md"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "none"  # numpydoc states the types in the docstrings
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
html_theme = "alabaster"
# Wide enough for 100-column code (the project's line length).
html_theme_options = {"page_width": "1240px", "sidebar_width": "240px"}
html_title = f"attnprec {release}"

# The index lists every page in reading order; pages the other layers have not written yet
# are left out at read time (with a note in the log) so the build stays warning-free; the
# globs pick up every page added under methods/ and bounds/, and the last entry (**) any
# other page.
_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9_*/.-]+)\s*$")


def _docnames() -> list[str]:
    names = []
    for path in _HERE.rglob("*"):
        rel = path.relative_to(_HERE).as_posix()
        if path.suffix in (".md", ".rst") and not rel.startswith("_") and rel != "README.md":
            names.append(rel.rsplit(".", 1)[0])
    return names


def _drop_missing_pages(app: object, docname: str, source: list[str]) -> None:
    from sphinx.util.matching import patfilter

    if docname != root_doc:
        return
    unclaimed = set(_docnames()) - {root_doc}
    out, in_toctree, skipped = [], False, []
    for line in source[0].splitlines():
        if line.startswith("```{toctree}"):
            in_toctree = True
        elif in_toctree and line.startswith("```"):
            in_toctree = False
        elif in_toctree and not line.startswith(":"):
            m = _ENTRY.match(line)
            if m:
                found = set(patfilter(sorted(unclaimed), m["name"]))
                if not found:
                    skipped.append(m["name"])
                    continue
                unclaimed -= found
        out.append(line)
    if skipped:
        from sphinx.util import logging

        logging.getLogger(__name__).info("index: no page (yet) for: %s", ", ".join(skipped))
    source[0] = "\n".join(out) + "\n"


# Docstrings write absolute values as |x| in plain text; reST would read |x| as a
# substitution reference. Escape the bars, except in literals (which may span lines),
# roles, and literal, math and doctest blocks (where reST does not parse them, and a
# backslash would show).
_LITERAL = re.compile(r"(``.+?``|:[a-z]+:`[^`]*`|`[^`]*`)", re.S)
_BAR = re.compile(r"(?<!\\)\|")  # a bar not escaped already


def _escape_text(text: str) -> str:
    parts = _LITERAL.split(text)
    return "".join(p if j % 2 else _BAR.sub(r"\\|", p) for j, p in enumerate(parts))


def _escape_bars(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    verbatim = []  # per line: inside a literal, math or doctest block
    block_indent: int | None = None
    in_doctest = False
    for line in lines:
        text = line.lstrip()
        indent = len(line) - len(text)
        if block_indent is not None and text and indent <= block_indent:
            block_indent = None
        in_doctest = (in_doctest and bool(text)) or text.startswith(">>>")
        verbatim.append(block_indent is not None or in_doctest)
        if not in_doctest and (text.startswith(".. ") or line.rstrip().endswith("::")):
            block_indent = indent
    out: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and verbatim[j] == verbatim[i]:
            j += 1
        chunk = lines[i:j]
        out += chunk if verbatim[i] else _escape_text("\n".join(chunk)).split("\n")
        i = j
    lines[:] = out


def setup(app: object) -> None:
    app.connect("source-read", _drop_missing_pages)  # type: ignore[attr-defined]
    # After numpydoc (priority 500) has turned the sections into reST.
    app.connect("autodoc-process-docstring", _escape_bars, priority=900)  # type: ignore[attr-defined]
