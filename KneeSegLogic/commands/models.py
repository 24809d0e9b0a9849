"""``kneeseg models``: list, import (offline sites) and download model packages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from KneeSegLogic.errors import KneeSegError

HELP = "list the model packages found"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--import",
        dest="import_path",
        type=Path,
        metavar="PACKAGE",
        help="copy a package folder or .zip into the user cache (offline sites)",
    )
    parser.add_argument(
        "--download", metavar="URL", help="download a package .zip into the user cache (needs --sha256)"
    )
    parser.add_argument("--sha256", metavar="HEX", help="expected sha256 of the --download zip")


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.segmentation.package import describe_input, package_summary
    from KneeSegLogic.segmentation.registry import (
        default_package,
        download_package,
        find_packages,
        import_package,
        search_roots,
    )

    if args.download and not args.sha256:
        raise KneeSegError("--download needs --sha256 HEX (the zip's checksum) so the download can be verified")
    installed = []
    if args.import_path:
        installed.append(import_package(args.import_path))
    if args.download:
        installed.append(download_package(args.download, args.sha256))
    for package in installed:
        print(f"installed {package.id} {package.version} in {package.path}", file=sys.stderr)
    problems: list[str] = []
    packages = find_packages(problems, verify=True)
    for problem in problems:
        print(f"kneeseg models: warning: skipped {problem}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "packages": [package_summary(p) for p in packages],
                    "problems": problems,
                    "searched": [str(root) for _, root in search_roots()],
                }
            )
        )
        return 0
    if not packages:
        print("no model packages found; searched " + ", ".join(str(root) for _, root in search_roots()))
    default = default_package(packages)
    for package in packages:
        flag = " (default)" if package is default else ""
        print(f"{package.id} {package.version}{flag}  licence {package.license}  [{package.origin}] {package.source}")
        print("  labels:  " + ", ".join(f"{c} {k}" for c, k in sorted(package.labels.items())))
        for m in package.members:
            spacing = " x ".join(f"{s:g}" for s in m.spacing_mm)
            print(f"  member:  {m.name}: {describe_input(m)}, {spacing} mm, {m.architecture}, weight {m.weight:g}")
    return 0
