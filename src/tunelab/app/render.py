"""Template filters: the marked example text, the Markdown of the evaluation report, and display helpers (dates,
numbers, byte counts). Everything is escaped first; only the tags made here reach the page.
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any

from markupsafe import Markup

from tunelab.app.machine import human_bytes
from tunelab.tasks.dry_run import TRAINED_CLOSE, TRAINED_OPEN


def marked(text: str) -> Markup:
    """An example as planned, its trained spans ([[ ]]) highlighted."""
    escaped = html.escape(text)
    pattern = re.escape(html.escape(TRAINED_OPEN)) + r"(.*?)" + re.escape(html.escape(TRAINED_CLOSE))
    return Markup(re.sub(pattern, r"<mark>\1</mark>", escaped, flags=re.S))


def markdown(text: str) -> Markup:
    """The Markdown `tunelab evaluate` writes, as HTML: headings, tables, paragraphs, fenced and indented code,
    lists, blockquotes, rules, **bold** and `code`; images are left out (the page shows the loss curves itself).

    evaluate.py puts each sample's prompt and answers into the report as they are, after a label on the same line
    (`**Reference:** <the answer>`), so an answer's own Markdown is the report's. Two things follow, both handled
    here: an answer that opens with a block (`**Reference:** ```python`) gets its label as a paragraph of its own,
    and a model answer cut off at the token limit inside a code block has its fence closed at the next sample label
    instead of swallowing the rest of the report. Lines inside a paragraph keep their breaks (and their leading
    spaces): the report shows data and model output, where a line break is meant.
    """
    return Markup("\n".join(_blocks(text.expandtabs(4).splitlines(), report=True)))


_FENCE = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_RULE = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_ITEM = re.compile(r" {0,3}([-*+]|(\d{1,9})[.)])( +|$)")
_QUOTE = re.compile(r" {0,3}> ?(.*)$")
_TABLE_ROW = re.compile(r" {0,3}\|")
# A label evaluate.py writes before a prompt or answer, and the rest of its line.
_LABELLED = re.compile(r"(\*\*[^*]{1,40}:\*\*) +(.*)$")
# Where one sample's text ends in the report, whatever that text did (evaluate writes a blank line before each).
_SAMPLE_START = re.compile(r"## Sample \d+\s*$|\*\*(Prompt|Reference|Rejected|Fine-tuned|Base):\*\*")


def _blocks(lines: list[str], report: bool = False) -> list[str]:
    """Block-level HTML of Markdown lines (called again on the inside of list items and blockquotes)."""
    lines = list(lines)
    out: list[str] = []
    paragraph: list[str] = []
    table: list[list[str]] = []

    def close_paragraph() -> None:
        if paragraph:
            first, *rest = paragraph
            shown = [_inline(first.strip())]
            # Kept leading spaces: an unfenced code answer stays readable.
            shown += ["&nbsp;" * _indent(line) + _inline(line.strip()) for line in rest]
            out.append("<p>" + "<br>".join(shown) + "</p>")
            paragraph.clear()

    def close_table() -> None:
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
            out.append("</table>")
            table.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _TABLE_ROW.match(line):
            close_paragraph()
            cells = [_inline(c.strip()) for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # the |---|---| separator row
                table.append(cells)
            i += 1
            continue
        close_table()
        labelled = _LABELLED.match(line)
        if labelled and _starts_block(labelled.group(2)):
            lines[i : i + 1] = [labelled.group(1), "", labelled.group(2)]
            continue
        if not line.strip():
            close_paragraph()
            i += 1
        elif line.lstrip().startswith("!["):
            close_paragraph()
            i += 1
        elif _indent(line) >= 4 and not paragraph:
            i = _indented_code(lines, i, out)
        elif _FENCE.match(line) and _fence_opens(line):
            close_paragraph()
            i = _fenced_code(lines, i, out, report)
        elif heading := _HEADING.match(line):
            close_paragraph()
            level = min(len(heading.group(1)) + 1, 6)  # the page has its own h1
            out.append(f"<h{level}>{_inline(heading.group(2) or '')}</h{level}>")
            i += 1
        elif _RULE.match(line):
            close_paragraph()
            out.append("<hr>")
            i += 1
        elif _QUOTE.match(line):
            close_paragraph()
            quoted = []
            while i < len(lines) and (quote := _QUOTE.match(lines[i])):
                quoted.append(quote.group(1))
                i += 1
            out.append("<blockquote>" + "\n".join(_blocks(quoted)) + "</blockquote>")
        elif _ITEM.match(line):
            close_paragraph()
            i = _list(lines, i, out)
        else:
            paragraph.append(line)
            i += 1
    close_paragraph()
    close_table()
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _fence_opens(line: str) -> bool:
    # A backtick fence's info string has no backtick: "```x```" on one line is inline code, not a block.
    match = _FENCE.match(line)
    return bool(match) and not (match.group(2)[0] == "`" and "`" in match.group(3))


def _starts_block(line: str) -> bool:
    """Whether a line opens something other than a paragraph (and so ends a list item's lazy continuation)."""
    if _FENCE.match(line) and _fence_opens(line):
        return True
    return any(p.match(line) for p in (_HEADING, _RULE, _ITEM, _QUOTE, _TABLE_ROW))


def _fenced_code(lines: list[str], i: int, out: list[str], report: bool) -> int:
    """A ``` or ~~~ block from lines[i]; returns the index after it. An unclosed fence ends with the lines, or in
    the report at the next sample label after a blank line (a model answer cut off inside its code)."""
    opening = _FENCE.match(lines[i])
    indent, fence, info = len(opening.group(1)), opening.group(2), opening.group(3).strip()
    code: list[str] = []
    i += 1
    while i < len(lines):
        line = lines[i]
        closing = _FENCE.match(line)
        if closing and closing.group(2)[0] == fence[0] and len(closing.group(2)) >= len(fence):
            if not closing.group(3).strip():
                i += 1
                break
        if report and code and not code[-1].strip() and _SAMPLE_START.match(line):
            break
        code.append(line[min(indent, _indent(line)) :])
        i += 1
    while code and not code[-1].strip():
        code.pop()
    language = re.sub(r"[^\w+#.-]", "", info.split()[0]) if info else ""
    attribute = f' class="language-{language}"' if language else ""
    out.append(f"<pre><code{attribute}>" + html.escape("\n".join(code)) + "</code></pre>")
    return i


def _indented_code(lines: list[str], i: int, out: list[str]) -> int:
    """A block of lines indented by four spaces or more (blank lines inside it included)."""
    code: list[str] = []
    while i < len(lines) and (_indent(lines[i]) >= 4 or not lines[i].strip()):
        code.append(lines[i][4:])
        i += 1
    while code and not code[-1].strip():
        code.pop()
        i -= 1  # trailing blank lines belong to what follows
    out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
    return i


def _list(lines: list[str], i: int, out: list[str]) -> int:
    """A bulleted or numbered list from lines[i]; each item's lines (indented under its text) are parsed again,
    so nested lists and code inside items work."""
    first = _ITEM.match(lines[i])
    numbered = first.group(2) is not None
    items: list[str] = []
    while i < len(lines):
        item = _ITEM.match(lines[i])
        if not item or _RULE.match(lines[i]) or (item.group(2) is not None) != numbered:
            break
        width = item.end() if 0 < len(item.group(3)) <= 4 else item.end(1) + 1
        body = [lines[i][width:] if len(lines[i]) > width else lines[i][item.end() :]]
        i += 1
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                after = i
                while after < len(lines) and not lines[after].strip():
                    after += 1
                if after == len(lines) or _indent(lines[after]) < width:
                    break
                body += [""] * (after - i)
                i = after
            elif _indent(line) >= width:
                body.append(line[width:])
                i += 1
            elif body[-1].strip() and not _starts_block(line):  # a lazy continuation of the item's text
                body.append(line.strip())
                i += 1
            else:
                break
        inner = _blocks(body)
        if "" not in body:  # a tight item: its text is not wrapped in a paragraph
            inner = [b[3:-4] if b.startswith("<p>") and b.endswith("</p>") else b for b in inner]
        items.append("<li>" + "\n".join(inner) + "</li>")
        after = i
        while after < len(lines) and not lines[after].strip():
            after += 1
        if after < len(lines) and _ITEM.match(lines[after]) and not _RULE.match(lines[after]):
            i = after
        else:
            break
    if numbered:
        start = int(first.group(2))
        out.append((f'<ol start="{start}">' if start != 1 else "<ol>") + "".join(items) + "</ol>")
    else:
        out.append("<ul>" + "".join(items) + "</ul>")
    return i


# A code span: a run of backticks, its text, the same run again (CommonMark's rule, simplified).
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


def _inline(text: str) -> str:
    """Escaped text with its **bold** and `code` spans marked (nothing inside a code span is bold)."""
    shown, start = [], 0
    for span in _CODE_SPAN.finditer(text):
        shown.append(_bold(html.escape(text[start : span.start()])))
        code = span.group(2)
        if code.startswith(" ") and code.endswith(" ") and code.strip():
            code = code[1:-1]
        shown.append(f"<code>{html.escape(code)}</code>")
        start = span.end()
    shown.append(_bold(html.escape(text[start:])))
    return "".join(shown)


def _bold(escaped: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)


def basename(value: Any) -> str:
    """The last part of a path (hub ids stay whole)."""
    text = str(value or "")
    return Path(text).name if text.startswith(("/", ".", "~")) else text


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else ""


def number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


FILTERS = {
    "marked": marked,
    "markdown": markdown,
    "basename": basename,
    "when": when,
    "number": number,
    "bytes": human_bytes,
}
