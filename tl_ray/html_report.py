"""One HTML page a person reads after a run, a sweep or an evaluation: a page of sections (a heading, text, facts,
tables, images), written as one self-contained ``report.html``.

Self-contained because it is opened wherever the run wrote it, a laptop's folder or a bucket's object fetched
alone: images are embedded as ``data:`` URIs, the style sheet is inline, nothing is fetched from the network and
no script runs. Every string a command puts on the page (class names, paths, option values: the user's) is
escaped with ``html.escape``; the one markup text may carry is ``**strong**`` (what the sweep's verdict lines
use), turned into ``<strong>`` after escaping.

A command fills a ``Page`` and calls ``write`` (or ``render`` for the text); this module knows no command.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tl_ray import location
from tl_ray.version import __version__

FILE_NAME = "report.html"
Cell = str | int | float | None


@dataclass(frozen=True)
class Image:
    """A picture on the page: its encoded bytes (PNG unless ``mime`` says otherwise), embedded in the file."""

    data: bytes
    caption: str = ""  # its lines kept
    alt: str = ""
    mime: str = "image/png"
    width: int | None = None  # the width it is shown at, in CSS pixels (default: its own, at most the page's)


@dataclass(frozen=True)
class Table:
    """Rows under a header; a float cell is shown with ``digits`` decimals, None as an empty cell."""

    header: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    caption: str = ""
    digits: int = 3


@dataclass(frozen=True)
class Section:
    """A part of the page: its heading, then paragraphs, facts (name: value pairs), tables and images, in that
    order. ``gallery`` lays the images out as a grid of small pictures (an error gallery) rather than one a row."""

    heading: str
    text: Sequence[str] = ()
    facts: Sequence[tuple[str, Cell]] = ()
    tables: Sequence[Table] = ()
    images: Sequence[Image] = ()
    gallery: bool = False


@dataclass(frozen=True)
class Page:
    title: str
    sections: Sequence[Section] = field(default_factory=tuple)
    subtitle: str = ""


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } .subtitle { color: #666; margin-top: 0; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } caption { caption-side: top; text-align: left; color: #555; padding: 0.2em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dt { color: #555; } dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.88em; overflow-wrap: anywhere; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
.gallery figure { width: 180px; margin: 0; } .gallery img { width: 100%; image-rendering: auto; }
footer { color: #888; font-size: 0.85em; margin-top: 2em; }
"""


def escape(text: object) -> str:
    """``text`` as HTML text or an attribute value: ``&``, ``<``, ``>`` and both quotes escaped."""
    return html.escape(str(text), quote=True)


_STRONG = re.compile(r"\*\*(.+?)\*\*")


def _text(text: str) -> str:
    return _STRONG.sub(r"<strong>\1</strong>", escape(text))


def _lines(text: str) -> str:
    """``text`` escaped, its line breaks kept (a caption's lines)."""
    return "<br>".join(escape(line) for line in text.split("\n"))


def _cell(value: Cell, digits: int) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"<td>{escape(value)}</td>"
    shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f'<td class="number">{shown}</td>'


def _table(table: Table) -> str:
    parts = ["<table>"]
    if table.caption:
        parts.append(f"<caption>{escape(table.caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{escape(name)}</th>" for name in table.header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(_cell(value, table.digits) for value in row) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{escape(mime)};base64,{base64.b64encode(data).decode('ascii')}"


def _image(image: Image) -> str:
    width = f' width="{int(image.width)}"' if image.width else ""
    alt = escape(image.alt or image.caption)
    caption = f"<figcaption>{_lines(image.caption)}</figcaption>" if image.caption else ""
    return f'<figure><img src="{data_uri(image.data, image.mime)}" alt="{alt}"{width}>{caption}</figure>'


def _section(section: Section) -> str:
    parts = ["<section>", f"<h2>{escape(section.heading)}</h2>"]
    parts += [f"<p>{_text(paragraph)}</p>" for paragraph in section.text]
    if section.facts:
        parts.append("<dl>")
        parts += [f"<dt>{escape(name)}</dt><dd>{escape('' if v is None else v)}</dd>" for name, v in section.facts]
        parts.append("</dl>")
    parts += [_table(table) for table in section.tables]
    if section.images:
        images = "\n".join(_image(image) for image in section.images)
        parts.append(f'<div class="gallery">\n{images}\n</div>' if section.gallery else images)
    parts.append("</section>")
    return "\n".join(parts)


def render(page: Page) -> str:
    """The page as one HTML document: no script, no external resource."""
    subtitle = f'<p class="subtitle">{escape(page.subtitle)}</p>' if page.subtitle else ""
    body = "\n".join(_section(section) for section in page.sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(page.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(page.title)}</h1>\n{subtitle}\n{body}\n"
        f"<footer>written by tl-ray {escape(__version__)}</footer>\n</body>\n</html>\n"
    )


def write(page: Page, target: location.Location) -> str:
    """The page written as the file ``target`` (local or object storage, one retried write); its URI. Raises
    OSError as ``location.write_bytes`` does."""
    location.write_bytes(target.filesystem, target.path, render(page).encode("utf-8"))
    return target.uri
