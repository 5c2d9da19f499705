"""Final-answer extraction: the content of the last ``\\boxed{...}`` in a response.

Rules (the same in training, synthesis and evaluation):
- ``\\boxed{...}`` and ``\\fbox{...}`` with arbitrarily nested braces; the *last* box wins.
- ``\\boxed 5`` (a space, then a single token running to whitespace, ``$`` or end of text).
- ``None`` when there is no box, when the box's braces never balance (a truncated response), or when
  the box is empty. ``None`` means "no answer": it never votes and never earns reward.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _read_braced(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at ``text[open_index] == '{'``; None if it never closes."""
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{" and (index == 0 or text[index - 1] != "\\"):
            depth += 1
        elif char == "}" and (index == 0 or text[index - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
    return None


def _read_bare(text: str, start: int) -> str | None:
    """``\\boxed 5``: the token after the space, up to whitespace, ``$`` or end of text."""
    match = re.match(r"[ \t]+([^\s$]+)", text[start:])
    return match.group(1) if match else None


def extract_boxed(response: str) -> str | None:
    """Return the stripped content of the last box in ``response``, or None (see module docstring)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    starts = [m.end() for m in _BOX_RE.finditer(response)]
    for start in reversed(starts):
        rest = response[start:].lstrip(" \t")
        if rest.startswith("{"):
            content = _read_braced(response, len(response) - len(rest))
        else:
            content = _read_bare(response, start)
        if content is None:
            # The last box is unterminated: the response was cut off. Earlier boxes are drafts the model
            # had not committed to, so the response has no final answer.
            return None
        content = content.strip()
        return content or None
    return None


def extract_answers(responses: list[str]) -> list[str | None]:
    """``extract_boxed`` over a batch, with an error that names the offending index."""
    answers: list[str | None] = []
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"response {index} is {type(response).__name__}, expected str")
        answers.append(extract_boxed(response))
    return answers


__all__ = ["extract_answers", "extract_boxed"]
