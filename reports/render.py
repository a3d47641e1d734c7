"""Report documents and their writers: one self-contained HTML page, a Markdown summary, CSVs.

A :class:`Report` is a title and a list of :class:`Section` s; a section holds blocks:
:class:`Paragraph`, :class:`KeyValues` (headline numbers), :class:`Table` (a pandas
``DataFrame``) and :class:`Figure` (a PNG rendered by matplotlib). :func:`write_report`
writes, into one directory:

- ``report.html``: every figure embedded as a base64 PNG, CSS inline, no script and no
  external resource, so the page opens offline and can be mailed as one file;
- ``report.md``: the same text and tables, figures linked from ``figures/``;
- ``tables/NAME.csv``: every table in full, through pandas;
- ``figures/NAME.png``: every figure;
- ``report.json``: a manifest (images, tables and the rows each shows) that the browser
  check ``scripts/render_report.py`` compares with the rendered page.

Long tables show their first ``max_rows`` rows in HTML and Markdown and say where the full
table is; the CSV always has every row.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "Block",
    "Figure",
    "KeyValues",
    "Paragraph",
    "Report",
    "Section",
    "Table",
    "WrittenReport",
    "figure_png",
    "format_value",
    "new_figure",
    "write_report",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


@dataclass(frozen=True, kw_only=True)
class Paragraph:
    """Plain text (escaped on output)."""

    text: str


@dataclass(frozen=True, kw_only=True)
class KeyValues:
    """Headline numbers shown as cards: ``(label, value)`` pairs."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True, eq=False)
class Table:
    """A table; ``name`` names its CSV (``tables/NAME.csv``) and its HTML id."""

    name: str
    title: str
    frame: pd.DataFrame
    caption: str = ""
    max_rows: int = 50

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def rows_total(self) -> int:
        return len(self.frame)

    @property
    def rows_shown(self) -> int:
        return min(len(self.frame), self.max_rows)


@dataclass(frozen=True, kw_only=True, eq=False)
class Figure:
    """A PNG figure; ``name`` names its file (``figures/NAME.png``)."""

    name: str
    title: str
    png: bytes
    caption: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name)


Block = Paragraph | KeyValues | Table | Figure


@dataclass(frozen=True, kw_only=True, eq=False)
class Section:
    title: str
    blocks: tuple[Block, ...] = ()


@dataclass(frozen=True, kw_only=True, eq=False)
class Report:
    """A report: ``kind`` is ``"plan"``, ``"whatif"`` or ``"run"``."""

    kind: str
    title: str
    subtitle: str = ""
    sections: tuple[Section, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def blocks(self) -> Iterable[Block]:
        for section in self.sections:
            yield from section.blocks

    @property
    def tables(self) -> tuple[Table, ...]:
        return tuple(b for b in self.blocks() if isinstance(b, Table))

    @property
    def figures(self) -> tuple[Figure, ...]:
        return tuple(b for b in self.blocks() if isinstance(b, Figure))

    def table(self, name: str) -> Table:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True, kw_only=True)
class WrittenReport:
    """Paths of what :func:`write_report` wrote."""

    out_dir: Path
    html: Path
    markdown: Path
    manifest: Path
    tables: dict[str, Path]
    figures: dict[str, Path]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"report block name {name!r} must match {_NAME.pattern}")


# -- figures -----------------------------------------------------------------------------


def new_figure(width_in: float = 9.0, height_in: float = 4.0) -> MplFigure:
    """A matplotlib figure detached from pyplot (no global state, Agg rendering)."""
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width_in, height_in), layout="constrained")


def figure_png(fig: MplFigure, *, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# -- values ------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Short, readable text for a table cell (4 significant digits, thousands separators)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        magnitude = abs(value)
        if magnitude >= 1e4:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude == 0:
            return "0"
        if magnitude < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def _rows(frame: pd.DataFrame, limit: int) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in frame.head(limit).itertuples(index=False)]


# -- writers -----------------------------------------------------------------------------

_CSS = """
:root { --ink:#1d2433; --muted:#5b6477; --line:#dde2ea; --accent:#2f6fdf; --bg:#f6f8fb; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#16213a; color:#fff; padding:22px 36px; }
header h1 { margin:0 0 4px; font-size:26px; }
header p { margin:0; color:#c5cde0; }
nav { padding:10px 36px; background:#fff; border-bottom:1px solid var(--line); font-size:14px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; }
main { padding:8px 36px 40px; max-width:1320px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; margin:18px 0;
          padding:6px 22px 16px; }
h2 { font-size:20px; margin:14px 0 10px; }
h3 { font-size:16px; margin:16px 0 6px; }
.cards { display:flex; flex-wrap:wrap; gap:10px; margin:8px 0 4px; }
.card { border:1px solid var(--line); border-radius:6px; padding:8px 14px; min-width:150px;
        background:#fbfcfe; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
.card .v { font-size:19px; font-weight:600; }
.tablewrap { overflow-x:auto; }
table { border-collapse:collapse; font-size:13px; margin:4px 0; }
th, td { border-bottom:1px solid var(--line); padding:4px 10px; text-align:right;
         white-space:nowrap; }
th { background:#eef2f8; position:sticky; top:0; }
th.l, td.l { text-align:left; }
tbody tr:nth-child(even) { background:#fafbfd; }
figure { margin:10px 0 14px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; }
figcaption, .caption { color:var(--muted); font-size:13px; }
.note { color:var(--muted); font-size:13px; font-style:italic; }
footer { color:var(--muted); font-size:12px; padding:0 36px 24px; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _html_table(table: Table) -> str:
    import pandas as pd

    e = html.escape
    # Text columns align left, numbers right.
    text_cols = [
        not (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype))
        for dtype in table.frame.dtypes
    ]
    head = "".join(
        f'<th class="{"l" if t else "r"}">{e(str(c))}</th>'
        for c, t in zip(table.frame.columns, text_cols, strict=True)
    )
    body = "\n".join(
        "<tr>"
        + "".join(
            f'<td class="l">{e(cell)}</td>' if t else f"<td>{e(cell)}</td>"
            for cell, t in zip(row, text_cols, strict=True)
        )
        + "</tr>"
        for row in _rows(table.frame, table.max_rows)
    )
    parts = [f'<h3 id="h-{table.name}">{e(table.title)}</h3>']
    if table.caption:
        parts.append(f'<p class="caption">{e(table.caption)}</p>')
    parts.append(
        f'<div class="tablewrap"><table id="t-{table.name}" data-rows="{table.rows_shown}" '
        f'data-total-rows="{table.rows_total}"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )
    parts.append(f'<p class="note">{_table_note(table, f"tables/{table.name}.csv")}</p>')
    return "\n".join(parts)


def _table_note(table: Table, csv_link: str) -> str:
    """Where the table's CSV lies, and how many of its rows show when not all do."""
    if table.rows_total > table.rows_shown:
        return f"Showing {table.rows_shown} of {table.rows_total:,} rows; full table: {csv_link}"
    return f"CSV: {csv_link}"


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Paragraph):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, KeyValues):
        cards = "".join(
            f'<div class="card"><div class="k">{e(k)}</div><div class="v">{e(v)}</div></div>'
            for k, v in block.items
        )
        return f'<div class="cards">{cards}</div>'
    if isinstance(block, Table):
        return _html_table(block)
    data = base64.b64encode(block.png).decode("ascii")
    caption = f"<figcaption>{e(block.caption)}</figcaption>" if block.caption else ""
    return (
        f'<h3 id="h-{block.name}">{e(block.title)}</h3>\n<figure id="f-{block.name}">'
        f'<img alt="{e(block.title)}" src="data:image/png;base64,{data}">{caption}</figure>'
    )


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document."""
    e = html.escape
    nav = " ".join(f'<a href="#{_slug(s.title)}">{e(s.title)}</a>' for s in report.sections)
    sections = "\n".join(
        f'<section id="{_slug(s.title)}"><h2>{e(s.title)}</h2>\n'
        + "\n".join(_html_block(b) for b in s.blocks)
        + "\n</section>"
        for s in report.sections
    )
    subtitle = f"<p>{e(report.subtitle)}</p>" if report.subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(report.title)}</title><style>{_CSS}</style></head>\n<body>"
        f"<header><h1>{e(report.title)}</h1>{subtitle}</header>\n<nav>{nav}</nav>\n"
        f'<main data-kind="{e(report.kind)}">\n{sections}\n</main>\n'
        "<footer>Generated by legend report. Tables as CSV in tables/, figures as PNG in "
        "figures/.</footer>\n</body></html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    cols = [_md_cell(str(c)) for c in table.frame.columns]
    lines = [f"### {table.title}", ""]
    if table.caption:
        lines += [table.caption, ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(":---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for row in _rows(table.frame, table.max_rows):
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    lines.append("")
    lines.append(f"*{_table_note(table, f'[tables/{table.name}.csv](tables/{table.name}.csv)')}*")
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """The report as Markdown; figures link to ``figures/NAME.png``."""
    out = [f"# {report.title}", ""]
    if report.subtitle:
        out += [report.subtitle, ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(block.text)
            elif isinstance(block, KeyValues):
                out.extend(f"- **{k}**: {v}" for k, v in block.items)
            elif isinstance(block, Table):
                out.append(_md_table(block))
            else:
                out.append(f"### {block.title}\n\n![{block.title}](figures/{block.name}.png)")
                if block.caption:
                    out += ["", f"*{block.caption}*"]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def manifest(report: Report) -> dict[str, Any]:
    """What the rendered page must contain (read by ``scripts/render_report.py``)."""
    return {
        "kind": report.kind,
        "title": report.title,
        "images": len(report.figures),
        "figures": [f.name for f in report.figures],
        "tables": {
            t.name: {
                "rows_shown": t.rows_shown,
                "rows_total": t.rows_total,
                "columns": [str(c) for c in t.frame.columns],
                "csv": f"tables/{t.name}.csv",
            }
            for t in report.tables
        },
        "meta": report.meta,
    }


def write_report(report: Report, out_dir: str | Path) -> WrittenReport:
    """Write HTML, Markdown, CSV tables, PNG figures and the manifest into ``out_dir``."""
    out = Path(out_dir)
    _check_unique(t.name for t in report.tables)
    _check_unique(f.name for f in report.figures)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    tables: dict[str, Path] = {}
    for t in report.tables:
        path = out / "tables" / f"{t.name}.csv"
        t.frame.to_csv(path, index=False)
        tables[t.name] = path
    figures: dict[str, Path] = {}
    for f in report.figures:
        path = out / "figures" / f"{f.name}.png"
        path.write_bytes(f.png)
        figures[f.name] = path
    html_path = out / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    manifest_path = out / "report.json"
    manifest_path.write_text(json.dumps(manifest(report), indent=2, default=str) + "\n")
    return WrittenReport(
        out_dir=out,
        html=html_path,
        markdown=md_path,
        manifest=manifest_path,
        tables=tables,
        figures=figures,
    )


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"report block name {name!r} is used twice")
        seen.add(name)


def short_list(items: Sequence[str], limit: int = 6) -> str:
    """``a, b, c`` or ``a, b, c and 12 more``."""
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" and {len(items) - limit:,} more"
