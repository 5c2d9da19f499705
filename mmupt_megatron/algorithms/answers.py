"""Final-answer extraction: the content of the last ``\\boxed{...}`` in a response.

Rules (the same in training, synthesis and evaluation):
- ``\\boxed{...}`` and ``\\fbox{...}`` with arbitrarily nested braces; the *last* box wins.
- Several boxes at the end that only separators part (spaces, ``,``, ``;``, ``$``, ``\\quad``, ``and``,
  ``or``, ``\\text{ and }``, ...: ``\\boxed{1}, \\boxed{2}``, ``$\\boxed{x=1}$ or $\\boxed{x=2}$``) are one
  answer, a list: their contents joined by ``", "`` (``1, 2``), which the matcher compares with a list, a set
  or a tuple (``answer_forms``). Boxes that all hold the same text are that one answer (a restated box).
  Any other text between two boxes (``\\boxed{1} then \\boxed{2}``) makes the earlier one a draft.
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


_SEPARATOR = re.compile(
    r"(?:\s|[,;&~]|\$|\\[()\[\],;:! ]|\\q?quad(?![A-Za-z])|\\\\|(?<![A-Za-z])(?:and|or)(?![A-Za-z])"
    r"|\\(?:text|mbox|textrm)\s*\{\s*(?:,|and|or)?\s*\})*"
)


def _box(response: str, match: re.Match) -> tuple[str | None, int]:
    """The content of the box at ``match`` (None: unterminated) and the index just past it."""
    start = match.end()
    rest = response[start:].lstrip(" \t")
    if rest.startswith("{"):
        open_index = len(response) - len(rest)
        content = _read_braced(response, open_index)
        return content, (open_index + len(content) + 2 if content is not None else len(response))
    bare = re.match(r"[ \t]+([^\s$]+)", response[start:])
    return (bare.group(1), start + bare.end()) if bare else (None, len(response))


def extract_boxed(response: str) -> str | None:
    """Return the stripped content of the last box in ``response`` (several adjacent final boxes: their
    contents joined by ``", "``), or None (see module docstring)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    matches = list(_BOX_RE.finditer(response))
    if not matches:
        return None
    content, _ = _box(response, matches[-1])
    if content is None:
        # The last box is unterminated: the response was cut off. Earlier boxes are drafts the model
        # had not committed to, so the response has no final answer.
        return None
    contents = [content.strip()]
    next_start = matches[-1].start()
    for match in reversed(matches[:-1]):
        earlier, earlier_end = _box(response, match)
        if earlier is None or earlier_end > next_start or not _SEPARATOR.fullmatch(response[earlier_end:next_start]):
            break
        contents.insert(0, earlier.strip())
        next_start = match.start()
    contents = [c for c in contents if c]
    if not contents:
        return None
    if len(set(contents)) == 1:
        return contents[0]
    return ", ".join(contents)


def extract_answers(responses: list[str]) -> list[str | None]:
    """``extract_boxed`` over a batch, with an error that names the offending index."""
    answers: list[str | None] = []
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"response {index} is {type(response).__name__}, expected str")
        answers.append(extract_boxed(response))
    return answers


__all__ = ["extract_answers", "extract_boxed"]
