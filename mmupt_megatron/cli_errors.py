"""Expected failures of a command (bad input, a file that cannot be read or written, a worker that failed,
a Ray task or actor error) become one line naming the cause, not a traceback; bugs keep their traceback.

    sys.exit(run_command(handler, args, prog="mmupt"))   # MMUPT_TRACEBACK=1 shows the traceback anyway
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _is_ray_error(error: BaseException) -> bool:
    return any(cls.__module__.startswith("ray.") for cls in type(error).__mro__)


def describe_failure(error: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an expected failure; None for anything else (a bug)."""
    if _is_ray_error(error):
        cause = getattr(error, "cause", None)
        where = getattr(error, "function_name", None)
        if isinstance(cause, BaseException) and cause is not error:
            inner = describe_failure(cause)
            text = inner[0] if inner else f"{type(cause).__name__}: {_last_line(str(cause))}"
        else:
            text = f"{type(error).__name__}: {_last_line(str(error))}"
        return (f"in a Ray worker ({where}): {text}" if where else f"in Ray: {text}"), FAILURE
    if isinstance(error, ValueError):
        return str(error), USAGE_ERROR
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}", FAILURE
    if isinstance(error, RuntimeError):
        text = str(error)
        if text.startswith("worker failure: "):  # distributed.parallel.run_workers: the worker's traceback follows
            head = text.splitlines()[0].removeprefix("worker failure: ").rstrip(":")
            return f"worker failure ({head}): {_last_line(text)}", FAILURE
        return _last_line(text) or type(error).__name__, FAILURE
    return None


def run_command(handler: Callable[[Any], int], args: Any, *, prog: str) -> int:
    """``handler(args)``, with expected failures reported on stderr as ``PROG: error: ...`` (exit code != 0)."""
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        described = describe_failure(error)
        if described is None or os.environ.get("MMUPT_TRACEBACK"):
            raise
        message, code = described
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code
