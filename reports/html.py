"""report.html: one self-contained page (inline stylesheet, every plot a base64 PNG data: URI,
no script, no external font), so it opens offline, from a mail attachment or an artifact
folder alike."""

from __future__ import annotations

import base64
import html

from reports.format import Figure, Section, Table, html_table
from reports.run import RunArtifacts
from reports.summary import headline_lines

STYLE = """
:root { --fg: #1d2330; --muted: #5d6677; --line: #d9dde5; --accent: #1f5fa8; --bg-alt: #f5f7fa; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 1.2rem 1.6rem 3rem; color: var(--fg);
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.6rem; margin: 0 0 .2rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .6rem; padding-bottom: .3rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1rem; margin: 1.4rem 0 .3rem; }
.sub { color: var(--muted); margin: 0 0 .8rem; }
nav { display: flex; flex-wrap: wrap; gap: .3rem .9rem; margin: .4rem 0 1rem; }
nav a { color: var(--accent); text-decoration: none; }
ul.headline { background: var(--bg-alt); border-left: 4px solid var(--accent); padding: .6rem 1rem .6rem 2rem; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; margin: .3rem 0 .4rem; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { text-align: left; background: var(--bg-alt); font-weight: 600; }
td.n, th.n { text-align: right; }
.tables { display: flex; flex-wrap: wrap; gap: 0 2.2rem; align-items: flex-start; }
.tables > div { max-width: 100%; }
tbody tr:nth-child(even) { background: #fafbfc; }
p.tnote, figcaption { color: var(--muted); font-size: .9em; margin: .1rem 0 .6rem; }
p.note { color: var(--warn); background: #fff8e6; border-left: 4px solid #e0a800; padding: .4rem .8rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
code { font-size: .92em; }
"""


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(t: Table) -> str:
    if not t.rows:
        return ""
    note = f'<p class="tnote">{html.escape(t.note)}</p>' if t.note else ""
    return f"<div><h3>{html.escape(t.title)}</h3>{note}<div class=\"tablewrap\">{html_table(t.rows)}</div></div>"


def _figure(f: Figure) -> str:
    caption = html.escape(f.title + (f": {f.caption}" if f.caption else ""))
    return (f'<figure><img alt="{html.escape(f.title)}" src="{png_data_uri(f.draw())}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _section(s: Section) -> str:
    parts = [f'<section id="{html.escape(s.id)}"><h2>{html.escape(s.title)}</h2>']
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
    parts += [f"<p>{html.escape(t)}</p>" for t in s.text]
    parts += ['<div class="tables">', *(_table(t) for t in s.tables), "</div>"]
    parts += [_figure(f) for f in s.figures]
    parts.append("</section>")
    return "\n".join(parts)


def render_html(run: RunArtifacts, sections: list[Section], head: dict) -> str:
    """The page: title (backbone, data, inputs), a navigation line, the headline, then each section."""
    model = run.model_name
    nav = "".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}</a>' for s in sections)
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in headline_lines(head))
    body = "\n".join(_section(s) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>exitflow report: {html.escape(model)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>exitflow report</h1>
<p class="sub">backbone <strong>{html.escape(model)}</strong> · data <strong>{html.escape(run.data or "unknown")}</strong>
· {len(run.manifests)} artifacts, listed under <a href="#run">Run</a></p>
<nav>{nav}</nav>
</header>
<ul class="headline">{lines}</ul>
{body}
</body>
</html>
"""
