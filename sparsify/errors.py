"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a wrong column) raises a :class:`SparsifyError`.
The CLI prints its message on one line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import re


class SparsifyError(Exception):
    """An error caused by user input; the message says what, where and what to do. Its text is one line (line
    breaks inside a message, from a library's error text for example, become spaces), so that the CLI's
    ``error:`` line is the whole message."""

    def __str__(self) -> str:
        text = re.sub(r"\s*[\r\n]+\s*", " ", super().__str__()).strip()
        # the other characters that end a line for str.splitlines (a key named "\x1e" in a recipe, say), escaped
        return _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_LINE_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


class RecipeError(SparsifyError):
    """A recipe that cannot be used: names the file, the line and the key path."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.file, self.line, self.key, self.reason = file, line, key, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")
