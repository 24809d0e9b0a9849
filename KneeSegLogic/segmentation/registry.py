"""Where model packages are found, imported and downloaded (see :mod:`.package` for the contract).

Search order: the bundled ``Resources/Models/``, the folders in ``KNEESEG_MODELS_PATH``, then the
user cache ``$KNEESEG_HOME/models``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from KneeSegLogic.errors import CancelledError, KneeSegError, one_line
from KneeSegLogic.io.outputs import atomic_folder
from KneeSegLogic.resources import BUNDLED_MODELS_DIR, kneeseg_home
from KneeSegLogic.segmentation.package import (
    _SHA256,
    _VERSION,
    MANIFEST,
    ModelPackage,
    load_package,
)

MODELS_PATH_VARIABLE = "KNEESEG_MODELS_PATH"


def user_models_dir() -> Path:
    """The user cache of model packages (imports and downloads go here)."""
    return kneeseg_home() / "models"


def search_roots() -> list[tuple[str, Path]]:
    """``(origin, folder)`` pairs the registry searches, in order."""
    extra = [Path(p).expanduser() for p in os.environ.get(MODELS_PATH_VARIABLE, "").split(os.pathsep) if p]
    return [("bundled", BUNDLED_MODELS_DIR)] + [("extra", p) for p in extra] + [("user", user_models_dir())]


def find_packages(problems: list[str] | None = None, verify: bool = False) -> list[ModelPackage]:
    """Every valid package in the search roots, in search order, each id and version once.

    A package that cannot be read is skipped: its error goes to ``problems`` when a list is
    given, else it is issued as a warning, so one broken package does not hide the others.
    The same id and version found again in a later root is dropped (the first one is what
    :func:`get_package` runs); when it is a different package (another ``model.json``) that is
    a problem too. With ``verify`` every weights file is also checked against its sha256 (it
    reads all weights, so only ``kneeseg models`` does it) and a tampered package is skipped.
    """

    def problem(message: str) -> None:
        if problems is None:
            warnings.warn(message, stacklevel=3)
        else:
            problems.append(message)

    packages: list[ModelPackage] = []
    first: dict[tuple[str, str], ModelPackage] = {}
    for origin, root in search_roots():
        for candidate in _candidates(root):
            try:
                package = load_package(candidate)
                if verify:
                    package.verify()
            except CancelledError:  # SIGTERM/Ctrl-C while reading or hashing: a stop, not a broken package
                raise
            except KneeSegError as error:
                problem(str(error))
                continue
            package.origin = origin
            key = (package.id, package.version)
            if key in first:
                if first[key].sha256 != package.sha256:
                    problem(
                        f"{package.path}: another {package.id} {package.version} than {first[key].path}, "
                        "which is used; give one of them another version"
                    )
                continue
            first[key] = package
            packages.append(package)
    return packages


def default_package(packages: list[ModelPackage]) -> ModelPackage | None:
    """The package run when none is named: the first marked ``"default": true``, else the first
    bundled one, at the highest version of its id; None when there is neither."""
    preferred = [p for p in packages if p.default] or [p for p in packages if p.origin == "bundled"]
    if not preferred:
        return None
    return max((p for p in packages if p.id == preferred[0].id), key=_version_key)


def _candidates(root: Path) -> list[Path]:
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if not p.name.endswith(".partial") and ((p / MANIFEST).is_file() or (p.is_file() and p.suffix == ".zip"))
    ]


def get_package(name: str | None = None) -> ModelPackage:
    """Find a package by id (``id`` or ``id@version``), by path, or the default when None.

    The default is the package marked ``"default": true`` (else the first bundled one); for an id,
    the highest version found wins, so an updated package imported into the user cache replaces
    the bundled one.

    Raises
    ------
    KneeSegError
        Nothing found; the message lists the known ids and the folders searched.
    """
    if name is not None and (name.endswith(".zip") or "/" in name or os.sep in name or Path(name).exists()):
        return load_package(name)
    packages = find_packages()
    searched = ", ".join(str(root) for _, root in search_roots())
    if name is None:
        default = default_package(packages)
        if default is None:
            raise KneeSegError(
                f"no model package found (searched {searched}); import one with "
                "`kneeseg models --import PACKAGE.zip` or pass --model PATH"
            )
        return default
    package_id, _, version = name.partition("@")
    matches = [p for p in packages if p.id == package_id and (not version or p.version == version)]
    if not matches:
        known = sorted({f"{p.id}@{p.version}" for p in packages})
        raise KneeSegError(f"unknown model package {name!r}; known: {known or 'none'} (searched {searched})")
    return max(matches, key=_version_key)


def _version_key(package: ModelPackage) -> tuple[int, ...]:
    match = _VERSION.fullmatch(package.version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def import_package(source: str | Path) -> ModelPackage:
    """Copy a package folder or zip into the user cache (for sites without network access).

    Every weights file is checked against its sha256 first. The copy lands in
    ``<cache>/<id>-<version>``; importing the same package again is a no-op, and a different
    package under the same id and version is refused.
    """
    package = load_package(source)
    package.verify()
    target = user_models_dir() / f"{package.id}-{package.version}"
    if target.exists():
        existing = load_package(target)
        if existing.sha256 != package.sha256:
            raise KneeSegError(
                f"{target}: a different {package.id} {package.version} is already installed; "
                "remove that folder first, or give the new package another version"
            )
    else:
        with atomic_folder(target) as partial:
            shutil.copytree(package.path, partial, dirs_exist_ok=True)
    imported = load_package(target)
    imported.origin = "user"
    return imported


def download_package(url: str, sha256: str, timeout_s: float = 60.0) -> ModelPackage:
    """Download a package zip, check its sha256, and import it into the user cache.

    The download is streamed into ``$KNEESEG_HOME/downloads``; on a checksum mismatch it is
    deleted and nothing is imported.

    Parameters
    ----------
    url : str
        Any URL urllib opens (https, http, file).
    sha256 : str
        Expected sha256 of the zip, hex (a ``SHA256:`` prefix, as Slicer writes it, is accepted).
    """
    expected = sha256.lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(expected):
        raise KneeSegError(f"sha256 {sha256!r}: must be 64 hexadecimal digits")
    downloads = kneeseg_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f"{expected}.partial"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as stream:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                stream.write(block)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise KneeSegError(f"{url}: download failed ({one_line(error)})") from None
    actual = digest.hexdigest()
    if actual != expected:
        partial.unlink()
        raise KneeSegError(
            f"{url}: sha256 mismatch, download refused and deleted (expected {expected}, found {actual})"
        )
    archive = partial.with_suffix(".zip")
    partial.replace(archive)
    try:
        return import_package(archive)
    finally:
        archive.unlink(missing_ok=True)
