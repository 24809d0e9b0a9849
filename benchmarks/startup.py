"""Benchmark: start-up of the commands that should not pay for torch, MONAI and VTK.

For ``kneeseg --help``, ``info SCAN``, ``models`` and ``segment --help`` (and, for scale, a bare
``python -c pass`` and ``import torch, monai, vtk``): the median wall seconds and user+sys CPU
seconds of N fresh interpreters (CPU from the children's rusage, so a loaded machine shows in
the wall column, not in the CPU one), the total of ``python -X importtime`` and which heavy
modules each command has loaded when it ends. Byte-code caches are used (written to a folder
under the system's temporary folder, not into the checkout) after one warm-up run per command,
as on an installed copy.

Run from the repository root: ``python benchmarks/startup.py [N]`` (default N = 5). Prints a
Markdown table.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCAN = "Resources/SampleData/mese_t2_knee.nrrd"
HEAVY = ("torch", "monai", "vtkmodules", "safetensors", "scipy", "skimage", "matplotlib", "SimpleITK", "pydicom")
KNEESEG = [sys.executable, "-m", "KneeSegLogic.commands.main"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "kneeseg --help": [*KNEESEG, "--help"],
    "kneeseg info SCAN": [*KNEESEG, "info", SCAN],
    "kneeseg models": [*KNEESEG, "models"],
    "kneeseg segment --help": [*KNEESEG, "segment", "--help"],
    "import torch, monai, vtk": [sys.executable, "-c", "import torch, monai, vtk"],
}

# Runs ``kneeseg ARGV`` and prints, on stderr's last line, the heavy modules loaded at its end.
PROBE = f"""
import runpy, sys
sys.argv = ["kneeseg", *sys.argv[1:]]
try:
    runpy.run_module("KneeSegLogic.commands.main", run_name="__main__")
except SystemExit:
    pass
print(" ".join(m for m in {HEAVY!r} if m in sys.modules) or "-", file=sys.stderr)
"""


def _timed(argv: list[str], environment: dict[str, str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run(argv, capture_output=True, env=environment).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, code


def _import_seconds(argv: list[str], environment: dict[str, str]) -> float:
    """Total of ``-X importtime``: the cumulative times of the top-level imports."""
    run = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=environment)
    total = 0
    for line in run.stderr.splitlines():
        if line.startswith("import time:"):
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and not name.startswith("  "):
                total += int(cumulative)
    return total / 1e6


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    home = Path(tempfile.mkdtemp(prefix="kneeseg-startup-"))
    environment = {**os.environ, "PYTHONPYCACHEPREFIX": str(home / "pycache"), "KNEESEG_HOME": str(home / "home")}
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    environment.pop("KNEESEG_MODELS_PATH", None)
    print(f"median of {repeats} runs, load average {os.getloadavg()[0]:.1f}")
    print("| command | wall s | user+sys s | -X importtime s | heavy modules loaded |")
    print("|---|---|---|---|---|")
    for name, argv in COMMANDS.items():
        subprocess.run(argv, capture_output=True, env=environment)  # warm-up: page cache and byte code
        runs = [_timed(argv, environment) for _ in range(repeats)]
        assert all(code == 0 for *_, code in runs), f"{name} failed"
        imports, heavy = "", ""
        if argv[: len(KNEESEG)] == KNEESEG:
            imports = f"{_import_seconds(argv, environment):.2f}"
            probe = subprocess.run(
                [sys.executable, "-c", PROBE, *argv[len(KNEESEG) :]], capture_output=True, text=True, env=environment
            )
            heavy = probe.stderr.strip().splitlines()[-1]
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"| `{name}` | {wall:.2f} | {cpu:.2f} | {imports} | {heavy} |", flush=True)


if __name__ == "__main__":
    main()
