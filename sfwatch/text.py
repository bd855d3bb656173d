"""Text for a terminal or a log line: names and messages that came from outside.

File names in a shared folder and messages from the API are written by someone
else. Printed as they are, an ESC starts a terminal escape sequence (colours,
cursor moves, a rewritten title), a BEL rings, a newline or carriage return
forges a line of output that looks like ours, and bidi controls reorder what is
shown. :func:`printable` is the one place that makes such text safe to show;
every line ``sfwatch`` prints for a human goes through it (JSON output needs no
help: ``json.dumps`` escapes control characters itself).
"""

from __future__ import annotations

import unicodedata

#: Unicode categories a name may hold but a terminal line must not: control
#: characters (C0, DEL, C1), lone surrogates, line and paragraph separators
_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})
#: format characters that reorder the text around them (bidi embeddings,
#: overrides and isolates, and the marks), so a name could display as another
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: what ``os.fsdecode`` makes of a byte that is not UTF-8 (surrogateescape)
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def _escape(char: str) -> str:
    code = ord(char)
    if code in _ESCAPED_BYTES:  # the original byte, as backslashreplace would show it
        return f"\\x{code - 0xDC00:02x}"
    if char in _BIDI or unicodedata.category(char) in _UNPRINTABLE:
        return repr(char)[1:-1]  # \n, \t, \x1b, \x9b, \u2028, \u202e, \udc00 ...
    return char


def printable(text: object) -> str:
    """``str(text)`` safe for one line of a terminal: control characters escaped.

    ``\\n`` → ``\\\\n``, ESC → ``\\\\x1b``, a byte of a non-UTF-8 file name → ``\\\\xe9``;
    everything else (spaces, CJK, emoji) is kept.
    """
    value = str(text)
    if value.isprintable():  # the common case: nothing to do (also no surrogates)
        return value
    return "".join(map(_escape, value))
