"""A tiny document model (headings, paragraphs, tables, figures, ...) and its two renderings:
Markdown (figures as relative PNG links) and one self-contained HTML page (inline CSS, PNGs as
base64 data URIs, no script, no external resource)."""
from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

_SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass
class Cell:
    text: str
    cls: str = ""  # "good", "bad", "noise" (a ratio within noise), "muted", "nw" or ""
    notes: tuple[str, ...] = ()  # footnote texts (numbered per table in order of first use)


@dataclass
class Table:
    columns: Sequence[str]
    align: str  # one letter per column: "l" or "r"
    rows: list[list[Union[Cell, str]]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)  # extra footnotes without a marker


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Para:
    text: str  # inline markup: `code` and **bold**
    cls: str = ""


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Banner:
    text: str
    kind: str = "warn"


@dataclass
class Figure:
    filename: str
    alt: str
    caption: str = ""


@dataclass
class Cards:
    items: list[tuple[str, str, str, str]]  # label, value, detail, cls


@dataclass
class Toc:
    entries: list[tuple[str, str]]  # anchor, text


Block = Union[Heading, Para, Bullets, Banner, Table, Figure, Cards, Toc]


def _cell(c: Union[Cell, str]) -> Cell:
    return c if isinstance(c, Cell) else Cell(c)


def _numbered(table: Table) -> tuple[dict[str, int], list[str]]:
    numbers: dict[str, int] = {}
    for row in table.rows:
        for c in map(_cell, row):
            for n in c.notes:
                numbers.setdefault(n, len(numbers) + 1)
    return numbers, list(numbers)


# ---------------------------------------------------------------- Markdown


def _md_text(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    out: list[str] = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {i}" for i in b.items] + [""]
        elif isinstance(b, Banner):
            out += [f"> **⚠ {b.text}**" if b.kind == "warn" else f"> {b.text}", ""]
        elif isinstance(b, Cards):
            out += [" · ".join(f"**{label}:** {value}" + (f" ({detail})" if detail else "")
                               for label, value, detail, _ in b.items), ""]
        elif isinstance(b, Toc):
            out += [" · ".join(f"[{text}](#{anchor})" for anchor, text in b.entries), ""]
        elif isinstance(b, Figure):
            out += [f"![{b.alt}]({b.filename})", ""] + ([f"*{b.caption}*", ""] if b.caption else [])
        elif isinstance(b, Table):
            out += _md_table(b)
    return "\n".join(out).rstrip() + "\n"


def _md_table(t: Table) -> list[str]:
    numbers, order = _numbered(t)
    lines = [f"*{t.caption}*", ""] if t.caption else []
    lines.append("| " + " | ".join(_md_text(c) for c in t.columns) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in t.align) + "|")
    for row in t.rows:
        cells = []
        for c in map(_cell, row):
            mark = ",".join(str(numbers[n]) for n in c.notes).translate(_SUP) if c.notes else ""
            cells.append(_md_text(c.text) + mark)
        lines.append("| " + " | ".join(cells) + " |")
    foot = [f"{str(numbers[n]).translate(_SUP)} {n}" for n in order] + list(t.notes)
    lines.append("")
    if foot:
        lines += ["  \n".join(foot), ""]
    return lines


# ---------------------------------------------------------------- HTML

CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--soft:#f3f4f6;--tuned:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:#eef1f5;color:var(--ink);
 font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans","DejaVu Sans",sans-serif}
main{max-width:1240px;margin:0 auto;background:#fff;padding:36px 44px 64px;min-height:100vh}
h1{font-size:28px;line-height:1.2;margin:0 0 6px;letter-spacing:-.01em}
h2{font-size:20px;margin:44px 0 10px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:16px;margin:26px 0 8px}
p{margin:8px 0;max-width:80ch}
.sub{color:var(--muted);margin-top:0}
code{font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;background:var(--soft);padding:1px 5px;border-radius:4px}
.banner{border-radius:10px;padding:12px 18px;margin:16px 0;font-weight:600}
.banner.warn{background:#fef3c7;border:1px solid #f59e0b;color:#78350f}
.banner.info{background:#eff6ff;border:1px solid #93c5fd;color:#1e3a8a}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0}
.card{border:1px solid var(--line);border-radius:12px;padding:12px 18px;min-width:170px;background:#fcfcfd}
.card .l{font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .v{font-size:26px;font-weight:700;font-variant-numeric:tabular-nums}
.card .d{font-size:12.5px;color:var(--muted)}
nav.toc{font-size:13.5px;color:var(--muted);margin:8px 0 0}
nav.toc a{color:var(--tuned);text-decoration:none;margin-right:14px;white-space:nowrap}
.wrap{overflow-x:auto;margin:10px 0 4px}
table{border-collapse:collapse;font-size:13.5px}
caption{caption-side:top;text-align:left;color:var(--muted);font-size:13px;padding-bottom:6px}
th,td{padding:5px 9px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{background:var(--soft);font-weight:600;text-align:left;border-bottom:1px solid #d1d5db;white-space:nowrap}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even) td{background:#fafbfc}
tbody tr:hover td{background:#f1f5ff}
.nw{white-space:nowrap}
.good{color:#047857;font-weight:650}.bad{color:#b91c1c;font-weight:650}.muted{color:#9ca3af}
.noise{color:#6b7280;font-style:italic}
sup{font-size:10px;color:var(--muted);margin-left:1px}
.foot{font-size:12.5px;color:#4b5563;margin:4px 0 12px;max-width:none}
.foot div{margin:1px 0}
figure{margin:18px 0 24px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:8px;display:block}
figcaption{color:var(--muted);font-size:13px;margin-top:6px}
ul{margin:6px 0 10px;padding-left:22px}li{margin:3px 0}
footer{margin-top:48px;color:var(--muted);font-size:12.5px;border-top:1px solid var(--line);padding-top:10px}
"""


def _inline(s: str) -> str:
    s = html.escape(s, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def to_html(title: str, subtitle: str, blocks: Sequence[Block], image_dir: Path, footer: str = "") -> str:
    body: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        body.append(f'<p class="sub">{_inline(subtitle)}</p>')
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            body.append(f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.cls}"' if b.cls else ""
            body.append(f"<p{cls}>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Banner):
            body.append(f'<div class="banner {b.kind}">{"⚠ " if b.kind == "warn" else ""}{_inline(b.text)}</div>')
        elif isinstance(b, Cards):
            body.append('<div class="cards">' + "".join(
                f'<div class="card"><div class="l">{html.escape(label)}</div>'
                f'<div class="v {cls}">{html.escape(value)}</div><div class="d">{_inline(detail)}</div></div>'
                for label, value, detail, cls in b.items) + "</div>")
        elif isinstance(b, Toc):
            body.append('<nav class="toc">' + "".join(
                f'<a href="#{html.escape(a)}">{html.escape(t)}</a>' for a, t in b.entries) + "</nav>")
        elif isinstance(b, Figure):
            data = base64.b64encode((image_dir / b.filename).read_bytes()).decode("ascii")
            cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">{cap}</figure>')
        elif isinstance(b, Table):
            body.append(_html_table(b))
    if footer:
        body.append(f"<footer>{_inline(footer)}</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def _html_table(t: Table) -> str:
    numbers, order = _numbered(t)
    align = lambda i: ' class="r"' if i < len(t.align) and t.align[i] == "r" else ""  # noqa: E731
    head = "".join(f"<th{align(i)}>{html.escape(c)}</th>" for i, c in enumerate(t.columns))
    rows = []
    for row in t.rows:
        cells = []
        for i, c in enumerate(map(_cell, row)):
            classes = " ".join(x for x in ("r" if t.align[i:i + 1] == "r" else "", c.cls) if x)
            cls = f' class="{classes}"' if classes else ""
            sup = ("<sup>" + ",".join(str(numbers[n]) for n in c.notes) + "</sup>") if c.notes else ""
            cells.append(f"<td{cls}>{_inline(c.text)}{sup}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    foot = [f"<div><sup>{numbers[n]}</sup> {_inline(n)}</div>" for n in order]
    foot += [f"<div>{_inline(n)}</div>" for n in t.notes]
    foot_html = f'<div class="foot">{"".join(foot)}</div>' if foot else ""
    table = f'<table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return f'<div class="wrap">{table}</div>{foot_html}'
