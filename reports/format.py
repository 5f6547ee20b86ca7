"""How numbers and tables read in every report: the HTML page, summary.md and the Prefect UI
show the same cells under the same column names, formatted here once.

A table is a list of rows, each a dict from column name to a formatted cell, keys in reading
order (the head or level first, then its numbers); every row has the same keys, so a UI that
takes its columns from the first row's keys shows them all, in that order.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

KEY_CHARS = 12
"""Artifact keys are shown by their first 12 characters (unique in practice, as git's short hashes)."""
MISSING = "–"
"""A cell with no value (not measured, or undefined: an AUROC with one class)."""

Rows = list[dict[str, str]]

_NUMERIC = re.compile(r"^(\*\*)?[-+−]?[\d.,]+(e[-+]?\d+)?( ?%| pt|x| [KMGT]?B)?( held| FAILED)?(\*\*)?$|^(–|∞|−∞|none|no exit)$")
"""Cells right-aligned in HTML: numbers with their unit (and a guarantee's verdict)."""


@dataclass(frozen=True)
class Table:
    """A titled table of formatted rows; `note` says how to read it."""

    title: str
    rows: Rows
    note: str = ""


@dataclass(frozen=True)
class Figure:
    """A plot of a section: `draw` returns its PNG bytes (`reports.plots`)."""

    title: str
    draw: Callable[[], bytes]
    caption: str = ""


@dataclass
class Section:
    """One part of a report about one artifact (or a pair): text, tables and plots. Figures
    draw lazily, so text-only renderings (summary.md) never draw."""

    id: str
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Caveats a reader must see (a curve missing from an older artifact, a guarantee that failed)."""


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: object, digits: int = 1) -> str:
    """A share as a percentage: 0.2925 -> "29.2 %"."""
    return f"{100 * x:.{digits}f} %" if is_number(x) else MISSING


def points(x: object, digits: int = 1) -> str:
    """A change of a share in percentage points, signed: 0.012 -> "+1.2 pt"."""
    return f"{100 * x:+.{digits}f} pt".replace("-", "−") if is_number(x) else MISSING


def num(x: object, digits: int = 3) -> str:
    """A plain number with `digits` decimals (an int as is, thousands separated)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if isinstance(x, str) and x in ("inf", "-inf"):
        return "∞" if x == "inf" else "−∞"
    return f"{x:.{digits}f}" if is_number(x) else MISSING


def signed(x: object, digits: int = 3) -> str:
    """A difference with its sign: -0.022 -> "−0.022"."""
    return f"{x:+.{digits}f}".replace("-", "−") if is_number(x) else MISSING


def times(x: object) -> str:
    """A ratio as a factor: 1.234 -> "1.23x"."""
    return f"{x:.2f}x" if is_number(x) else MISSING


def level(x: object) -> str:
    """A target accuracy level as given: 0.9 -> "0.9"."""
    return f"{x:g}" if is_number(x) else MISSING


def yes_no(x: object) -> str:
    return MISSING if x is None else ("yes" if x else "no")


def short(key: str | None) -> str:
    return MISSING if not key else key[:KEY_CHARS]


def human_bytes(n: object) -> str:
    """1536 -> "1.5 KB" (powers of 1024)."""
    if not is_number(n):
        return MISSING
    value = float(n)  # type: ignore[arg-type]
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return MISSING


def layer_sorted(d: dict) -> list[tuple[int, object]]:
    """A manifest's per-layer dict (string keys) as (layer, value) pairs in layer order."""
    return sorted(((int(k), v) for k, v in d.items()), key=lambda kv: kv[0])


def markdown_table(rows: Rows) -> str:
    """A GitHub markdown table of `rows` (columns: the first row's keys); "" when empty."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(x: object) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, MISSING)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def html_table(rows: Rows, links: list[dict[str, str]] | None = None) -> str:
    """An HTML table of `rows` (columns: the first row's keys), cells escaped; "" when empty.
    `links`: per row, the cells (by column) that link somewhere, to that href."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(x: object, href: str | None) -> str:
        text = str(x)
        cls = ' class="n"' if _NUMERIC.match(text) else ""
        inner = html.escape(text)
        if len(text) > 4 and text.startswith("**") and text.endswith("**"):  # markdown emphasis, as in drift tables
            inner = f"<strong>{html.escape(text[2:-2])}</strong>"
        if href is not None:
            inner = f'<a href="{html.escape(href)}">{inner}</a>'
        return f"<td{cls}>{inner}</td>"

    numeric = {c for c in columns if all(_NUMERIC.match(str(r.get(c, MISSING))) for r in rows)}
    head = "".join(("<th class=\"n\">" if c in numeric else "<th>") + f"{html.escape(c)}</th>" for c in columns)
    links = links or [{} for _ in rows]
    body = "".join("<tr>" + "".join(cell(r.get(c, MISSING), ln.get(c)) for c in columns) + "</tr>"
                   for r, ln in zip(rows, links))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
