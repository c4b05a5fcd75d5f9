"""Names (file paths, class names) shown on a terminal or in a table as text that cannot act on it."""

import unicodedata

# Unicode's bidirectional controls reorder what a terminal shows, so that one name can pass for another.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def utf8(path: str) -> str:
    """The path with the bytes that are not UTF-8 (kept by Python as surrogates) as U+FFFD, so a strict UTF-8
    stdout never fails on them."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def printable(text: str) -> str:
    """The text as a terminal shows it without acting on it: UTF-8 (see `utf8`), with control characters (escape
    sequences, carriage returns, ...) and bidirectional controls written as visible escapes such as \\x1b."""
    return "".join(_escape(character) if unicodedata.category(character) == "Cc" or character in BIDI_CONTROLS
                   else character for character in utf8(text))


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
