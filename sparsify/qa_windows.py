"""The one rule for question-answering windows, shared by the training data and the runtime: a context too long
for ``max_length`` is read in windows that share ``doc_stride`` tokens, and the stride must be smaller than the
context a window holds once the longest question and the special tokens are in."""

from __future__ import annotations


def default_doc_stride(max_length: int) -> int:
    return max_length // 4


def stride_problem(max_length: int, stride: int, *, longest: int, special: int, where: str,
                   default: bool) -> tuple[str, str] | None:
    """None when ``stride`` fits, else ``(key, message)``: ``key`` is ``"max_length"`` when no context fits at
    all and ``"doc_stride"`` when the stride is too large, the message starts with that key's value; ``where`` names the longest question (e.g. "the longest
    question (12 tokens)"), ``default`` says the stride is the default one."""
    room = max_length - special - longest
    if room < 1:
        return "max_length", f"{max_length} leaves no room for the context: {where} and {special} special " \
                             "tokens fill it"
    if stride >= room:
        given = " (the default, max_length // 4)" if default else ""
        return "doc_stride", (f"{stride}{given} must be smaller than the {room} tokens of context a window "
                              f"holds ({where} and {special} special tokens take {max_length - room} of max_length "
                              f"{max_length}): give 0 to {room - 1}")
    return None
