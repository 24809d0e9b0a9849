"""The engine seen from the Slicer module: where it is, its command lines, its progress and error lines.

The module runs the engine (the package named by :data:`ENGINE_PACKAGE`) as a child process with
Slicer's own Python (``PythonSlicer -m <ENGINE_PACKAGE> COMMAND ...``) and reads what it prints:

- progress, one JSON object per line on stdout: ``{"stage": "inference", "progress": 0.42,
  "message": "slice 67/160"}``;
- on failure, a non-zero exit code and one line ``kneeseg COMMAND: error: PROBLEM`` on stderr
  (exit 1: bad input or a failed run; 2: usage, or a command not available in this engine;
  3: an internal error; 130: cancelled).

Slicer merges the child's stderr into its stdout, so every line that is not a progress object is
kept for the log and searched for the error line.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .results import SEGMENTATION_FILE

# The engine's import name: the only place the module names it. The module never imports it (the
# Slicer module's own Logic class is also called KneeSegLogic, as the scripted-module template names it).
ENGINE_PACKAGE = "KneeSegLogic"

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_CANCELLED = 130

# "mps" (Apple GPUs) is offered only where the device probe finds it.
DEVICES = ("auto", "cpu", "cuda", "mps")
# First entry of each: the engine's default.
# epg fits all echoes with B1 (also writes t2_b1.nrrd); dess is the two-echo DESS formula.
T2_MODELS = ("ncexp", "mono", "mono-offset", "loglinear", "epg", "dess")
# Relaxation maps: "t2" runs `kneeseg t2` (or segment's own fit), the others `kneeseg relax --kind`.
RELAXATION_KINDS = ("t2", "t1rho", "t2star")
RELAX_MODELS = T2_MODELS[:4]  # epg and dess map T2 only
DESS_ECHOES = 2  # a two-echo series is DESS (as `kneeseg segment` decides)
DESS_PARAMETERS_MISSING = (
    "DESS T2 needs the repetition time and the flip angle: type them under Quantitative MRI, or untick the "
    "T2 map (the engine gets an NRRD copy of the scan, without its DICOM header)")
SURFACE_SMOOTHING = ("windowed-sinc", "laplacian-idw", "none")
REGION_VARIANTS = ("default", "dosma", "thomas")  # "default": the engine's own choice, no flag passed


def findEngineRoot(moduleDirectory: str | Path) -> Path | None:
    """The folder that holds the engine package, to put on the child's ``PYTHONPATH``.

    Installed extensions place the package beside the module script (the module's CMake lists
    copy it into the same ``qt-scripted-modules`` folder); in a source checkout it is one level up,
    beside ``KneeSegExtension/``. ``None`` when neither holds it (then the engine must be
    pip-installed in Slicer's Python).
    """
    moduleDirectory = Path(moduleDirectory).resolve()
    for candidate in (moduleDirectory, moduleDirectory.parent):
        if (candidate / ENGINE_PACKAGE / "__main__.py").is_file():
            return candidate
    return None


def engineEnvironment(engineRoot: Path | None, pythonPath: str | None) -> dict[str, str]:
    """Environment additions for the child: the engine's folder first on ``PYTHONPATH``.

    ``pythonPath`` is the ``PYTHONPATH`` the child would otherwise get (Slicer's startup
    environment); it is kept after the engine's folder. ``PYTHONUNBUFFERED`` makes progress lines
    arrive as they are printed, not when a pipe buffer fills.
    """
    environment = {"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    if engineRoot is not None:
        parts = [str(engineRoot)] + [p for p in (pythonPath or "").split(os.pathsep) if p and p != str(engineRoot)]
        environment["PYTHONPATH"] = os.pathsep.join(parts)
    return environment


@dataclass(frozen=True)
class SegmentOptions:
    """What the user chose for a run; ``""``, ``0``, ``None`` or ``"default"`` mean "as the engine says".

    Attributes
    ----------
    model : str
        Model package id (empty: the registry's default package).
    device : one of :data:`DEVICES`
    closingRadiusMm : float or None
        Radius of the morphological closing in millimetres (None: the model package's).
    ensembleMembers : int
        Number of ensemble members to run (0: all members of the package).
    fast : bool
        Fast mode for laptops: one ensemble member, whatever ``ensembleMembers`` says.
    surfaces : bool
        Whether to build surface models.
    surfaceSmoothing : one of :data:`SURFACE_SMOOTHING`
    t2 : bool
        Whether to fit T2 when a multi-echo series is given.
    t2Model : one of :data:`T2_MODELS`
        Signal model (for T1rho and T2* one of :data:`RELAX_MODELS`). A two-echo series with the
        default model is fitted with ``dess``.
    regionVariant : one of :data:`REGION_VARIANTS`
        Femoral cartilage subregion recipe.
    relaxationKind : one of :data:`RELAXATION_KINDS`
        The map fitted on the multi-echo (or multi-spin-lock) series.
    regionFile : str
        Region file replacing the recipe: a label volume (every non-zero value a region) or a
        ``.json`` recipe (empty: none).
    excludeSurface : bool
        Leave the articular-surface voxel layer (partial volume with fluid) out of region statistics.
    repetitionTimeMs, flipAngleDeg : float or None
        DESS sequence parameters. The module hands the engine an NRRD copy of the scan, without
        its DICOM header, so DESS needs them typed.
    """

    model: str = ""
    device: str = "auto"
    closingRadiusMm: float | None = None
    ensembleMembers: int = 0
    fast: bool = False
    surfaces: bool = True
    surfaceSmoothing: str = SURFACE_SMOOTHING[0]
    t2: bool = True
    t2Model: str = T2_MODELS[0]
    regionVariant: str = REGION_VARIANTS[0]
    relaxationKind: str = RELAXATION_KINDS[0]
    regionFile: str = ""
    excludeSurface: bool = False
    repetitionTimeMs: float | None = None
    flipAngleDeg: float | None = None


@dataclass(frozen=True)
class PlannedCommand:
    """One engine command of a run and the output folder it writes."""

    name: str
    args: list[str]
    outputFolder: Path


def _base(python: str, command: str) -> list[str]:
    return [python, "-m", ENGINE_PACKAGE, command]


def _device(device: str) -> list[str]:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return ["--device", device]


def segmentCommand(python: str, inputPath: str | Path, outputFolder: str | Path, options: SegmentOptions,
                   echoTimesMs: Sequence[float] | None = None, surfaces: bool = True) -> list[str]:
    """``kneeseg segment`` command line (surfaces only when both ``surfaces`` and the options ask)."""
    args = _base(python, "segment") + [str(inputPath), "-o", str(outputFolder)] + _device(options.device)
    if echoTimesMs:
        args += ["--echo-times", formatEchoTimes(echoTimesMs)]
    if options.model:
        args += ["--model", options.model]
    if options.closingRadiusMm is not None:
        args += ["--closing-radius", f"{options.closingRadiusMm:g}"]
    members = 1 if options.fast else options.ensembleMembers
    if members > 0:
        args += ["--members", str(members)]
    if not (surfaces and options.surfaces):
        args.append("--no-surfaces")
    return args


def _regions(regionVariant: str, regionFile: str | Path = "") -> list[str]:
    """``--regions``: the region file when one is given, else a recipe other than the engine's default."""
    if regionVariant not in REGION_VARIANTS:
        raise ValueError(f"region variant must be one of {REGION_VARIANTS}, got {regionVariant!r}")
    if str(regionFile):
        return ["--regions", str(regionFile)]
    return ["--regions", regionVariant] if regionVariant != REGION_VARIANTS[0] else []


def t2Command(python: str, inputPath: str | Path, outputFolder: str | Path, maskPath: str | Path | None,
              echoTimesMs: Sequence[float] | None = None, model: str = T2_MODELS[0], device: str = "auto",
              regionVariant: str = REGION_VARIANTS[0], regionFile: str | Path = "", excludeSurface: bool = False,
              repetitionTimeMs: float | None = None, flipAngleDeg: float | None = None) -> list[str]:
    """``kneeseg t2`` command line: T2 map of a multi-echo scan, cartilage regions from ``maskPath``.

    ``model`` ``epg`` fits every echo with B1 (``t2_b1.nrrd``); ``dess`` the two-echo DESS formula
    with ``repetitionTimeMs`` and ``flipAngleDeg`` (TE comes from the echo times).
    """
    if model not in T2_MODELS:
        raise ValueError(f"T2 model must be one of {T2_MODELS}, got {model!r}")
    args = _base(python, "t2") + [str(inputPath), "-o", str(outputFolder), "--model", model] + _device(device)
    if echoTimesMs:
        args += ["--echo-times", formatEchoTimes(echoTimesMs)]
    if maskPath is not None:
        args += ["--mask", str(maskPath)]
    args += _regions(regionVariant, regionFile)
    if excludeSurface:
        args.append("--exclude-surface")
    if model == "dess":
        if not (repetitionTimeMs and flipAngleDeg):
            raise ValueError(DESS_PARAMETERS_MISSING)
        args += ["--tr", f"{repetitionTimeMs:g}", "--flip-angle", f"{flipAngleDeg:g}"]
    return args


def relaxCommand(python: str, inputPath: str | Path, outputFolder: str | Path, maskPath: str | Path | None,
                 kind: str, timesMs: Sequence[float] | None = None, model: str = RELAX_MODELS[0],
                 device: str = "auto", regionVariant: str = REGION_VARIANTS[0], regionFile: str | Path = "",
                 excludeSurface: bool = False) -> list[str]:
    """``kneeseg relax --kind KIND`` command line: a T1rho, T2* (or T2) map, cartilage regions from ``maskPath``.

    ``timesMs`` are the spin-lock or echo times, one per volume (spin-lock times may start at 0).
    """
    if kind not in RELAXATION_KINDS:
        raise ValueError(f"relaxation kind must be one of {RELAXATION_KINDS}, got {kind!r}")
    if model not in (T2_MODELS if kind == "t2" else RELAX_MODELS):
        raise ValueError(f"the {kind} model must be one of {RELAX_MODELS}, got {model!r} (epg and dess map T2 only)")
    args = _base(python, "relax") + [str(inputPath), "-o", str(outputFolder), "--kind", kind, "--model", model]
    args += _device(device)
    if timesMs:
        args += ["--times", formatTimes(timesMs)]
    if maskPath is not None:
        args += ["--mask", str(maskPath)]
    args += _regions(regionVariant, regionFile)
    if excludeSurface:
        args.append("--exclude-surface")
    return args


def effectiveT2Model(options: SegmentOptions, echoCount: int) -> str:
    """The model a run fits with: ``dess`` for a two-echo T2 series left at the default model."""
    if options.relaxationKind == "t2" and echoCount == DESS_ECHOES and options.t2Model == T2_MODELS[0]:
        return "dess"
    return options.t2Model


def quantitativeCommand(python: str, work: Path, seriesPath: Path, maskPath: Path,
                        timesMs: Sequence[float] | None, options: SegmentOptions) -> PlannedCommand | None:
    """The ``t2`` or ``relax`` command fitting ``options.relaxationKind`` on the series, or ``None``
    for a two-echo (DESS) series whose TR and flip angle were not typed (``segment`` then warns itself)."""
    if options.relaxationKind != "t2":
        folder = work / "relax"
        return PlannedCommand("relax", relaxCommand(python, seriesPath, folder, maskPath, options.relaxationKind, timesMs,
                                                    options.t2Model, options.device, options.regionVariant,
                                                    options.regionFile, options.excludeSurface), folder)
    model = effectiveT2Model(options, len(timesMs or ()))
    if model == "dess" and options.t2Model != "dess" and not (options.repetitionTimeMs and options.flipAngleDeg):
        return None
    folder = work / "t2"
    return PlannedCommand("t2", t2Command(python, seriesPath, folder, maskPath, timesMs, model, options.device,
                                          options.regionVariant, options.regionFile, options.excludeSurface,
                                          options.repetitionTimeMs, options.flipAngleDeg), folder)


def segmentFitsWhatIsAsked(options: SegmentOptions, echoCount: int) -> bool:
    """Whether ``segment``'s own T2 fit on its multi-echo input is the one asked for (nothing to add)."""
    return (options.relaxationKind == "t2" and effectiveT2Model(options, echoCount) == T2_MODELS[0]
            and options.regionVariant == REGION_VARIANTS[0] and not options.regionFile and not options.excludeSurface)


def surfacesCommand(python: str, segmentationPath: str | Path, outputFolder: str | Path,
                    smoothing: str = SURFACE_SMOOTHING[0]) -> list[str]:
    """``kneeseg surfaces`` command line: smoothed surface models of every structure (LPS, mm)."""
    if smoothing not in SURFACE_SMOOTHING:
        raise ValueError(f"surface smoothing must be one of {SURFACE_SMOOTHING}, got {smoothing!r}")
    return _base(python, "surfaces") + [str(segmentationPath), "-o", str(outputFolder), "--smoothing", smoothing]


def planSegmentRun(python: str, work: Path, inputPath: Path, inputEchoTimesMs: Sequence[float] | None,
                   t2InputPath: Path | None, t2EchoTimesMs: Sequence[float] | None,
                   options: SegmentOptions) -> list[PlannedCommand]:
    """The engine commands of one Apply, in order, each writing a sub-folder of ``work``.

    ``segment`` does what it can with its defaults: on a multi-echo input it also fits T2 with
    the default model and regions, and it builds surfaces with the default smoothing. Other
    choices run the ``surfaces``, ``t2`` or ``relax`` command on its segmentation afterwards, so
    nothing is computed twice with different settings by accident. When the input is itself a
    T1rho or T2* series, ``segment`` gets its times as echo times: spin-lock times of 0 ms cannot be,
    and raise ``ValueError`` (segment an anatomical scan and choose the series for the map).
    """
    segmentation = work / "segment" / SEGMENTATION_FILE
    separateSurfaces = options.surfaces and options.surfaceSmoothing != SURFACE_SMOOTHING[0]
    commands = [PlannedCommand("segment", segmentCommand(python, inputPath, work / "segment", options, inputEchoTimesMs,
                                                        surfaces=not separateSurfaces), work / "segment")]
    if separateSurfaces:
        commands.append(PlannedCommand("surfaces", surfacesCommand(python, segmentation, work / "surfaces",
                                                                   options.surfaceSmoothing), work / "surfaces"))
    if inputEchoTimesMs and any(t <= 0 for t in inputEchoTimesMs):
        raise ValueError("the input's times start at 0 ms (spin-lock times): segment an anatomical scan and choose "
                         "this series as the multi-echo series for the map")
    if options.t2 and t2InputPath is not None:
        if t2InputPath != inputPath or not segmentFitsWhatIsAsked(options, len(t2EchoTimesMs or ())):
            command = quantitativeCommand(python, work, t2InputPath, segmentation, t2EchoTimesMs, options)
            if command is None and t2InputPath != inputPath:
                raise ValueError(DESS_PARAMETERS_MISSING)
            if command is not None:  # else segment tries DESS on its input itself, and warns
                commands.append(command)
    return commands


def planRecompute(python: str, work: Path, segmentationPath: Path, t2InputPath: Path | None,
                  t2EchoTimesMs: Sequence[float] | None, options: SegmentOptions) -> list[PlannedCommand]:
    """The engine commands recomputing surfaces, volumes and T2 statistics from an edited segmentation."""
    commands = [PlannedCommand("surfaces", surfacesCommand(python, segmentationPath, work / "surfaces",
                                                           options.surfaceSmoothing), work / "surfaces")]
    if options.t2 and t2InputPath is not None:
        command = quantitativeCommand(python, work, t2InputPath, segmentationPath, t2EchoTimesMs, options)
        if command is None:
            raise ValueError(DESS_PARAMETERS_MISSING)
        commands.append(command)
    return commands


def modelsCommand(python: str, importPath: str | Path | None = None, downloadUrl: str = "",
                  sha256: str = "") -> list[str]:
    """``kneeseg models --json``, first importing a package folder or zip (offline sites) or
    downloading a package zip whose sha256 the engine checks before installing it."""
    args = _base(python, "models") + ["--json"]
    if importPath is not None:
        args += ["--import", str(importPath)]
    if downloadUrl:
        if not sha256:
            raise ValueError("a download needs the sha256 of the package zip")
        args += ["--download", downloadUrl, "--sha256", sha256]
    return args


def infoCommand(python: str, scanPath: str | Path) -> list[str]:
    """``kneeseg info --json``: size, spacing and echo times of a scan as the engine reads it."""
    return _base(python, "info") + [str(scanPath), "--json"]


# Printed by a child Python so that importing torch (seconds, sometimes a crash with a broken
# CUDA install) never happens inside Slicer. Prints one JSON object.
DEVICE_PROBE = """
import json
try:
    import torch
except Exception as error:
    print(json.dumps({"torch": None, "error": f"{type(error).__name__}: {error}"}))
else:
    cuda = bool(torch.backends.cuda.is_built() and torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    info = {"torch": torch.__version__, "cuda_built": bool(torch.backends.cuda.is_built()), "cuda": cuda,
            "mps": bool(mps is not None and mps.is_available())}
    if cuda:
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(name=properties.name, memory_gb=round(properties.total_memory / 2**30, 1),
                    cuda_version=torch.version.cuda)
    print(json.dumps(info))
"""


def probeCommand(python: str) -> list[str]:
    """Command printing what PyTorch sees (version, CUDA, MPS, GPU name and memory) as one JSON line."""
    return [python, "-c", DEVICE_PROBE]


def availableDevices(probe: dict | None) -> list[str]:
    """The device choices to offer: auto and cpu always, cuda and mps only where PyTorch can use them."""
    probe = probe or {}
    return ["auto", "cpu"] + [device for device in ("cuda", "mps") if probe.get(device)]


def resolvedDevice(probe: dict | None, choice: str) -> str:
    """The device a run with ``choice`` uses: ``auto`` is CUDA when usable, else the CPU (the engine's rule)."""
    if choice == "auto":
        return "cuda" if (probe or {}).get("cuda") else "cpu"
    return choice


def describeDevice(probe: dict | None, choice: str = "auto") -> str:
    """One line for the panel, before the run: what the run with ``choice`` will run on."""
    if not probe or not probe.get("torch"):
        reason = (probe or {}).get("error", "")
        return "PyTorch is not installed yet (it is installed at the first Apply)" + (f" [{reason}]" if "ModuleNotFound" not in reason and reason else "")
    device = resolvedDevice(probe, choice)
    if device == "cuda" and probe.get("cuda"):
        return f"Runs on the GPU: {probe.get('name', 'CUDA device')}, {probe.get('memory_gb', '?')} GB (PyTorch {probe['torch']}, CUDA {probe.get('cuda_version', '?')})"
    if device == "mps" and probe.get("mps"):
        return f"Runs on the Apple GPU (MPS, PyTorch {probe['torch']})"
    if device in ("cuda", "mps"):
        return f"{device.upper()} is not usable here (PyTorch {probe['torch']}): choose auto or cpu"
    if probe.get("cuda"):
        return f"Runs on the CPU although a GPU ({probe.get('name', 'CUDA device')}) is there (PyTorch {probe['torch']})"
    if probe.get("cuda_built"):
        return f"Runs on the CPU: PyTorch {probe['torch']} has CUDA but no usable GPU or driver was found"
    return f"Runs on the CPU (PyTorch {probe['torch']}, built without CUDA)"


@dataclass(frozen=True)
class ProgressLine:
    """One progress report of the engine: ``progress`` is the fraction of ``stage`` done, in [0, 1]."""

    stage: str
    progress: float
    message: str = ""


def parseProgressLine(line: str) -> ProgressLine | None:
    """The progress report in ``line``, or ``None`` for any other line (log text, warnings, errors)."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "stage" not in data or "progress" not in data:
        return None
    try:
        fraction = float(data["progress"])
    except (TypeError, ValueError):
        return None
    if not math.isfinite(fraction):
        return None
    return ProgressLine(str(data["stage"]), min(max(fraction, 0.0), 1.0), str(data.get("message", "")))


def overallProgress(stepIndex: int, stepCount: int, line: ProgressLine | None) -> float:
    """Fraction of a run of ``stepCount`` engine commands done, from the current command's report."""
    within = line.progress if line is not None else 0.0
    return min(max((stepIndex + within) / max(stepCount, 1), 0.0), 1.0)


def engineErrorMessage(outputLines: Iterable[str], returnCode: int) -> str:
    """A message a person can act on, from a failed command's output and exit code."""
    lines = [line.strip() for line in outputLines if line.strip() and parseProgressLine(line) is None]
    errorLines = [line for line in lines if line.startswith("kneeseg ") and ": " in line]
    text = errorLines[-1] if errorLines else (lines[-1] if lines else "")
    if text.startswith("kneeseg "):
        # "kneeseg segment: error: scan.nrrd: 2D image" -> "scan.nrrd: 2D image"
        text = text.split(": ", 1)[1]
        if text.startswith("error: "):
            text = text[len("error: "):]
    lowered = " ".join(lines[-20:]).lower()
    if "out of memory" in lowered:
        return (text or "the GPU ran out of memory") + " -- choose device CPU, or close other programs using the GPU"
    if returnCode == EXIT_CANCELLED:
        return "cancelled"
    if returnCode < 0 and not text:
        # Killed by a signal; SIGKILL without a cancel is most often the system's out-of-memory killer.
        hint = " (the computer may have run out of memory: try a smaller input or close other programs)" if returnCode == -9 else ""
        return f"the engine was stopped by signal {-returnCode}{hint}"
    if returnCode == EXIT_USAGE and "not available" not in text:
        return f"the engine did not accept the command ({text or 'usage error'}); the engine and the module may be of different versions"
    missingModule = re.search(r"No module named '([\w.]+)'", text)
    if missingModule and missingModule.group(1).split(".")[0] == ENGINE_PACKAGE:
        return f"the KneeSeg engine ({ENGINE_PACKAGE}) was not found by Slicer's Python; reinstall the extension"
    if missingModule:
        return (f"the Python package '{missingModule.group(1).split('.')[0]}' is not installed in Slicer's Python "
                "(KneeSeg installs its dependencies at the first Apply)")
    if not text:
        return f"the engine stopped with exit code {returnCode} and no message"
    return text


def parseEchoTimes(text: str, allowZero: bool = False) -> list[float]:
    """``"10, 20, 30"`` -> ``[10.0, 20.0, 30.0]`` (milliseconds); empty text gives ``[]``.

    ``allowZero``: spin-lock times (T1rho), which may start at 0 ms.

    Raises
    ------
    ValueError
        A value is not a number, not positive (negative with ``allowZero``), or the times do not increase.
    """
    items = [item for item in text.replace(";", ",").replace(" ", ",").split(",") if item]
    try:
        times = [float(item) for item in items]
    except ValueError:
        raise ValueError(f"echo times must be numbers in ms separated by commas, got {text!r}") from None
    if any(not math.isfinite(t) or t < 0 or (t == 0 and not allowZero) for t in times):
        kind = "spin-lock times must be numbers of milliseconds >= 0" if allowZero else "echo times must be positive numbers of milliseconds"
        raise ValueError(f"{kind}, got {text!r}")
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"echo times must increase, got {text!r}")
    return times


def formatEchoTimes(times: Sequence[float]) -> str:
    return ",".join(f"{t:g}" for t in times)


formatTimes = formatEchoTimes  # `relax --times` takes the same list (0 allowed there)
