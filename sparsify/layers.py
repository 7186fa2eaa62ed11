"""Which layers a technique acts on: regular expressions over module names (imports no torch).

Pruning and quantization select the same way: ``include`` patterns searched in module names (default: the
encoder's Linear layers of BERT, MiniLM, RoBERTa and DistilBERT; not the embeddings, pooler or classifier),
minus ``exclude`` patterns, each pattern required to match something.
"""

from __future__ import annotations

import re

from sparsify.config import FieldError

# re.search on module names (so "bert.", "roberta.", "module." or any other prefix is fine): BERT / MiniLM /
# RoBERTa / ELECTRA / XLM-R / DeBERTa naming, then DistilBERT. Not the embeddings, the pooler or the head.
DEFAULT_INCLUDE: tuple[str, ...] = (
    r"(?:^|\.)encoder\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)(?:_proj)?|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)$",
    r"(?:^|\.)transformer\.layer\.\d+\.(?:attention\.(?:q_lin|k_lin|v_lin|out_lin)|ffn\.lin[12])$",
)


def check_patterns(patterns: tuple[str, ...], field: str) -> None:
    """Every pattern compiles; otherwise a FieldError naming ``field[i]``."""
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
        except re.error as e:
            raise FieldError((field, i), f"invalid regular expression {p!r}: {e}") from None


def select_layers(linears: list[tuple[str, object]], include: tuple[str, ...], exclude: tuple[str, ...], *,
                  action: str) -> list[tuple[str, object]]:
    """The ``(name, module)`` pairs of ``linears`` that ``include`` selects and ``exclude`` does not.

    Raises FieldError (naming include[i] / exclude[i]) for a pattern that matches nothing, or when nothing is left;
    ``action`` ("prune", "quantize") words the messages.
    """
    if not linears:
        raise FieldError("include", f"the model has no torch.nn.Linear layer to {action}")
    examples = ", ".join(n for n, _ in linears[:3])
    default = tuple(include) == DEFAULT_INCLUDE
    if not default:
        for i, p in enumerate(include):
            if not any(re.search(p, n) for n, _ in linears):
                raise FieldError(("include", i), f"pattern {p!r} matches no Linear layer of the model (a regular "
                                                 f"expression searched in module names such as {examples})")
    included = [(n, m) for n, m in linears if any(re.search(p, n) for p in include)]
    if default and not included:
        raise FieldError("include", f"the default patterns (the encoder's Linear layers of BERT, MiniLM, RoBERTa "
                                    f"or DistilBERT) match no layer of this model; give include patterns for "
                                    f"module names such as {examples}")
    for i, p in enumerate(exclude):
        if not any(re.search(p, n) for n, _ in included):
            raise FieldError(("exclude", i), f"pattern {p!r} matches none of the layers selected by include")
    selected = [(n, m) for n, m in included if not any(re.search(p, n) for p in exclude)]
    if not selected:
        raise FieldError("exclude", f"excludes every layer that include selects: nothing left to {action}")
    return selected
