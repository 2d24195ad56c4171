"""Template filters: the marked example text, a small Markdown subset for the evaluation report, and display
helpers. Everything is escaped first; only the tags made here reach the page.
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any

from markupsafe import Markup

from tunelab.tasks.dry_run import TRAINED_CLOSE, TRAINED_OPEN


def marked(text: str) -> Markup:
    """An example as planned, its trained spans ([[ ]]) highlighted."""
    escaped = html.escape(text)
    pattern = re.escape(html.escape(TRAINED_OPEN)) + r"(.*?)" + re.escape(html.escape(TRAINED_CLOSE))
    return Markup(re.sub(pattern, r"<mark>\1</mark>", escaped, flags=re.S))


def markdown(text: str) -> Markup:
    """The Markdown `tunelab evaluate` writes (headings, tables, paragraphs, **bold**, `code`) as HTML; images
    are left out (the page shows the loss curves itself)."""
    out: list[str] = []
    table: list[list[str]] = []

    def close_table() -> None:
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
            out.append("</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [_inline(c.strip()) for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # the |---|---| separator row
                table.append(cells)
            continue
        close_table()
        if not line.strip() or line.startswith("!["):
            continue
        heading = re.match(r"(#{1,4}) (.*)", line)
        if heading:
            level = len(heading.group(1)) + 1  # the page has its own h1
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        else:
            out.append(f"<p>{_inline(line)}</p>")
    close_table()
    return Markup("\n".join(out))


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def basename(value: Any) -> str:
    """The last part of a path (hub ids stay whole)."""
    text = str(value or "")
    return Path(text).name if text.startswith(("/", ".", "~")) else text


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else ""


def number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


FILTERS = {"marked": marked, "markdown": markdown, "basename": basename, "when": when, "number": number}
