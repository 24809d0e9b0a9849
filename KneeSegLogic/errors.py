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


class NotAvailableError(KneeSegError):
    """A command whose capability has not landed yet."""

    exit_code = 2


class CancelledError(KneeSegError):
    """The user (or the Slicer module) asked the engine to stop."""

    exit_code = 130
