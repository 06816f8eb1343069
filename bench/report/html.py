"""A self-contained HTML page: inline CSS, images embedded as data URIs (each also linked to
its file beside the page: PNG figures, GIF animations), no scripts, nothing fetched from the network."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } tr.reference td { background: #fff7d6; } tr.nomatch td { color: #777; }
tr.regression td { background: #fde2e2; } tr.inert td { background: #ffe9cc; }
figure { margin: 0.8em 0 1.4em; } figure img { max-width: 100%; border: 1px solid #ddd; }
table.clips img { border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: #444; margin-top: 0.3em; }
.meta { color: #555; font-size: 0.9em; } .pass { color: #1a7f37; font-weight: bold; } .fail { color: #c62828; font-weight: bold; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
nav a { margin-right: 1em; }
"""


def esc(s: object) -> str:
    return html.escape(str(s))


MIME = {".png": "image/png", ".gif": "image/gif"}


def media(path: Path, alt: str, zoom: int = 1) -> str:
    """An embedded image or animation (data URI, PNG or GIF) that links to the file beside the page;
    ``zoom`` > 1 shows it that many times its size (pixelated, for small pixel art such as clips)."""
    path = Path(path)
    if path.suffix.lower() not in MIME:
        raise ValueError(f"cannot embed {path.name}: the report embeds {', '.join(MIME)} files")
    raw = path.read_bytes()
    size = ""
    if zoom > 1:
        from PIL import Image

        with Image.open(path) as im:
            size = f' width="{im.width * zoom}" height="{im.height * zoom}"'
    data = base64.b64encode(raw).decode("ascii")
    return f'<a href="{esc(path.name)}"><img src="data:{MIME[path.suffix.lower()]};base64,{data}" alt="{esc(alt)}"{size}></a>'


def figure(png: Path, caption: str, alt: str) -> str:
    """An embedded PNG (data URI) that links to the file beside the page."""
    return f"<figure>{media(png, alt)}<figcaption>{caption}</figcaption></figure>"


def page(title: str, sections: list[tuple[str, str, str]], subtitle: str = "") -> str:
    """``sections``: (anchor, heading, body html)."""
    nav = " ".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "\n".join(f'<h2 id="{esc(a)}">{esc(h)}</h2>\n{b}' for a, h, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
        f'<h1>{esc(title)}</h1><p class="meta">{subtitle}</p><nav>{nav}</nav>\n{body}\n</body></html>\n'
    )
