"""``<report_dir>/index.html``: every report of one page, readable in a browser without a server.

For each table (in the order given, the Makefile's ``TABLES``) whose ``<name>.md`` exists it
shows the markdown report converted to HTML (our columns beside the paper's, as the markdown
has them), its claims with their verdicts (from ``<name>.claims.json``, the verdicts the README
is generated from), its figures inline (``<name>.png``, ``<name>_curves.png`` and any image the
markdown names) and links to its run folders. Every link is relative, so the folder can be
copied or opened as ``file://``; the page has no script and no external resource.

The markdown is the small subset ``tables.py`` and ``figures.py`` write (headings, pipe tables,
one image per line, paragraphs with ``**bold**``, ``_italic_``, ``code`` spans and links): converted
here rather than by a library the project does not declare.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

CLAIMS_HEADING = "## The paper's claims"
IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
#: sections folded away (``tables.py``'s every-run calibration tables: long, looked up now and then)
FOLDED_HEADINGS = ("All runs of group",)
VERDICT_CLASSES = {"holds": "holds", "fails": "fails", "not settled": "not-settled", "not run": "not-run"}

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; margin: 0;
       background: #f4f5f7; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 8px 24px 20px;
          margin: 24px 0; }
section > h2 { font-size: 21px; border-bottom: 1px solid #e4e7eb; padding-bottom: 6px; }
h3 { font-size: 17px; margin: 22px 0 8px; }
nav ul { columns: 2; padding-left: 20px; }
nav li { margin: 2px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #d5d9de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.paper { background: #e9e4f5; }
tbody tr td.paper { background: #f6f3fb; }
th.ours { background: #e1eefa; }
.verdict { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; white-space: nowrap; }
.verdict.holds { background: #d7f2de; color: #12622b; }
.verdict.fails { background: #fadcdc; color: #8a1c1c; }
.verdict.not-settled { background: #fcefcf; color: #7a5300; }
.verdict.not-run { background: #e7e9ec; color: #4a525c; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e7eb; }
figcaption { color: #5b6470; font-size: 13px; }
.missing { color: #8a1c1c; }
.muted { color: #5b6470; }
code { background: #f0f2f4; padding: 0 3px; border-radius: 3px; font-size: 13px; }
details { margin: 12px 0 0; }
summary { cursor: pointer; font-weight: 600; font-size: 15px; }
details > .scroll { margin-left: 18px; }
details ul { padding-left: 20px; }
.runs a { margin-right: 10px; white-space: nowrap; }
"""


def href(target: Path, page_dir: Path) -> str:
    """A relative URL from the page's folder to ``target`` (a folder ends with ``/``)."""
    # abspath, not resolve: a runs folder reached through a symlink keeps its place beside the report
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))
    # = and , stay readable (run folders are named key=value,key=value): both are legal in a path
    return quote(Path(rel).as_posix(), safe="/=,") + ("/" if Path(target).is_dir() else "")


def _natural(name: str) -> list:
    """Sort key: reward_weight=3.0 before reward_weight=10.0."""
    return [float(t) if re.fullmatch(r"\d+(\.\d+)?", t) else t for t in re.split(r"(\d+(?:\.\d+)?)", name)]


# --- markdown ----------------------------------------------------------------------------------

def inline(text: str) -> str:
    """Escaped text with ``code`` spans, **bold**, _italic_ and [links](url)."""
    out = []
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2:  # inside backticks: no other markup
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        part = html.escape(part, quote=False)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w])_(\S(?:.*?\S)?)_(?![\w])", r"<em>\1</em>", part)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)",
                      lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', part)
        out.append(part)
    return "".join(out)


def blocks(text: str) -> list[tuple[str, object]]:
    """The markdown as ``(kind, content)``: heading (level, text), table (rows of cells),
    image (alt, src), paragraph (text)."""
    out: list[tuple[str, object]] = []
    para: list[str] = []
    table: list[list[str]] = []

    def flush():
        if para:
            out.append(("paragraph", " ".join(para)))
            para.clear()
        if table:
            out.append(("table", [row[:] for row in table]))
            table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            if para:
                flush()
            table.append([cell.strip() for cell in stripped.strip("|").split("|")])
            continue
        if table:
            flush()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        image = IMAGE.match(stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            out.append(("heading", (len(heading.group(1)), heading.group(2))))
        elif image:
            flush()
            out.append(("image", (image.group("alt"), image.group("src"))))
        else:
            para.append(stripped)
    flush()
    return out


def _is_number(cell: str) -> bool:
    return bool(re.match(r"^[−\-+]?\d[\d.,]*(e[−\-+]?\d+)?( ± [\d.e−\-+]+)?$", cell))


def _column_class(header: str) -> str:
    """Our columns and the paper's apart at a glance (``tables.py`` suffixes the headers)."""
    return "paper" if header.endswith("(paper)") else "ours" if header.endswith("(ours)") else ""


def _verdict(verdict: str) -> str:
    cls = VERDICT_CLASSES.get(verdict, "not-run")
    return f'<span class="verdict {cls}">{html.escape(verdict)}</span>'


def render_table(rows: list[list[str]]) -> str:
    header, body = rows[0], [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
    classes = [_column_class(h) for h in header]
    verdict_col = [h.strip().lower() == "verdict" for h in header]

    def cell(tag: str, text: str, i: int) -> str:
        cls = [classes[i]] if i < len(classes) and classes[i] else []
        if tag == "td" and (_is_number(text) or text == "—"):
            cls.append("num")
        if tag == "td" and i < len(verdict_col) and verdict_col[i]:
            content = _verdict(text.strip("*"))
        else:
            content = inline(text)
        attr = f' class="{" ".join(cls)}"' if cls else ""
        return f"<{tag}{attr}>{content}</{tag}>"

    head = "<tr>" + "".join(cell("th", h, i) for i, h in enumerate(header)) + "</tr>"
    rows_html = ["<tr>" + "".join(cell("td", c, i) for i, c in enumerate(r)) + "</tr>" for r in body]
    return ('<div class="scroll"><table><thead>' + head + "</thead><tbody>" + "".join(rows_html)
            + "</tbody></table></div>")


def render_image(alt: str, src: str, report_dir: Path) -> str:
    if not (report_dir / src).exists():  # a report whose figure was not drawn: say so, no broken image
        return f'<p class="missing">Figure <code>{html.escape(src)}</code> not found.</p>'
    url = html.escape(href(report_dir / src, report_dir))
    return (f'<figure><img src="{url}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(src)}</figcaption></figure>")


# --- claims ------------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None:
        return "—"
    mean, ci = value
    return f"{mean:.3g} ± {ci:.2g}" if ci else f"{mean:.3g}"


def render_claims(claims: list[dict]) -> str:
    rows = "".join(f"<tr><td>{inline(c['text'])}</td><td class=\"num\">{_cell(c.get('left'))}</td>"
                   f"<td class=\"num\">{_cell(c.get('right'))}</td><td>{_verdict(c['verdict'])}</td></tr>"
                   for c in claims)
    return ("<h3>The paper's claims</h3>"
            '<div class="scroll"><table><thead><tr><th>claim</th><th>left</th><th>right</th><th>verdict</th>'
            f"</tr></thead><tbody>{rows}</tbody></table></div>"
            '<p class="muted">Verdicts: holds / fails when the difference exceeds the two cells\' combined 95% '
            "interval, not settled otherwise; not run when a row has no runs.</p>")


# --- one report --------------------------------------------------------------------------------

def with_claims(parts: list[tuple[str, object]], claims: list[dict]) -> list[tuple[str, object]]:
    """The blocks with the markdown's claims section (heading, its table, the "Verdicts" note)
    replaced by one ``claims`` block, shown from ``claims.json``; appended where there is none."""
    for i, (kind, content) in enumerate(parts):
        if kind == "heading" and f"{'#' * content[0]} {content[1]}" == CLAIMS_HEADING:
            end = i + 1
            if end < len(parts) and parts[end][0] == "table":
                end += 1
            if end < len(parts) and parts[end][0] == "paragraph" and str(parts[end][1]).startswith("Verdicts"):
                end += 1
            return [*parts[:i], ("claims", claims), *parts[end:]]
    return [*parts, ("claims", claims)]


def render_runs(groups: dict[str, Path], report_dir: Path) -> str:
    """Links to the run folders of a table's groups that exist (a group never run has none)."""
    items = []
    for group, folder in groups.items():
        if not folder.is_dir():
            continue
        runs = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: _natural(p.name))
        links = "".join(f'<a href="{html.escape(href(run, report_dir))}">{html.escape(run.name)}</a>'
                        + ("" if (run / "metrics.json").exists() else ' <span class="muted">(unfinished)</span>')
                        for run in runs)
        items.append(f'<li><a href="{html.escape(href(folder, report_dir))}"><strong>{html.escape(group)}</strong></a>'
                     f' <span class="muted">({len(runs)} run{"s" if len(runs) != 1 else ""})</span>'
                     f'<div class="runs">{links}</div></li>')
    if not items:
        return '<p class="muted">No run folders found.</p>'
    return f"<details><summary>Run folders</summary><ul>{''.join(items)}</ul></details>"


def _heading(content) -> str:
    level = min(content[0] + 1, 6)  # the page's h1 is its own; a report's title is h2
    return f"<h{level}>{inline(content[1])}</h{level}>"


def _fold_summary(parts: list, i: int) -> str:
    """``All runs of group dpok (18 runs)``: the heading and the size of the table under it."""
    text = inline(parts[i][1][1])
    if i + 1 < len(parts) and parts[i + 1][0] == "table":
        n = len(parts[i + 1][1]) - 2  # header and separator rows
        text += f' <span class="muted">({n} run{"s" if n != 1 else ""})</span>'
    return f"<details><summary>{text}</summary>"


def render_blocks(parts: list, report_dir: Path) -> list[str]:
    """One HTML string per block. The per-run calibration sections (:data:`FOLDED_HEADINGS`)
    are folded into ``<details>``: long tables looked up now and then, below the main ones."""
    out, fold = [], None  # fold: the heading level of the open <details>
    for i, (kind, content) in enumerate(parts):
        if kind == "heading" and fold is not None and content[0] <= fold:
            out.append("</details>")
            fold = None
        if kind == "heading" and content[1].startswith(FOLDED_HEADINGS):
            out.append(_fold_summary(parts, i))
            fold = content[0]
        elif kind == "heading":
            out.append(_heading(content))
        elif kind == "table":
            out.append(render_table(content))
        elif kind == "image":
            out.append(render_image(*content, report_dir))
        elif kind == "claims":
            out.append(render_claims(content) if content else "")
        else:
            out.append(f"<p>{inline(content)}</p>")
    if fold is not None:
        out.append("</details>")
    return out


def render_report(name: str, report_dir: Path, groups: dict[str, Path]) -> tuple[str, str]:
    """``(title, section html)`` of one report."""
    parts = blocks((report_dir / f"{name}.md").read_text())
    claims_file = report_dir / f"{name}.claims.json"
    if claims_file.exists():
        parts = with_claims(parts, json.loads(claims_file.read_text()))
    title = name
    if parts and parts[0][0] == "heading" and parts[0][1][0] == 1:
        title, parts = parts[0][1][1], parts[1:]
    shown = {content[1] for kind, content in parts if kind == "image"}
    out = render_blocks(parts, report_dir)
    # the figures of a report, drawn even where its markdown does not show them
    for png in (f"{name}.png", f"{name}_curves.png"):
        if png not in shown and (report_dir / png).exists():
            out.append(render_image(png.removesuffix(".png"), png, report_dir))
    out.append(render_runs(groups, report_dir))
    body = "".join(out)
    return title, (f'<section id="{html.escape(name)}"><h2>{inline(title)} '
                   f'<span class="muted">({html.escape(name)})</span></h2>{body}</section>')


# --- the page ----------------------------------------------------------------------------------

def render_index(report_dir: Path, tables: list[str], groups: dict[str, dict[str, Path]]) -> str:
    report_dir = Path(report_dir)
    present = [t for t in tables if (report_dir / f"{t}.md").exists()]
    absent = [t for t in tables if t not in present]
    sections, contents = [], []
    for name in present:
        title, section = render_report(name, report_dir, groups.get(name, {}))
        sections.append(section)
        contents.append(f'<li><a href="#{html.escape(name)}">{inline(title)}</a></li>')
    nav = f"<nav><ul>{''.join(contents)}</ul></nav>" if contents else "<p>No report has been built yet.</p>"
    if absent:
        nav += ('<p class="muted">No report yet (<code>make &lt;name&gt;</code> builds one): '
                + ", ".join(f"<code>{html.escape(t)}</code>" for t in absent) + ".</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>diffusion_rl reports</title><style>{STYLE}</style></head><body><main>"
            "<h1>diffusion_rl reports</h1>"
            '<p class="muted">Our numbers beside the papers\', the papers\' claims checked against them, the '
            "figures, and the runs behind each table. Rebuilt by <code>make report</code>.</p>"
            f"{nav}{''.join(sections)}</main></body></html>\n")


def write_index(report_dir: Path, tables: list[str], groups: dict[str, dict[str, Path]]) -> Path:
    """Write ``<report_dir>/index.html``; ``groups``: table → group → its runs folder."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "index.html"
    path.write_text(render_index(report_dir, tables, groups))
    return path
