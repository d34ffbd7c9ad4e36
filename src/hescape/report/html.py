"""Rendering a report document as Markdown and as one self-contained HTML page.

A document is a list of blocks: ``Heading``, ``Text``, ``Table`` (a DataFrame) and ``Figure`` (a PNG
file). Markdown links the PNGs by relative path; the HTML page embeds them as base64 and carries its
CSS inline, so the one file can be mailed or opened from an MLflow artifact view.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    digits: int = 3


@dataclass
class Figure:
    path: Path
    caption: str = ""


def _cell(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "–"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _header(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    index = [str(n) if n is not None else "" for n in frame.index.names]
    cols = [" ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    return index, cols


def _rows(frame: pd.DataFrame):
    """``(index, values)`` per row with each column's own type (iterrows would upcast ints to floats)."""
    return zip(frame.index, frame.itertuples(index=False, name=None), strict=True)


def _has_index(frame: pd.DataFrame) -> bool:
    return not (isinstance(frame.index, pd.RangeIndex) and frame.index.name is None)


def markdown_table(frame: pd.DataFrame, *, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (index included when it is not a plain range)."""
    index_names, cols = _header(frame)
    with_index = _has_index(frame)
    head = ([" / ".join(index_names) or ""] if with_index else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in _rows(frame):
        cells = [_cell(v, digits).replace("|", "\\|") for v in row]
        if with_index:
            label = " / ".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
            cells = [label, *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(frame: pd.DataFrame, *, digits: int = 3) -> str:
    index_names, cols = _header(frame)
    with_index = _has_index(frame)
    head = ([" / ".join(index_names)] if with_index else []) + cols
    out = ["<table><thead><tr>", *[f"<th>{html.escape(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for idx, row in _rows(frame):
        out.append("<tr>")
        if with_index:
            label = " / ".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
            out.append(f"<th>{html.escape(label)}</th>")
        out.extend(f"<td>{html.escape(_cell(v, digits))}</td>" for v in row)
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_markdown(title: str, blocks: list, *, base: Path) -> str:
    """Markdown of the document; figures linked relative to ``base`` (the report folder)."""
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            out += [block.text, ""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            out += [markdown_table(block.frame, digits=block.digits), ""]
        elif isinstance(block, Figure):
            rel = Path(block.path).resolve().relative_to(base.resolve())
            out += [f"![{block.caption}]({rel.as_posix()})", ""]
    return "\n".join(out)


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f2f2f2}
tbody th{text-align:left}caption,.cap{font-style:italic;color:#555;text-align:left;margin:.3em 0}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}.note{color:#555}
"""


def render_html(title: str, blocks: list) -> str:
    """One self-contained HTML page: inline CSS, PNGs embedded as base64 data URIs."""
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            out.append(f"<p class='note'>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            if block.caption:
                out.append(f"<div class='cap'>{html.escape(block.caption)}</div>")
            out.append(html_table(block.frame, digits=block.digits))
        elif isinstance(block, Figure):
            data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(block.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption class='cap'>{html.escape(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
