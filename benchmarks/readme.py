"""The README's generated blocks: each benchmark rewrites only the text between its own pair of markers."""

import pathlib

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def replace_block(name: str, content: str, readme: pathlib.Path = README) -> None:
    """Puts `content` between `<!-- NAME:start -->` and `<!-- NAME:end -->`, re-reading the file just before, so
    edits made while a long benchmark ran are kept; refuses, changing nothing, unless each marker is there once."""
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    once = text.count(start_marker) == 1 and text.count(end_marker) == 1
    if not once or text.index(start_marker) > text.index(end_marker):
        raise SystemExit(f"error: {readme.name} needs exactly one {start_marker} before one {end_marker}; not updated.")
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    readme.write_text(text[:start] + "\n" + content + text[end:])
