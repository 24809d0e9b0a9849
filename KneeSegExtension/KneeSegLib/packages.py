"""Model packages as the module shows them: size, licence, model card, download arguments.

The engine's registry (``kneeseg models --json``) says where each package is (``location``: a
folder with ``model.json`` or a ``.zip``); the module reads only what it shows from there: the
size on disk and ``MODEL_CARD.md``. Downloading and importing stay with the engine, which checks
every checksum.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

MODEL_CARD = "MODEL_CARD.md"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def packageSize(location: str | Path) -> int:
    """Bytes a package takes on disk (the zip, or every file of its folder); 0 when absent."""
    path = Path(location)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return 0


def humanSize(size: int) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024, one decimal)."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def modelCard(location: str | Path) -> str | None:
    """The package's ``MODEL_CARD.md`` (folder, or zip with the card at its top or in one top folder)."""
    path = Path(location)
    if path.is_dir():
        card = path / MODEL_CARD
        return card.read_text(encoding="utf-8") if card.is_file() else None
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if PurePosixPath(name).name == MODEL_CARD
                     and len(PurePosixPath(name).parts) <= 2]
            if names:
                return archive.read(min(names, key=len)).decode("utf-8")
    return None


def normaliseSha256(text: str) -> str:
    """A sha256 as the engine takes it (64 lower-case hex digits; ``SHA256:`` prefix and spaces dropped)."""
    value = re.sub(r"\s+", "", text).lower()
    value = value[len("sha256:"):] if value.startswith("sha256:") else value
    if not _SHA256.fullmatch(value):
        raise ValueError("the SHA256 checksum must be 64 hexadecimal digits")
    return value


def packageRow(summary: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
    """(id, version, licence, size, origin) of one ``models --json`` entry, for the packages table."""
    location = summary.get("location") or ""
    return (str(summary.get("id", "")), str(summary.get("version", "")), str(summary.get("license") or "not stated"),
            humanSize(packageSize(location)) if location else "", str(summary.get("origin", "")))
