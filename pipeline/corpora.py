"""The corpora that ship inside Python itself, so the embedded default runs offline.

`embedded:python-docs` (the default) is the language reference that `pydoc` serves (79
topics) followed by the standard library's own documentation: for each top-level module of
the running interpreter's `Lib/`, its long docstrings (module, classes, functions) in source
order, as one document. `embedded:pydoc` is the reference alone. Both are fixed by the
interpreter version, read in a sorted order, and fingerprinted by content like any corpus.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import tokenize
import warnings
from pathlib import Path

PYDOC = "embedded:pydoc"
PYTHON_DOCS = "embedded:python-docs"
EMBEDDED_CORPORA = {
    PYTHON_DOCS: "the Python language reference and the standard library's docstrings",
    PYDOC: "the Python language reference alone (79 topics)",
}
_MIN_DOCSTRING = 200  # characters: shorter docstrings are one-liners ("Return self.") that teach little
_MIN_MODULE = 2000  # characters of kept docstrings for a module to become a document


class EmbeddedCorpusError(ValueError):
    """The embedded corpus is not one we ship, or this interpreter lacks its sources."""


def check_embedded(source: str) -> None:
    if source not in EMBEDDED_CORPORA:
        names = ", ".join(f"{name!r} ({what})" for name, what in EMBEDDED_CORPORA.items())
        raise EmbeddedCorpusError(f"data.source {source!r} is not an embedded corpus; use one of {names}")


def embedded_documents(source: str) -> list[str]:
    """The documents of an embedded corpus, in their fixed order."""
    check_embedded(source)
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    if source == PYTHON_DOCS:
        documents += [text for _, text in _stdlib_documents()]
    return documents


def embedded_stamp(source: str) -> str:
    """A cheap stamp of what an embedded corpus is read from (interpreter version, file names,
    sizes and times), keying memos of work derived from it."""
    check_embedded(source)
    from pydoc_data import topics

    files = [Path(topics.__file__)] + (_stdlib_files() if source == PYTHON_DOCS else [])
    h = hashlib.sha256(f"{source}\0{sys.version}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    if not files:
        raise EmbeddedCorpusError(
            f"this Python has no standard library sources in {lib} (only compiled files), so "
            f"{PYTHON_DOCS!r} cannot be read; install them (e.g. Debian's libpython3-stdlib) or use "
            f"data.source={PYDOC!r}")
    return files


def _stdlib_documents() -> list[tuple[str, str]]:
    """(module, text) per standard-library module whose long docstrings add up to a document."""
    documents = []
    for path in _stdlib_files():
        try:
            with tokenize.open(path) as f:
                source = f.read()
            with warnings.catch_warnings():  # old modules' invalid escapes in non-raw strings
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this interpreter cannot parse is not documentation it ships
        texts = [doc for doc in map(_docstring, _documented(tree)) if doc and len(doc) > _MIN_DOCSTRING]
        text = "\n\n".join(texts)
        if len(text) > _MIN_MODULE:
            documents.append((path.stem, text))
    return documents


def _documented(tree: ast.Module) -> list[ast.AST]:
    """The module and every class and function in it, in source order."""
    nodes = [node for node in ast.walk(tree)
             if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [tree, *sorted(nodes, key=lambda n: (n.lineno, n.col_offset))]


def _docstring(node: ast.AST) -> str | None:
    return ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
