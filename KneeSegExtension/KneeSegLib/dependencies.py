"""Which Python packages the engine still needs in Slicer's Python, and how to install them safely.

``Resources/requirements.txt`` lists the engine's dependencies except those Slicer ships itself
(numpy, SimpleITK, VTK). PyTorch is installed through the PyTorch extension (it picks the build
matching the GPU driver); the rest with pip under a constraints file that pins every package
Slicer owns to the version installed, so pip fails loudly instead of replacing Slicer's numpy,
SimpleITK, VTK or requests (a replaced SimpleITK or VTK breaks Slicer itself).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

# Packages Slicer (or the PyTorch extension) owns: never installed or replaced by KneeSeg.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "vtk", "requests", "torch")
TORCH = "torch"


def readRequirements(path: str | Path) -> list[Requirement]:
    """Requirements of a pip requirements file (comments and blank lines skipped)."""
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                requirements.append(Requirement(text))
            except InvalidRequirement as error:
                raise ValueError(f"{path}: {error}") from None
    return requirements


def installedVersion(name: str) -> str | None:
    """Version of an installed distribution, or ``None``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missingRequirements(requirements: Iterable[Requirement],
                        version: Callable[[str], str | None] = installedVersion) -> list[Requirement]:
    """Requirements not satisfied by what is installed (absent, or a version outside the specifier)."""
    missing = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = version(requirement.name)
        if installed is None or (requirement.specifier and not requirement.specifier.contains(installed, prereleases=True)):
            missing.append(requirement)
    return missing


def splitTorch(requirements: Iterable[Requirement]) -> tuple[Requirement | None, list[Requirement]]:
    """(the torch requirement, the others): torch goes through the PyTorch extension, not pip."""
    torch, others = None, []
    for requirement in requirements:
        if canonicalize_name(requirement.name) == TORCH:
            torch = requirement
        else:
            others.append(requirement)
    return torch, others


def protectionConstraints(version: Callable[[str], str | None] = installedVersion) -> str:
    """pip constraints pinning Slicer's own packages: ``name==installed``, or ``name<0`` when absent.

    ``<0`` matches no release, so a dependency asking for a package Slicer provides without pip
    metadata (its VTK) makes pip stop with an error instead of installing a second copy.
    """
    lines = []
    for name in PROTECTED_PACKAGES:
        installed = version(name)
        lines.append(f"{name}=={installed}" if installed else f"{name}<0")
    return "\n".join(lines) + "\n"
