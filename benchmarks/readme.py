"""The docs' generated blocks: each benchmark rewrites only the text between its own pair of markers, in whichever
page (README.md or docs/*.md) holds them."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def page_holding(name: str) -> pathlib.Path:
    """The one page with `<!-- NAME:start -->`; the blocks moved from the README into docs/ pages by topic."""
    marker = f"<!-- {name}:start -->"
    pages = [page for page in (README, *sorted((ROOT / "docs").glob("*.md"))) if marker in page.read_text()]
    if len(pages) != 1:
        names = ", ".join(page.name for page in pages) or "none"
        raise SystemExit(f"error: {len(pages)} pages hold {marker} ({names}); exactly one should; not updated.")
    return pages[0]


def replace_block(name: str, content: str, readme: pathlib.Path | None = None) -> None:
    """Puts `content` between `<!-- NAME:start -->` and `<!-- NAME:end -->`, re-reading the file just before, so
    edits made while a long benchmark ran are kept; refuses, changing nothing, unless each marker is there once."""
    readme = readme or page_holding(name)
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    once = text.count(start_marker) == 1 and text.count(end_marker) == 1
    if not once or text.index(start_marker) > text.index(end_marker):
        raise SystemExit(f"error: {readme.name} needs exactly one {start_marker} before one {end_marker}; not updated.")
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    readme.write_text(text[:start] + "\n" + content + text[end:])
