"""Which Slicer and Python the module supports, checked before anything is installed.

Slicer 5.8 ships Python 3.9, Slicer 5.10 and 5.12 ship Python 3.12. The module's own files are
kept valid Python 3.9 (``Testing/slicer/test_slicer_module.py`` compiles them with a 3.9 grammar), and
the Slicer calls they make are checked against the API lists of Slicer 5.8.1.
"""

from __future__ import annotations

from typing import Sequence

MINIMUM_PYTHON_VERSION = (3, 9)
MINIMUM_SLICER_VERSION = (5, 8)
# Releases the module was read against (Slicer's source at these tags); newer ones are expected to work.
TESTED_SLICER_RELEASES = ((5, 8), (5, 10), (5, 12))


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(part) for part in version)


def unsupportedReason(pythonVersion: Sequence[int], slicerVersion: Sequence[int]) -> str | None:
    """Why this Slicer cannot run KneeSeg, or ``None`` when it can.

    ``pythonVersion`` is ``sys.version_info``; ``slicerVersion`` is ``(major, minor)`` of Slicer.
    """
    python = tuple(pythonVersion[:2])
    slicerVersion = tuple(slicerVersion[:2])
    if slicerVersion < MINIMUM_SLICER_VERSION:
        return (f"KneeSeg needs Slicer {_dotted(MINIMUM_SLICER_VERSION)} or newer; this is Slicer "
                f"{_dotted(slicerVersion)}. Install a current Slicer release.")
    if python < MINIMUM_PYTHON_VERSION:
        return (f"KneeSeg's engine needs Python {_dotted(MINIMUM_PYTHON_VERSION)} or newer; this Slicer runs Python "
                f"{_dotted(python)}. Nothing was installed. Install a Slicer release with a newer Python.")
    return None
