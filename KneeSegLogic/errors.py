"""Errors the engine raises on purpose: each carries a message a person can act on."""

from __future__ import annotations

from pathlib import Path


class KneeSegError(Exception):
    """Base class: the CLI prints ``str(error)`` as one line and exits non-zero."""

    exit_code = 1


class InputError(KneeSegError):
    """An input that cannot be right: names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class CancelledError(KneeSegError):
    """The user (or the Slicer module) asked the engine to stop."""

    exit_code = 130


def one_line(message: object, limit: int = 400) -> str:
    """``message`` (an exception or text) on one line, whitespace collapsed, at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit] + "..."
