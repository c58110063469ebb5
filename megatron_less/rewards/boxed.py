"""Find the final answer a model wrote in ``\\boxed{...}`` (or ``\\fbox{...}``).

Only the LAST box counts: models often box intermediate results, and the answer-extraction
convention of the MATH dataset, Qwen2.5-Math and verl is "last box wins". The scan is a single
linear pass so that a 100k-character response with thousands of braces costs microseconds.
"""

from __future__ import annotations

_COMMANDS = ("\\boxed", "\\fbox")


def _last_command(text: str) -> tuple[int, int]:
    """Start and end index of the last ``\\boxed``/``\\fbox`` that is a whole command name."""
    best = (-1, -1)
    for cmd in _COMMANDS:
        pos = len(text)
        while True:
            pos = text.rfind(cmd, 0, pos)
            if pos < 0:
                break
            end = pos + len(cmd)
            # "\boxedx" would be a different macro; keep looking further left.
            if end < len(text) and text[end].isalpha():
                continue
            if pos > best[0]:
                best = (pos, end)
            break
    return best


def _braced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at ``open_at``; None when it never closes."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            # "\{" and "\}" are literal braces inside the answer (sets), not grouping.
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``.

    Returns None when there is no box, or when the last box is never closed (a truncated
    response): falling back to an earlier box would reward an answer the model abandoned.
    """
    if not isinstance(text, str):
        return None
    start, end = _last_command(text)
    if start < 0:
        return None
    i = end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced(text, i)
        return None if content is None else content.strip()
    if i == end:  # "\boxed" glued to something that is neither a brace nor a space
        return None
    # "\boxed 5" form (no braces): the answer runs to the next space, "$" or newline.
    j = i
    while j < len(text) and text[j] not in " \t\n$":
        j += 1
    token = text[i:j].rstrip(".,;")
    return token or None
