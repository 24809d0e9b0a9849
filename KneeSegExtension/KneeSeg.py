"""KneeSeg: knee MRI segmentation, uncertainty heatmap, T2 map and surface models in 3D Slicer.

The module is the face of the KneeSeg engine. It never imports the engine: it writes the input
node(s) to a temporary folder, runs the engine as a child process with Slicer's own Python
(``PythonSlicer -m <engine package> segment|t2|relax|surfaces|models ...``, command lines built by
``KneeSegLib.engine``), turns the engine's JSON progress lines into a progress bar, can cancel the
whole process tree, and loads the engine's output folder into scene nodes. It computes nothing
itself: a crash or an out-of-memory error in PyTorch stays in the child process, and the GUI stays
responsive. The Logic class below carries the scripted-module template's ``<Module>Logic`` name;
it is not the engine package, which the module names only in ``KneeSegLib.engine.ENGINE_PACKAGE``.

Supported: Slicer 5.8, 5.10 and 5.12 (Python 3.9 and 3.12). Calls newer than Slicer 5.8 sit behind
a version or ``hasattr`` check, which ``Testing/slicer/test_slicer_module.py`` verifies.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from KneeSegLib.compatibility import unsupportedReason
from KneeSegLib.dependencies import missingRequirements, protectionConstraints, readRequirements, splitTorch
from KneeSegLib.engine import (
    REGION_VARIANTS,
    RELAXATION_KINDS,
    SURFACE_SMOOTHING,
    T2_MODELS,
    PlannedCommand,
    SegmentOptions,
    availableDevices,
    describeDevice,
    engineEnvironment,
    engineErrorMessage,
    findEngineRoot,
    infoCommand,
    modelsCommand,
    overallProgress,
    parseEchoTimes,
    parseProgressLine,
    planRecompute,
    planSegmentRun,
    probeCommand,
)
from KneeSegLib.inputs import echoMessage, frameDescription, frameEchoTimes
from KneeSegLib.packages import modelCard, normaliseSha256, packageRow
from KneeSegLib.processtree import killProcessTree
from KneeSegLib.results import (
    REGIONS_TABLE_FILE,
    RELAXATION_FILES,
    SEGMENTATION_FILE,
    SURFACES_FOLDER,
    UNCERTAINTY_FILE,
    UncertainSlice,
    caseName,
    provenanceAttributes,
    readResults,
    relaxationMapIn,
    replacementWarning,
    sliceCentreIJK,
    surfaceFiles,
    trainingCasePaths,
    uncertainSlices,
    writeVolumesTable,
)

SAMPLE_CATEGORY = "KneeSeg"
# Sample name -> (file in Resources/SampleData, SHA256, Slicer file type). The MESE scan loads as a
# multi-echo (vector) volume; the label map loads as a segmentation with one segment per label.
SAMPLES = {
    "KneeMESE": ("mese_t2_knee.nrrd", "23bdc8772595e50f3b01ab516a998cf2dacffe52cc1a26dc1966272a33433c84", "VolumeFile"),
    "KneeLabels": ("knee_labels.nrrd", "d6307205761bd0197545b6f3d265a71fb410948f9c96f8a72e1fc1e14b7ba246", "SegmentationFile"),
}

EDITED_ATTRIBUTE = "KneeSeg.Edited"
# Written (with the rest of the provenance) on every segmentation KneeSeg made.
MADE_BY_ATTRIBUTE = "KneeSeg.ModelSha256"
OUTPUT_FOLDER_ATTRIBUTE = "KneeSeg.OutputFolder"
RECOMPUTED_FOLDER_ATTRIBUTE = "KneeSeg.RecomputedFolder"
# The engine's most uncertain slices, kept on the node so that they survive a saved scene.
UNCERTAIN_SLICES_ATTRIBUTE = "KneeSeg.UncertainSlices"
# Node references from a segmentation to the nodes KneeSeg derived from it: a rerun replaces
# exactly these, and a second scan of the same study keeps its own.
MODEL_ROLE = "kneeSegSurfaceModel"
UNCERTAINTY_ROLE = "kneeSegUncertainty"
T2_ROLE = "kneeSegT2Map"
B1_ROLE = "kneeSegB1Map"
VOLUMES_TABLE_ROLE = "kneeSegVolumesTable"
REGIONS_TABLE_ROLE = "kneeSegRegionsTable"

T2_WINDOW_MS = (0.0, 100.0)
T2_THRESHOLD_MS = 1.0  # the engine writes 0 where it fitted nothing: those voxels stay transparent
# Relaxation maps a T2 folder may hold (t2.nrrd from MESE, EPG or DESS; t1rho.nrrd and t2star.nrrd
# from `kneeseg relax`): kind (file stem, KneeSegLib.results.RELAXATION_FILES) -> (name suffix,
# quantity coded entry, window in ms). T2 and T2* are DICOM CID 7180 codes; DICOM has no T1rho
# code, so it gets a private (99-prefixed) scheme.
RELAXATION_MAPS = {
    "t2": ("T2", ("113065", "DCM", "T2"), T2_WINDOW_MS),
    "t2star": ("T2*", ("113064", "DCM", "T2*"), T2_WINDOW_MS),
    "t1rho": ("T1rho", ("T1rho", "99KNEESEG", "T1rho"), (0.0, 200.0)),
}
B1_FILE = "t2_b1.nrrd"  # EPG fit: refocusing angle over nominal (unitless, at most 1; 0 where not fitted)
B1_WINDOW = (0.6, 1.0)
B1_THRESHOLD = 0.01
UNCERTAINTY_THRESHOLD = 0.05  # below it the heatmap is transparent, so it does not dim the scan
UNCERTAINTY_OPACITY = 0.5
T2_OPACITY = 0.7  # the anatomy stays visible under fitted voxels
THRESHOLD_CEILING = 1.0e6  # upper threshold of the maps: every value above the lower one stays visible
OVERLAYS = ("uncertainty", "t2", "none")
ACCEPTED_CARDS_SETTING = "KneeSeg/AcceptedModelCards"
# Set to 1 to run KneeSegTest's engine runs on a build machine (ctest runs Slicer with --testing).
RUN_ENGINE_TESTS_VARIABLE = "KNEESEG_TEST_ENGINE"


def slicerVersionAtLeast(major: int, minor: int) -> bool:
    """True when this Slicer is ``major.minor`` or newer."""
    return (slicer.app.majorVersion, slicer.app.minorVersion) >= (major, minor)


def notSupportedHere() -> str | None:
    """Why this Slicer (or its Python) cannot run KneeSeg, or ``None``."""
    return unsupportedReason(sys.version_info, (slicer.app.majorVersion, slicer.app.minorVersion))


def moduleDirectory() -> Path:
    return Path(__file__).resolve().parent


def sharedResource(*parts: str) -> Path:
    """A file of the repository-level ``Resources/`` folder (sample data, model packages).

    Installed, it sits in the module's own ``Resources/`` (the CMake lists copy it there); in a
    source checkout it is one level up, beside ``KneeSegExtension/``.
    """
    for base in (moduleDirectory(), moduleDirectory().parent):
        candidate = base.joinpath("Resources", *parts)
        if candidate.exists():
            return candidate
    return moduleDirectory().joinpath("Resources", *parts)


#
# KneeSeg
#


class KneeSeg(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("KneeSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["KneeSeg developers"]
        self.parent.helpText = _("""
Segments bones, cartilage and menisci of the knee on MRI, shows where the model is unsure
(uncertainty heatmap), fits a quantitative T2 map (MESE, EPG with B1, DESS), or a T1rho or T2*
map, with cartilage subregion statistics on multi-echo scans, and builds smoothed surface models for 3D viewing, printing and planning.
Correct the segmentation in Segment Editor, then recompute surfaces, volumes and T2 statistics,
or save the corrected case for fine-tuning. Runs in Slicer 5.8 or newer.
""")
        self.parent.acknowledgementText = _("""
KneeSeg brings together methods of KneeXNet-2.5D, multi-planar fusion (Luan et al.), low-field bone
segmentation (Listone et al.) and MESE cartilage T2 mapping (Thomas et al.). The bundled sample is
derived from the MIT-licensed pymskt example data.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the bundled, checksummed samples to the Sample Data module (registering twice is harmless)."""
    import SampleData

    # Slicer >= 5.12 gives a category a translated title; before, the category is its own title.
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):
        SampleData.SampleDataLogic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, title=_("KneeSeg"))
    for sampleName, (fileName, sha256, fileType) in SAMPLES.items():
        path = sharedResource("SampleData", fileName)
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=sampleName,
            thumbnailFileName=str(moduleDirectory() / "Resources" / "Icons" / "KneeSeg.png"),
            uris=path.as_uri(),
            fileNames=fileName,
            checksums=f"SHA256:{sha256}",
            nodeNames=sampleName,
            loadFileTypes=fileType,
        )


#
# KneeSegParameterNode
#


@parameterNodeWrapper
class KneeSegParameterNode:
    """What the user chose; saved with the scene.

    Slicer evaluates these annotations (``typing.get_type_hints``) in Python 3.9 too: no ``X | Y``.

    inputVolume - scan to segment (single- or multi-echo; a volume sequence's proxy node counts).
    t2Volume - multi-echo series for T2 when it is not the input itself.
    echoTimes - echo times in ms ("" = from the series' header, index or attributes).
    modelId - model package id ("" = the registry's default). Chosen in modelComboBox, whose items
        come from the engine's registry at run time, so it has no static Choice to bind.
    device - auto / cpu / cuda / mps, chosen in deviceComboBox, which offers only the devices
        PyTorch can use here (known at run time), so it is bound by hand too.
    ensembleMembers - how many ensemble members to run (0 = all in the package).
    fastMode - one ensemble member, for laptops.
    closingRadiusMm - morphological closing radius (-1 = as the model package says).
    surfaceSmoothing - smoothing of the surface models.
    relaxationKind - map fitted on the multi-echo series: t2 (`kneeseg t2`), t1rho or t2star (`kneeseg relax`).
    t2Model - signal model of that fit (epg: all echoes with a B1 map; dess: two-echo DESS; T2 only).
    regionVariant - femoral cartilage subregion recipe ("default": the engine's).
    regionFile - region file replacing the recipe (label volume or .json; empty path "." = none).
    excludeSurface - leave the articular-surface voxel layer (partial volume) out of region statistics.
    dessRepetitionTimeMs, dessFlipAngleDeg - DESS TR and flip angle (0 = not given; the engine gets
        an NRRD copy of the scan, without its DICOM header).
    outputSegmentation - segmentation to write into (none = a new one).
    showUncertainty, computeT2, computeSurfaces - which outputs to produce.
    trainingFolder - where corrected cases are saved for fine-tuning.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    echoTimes: str = ""
    modelId: str = ""
    device: str = "auto"
    ensembleMembers: Annotated[int, WithinRange(0, 16)] = 0
    fastMode: bool = False
    closingRadiusMm: Annotated[float, WithinRange(-1.0, 20.0)] = -1.0
    surfaceSmoothing: Annotated[str, Choice(list(SURFACE_SMOOTHING))] = "windowed-sinc"
    t2Model: Annotated[str, Choice(list(T2_MODELS))] = "ncexp"
    regionVariant: Annotated[str, Choice(list(REGION_VARIANTS))] = "default"
    relaxationKind: Annotated[str, Choice(list(RELAXATION_KINDS))] = "t2"
    regionFile: Path = Path()
    excludeSurface: bool = False
    dessRepetitionTimeMs: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    dessFlipAngleDeg: Annotated[float, WithinRange(0.0, 179.0)] = 0.0
    outputSegmentation: vtkMRMLSegmentationNode
    showUncertainty: bool = True
    computeT2: bool = True
    computeSurfaces: bool = True
    trainingFolder: Path = Path.home() / "KneeSegTraining"


#
# Engine runs
#


@dataclass
class EngineStep:
    """One engine command and the folder it writes."""

    name: str
    args: list[str]
    outputFolder: Path | None = None
    lines: list[str] = field(default_factory=list)


@dataclass
class RunOutcome:
    """How a run ended: ``succeeded``, or ``cancelled``, or failed with ``message``."""

    succeeded: bool
    cancelled: bool = False
    message: str = ""
    steps: list[EngineStep] = field(default_factory=list)
    result: object = None


class EngineRunner:
    """Runs engine commands one after another as child processes of Slicer's Python.

    Non-blocking (the GUI stays live): on Slicer >= 5.12 through ``launchConsoleProcess``'s own
    reader thread and timer; before, through a reader thread and a ``qt.QTimer`` poll here.
    Blocking (self-test, scripts, the short echo-time query): lines are read in a loop without
    processing GUI events, so nobody can press Apply again meanwhile. Either way
    ``onProgress(fraction, text)`` and ``onLog(line)`` are called on the main thread, and
    ``onFinished(RunOutcome)`` once.
    """

    POLL_INTERVAL_MS = 100
    KEPT_LINES = 400

    def __init__(self, steps: list[EngineStep], environment: dict[str, str],
                 onProgress: Callable[[float, str], None] | None = None,
                 onLog: Callable[[str], None] | None = None,
                 onFinished: Callable[[RunOutcome], None] | None = None) -> None:
        self.steps = steps
        self.environment = environment
        self.onProgress = onProgress or (lambda fraction, text: None)
        self.onLog = onLog or logging.info
        self.onFinished = onFinished or (lambda outcome: None)
        self.outcome: RunOutcome | None = None
        self._process = None
        self._stepIndex = 0
        self._cancelRequested = False
        self._timer = None
        self._lines: queue.Queue = queue.Queue()

    @property
    def running(self) -> bool:
        return self.outcome is None and self._process is not None

    def start(self, blocking: bool = False) -> RunOutcome | None:
        """Start the first step; with ``blocking`` run all steps and return the outcome."""
        if blocking:
            for index, step in enumerate(self.steps):
                self._stepIndex = index
                returnCode = self._runBlocking(step)
                if not self._stepSucceeded(step, returnCode):
                    return self.outcome
            self._finish(RunOutcome(True, steps=self.steps))
            return self.outcome
        self._startStep(0)
        return None

    def cancel(self) -> None:
        """Stop the running step and everything it started; the outcome is 'cancelled'."""
        self._cancelRequested = True
        if self._process is not None and self._process.poll() is None:
            killProcessTree(self._process.pid)

    # -- steps

    def _announce(self, step: EngineStep) -> None:
        self.onLog(" ".join(step.args))
        self.onProgress(overallProgress(self._stepIndex, len(self.steps), None), step.name)

    def _runBlocking(self, step: EngineStep) -> int:
        self._announce(step)
        # Blocking mode only returns the process; its output is read here.
        self._process = slicer.util.launchConsoleProcess(step.args, updateEnvironment=self.environment)
        while True:
            try:
                line = self._process.stdout.readline()
            except UnicodeDecodeError:
                continue  # output in a non-UTF-8 locale: drop the line, keep reading
            if not line:
                break
            self._onLine(line.rstrip())
        return self._process.wait()

    def _startStep(self, index: int) -> None:
        self._stepIndex = index
        step = self.steps[index]
        self._announce(step)
        if slicerVersionAtLeast(5, 12):
            self._process = slicer.util.launchConsoleProcess(
                step.args, updateEnvironment=self.environment, blocking=False,
                logCallback=self._onLine, completedCallback=self._onStepCompleted)
        else:
            self._process = slicer.util.launchConsoleProcess(step.args, updateEnvironment=self.environment)
            self._pollOutput(self._process)

    def _pollOutput(self, process) -> None:
        """Read ``process``'s output on a thread; hand it to the main thread from the runner's timer."""
        lines = self._lines

        def read() -> None:
            while True:
                try:
                    line = process.stdout.readline()
                except UnicodeDecodeError:
                    continue
                if not line:
                    break
                lines.put(("line", line.rstrip()))
            lines.put(("done", process.wait()))

        threading.Thread(target=read, daemon=True).start()
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(self.POLL_INTERVAL_MS)
            self._timer.connect("timeout()", self._drain)
        self._timer.start()

    def _drain(self) -> None:
        while True:
            try:
                kind, value = self._lines.get_nowait()
            except queue.Empty:
                return
            if kind == "line":
                self._onLine(value)
                continue
            self._timer.stop()
            # Finish outside the timer's own timeout signal: the next step, or a caller's
            # onFinished that drops this runner, must not release the timer while it signals.
            qt.QTimer.singleShot(0, lambda returnCode=value: self._onStepCompleted(returnCode))
            return

    def _onLine(self, line: str) -> None:
        step = self.steps[self._stepIndex]
        progress = parseProgressLine(line)
        if progress is None:
            step.lines.append(line)
            del step.lines[:-self.KEPT_LINES]
            self.onLog(line)
            return
        text = f"{step.name}: {progress.stage}" + (f" - {progress.message}" if progress.message else "")
        self.onProgress(overallProgress(self._stepIndex, len(self.steps), progress), text)

    def _onStepCompleted(self, returnCode: int) -> None:
        step = self.steps[self._stepIndex]
        if not self._stepSucceeded(step, returnCode):
            return
        if self._stepIndex + 1 < len(self.steps):
            self._startStep(self._stepIndex + 1)
        else:
            self._finish(RunOutcome(True, steps=self.steps))

    def _stepSucceeded(self, step: EngineStep, returnCode: int) -> bool:
        if self._cancelRequested:
            self._finish(RunOutcome(False, cancelled=True, message=_("Cancelled."), steps=self.steps))
            return False
        if returnCode != 0:
            message = f"{step.name}: {engineErrorMessage(step.lines, returnCode)}"
            self._finish(RunOutcome(False, message=message, steps=self.steps))
            return False
        return True

    def _finish(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self._process = None
        if outcome.succeeded:
            self.onProgress(1.0, _("done"))
        self.onFinished(outcome)


#
# Inputs and results in the scene
#


@dataclass
class ScanInput:
    """An input as the engine gets it.

    ``node`` is the volume results are placed beside (subject-hierarchy parent, transform,
    reference geometry); ``source`` is the volume written for the engine: the node itself, or a
    temporary vector volume stacked from a sequence's or multi-volume's frames (``temporary``:
    removed once written). ``echoTimesMs`` come from the frames' index when it names them.
    """

    node: object
    source: object
    echoes: int
    echoTimesMs: list[float] | None = None
    temporary: bool = False


@dataclass
class SceneResult:
    """The nodes one run put into the scene (absent outputs are None / empty)."""

    outputFolder: Path
    results: dict
    segmentation: object = None
    uncertainty: object = None
    t2: object = None
    models: list = field(default_factory=list)
    volumesTable: object = None
    regionsTable: object = None


@dataclass
class RunOptions:
    """Everything a run needs besides its input nodes; built from the parameter node or by a script.

    ``engine`` holds the engine's options; ``echoTimes`` the echo times typed by the user (ms,
    comma-separated; empty: from the series); ``showUncertainty`` whether the heatmap is loaded.
    """

    engine: SegmentOptions = field(default_factory=SegmentOptions)
    echoTimes: str = ""
    showUncertainty: bool = True

    @staticmethod
    def fromParameterNode(parameters: KneeSegParameterNode) -> RunOptions:
        engine = SegmentOptions(
            model=parameters.modelId,
            device=parameters.device,
            closingRadiusMm=None if parameters.closingRadiusMm < 0 else parameters.closingRadiusMm,
            ensembleMembers=parameters.ensembleMembers,
            fast=parameters.fastMode,
            surfaces=parameters.computeSurfaces,
            surfaceSmoothing=parameters.surfaceSmoothing,
            t2=parameters.computeT2,
            t2Model=parameters.t2Model,
            regionVariant=parameters.regionVariant,
            relaxationKind=parameters.relaxationKind,
            regionFile=optionalPath(parameters.regionFile),
            excludeSurface=parameters.excludeSurface,
            repetitionTimeMs=parameters.dessRepetitionTimeMs or None,
            flipAngleDeg=parameters.dessFlipAngleDeg or None,
        )
        return RunOptions(engine, parameters.echoTimes, parameters.showUncertainty)

    def asParameters(self) -> dict:
        """The choices as plain values, recorded with the results (provenance)."""
        return asdict(self)

    @property
    def zeroTimeAllowed(self) -> bool:
        """Typed times may start at 0 ms: spin-lock times of a T1rho series."""
        return self.engine.relaxationKind == "t1rho"


def optionalPath(path: Path | None) -> str:
    """A path chosen in a path line edit, or "" when none was (an empty edit reads as ``Path(".")``)."""
    text = str(path or "")
    return "" if text in ("", ".") else text


#
# KneeSegWidget
#


class KneeSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.runner: EngineRunner | None = None
        self._probe: EngineRunner | None = None
        self._probeResult: dict | None = None
        self._modelsQuery: EngineRunner | None = None
        self._models: list[dict] = []
        self._dependenciesChecked = False
        self._unsupported: str | None = None
        self._describedInput: tuple = ()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KneeSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KneeSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for key, label in zip(OVERLAYS, (_("Uncertainty heatmap"), _("Relaxation map: T2, T1rho or T2* (ms)"), _("None"))):
            self.ui.overlayComboBox.addItem(label, key)
        self._fillDeviceComboBox(availableDevices(None))

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelPackagesButton.connect("clicked(bool)", self.onModelPackages)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecompute)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onOverlayChanged)
        self.ui.uncertainSlicesButton.connect("clicked(bool)", self.onListUncertainSlices)
        self.ui.uncertainSlicesListWidget.connect("currentRowChanged(int)", self.onUncertainSliceSelected)
        self.ui.saveTrainingCaseButton.connect("clicked(bool)", self.onSaveTrainingCase)
        self.ui.exportStlButton.connect("clicked(bool)", self.onExportStl)
        self._uncertainSlices: list[UncertainSlice] = []

        self.initializeParameterNode()
        # Refuse before anything is installed or run: Slicer's Python too old for the engine.
        self._unsupported = notSupportedHere()
        if self._unsupported:
            self.ui.statusLabel.text = self._unsupported
            self._updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("KneeSeg could not query its engine.")):
            self.refreshModels()
            self.refreshDevice()

    def cleanup(self) -> None:
        for runner in (self.runner, self._probe, self._modelsQuery):
            if runner is not None and runner.running:
                runner.cancel()
        self.removeObservers()
        if self.logic is not None:
            self.logic.stopWatchingEdits()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self.runner is not None and self.runner.running:
            self.runner.cancel()
        self.logic.stopWatchingEdits()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: KneeSegParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._selectModel(self._parameterNode.modelId)
            self._selectDevice(self._parameterNode.device)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        running = self.runner is not None and self.runner.running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = not self._unsupported and (running or bool(parameters and parameters.inputVolume))
        self.ui.applyButton.toolTip = _("Stop the engine and everything it started") if running else (
            _("Segment the input volume") if parameters and parameters.inputVolume else _("Select an input volume"))
        hasSegmentation = bool(parameters and parameters.outputSegmentation)
        for button in (self.ui.recomputeButton, self.ui.uncertainSlicesButton, self.ui.saveTrainingCaseButton,
                       self.ui.exportStlButton, self.ui.overlayComboBox):
            button.enabled = hasSegmentation and not running and not self._unsupported
        self.ui.modelPackagesButton.enabled = not running and not self._unsupported
        self.ui.ensembleMembersSpinBox.enabled = not (parameters and parameters.fastMode)
        t2Map = not parameters or parameters.relaxationKind == "t2"  # DESS maps T2 only
        self.ui.dessRepetitionTimeSpinBox.enabled = t2Map
        self.ui.dessFlipAngleSpinBox.enabled = t2Map
        self._describeInput()

    def _describeInput(self) -> None:
        """Say before the run how many echoes the input has and what happens with T2."""
        parameters = self._parameterNode
        if not parameters or not parameters.inputVolume:
            self.ui.inputInfoLabel.text = ""
            return
        key = (parameters.inputVolume.GetID(), parameters.t2Volume.GetID() if parameters.t2Volume else "",
               parameters.computeT2, parameters.echoTimes, parameters.relaxationKind)
        if key == self._describedInput:
            return
        self._describedInput = key
        try:
            self.ui.inputInfoLabel.text = self.logic.describeInput(parameters.inputVolume, parameters.t2Volume,
                                                                   parameters.computeT2, parameters.echoTimes,
                                                                   parameters.relaxationKind == "t1rho")
        except ValueError as error:
            self.ui.inputInfoLabel.text = str(error)

    # -- registry and device

    def refreshModels(self) -> None:
        """Fill the model list from ``kneeseg models --json`` (child process, GUI stays live)."""
        self.ui.modelInfoLabel.text = _("Looking for model packages...")

        def finished(outcome: RunOutcome) -> None:
            if not outcome.succeeded:
                self.ui.modelInfoLabel.text = _("Model registry not available: {message}").format(message=outcome.message)
                return
            self.setModels(KneeSegLogic.modelsFromOutput(outcome.steps[0].lines))

        self._modelsQuery = self.logic.startModelsCommand(onFinished=finished)

    def setModels(self, packages: list[dict]) -> None:
        self._models = packages
        self._fillModelComboBox()

    def _fillModelComboBox(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Default model package"), "")
        for package in self._models:
            flag = _(" (default)") if package.get("default") else ""
            combo.addItem(f"{package.get('id')} {package.get('version', '')}{flag}", package.get("id", ""))
        combo.blockSignals(wasBlocked)
        self._selectModel(self._parameterNode.modelId if self._parameterNode else "")

    def _selectModel(self, modelId: str) -> None:
        combo = self.ui.modelComboBox
        index = max(combo.findData(modelId), 0)
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)
        self._showModelInfo(modelId)

    def onModelChanged(self, index: int) -> None:
        modelId = self.ui.modelComboBox.itemData(index) or ""
        if self._parameterNode:
            self._parameterNode.modelId = modelId
        self._showModelInfo(modelId)

    def _selectedPackage(self, modelId: str) -> dict | None:
        """The package a run with ``modelId`` uses: that id (highest version), else the default."""
        packages = [p for p in self._models if p.get("id") == modelId] or [p for p in self._models if p.get("default")]
        return packages[0] if packages else None

    def _showModelInfo(self, modelId: str) -> None:
        package = self._selectedPackage(modelId)
        if package is None:
            if not self._models:
                self.ui.modelInfoLabel.text = _("No model package found yet: download or import one (Get models...).")
            return
        members = package.get("members") or []
        packageId, version, license, size, _origin = packageRow(package)
        self.ui.modelInfoLabel.text = _("{id} {version} - licence: {license} - {size} - {count} ensemble member(s). {description}").format(
            id=packageId, version=version, license=license, size=size, count=len(members),
            description=package.get("description") or "")
        self.ui.ensembleMembersSpinBox.maximum = max(len(members), 1)

    def onModelPackages(self) -> None:
        """The model packages dialog: list with size and licence, model cards, download, import."""
        dialog = ModelPackagesDialog(self.logic, self._models, parent=slicer.util.mainWindow())
        dialog.exec()
        if dialog.packages is not self._models:
            self.setModels(dialog.packages)

    def confirmModelCard(self, package: dict | None) -> bool:
        """Before a package's first use: its model card (data, accuracy, intended use, licence), OK or Cancel."""
        if package is None or self.logic.modelCardAccepted(package):
            return True
        card = modelCard(package.get("location") or "") or _("This package has no model card.")
        if not showModelCard(slicer.util.mainWindow(), _("KneeSeg: model card of {id} {version}").format(
                id=package.get("id"), version=package.get("version")), card, askToUse=True):
            return False
        self.logic.acceptModelCard(package)
        return True

    def refreshDevice(self) -> None:
        """Find out what PyTorch sees (GPU name and memory, MPS) from a child process."""
        self.ui.deviceInfoLabel.text = _("Detecting PyTorch and GPU...")

        def finished(outcome: RunOutcome) -> None:
            self._probeResult = KneeSegLogic.lastJsonObject(outcome.steps[0].lines) if outcome.steps else None
            self._fillDeviceComboBox(availableDevices(self._probeResult))

        self._probe = self.logic.startDeviceProbe(onFinished=finished)

    def _fillDeviceComboBox(self, devices: list[str]) -> None:
        labels = {"auto": _("auto (GPU when usable)"), "cpu": _("CPU"), "cuda": _("NVIDIA GPU (CUDA)"),
                  "mps": _("Apple GPU (MPS)")}
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for device in devices:
            combo.addItem(labels[device], device)
        combo.blockSignals(wasBlocked)
        self._selectDevice(self._parameterNode.device if self._parameterNode else "auto")

    def _selectDevice(self, device: str) -> None:
        """Show ``device`` (``auto`` when PyTorch cannot use it here) and what the run will run on."""
        combo = self.ui.deviceComboBox
        index = combo.findData(device)
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = max(index, 0)
        combo.blockSignals(wasBlocked)
        if index < 0 and self._parameterNode and self._probeResult is not None:
            self._parameterNode.device = "auto"
        self._showDevice()

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"
        self._showDevice()

    def _showDevice(self) -> None:
        if self._probeResult is not None:
            self.ui.deviceInfoLabel.text = describeDevice(self._probeResult, self.ui.deviceComboBox.itemData(self.ui.deviceComboBox.currentIndex) or "auto")

    # -- run

    def onApplyButton(self) -> None:
        if self.runner is not None and self.runner.running:
            self.appendLog(_("Cancelling..."))
            self.runner.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("KneeSeg could not start."), waitCursor=True):
            parameters = self._parameterNode
            if not self.confirmModelCard(self._selectedPackage(parameters.modelId)):
                return
            if not self.ensureDependencies():
                return
            target = self.confirmOutputSegmentation(parameters.outputSegmentation)
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self.appendLog(self.ui.deviceInfoLabel.text)
            self.runner = self.logic.segment(
                parameters.inputVolume, RunOptions.fromParameterNode(parameters), t2Volume=parameters.t2Volume,
                outputSegmentation=target, onProgress=self.onProgress, onLog=self.appendLog,
                onFinished=self.onRunFinished)
            self._updateButtons()

    def confirmOutputSegmentation(self, segmentation):
        """The segmentation to write into: the chosen one, unless the user keeps a correction or another's work."""
        if segmentation is None:
            return None
        warning = replacementWarning(self.logic.madeByKneeSeg(segmentation), self.logic.isEdited(segmentation),
                                     segmentation.GetSegmentation().GetNumberOfSegments())
        if not warning:
            return segmentation
        if warning == "edited":
            question = _("The segmentation '{name}' has been edited since KneeSeg made it. Replace its segments with the new result?")
        else:
            question = _("The segmentation '{name}' was not made by KneeSeg and holds {count} segment(s). Replace them with the new result?")
        replace = slicer.util.confirmYesNoDisplay(
            question.format(name=segmentation.GetName(), count=segmentation.GetSegmentation().GetNumberOfSegments())
            + "\n\n" + _("Yes: write the result into it. No: keep it and put the result in a new segmentation."),
            windowTitle=_("KneeSeg: output segmentation"))
        return segmentation if replace else None

    def ensureDependencies(self) -> bool:
        """At the first Apply: one confirmation listing what will be installed, then install it."""
        if self._dependenciesChecked:
            return True
        missing = self.logic.missingDependencies()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("KneeSeg needs these Python packages in Slicer's Python. They are downloaded and "
                      "installed once (PyTorch through the PyTorch extension, which picks the build for "
                      "your GPU driver; this can take several minutes and a few GB):\n\n{packages}\n\n"
                      "Slicer's own numpy, SimpleITK, VTK and requests are kept as they are.").format(
                          packages="\n".join(f"- {item}" for item in missing)),
                    windowTitle=_("KneeSeg: install dependencies")):
                return False
            self.appendLog(_("Installing: {packages}").format(packages=", ".join(missing)))
            self.logic.installDependencies()
            self.refreshDevice()
            self.refreshModels()
        self._dependenciesChecked = True
        return True

    def onProgress(self, fraction: float, text: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text

    def appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def onRunFinished(self, outcome: RunOutcome) -> None:
        self._updateButtons()
        if outcome.cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
            self.ui.progressBar.value = 0
            return
        if not outcome.succeeded:
            self.ui.statusLabel.text = _("Failed.")
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(_("KneeSeg failed: {message}").format(message=outcome.message),
                                     detailedText="\n".join(line for step in outcome.steps for line in step.lines[-40:]))
            return
        result: SceneResult = outcome.result
        if result is not None and result.segmentation is not None and self._parameterNode:
            self._parameterNode.outputSegmentation = result.segmentation
            overlay = self.logic.defaultOverlay(result.segmentation)
            combo = self.ui.overlayComboBox
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = combo.findData(overlay)
            combo.blockSignals(wasBlocked)
            self.logic.showOverlay(result.segmentation, overlay)
        warnings = (result.results.get("warnings") if result else None) or []
        for warning in warnings:
            self.appendLog(_("warning: {warning}").format(warning=warning))
        self.ui.statusLabel.text = _("Done.") + (_(" {count} warning(s): see the log.").format(count=len(warnings)) if warnings else "")
        self._uncertainSlices = []
        self.ui.uncertainSlicesListWidget.clear()
        self._updateButtons()

    # -- review and correction

    def onOverlayChanged(self, index: int) -> None:
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentation is not None:
            self.logic.showOverlay(segmentation, self.ui.overlayComboBox.itemData(index) or "none")

    def onRecompute(self) -> None:
        if self.runner is not None and self.runner.running:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not recompute from the segmentation."), waitCursor=True):
            if not self.ensureDependencies():
                return
            parameters = self._parameterNode
            segmentation = parameters.outputSegmentation
            scan = self.logic.referenceVolumeOf(segmentation) or parameters.inputVolume
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self.runner = self.logic.recompute(
                segmentation, RunOptions.fromParameterNode(parameters),
                t2Volume=self.logic.t2SeriesFor(scan, parameters.t2Volume) if parameters.computeT2 else None,
                onProgress=self.onProgress, onLog=self.appendLog, onFinished=self.onRunFinished)
            self._updateButtons()

    def onListUncertainSlices(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        self._uncertainSlices = self.logic.uncertainSlicesOf(segmentation)
        widget = self.ui.uncertainSlicesListWidget
        widget.clear()
        if not self._uncertainSlices:
            widget.addItem(_("The engine reported no slices for this segmentation."))
            return
        for entry in self._uncertainSlices:
            widget.addItem(entry.label)

    def onUncertainSliceSelected(self, row: int) -> None:
        if 0 <= row < len(self._uncertainSlices):
            volume = self.logic.referenceVolumeOf(self._parameterNode.outputSegmentation) or self._parameterNode.inputVolume
            with slicer.util.tryWithErrorDisplay(_("Could not show the slice.")):
                self.logic.jumpToSlice(volume, self._uncertainSlices[row])

    def onSaveTrainingCase(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not save the training case."), waitCursor=True):
            segmentation = parameters.outputSegmentation
            image = self.logic.referenceVolumeOf(segmentation) or parameters.inputVolume
            imagePath, labelPath = trainingCasePaths(parameters.trainingFolder, caseName(image.GetName()))
            if (imagePath.exists() or labelPath.exists()) and not slicer.util.confirmYesNoDisplay(
                    _("{path} already holds this case. Overwrite it?").format(path=labelPath),
                    windowTitle=_("KneeSeg: training case exists")):
                return
            imagePath, labelPath = self.logic.saveTrainingCase(image, segmentation, parameters.trainingFolder, overwrite=True)
            self.appendLog(_("Saved {image} and {label}").format(image=imagePath, label=labelPath))
            slicer.util.showStatusMessage(_("Training case saved to {folder}").format(folder=parameters.trainingFolder), 5000)

    def onExportStl(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Export surface models as STL (mm)"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not export the surfaces."), waitCursor=True):
            paths = self.logic.exportSurfacesToStl(self._parameterNode.outputSegmentation, Path(folder))
            self.appendLog(_("Exported {count} STL files to {folder}").format(count=len(paths), folder=folder))


#
# Model packages dialog
#


def showModelCard(parent, title: str, markdown: str, askToUse: bool = False) -> bool:
    """Show a model card; with ``askToUse`` the user accepts it (OK) or not (Cancel)."""
    dialog = qt.QDialog(parent)
    dialog.setWindowTitle(title)
    dialog.resize(720, 640)
    layout = qt.QVBoxLayout(dialog)
    browser = qt.QTextBrowser()
    browser.setMarkdown(markdown)
    layout.addWidget(browser)
    if askToUse:
        layout.addWidget(qt.QLabel(_("Read the intended use and the licence. Use this model package?")))
        buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Ok | qt.QDialogButtonBox.Cancel)
    else:
        buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Close)
    buttons.connect("accepted()", dialog.accept)
    buttons.connect("rejected()", dialog.reject)
    layout.addWidget(buttons)
    return dialog.exec_() == qt.QDialog.Accepted


class ModelPackagesDialog:
    """Model packages the engine knows (size, licence, model card), download by URL + SHA256, import of a zip.

    Downloads and imports run the engine's ``models`` command as a child process (it checks every
    checksum); the dialog's buttons are disabled meanwhile, so nothing is started twice.
    """

    COLUMNS = (_("Package"), _("Version"), _("Licence"), _("Size"), _("Where"))

    def __init__(self, logic: KneeSegLogic, packages: list[dict], parent=None) -> None:
        self.logic = logic
        self.packages = packages
        self.runner: EngineRunner | None = None
        self.dialog = qt.QDialog(parent)
        self.dialog.setWindowTitle(_("KneeSeg model packages"))
        self.dialog.resize(760, 620)
        layout = qt.QVBoxLayout(self.dialog)
        self.table = qt.QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.table.connect("currentCellChanged(int,int,int,int)", self._showCard)
        layout.addWidget(self.table)
        self.card = qt.QTextBrowser()
        layout.addWidget(self.card)
        form = qt.QFormLayout()
        self.urlEdit = qt.QLineEdit()
        self.urlEdit.placeholderText = _("https://.../package.zip (from the model's release page)")
        self.sha256Edit = qt.QLineEdit()
        self.sha256Edit.placeholderText = _("SHA256 of the zip, 64 hexadecimal digits")
        form.addRow(_("Download URL:"), self.urlEdit)
        form.addRow(_("SHA256:"), self.sha256Edit)
        layout.addLayout(form)
        buttons = qt.QHBoxLayout()
        self.downloadButton = qt.QPushButton(_("Download"))
        self.downloadButton.toolTip = _("Download the zip, check its SHA256, install it in the user cache")
        self.importButton = qt.QPushButton(_("Import zip..."))
        self.importButton.toolTip = _("Install a package zip (or a folder's model.json) for sites without network access")
        self.closeButton = qt.QPushButton(_("Close"))
        for button in (self.downloadButton, self.importButton, self.closeButton):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.progressBar = qt.QProgressBar()
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        layout.addWidget(self.progressBar)
        layout.addWidget(self.statusLabel)
        self.downloadButton.connect("clicked(bool)", self.onDownload)
        self.importButton.connect("clicked(bool)", self.onImport)
        self.closeButton.connect("clicked(bool)", self.dialog.reject)
        self.dialog.connect("rejected()", self._cancelRun)
        self._fillTable()

    def exec(self) -> None:
        self.dialog.exec_()

    def _fillTable(self, selectId: str = "") -> None:
        self.table.setRowCount(len(self.packages))
        for row, package in enumerate(self.packages):
            for column, text in enumerate(packageRow(package)):
                self.table.setItem(row, column, qt.QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        ids = [package.get("id") for package in self.packages]
        if self.packages:
            row = ids.index(selectId) if selectId in ids else 0
            self.table.selectRow(row)
            self._showCard(row)
        else:
            self.card.setPlainText(_("No model package found: download or import one."))

    def _showCard(self, row: int, column: int = 0, previousRow: int = 0, previousColumn: int = 0) -> None:
        if 0 <= row < len(self.packages):
            package = self.packages[row]
            self.card.setMarkdown(modelCard(package.get("location") or "") or _("This package has no model card."))

    def onDownload(self) -> None:
        url = self.urlEdit.text.strip()
        try:
            sha256 = normaliseSha256(self.sha256Edit.text)
        except ValueError as error:
            self.statusLabel.text = str(error)
            return
        if not url:
            self.statusLabel.text = _("Enter the URL of the package zip.")
            return
        self._start(_("Downloading {url} ...").format(url=url), downloadUrl=url, sha256=sha256)

    def onImport(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.dialog, _("Import a KneeSeg model package"), "",
                                              _("Model package (*.zip model.json)"))
        if not path:
            return
        packageFile = Path(path)
        self._start(_("Importing {path} ...").format(path=path),
                    importPath=packageFile.parent if packageFile.name == "model.json" else packageFile)

    def _start(self, text: str, importPath: Path | None = None, downloadUrl: str = "", sha256: str = "") -> None:
        self.statusLabel.text = text
        self._setBusy(True)
        try:
            self.runner = self.logic.startModelsCommand(self._finished, importPath=importPath, downloadUrl=downloadUrl,
                                                        sha256=sha256, onProgress=self._onProgress)
        except (RuntimeError, ValueError) as error:  # no PythonSlicer, a bad URL or checksum: say so, stay usable
            self._setBusy(False)
            self.statusLabel.text = str(error)

    def _onProgress(self, fraction: float, text: str) -> None:
        if fraction > 0:  # the first report gives the bar a scale; until then it shows "busy"
            self.progressBar.maximum = 100
            self.progressBar.value = int(round(100 * fraction))

    def _setBusy(self, busy: bool) -> None:
        for widget in (self.downloadButton, self.importButton, self.urlEdit, self.sha256Edit, self.table):
            widget.enabled = not busy
        self.closeButton.text = _("Cancel") if busy else _("Close")
        self.progressBar.maximum = 0 if busy else 100
        self.progressBar.value = 0

    def _cancelRun(self) -> None:
        if self.runner is not None and self.runner.running:
            self.runner.cancel()

    def _finished(self, outcome: RunOutcome) -> None:
        self._setBusy(False)
        if not outcome.succeeded:
            self.statusLabel.text = _("Not installed: {message}").format(message=outcome.message)
            return
        before = {(p.get("id"), p.get("version"), p.get("sha256")) for p in self.packages}
        self.packages = KneeSegLogic.modelsFromOutput(outcome.steps[0].lines)
        new = [p for p in self.packages if (p.get("id"), p.get("version"), p.get("sha256")) not in before]
        self.statusLabel.text = _("Installed {packages}; its model card is shown below.").format(
            packages=", ".join(f"{p.get('id')} {p.get('version')}" for p in new)) if new else _("Nothing new was installed.")
        self._fillTable(new[0].get("id") if new else "")


#
# KneeSegLogic
#


class KneeSegLogic(ScriptedLoadableModuleLogic, VTKObservationMixin):
    """Runs the engine and puts its outputs into the scene; usable without the widget.

    (The scripted-module template names this class ``<Module>Logic``; the engine package is
    reached only through its command line.) Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("KneeSeg")
        outcome = logic.segment(getNode("KneeMESE"), RunOptions(), blocking=True)
        outcome.result.segmentation
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        VTKObservationMixin.__init__(self)

    def getParameterNode(self) -> KneeSegParameterNode:
        return KneeSegParameterNode(super().getParameterNode())

    # -- child processes

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher (``PythonSlicer``), which sets up Slicer's Python environment."""
        executable = shutil.which("PythonSlicer")
        if not executable:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer; the installation looks incomplete."))
        return executable

    @staticmethod
    def environment() -> dict[str, str]:
        """Environment additions for engine runs: the engine's folder on ``PYTHONPATH``."""
        return engineEnvironment(findEngineRoot(moduleDirectory()), slicer.util.startupEnvironment().get("PYTHONPATH"))

    def runner(self, steps: list[EngineStep], onProgress=None, onLog=None, onFinished=None) -> EngineRunner:
        return EngineRunner(steps, self.environment(), onProgress, onLog, onFinished)

    @staticmethod
    def lastJsonObject(lines: list[str]) -> dict | None:
        """The last line of ``lines`` that is a JSON object (what ``--json`` commands print)."""
        for line in reversed(lines):
            text = line.strip()
            if text.startswith("{"):
                try:
                    return json.loads(text)
                except ValueError:
                    continue
        return None

    @staticmethod
    def modelsFromOutput(lines: list[str]) -> list[dict]:
        listing = KneeSegLogic.lastJsonObject(lines) or {}
        return list(listing.get("packages") or [])

    def _modelsStep(self, importPath: Path | None, downloadUrl: str, sha256: str) -> EngineStep:
        return EngineStep("models", modelsCommand(self.pythonExecutable(), importPath, downloadUrl, sha256))

    def startModelsCommand(self, onFinished: Callable[[RunOutcome], None], importPath: Path | None = None,
                           downloadUrl: str = "", sha256: str = "", onProgress=None) -> EngineRunner:
        """``kneeseg models --json`` in the background, after an import or a checked download when given."""
        runner = self.runner([self._modelsStep(importPath, downloadUrl, sha256)], onProgress=onProgress,
                             onFinished=onFinished, onLog=logging.debug)
        runner.start()
        return runner

    def modelPackages(self, importPath: Path | None = None, downloadUrl: str = "", sha256: str = "") -> list[dict]:
        """Model packages the engine's registry finds (id, version, licence, location...), blocking.

        With ``importPath`` (package folder or zip) or ``downloadUrl`` + ``sha256`` the package is
        installed into the engine's user cache first.
        """
        outcome = self.runner([self._modelsStep(importPath, downloadUrl, sha256)]).start(blocking=True)
        if not outcome.succeeded:
            raise RuntimeError(outcome.message)
        return self.modelsFromOutput(outcome.steps[0].lines)

    @staticmethod
    def _acceptedCards() -> list[str]:
        value = qt.QSettings().value(ACCEPTED_CARDS_SETTING) or ""
        return [item for item in str(value).split(",") if item]

    def modelCardAccepted(self, package: dict) -> bool:
        """Whether the user has read and accepted this exact package's model card (by its sha256)."""
        return bool(package.get("sha256")) and package["sha256"] in self._acceptedCards()

    def acceptModelCard(self, package: dict) -> None:
        accepted = self._acceptedCards()
        if package.get("sha256") and package["sha256"] not in accepted:
            qt.QSettings().setValue(ACCEPTED_CARDS_SETTING, ",".join(accepted + [package["sha256"]]))

    def startDeviceProbe(self, onFinished: Callable[[RunOutcome], None]) -> EngineRunner:
        runner = self.runner([EngineStep("device", probeCommand(self.pythonExecutable()))], onFinished=onFinished,
                             onLog=logging.debug)
        runner.start()
        return runner

    # -- dependencies

    @staticmethod
    def requirements():
        return readRequirements(moduleDirectory() / "Resources" / "requirements.txt")

    def missingDependencies(self) -> list[str]:
        """What installDependencies would install, one line per package (empty when all are there)."""
        torch, others = splitTorch(missingRequirements(self.requirements()))
        missing = [f"PyTorch ({torch})"] if torch is not None else []
        return missing + [str(requirement) for requirement in others]

    def installDependencies(self) -> None:
        """Install missing packages: torch through the PyTorch extension, the rest with pip.

        Refused, before anything is installed, on a Slicer or Python the engine cannot run on. pip
        runs under constraints pinning Slicer's numpy, SimpleITK, VTK, requests and torch, so it
        fails with a message rather than replace them.
        """
        reason = notSupportedHere()
        if reason:
            raise RuntimeError(reason)
        torch, others = splitTorch(missingRequirements(self.requirements()))
        if torch is not None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(_("KneeSeg needs the PyTorch extension: install it from the Extensions Manager and restart Slicer.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=str(torch.specifier)) is None:
                raise RuntimeError(_("PyTorch was not installed."))
        if not others:
            return
        constraints = Path(slicer.util.tempDirectory("KneeSegPip")) / "constraints.txt"
        constraints.write_text(protectionConstraints(), encoding="utf-8")
        requirements = [str(requirement) for requirement in others]
        if slicerVersionAtLeast(5, 12):
            from slicer import packaging as slicerPackaging  # Slicer >= 5.12 only

            slicerPackaging.pip_ensure(requirements, constraints=constraints, prompt_install=False,
                                       requester="KneeSeg", skip_in_testing=False)
        else:
            slicer.util.pip_install(["-c", str(constraints), *requirements])

    # -- inputs

    @staticmethod
    def browserOf(proxyNode):
        """The sequence browser whose proxy ``proxyNode`` is, or None."""
        for browser in slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode"):
            if browser.IsProxyNodeID(proxyNode.GetID()):
                return browser
        return None

    def sequenceOf(self, node) -> tuple:
        """(sequence, proxy volume or None) of a sequence browser, a sequence or a proxy; (None, None) else."""
        if node.IsA("vtkMRMLSequenceBrowserNode"):
            sequence = node.GetMasterSequenceNode()
            return sequence, node.GetProxyNode(sequence) if sequence is not None else None
        if node.IsA("vtkMRMLSequenceNode"):
            for browser in slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode"):
                if browser.IsSynchronizedSequenceNodeID(node.GetID(), True):
                    return node, browser.GetProxyNode(node)
            return node, None
        browser = self.browserOf(node)
        if browser is not None:
            return browser.GetSequenceNode(node), node
        return None, None

    @staticmethod
    def multiVolumeFrames(node) -> tuple[str, str, list[str]]:
        """(frame tag, its unit, frame labels) MultiVolumeImporter writes as attributes ("EchoTime", "ms", echo times)."""
        labels = [label for label in (node.GetAttribute("MultiVolume.FrameLabels") or "").split(",") if label.strip()]
        return (node.GetAttribute("MultiVolume.FrameIdentifyingDICOMTagName") or "",
                node.GetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits") or "", labels)

    def frameIndex(self, node) -> tuple | None:
        """(name, index name, index unit, index values) of a sequence's or multi-volume's frames; None for a volume."""
        sequence, proxy = self.sequenceOf(node)
        if sequence is not None:
            values = [sequence.GetNthIndexValue(index) for index in range(sequence.GetNumberOfDataNodes())]
            described = frameDescription(sequence.GetIndexName(), sequence.GetIndexUnit(), values, *self.multiVolumeFrames(sequence))
            return ((proxy if proxy is not None else sequence).GetName(), *described)
        if node.IsA("vtkMRMLMultiVolumeNode"):
            tag, unit, labels = self.multiVolumeFrames(node)
            if not labels:
                return None  # frames not described: taken as a vector volume (echo times typed or from its file)
            return node.GetName(), tag, unit, labels
        return None

    def echoCount(self, node) -> int:
        """Echoes (frames, or components of a vector volume) of an input node; 0 for none."""
        if node is None:
            return 0
        frames = self.frameIndex(node)
        if frames is not None and len(frames[3]) > 0:
            return len(frames[3])
        imageData = node.GetImageData() if node.IsA("vtkMRMLVolumeNode") else None
        return imageData.GetNumberOfScalarComponents() if imageData else 0

    def describeInput(self, node, t2Volume=None, t2Requested: bool = True, typedEchoTimes: str = "",
                      allowZero: bool = False) -> str:
        """One sentence before the run: echoes of the input and what happens with T2.

        Raises ``ValueError`` with the reason when an input is a 4D series KneeSeg does not take.
        ``allowZero``: the typed times are spin-lock times, which may start at 0 ms.
        """
        typed = parseEchoTimes(typedEchoTimes, allowZero) if typedEchoTimes.strip() else []
        for candidate in (node, t2Volume):
            frames = self.frameIndex(candidate) if candidate is not None else None
            if frames is not None and len(frames[3]) > 1:
                frameEchoTimes(*frames, typedEchoTimes=typed)
        return echoMessage(node.GetName(), self.echoCount(node), t2Volume is not None, t2Requested)

    def scanInput(self, node, typedEchoTimes: str = "", allowZero: bool = False) -> ScanInput:
        """What the engine gets for ``node``: the volume itself, or the frames of its sequence or
        multi-volume stacked into one multi-echo volume. A 4D series that is not multi-echo raises
        ``ValueError`` (KneeSeg does not segment frame by frame)."""
        frames = self.frameIndex(node)
        if frames is None:
            return ScanInput(node, node, self.echoCount(node))
        typed = parseEchoTimes(typedEchoTimes, allowZero) if typedEchoTimes.strip() else []
        name, indexName, indexUnit, values = frames
        if not values:
            raise ValueError(_("'{name}' holds no frames.").format(name=name))
        echoTimes = frameEchoTimes(name, indexName, indexUnit, values, typed) if len(values) > 1 else None
        sequence, proxy = self.sequenceOf(node)
        if sequence is None:  # multi-volume: one image with a component per frame
            stacked = self.volumeFromArray(slicer.util.arrayFromVolume(node), node, f"{name} echoes")
            return ScanInput(node, stacked, len(values), echoTimes, temporary=True)
        if len(values) == 1 and proxy is not None:
            return ScanInput(proxy, proxy, 1)
        volumes = [sequence.GetNthDataNode(index) for index in range(len(values))]
        stacked = self.stackFrames(volumes, f"{name} echoes")
        if proxy is None:  # nothing in the scene shows the sequence: the stacked volume stays, results go beside it
            return ScanInput(stacked, stacked, len(values), echoTimes)
        return ScanInput(proxy, stacked, len(values), echoTimes, temporary=True)

    def stackFrames(self, volumes: list, name: str):
        """One vector volume (a component per frame) from a sequence's scalar volumes of one grid."""
        import numpy as np

        arrays = []
        for volume in volumes:
            if not volume.IsA("vtkMRMLScalarVolumeNode") or volume.GetImageData() is None:
                raise ValueError(_("'{name}': every frame must be a scalar volume.").format(name=name))
            array = slicer.util.arrayFromVolume(volume)
            if array.ndim != 3 or (arrays and array.shape != arrays[0].shape):
                raise ValueError(_("'{name}': the frames must be 3D volumes of one size.").format(name=name))
            arrays.append(array)
        if len(arrays) == 1:
            return self.volumeFromArray(arrays[0], volumes[0], name)
        return self.volumeFromArray(np.stack(arrays, axis=-1), volumes[0], name)

    @staticmethod
    def volumeFromArray(array, geometryNode, name: str):
        """A new volume holding ``array`` (k, j, i[, components]) on ``geometryNode``'s grid."""
        className = "vtkMRMLVectorVolumeNode" if array.ndim == 4 else "vtkMRMLScalarVolumeNode"
        volume = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
        volume.CopyOrientation(geometryNode)
        slicer.util.updateVolumeFromArray(volume, array)
        volume.CreateDefaultDisplayNodes()
        return volume

    def t2SeriesFor(self, inputVolume, t2Volume):
        """The multi-echo series T2 is fitted on: the chosen one, else the input when it has echoes."""
        if t2Volume is not None:
            return t2Volume
        return inputVolume if self.echoCount(inputVolume) > 1 else None

    def echoTimesOf(self, scan: ScanInput, text: str = "", allowZero: bool = False) -> list[float] | None:
        """Echo times (ms) of a multi-echo input: from its frames' index, typed by the user, from the
        node's attributes, else from its file. ``None`` when it has one echo.

        Multi-volumes keep them in ``MultiVolume.FrameLabels``; a node read from an unmodified file
        gets them from the engine's own reader (``info``).
        """
        if scan.echoes <= 1:
            return None
        if scan.echoTimesMs:
            return scan.echoTimesMs
        volumeNode = scan.source
        times = parseEchoTimes(text, allowZero) if text.strip() else []
        if not times and volumeNode.GetAttribute("MultiVolume.FrameLabels"):
            times = parseEchoTimes(volumeNode.GetAttribute("MultiVolume.FrameLabels"))
        storage = volumeNode.GetStorageNode()
        if not times and storage is not None and storage.GetFileName() and Path(storage.GetFileName()).is_file():
            outcome = self.runner([EngineStep("info", infoCommand(self.pythonExecutable(), storage.GetFileName()))]).start(blocking=True)
            info = self.lastJsonObject(outcome.steps[0].lines) if outcome.succeeded else None
            times = list((info or {}).get("echo_times_ms") or [])
        if not times:
            raise ValueError(_("The echo times of '{name}' are not known: type them in milliseconds, e.g. 10,20,30.").format(name=scan.node.GetName()))
        if len(times) != scan.echoes:
            raise ValueError(_("'{name}' has {count} echoes but {given} echo times were given.").format(
                name=scan.node.GetName(), count=scan.echoes, given=len(times)))
        return times

    @staticmethod
    def workFolder() -> Path:
        """A new, short temporary folder for one run (long paths break tools on Windows)."""
        return Path(slicer.util.tempDirectory("KneeSeg"))

    @staticmethod
    def exportVolume(volumeNode, path: Path) -> Path:
        """Write a volume node as the engine reads it (NRRD, LPS, its own grid: the transform stays in Slicer).

        The node's own storage is untouched; a fresh ``properties`` dict each time, because
        exportNode writes into it (a shared default would carry one file's format to the next).
        """
        if not slicer.util.exportNode(volumeNode, str(path), {}):
            raise RuntimeError(_("Could not write '{name}' to {path}").format(name=volumeNode.GetName(), path=path))
        return path

    def discardTemporaries(self, *scans: ScanInput | None) -> None:
        """Remove stacked volumes still in the scene (a run that stopped before writing them)."""
        for scan in scans:
            if scan is not None and scan.temporary and slicer.mrmlScene.IsNodePresent(scan.source):
                self.removeNodeCompletely(scan.source)

    def writeScan(self, scan: ScanInput, path: Path) -> Path:
        """Write the scan for the engine; a temporary stacked volume leaves the scene once written."""
        self.exportVolume(scan.source, path)
        if scan.temporary:
            self.removeNodeCompletely(scan.source)
        return path

    # -- runs

    def segment(self, inputNode, options: RunOptions | None = None, t2Volume=None, outputSegmentation=None,
                onProgress=None, onLog=None, onFinished=None, blocking: bool = False):
        """Segment ``inputNode``; with T2 when a multi-echo series is there; load the outputs.

        ``inputNode`` is a volume (single- or multi-echo), a multi-volume, a volume sequence, its
        browser or its proxy volume. The result is written into ``outputSegmentation`` when given
        (the same node, so references to it stay valid; the caller asks the user first when it
        holds a correction or somebody's work), else into a new segmentation. Returns the
        :class:`EngineRunner` (``blocking=False``) or the :class:`RunOutcome`.
        """
        if inputNode is None:
            raise ValueError(_("Select an input volume."))
        options = options or RunOptions()
        zero = options.zeroTimeAllowed
        scan = self.scanInput(inputNode, options.echoTimes, zero)
        t2Scan = None
        try:
            if options.engine.t2 and t2Volume is not None and t2Volume is not inputNode:
                t2Scan = self.scanInput(t2Volume, options.echoTimes, zero)
            elif options.engine.t2 and scan.echoes > 1:
                t2Scan = scan
            (onLog or logging.info)(echoMessage(scan.node.GetName(), scan.echoes, t2Scan is not None and t2Scan is not scan,
                                                options.engine.t2))
            inputEchoTimes = self.echoTimesOf(scan, options.echoTimes, zero)
            t2EchoTimes = self.echoTimesOf(t2Scan, options.echoTimes, zero) if t2Scan is not None else None
            work = self.workFolder()
            inputPath = self.writeScan(scan, work / "input.nrrd")
            t2Input = None
            if t2Scan is not None:
                t2Input = inputPath if t2Scan is scan else self.writeScan(t2Scan, work / "t2input.nrrd")
        except Exception:
            self.discardTemporaries(scan, t2Scan)
            raise
        plan = planSegmentRun(self.pythonExecutable(), work, inputPath, inputEchoTimes, t2Input, t2EchoTimes, options.engine)

        def loadOutputs(outcome: RunOutcome) -> SceneResult:
            result = self.loadOutputs(scan.node, work, options, outputSegmentation,
                                      t2Scan.node if t2Scan is not None else None)
            for copy in {inputPath, t2Input} - {None}:
                copy.unlink(missing_ok=True)  # copies of the scans; the outputs are in the scene now
            return result

        return self._run(plan, loadOutputs, onProgress, onLog, onFinished, blocking)

    def recompute(self, segmentationNode, options: RunOptions | None = None, t2Volume=None,
                  onProgress=None, onLog=None, onFinished=None, blocking: bool = False):
        """Surfaces, volumes and T2 region statistics again, from the (edited) segmentation in the scene."""
        if segmentationNode is None:
            raise ValueError(_("Select the segmentation to recompute from."))
        options = options or RunOptions()
        zero = options.zeroTimeAllowed
        t2Scan = self.scanInput(t2Volume, options.echoTimes, zero) if t2Volume is not None and options.engine.t2 else None
        try:
            t2EchoTimes = self.echoTimesOf(t2Scan, options.echoTimes, zero) if t2Scan is not None else None
            work = self.workFolder()
            segmentationPath = work / "edited.seg.nrrd"
            if not slicer.util.exportNode(segmentationNode, str(segmentationPath), {}):
                raise RuntimeError(_("Could not write the segmentation to {path}").format(path=segmentationPath))
            t2Input = self.writeScan(t2Scan, work / "t2input.nrrd") if t2Scan is not None else None
        except Exception:
            self.discardTemporaries(t2Scan)
            raise
        plan = planRecompute(self.pythonExecutable(), work, segmentationPath, t2Input, t2EchoTimes, options.engine)

        def loadOutputs(outcome: RunOutcome) -> SceneResult:
            return self.loadRecomputed(segmentationNode, work, options, t2Series=t2Scan.node if t2Scan is not None else None)

        return self._run(plan, loadOutputs, onProgress, onLog, onFinished, blocking)

    def _run(self, plan: list[PlannedCommand], loadOutputs, onProgress, onLog, onFinished, blocking):
        def finished(outcome: RunOutcome) -> None:
            if outcome.succeeded:
                try:
                    outcome.result = loadOutputs(outcome)
                except Exception as error:  # a folder the scene cannot read: report it, do not hide it
                    logging.exception("KneeSeg: loading the outputs failed")
                    outcome.succeeded, outcome.message = False, _("loading the outputs failed: {error}").format(error=error)
            if onFinished is not None:
                onFinished(outcome)

        steps = [EngineStep(command.name, command.args, command.outputFolder) for command in plan]
        runner = self.runner(steps, onProgress, onLog, finished)
        outcome = runner.start(blocking=blocking)
        return outcome if blocking else runner

    # -- outputs into the scene

    @staticmethod
    def firstFolderWith(fileName: str, *folders: Path) -> Path | None:
        """The first of ``folders`` holding ``fileName`` (a later, more specific command wins)."""
        for folder in folders:
            if (folder / fileName).exists():
                return folder
        return None

    def loadOutputs(self, inputVolume, work: Path, options: RunOptions, outputSegmentation=None, t2Series=None) -> SceneResult:
        """Nodes from a run's output folders (``segment``, then ``surfaces`` / ``t2`` when they ran).

        Nodes an earlier run derived from the same segmentation (models, maps, tables) are replaced.
        """
        segmentFolder = work / "segment"
        results = readResults(segmentFolder)
        parameters = options.asParameters()
        result = SceneResult(work, results)
        result.segmentation = self.loadSegmentation(segmentFolder / SEGMENTATION_FILE, inputVolume, results, parameters,
                                                    outputSegmentation)
        result.segmentation.SetAttribute(OUTPUT_FOLDER_ATTRIBUTE, str(work))
        slices = (results.get("uncertainty") or {}).get("most_uncertain_slices") or []
        result.segmentation.SetAttribute(UNCERTAIN_SLICES_ATTRIBUTE, json.dumps(slices))
        if options.showUncertainty and (segmentFolder / UNCERTAINTY_FILE).is_file():
            result.uncertainty = self.loadUncertainty(segmentFolder / UNCERTAINTY_FILE, inputVolume, results, parameters)
        self.replaceDerived(result.segmentation, UNCERTAINTY_ROLE, [result.uncertainty] if result.uncertainty is not None else [])
        surfacesFolder = self.firstFolderWith(SURFACES_FOLDER, work / "surfaces", segmentFolder) if options.engine.surfaces else None
        self.loadSurfaces(result, surfacesFolder, readResults(surfacesFolder) if surfacesFolder else {}, parameters)
        found = relaxationMapIn(work / "relax", work / "t2", segmentFolder) if t2Series is not None else None
        self.loadT2Outputs(result, found, t2Series, parameters)
        result.volumesTable = self.loadVolumesTable(result.segmentation, results, work, inputVolume)
        self.watchForEdits(result.segmentation)
        return result

    def loadRecomputed(self, segmentationNode, work: Path, options: RunOptions, t2Series=None) -> SceneResult:
        """Nodes from a recompute's output folders; the segmentation itself is left as the user edited it."""
        surfacesFolder = work / "surfaces"
        results = readResults(surfacesFolder)
        reference = self.referenceVolumeOf(segmentationNode) or segmentationNode
        parameters = options.asParameters()
        result = SceneResult(work, results, segmentation=segmentationNode)
        self.loadSurfaces(result, surfacesFolder, results, parameters)
        result.volumesTable = self.loadVolumesTable(segmentationNode, results, work, reference)
        if t2Series is not None:
            self.loadT2Outputs(result, relaxationMapIn(work / "relax", work / "t2"), t2Series, parameters)
        segmentationNode.SetAttribute(RECOMPUTED_FOLDER_ATTRIBUTE, str(work))
        return result

    def loadT2Outputs(self, result: SceneResult, found: tuple[Path, str] | None, t2Series, parameters: dict) -> None:
        """The relaxation map (T2, T1rho or T2*; and the EPG B1 map) and the per-region table of the
        output folder ``found`` names (``(folder, kind)``), replacing the segmentation's old ones."""
        b1 = None
        if found is not None:
            folder, kind = found
            t2Results = readResults(folder)
            result.t2 = self.loadT2Map(folder / RELAXATION_FILES[kind], t2Series, t2Results, parameters)
            if (folder / B1_FILE).is_file():
                b1 = self.loadScalarMap(folder / B1_FILE, f"{t2Series.GetName()} B1", t2Series, ("1", "UCUM", "no units"),
                                        "vtkMRMLColorTableNodeFileViridis.txt", B1_WINDOW, B1_THRESHOLD, t2Results, parameters)
            if (folder / REGIONS_TABLE_FILE).is_file():
                result.regionsTable = self.loadTable(folder / REGIONS_TABLE_FILE,
                                                     f"{t2Series.GetName()} {RELAXATION_MAPS[kind][0]} per region", t2Series)
        self.replaceDerived(result.segmentation, T2_ROLE, [result.t2] if result.t2 is not None else [])
        self.replaceDerived(result.segmentation, B1_ROLE, [b1] if b1 is not None else [])
        self.replaceDerived(result.segmentation, REGIONS_TABLE_ROLE, [result.regionsTable] if result.regionsTable is not None else [])

    @staticmethod
    def placeBeside(node, inputNode) -> None:
        """Put ``node`` under the input's subject-hierarchy parent and under its transform."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        shNode.SetItemParent(shNode.GetItemByDataNode(node), shNode.GetItemParent(shNode.GetItemByDataNode(inputNode)))
        node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())

    @staticmethod
    def setAttributes(node, attributes: dict[str, str]) -> None:
        for name, value in attributes.items():
            node.SetAttribute(name, value)

    @staticmethod
    def keepInScene(node) -> None:
        """Drop the link to the file a node was read from (in Slicer's temporary folder).

        Without a storage node Slicer's Save dialog gives it a new one in the scene's folder and
        selects it, so a saved scene holds its own copy instead of pointing into a folder that
        is deleted later.
        """
        storage = node.GetStorageNode()
        if storage is not None:
            node.SetAndObserveStorageNodeID(None)
            slicer.mrmlScene.RemoveNode(storage)

    @staticmethod
    def removeNodeCompletely(node) -> None:
        """Remove a node with its display and storage nodes (the scene leaves those behind otherwise)."""
        if node.IsA("vtkMRMLDisplayableNode"):
            for index in reversed(range(node.GetNumberOfDisplayNodes())):
                slicer.mrmlScene.RemoveNode(node.GetNthDisplayNode(index))
        KneeSegLogic.keepInScene(node)
        slicer.mrmlScene.RemoveNode(node)

    @staticmethod
    def referencedNodes(owner, role: str) -> list:
        return [owner.GetNthNodeReference(role, index) for index in range(owner.GetNumberOfNodeReferences(role))
                if owner.GetNthNodeReference(role, index) is not None]

    def replaceDerived(self, owner, role: str, nodes: list) -> None:
        """Make ``nodes`` the ones ``owner`` refers to under ``role``; remove the ones they replace.

        Only nodes KneeSeg derived from this segmentation are removed (never another scan's), and
        a subject-hierarchy folder left empty by that goes too.
        """
        old = self.referencedNodes(owner, role)
        owner.RemoveNodeReferenceIDs(role)
        for node in nodes:
            owner.AddNodeReferenceID(role, node.GetID())
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        for node in old:
            if node in nodes:
                continue
            folder = shNode.GetItemParent(shNode.GetItemByDataNode(node))
            self.removeNodeCompletely(node)
            if role == MODEL_ROLE and folder and folder != shNode.GetSceneItemID() and not shNode.GetNumberOfItemChildren(folder):
                shNode.RemoveItem(folder)

    def loadSegmentation(self, path: Path, inputVolume, results: dict, parameters: dict, target=None):
        """The engine's ``.seg.nrrd`` (names, colours and terminology come with it) as an editable segmentation.

        Written into ``target`` when given (its segments are replaced; the node and references to
        it stay), else into a new node.
        """
        loaded = slicer.util.loadSegmentation(str(path), {})
        if loaded is None:
            raise RuntimeError(_("Slicer could not read {path}").format(path=path))
        if target is None:
            segmentation = loaded
            self.keepInScene(segmentation)
            segmentation.SetName(slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} KneeSeg segmentation"))
        else:
            segmentation = target
            segmentation.GetSegmentation().DeepCopy(loaded.GetSegmentation())
            self.removeNodeCompletely(loaded)
            if segmentation.GetDisplayNode() is None:
                segmentation.CreateDefaultDisplayNodes()
            for name in segmentation.GetAttributeNames() or ():
                if name.startswith("KneeSeg."):  # provenance of the result it held before
                    segmentation.RemoveAttribute(name)
        # Place first, then take the geometry: with the segmentation already under the input's
        # transform, the reference grid is the input's own; the other way round the transform
        # would be applied twice and Segment Editor would edit on a misplaced grid.
        self.placeBeside(segmentation, inputVolume)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
        self.setAttributes(segmentation, provenanceAttributes(results, parameters))
        return segmentation

    def loadScalarMap(self, path: Path, name: str, besideVolume, units: tuple[str, str, str], colorNodeID: str,
                      window: tuple[float, float], threshold: float, results: dict, parameters: dict):
        """A quantitative map: coded units (UCUM), a colour map, a fixed window, transparent below
        ``threshold`` (so an overlay shows only where it says something), placed beside its scan."""
        volume = slicer.util.loadVolume(str(path), {"name": name, "show": False})
        self.keepInScene(volume)
        unitsEntry = slicer.vtkCodedEntry()
        unitsEntry.SetValueSchemeMeaning(*units)
        volume.SetVoxelValueUnits(unitsEntry)
        display = volume.GetScalarVolumeDisplayNode()
        display.SetAndObserveColorNodeID(colorNodeID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(*window)
        display.AutoThresholdOff()
        display.SetThreshold(threshold, THRESHOLD_CEILING)
        display.ApplyThresholdOn()
        self.placeBeside(volume, besideVolume)
        self.setAttributes(volume, provenanceAttributes(results, parameters))
        return volume

    def loadUncertainty(self, path: Path, inputVolume, results: dict, parameters: dict):
        """Normalised entropy (0-1), Inferno colour map, fixed 0-1 window, transparent where the model is sure."""
        return self.loadScalarMap(path, f"{inputVolume.GetName()} uncertainty", inputVolume, ("1", "UCUM", "no units"),
                                  "vtkMRMLColorTableNodeFileInferno.txt", (0.0, 1.0), UNCERTAINTY_THRESHOLD, results, parameters)

    def loadT2Map(self, path: Path, seriesVolume, results: dict, parameters: dict):
        """A relaxation map in ms (T2, T2* or T1rho by file name, :data:`RELAXATION_MAPS`): colour map,
        fixed window with a colour bar, unfitted voxels transparent, quantity and units coded."""
        kind = next(k for k, fileName in RELAXATION_FILES.items() if fileName == path.name)
        suffix, code, window = RELAXATION_MAPS[kind]
        volume = self.loadScalarMap(path, f"{seriesVolume.GetName()} {suffix}", seriesVolume, ("ms", "UCUM", "millisecond"),
                                    "vtkMRMLColorTableNodeFileViridis.txt", window, T2_THRESHOLD_MS, results, parameters)
        quantity = slicer.vtkCodedEntry()
        quantity.SetValueSchemeMeaning(*code)
        volume.SetVoxelValueQuantity(quantity)
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volume)
        if legend is not None:
            legend.SetVisibility(False)  # shown with the map (showOverlay)
        return volume

    def defaultOverlay(self, segmentationNode) -> str:
        """The T2 map when the segmentation has one (the quantitative result asked for), else its heatmap."""
        for overlay, role in (("t2", T2_ROLE), ("uncertainty", UNCERTAINTY_ROLE)):
            if self.referencedNodes(segmentationNode, role):
                return overlay
        return "none"

    def showOverlay(self, segmentationNode, overlay: str) -> None:
        """Show the segmentation's uncertainty heatmap or T2 map (one of :data:`OVERLAYS`) over its scan."""
        if overlay not in OVERLAYS:
            raise ValueError(f"overlay must be one of {OVERLAYS}, got {overlay!r}")
        maps = {role: (self.referencedNodes(segmentationNode, role) or [None])[0] for role in (UNCERTAINTY_ROLE, T2_ROLE)}
        shown = {"uncertainty": maps[UNCERTAINTY_ROLE], "t2": maps[T2_ROLE], "none": None}[overlay]
        background = self.referenceVolumeOf(segmentationNode)
        slicer.util.setSliceViewerLayers(background=background if background is not None else "keep-current",
                                         foreground=shown, foregroundOpacity=T2_OPACITY if overlay == "t2" else UNCERTAINTY_OPACITY)
        t2 = maps[T2_ROLE]
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(t2) if t2 is not None else None
        if legend is not None:
            legend.SetVisibility(overlay == "t2")

    def loadSurfaces(self, result: SceneResult, folder: Path | None, results: dict, parameters: dict) -> None:
        """Surface models (LPS, mm) into a subject-hierarchy folder of their own, coloured like their segments.

        The segmentation refers to its models (node references), so a rerun replaces exactly these
        and a second scan of the same study keeps its own. With models, the segmentation's own
        3D surface is hidden (the smoothed models are what is shown); without, it is shown.
        """
        segmentationNode = result.segmentation
        files = surfaceFiles(folder, results) if folder is not None else {}
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        models = []
        if files:
            parent = shNode.GetItemParent(shNode.GetItemByDataNode(segmentationNode))
            folderItem = shNode.CreateFolderItem(parent, _("{name} surfaces").format(name=segmentationNode.GetName()))
            segmentation = segmentationNode.GetSegmentation()
            attributes = provenanceAttributes(results, parameters)
            for key, path in files.items():
                model = slicer.util.loadModel(str(path))
                self.keepInScene(model)
                segment = segmentation.GetSegment(key)
                model.SetName(segment.GetName() if segment else key)
                if segment is not None:
                    model.GetDisplayNode().SetColor(*segment.GetColor())
                shNode.SetItemParent(shNode.GetItemByDataNode(model), folderItem)
                model.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
                self.setAttributes(model, attributes)
                models.append(model)
            shNode.SetItemExpanded(folderItem, False)
        self.replaceDerived(segmentationNode, MODEL_ROLE, models)
        result.models = models
        if not models:
            segmentationNode.CreateClosedSurfaceRepresentation()
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility3D(not models)

    def loadTable(self, path: Path, name: str, inputNode):
        table = slicer.util.loadTable(str(path))
        self.keepInScene(table)
        table.SetName(name)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        shNode.SetItemParent(shNode.GetItemByDataNode(table), shNode.GetItemParent(shNode.GetItemByDataNode(inputNode)))
        return table

    def loadVolumesTable(self, segmentationNode, results: dict, work: Path, inputNode):
        """Volume (and mean uncertainty) per structure as a table node, rows named like the segments."""
        names = {}
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            names[segmentation.GetNthSegmentID(index)] = segmentation.GetNthSegment(index).GetName()
        path = writeVolumesTable(results, names, work / "volumes.csv")
        table = self.loadTable(path, f"{segmentationNode.GetName()} volumes", inputNode) if path is not None else None
        self.replaceDerived(segmentationNode, VOLUMES_TABLE_ROLE, [table] if table is not None else [])
        return table

    # -- correction and planning

    EDIT_EVENTS = ("SourceRepresentationModified", "SegmentAdded", "SegmentRemoved")

    def watchForEdits(self, segmentationNode) -> None:
        """Mark the segmentation edited at its first change (Segment Editor), so no rerun overwrites it silently."""
        self._stopWatching(segmentationNode)
        segmentationNode.SetAttribute(EDITED_ATTRIBUTE, "false")
        for eventName in self.EDIT_EVENTS:
            self.addObserver(segmentationNode, getattr(slicer.vtkSegmentation, eventName), self._onSegmentationEdited)

    def _stopWatching(self, segmentationNode) -> None:
        for eventName in self.EDIT_EVENTS:
            self.removeObserver(segmentationNode, getattr(slicer.vtkSegmentation, eventName), self._onSegmentationEdited)

    def stopWatchingEdits(self) -> None:
        """Remove every observer this logic holds (module cleanup, scene close)."""
        self.removeObservers()

    def _onSegmentationEdited(self, segmentationNode, event) -> None:
        segmentationNode.SetAttribute(EDITED_ATTRIBUTE, "true")
        self._stopWatching(segmentationNode)

    @staticmethod
    def madeByKneeSeg(segmentationNode) -> bool:
        """Whether KneeSeg wrote this segmentation (its provenance names a model)."""
        return bool(segmentationNode.GetAttribute(MADE_BY_ATTRIBUTE))

    def isEdited(self, segmentationNode) -> bool:
        """True unless this session watched the segmentation since KneeSeg wrote it and saw no edit.

        A segmentation from a reloaded scene counts as edited: asking once too often is better
        than losing a correction.
        """
        watched = self.hasObserver(segmentationNode, slicer.vtkSegmentation.SourceRepresentationModified, self._onSegmentationEdited)
        return not (watched and segmentationNode.GetAttribute(EDITED_ATTRIBUTE) == "false")

    @staticmethod
    def referenceVolumeOf(segmentationNode):
        """The volume whose grid the segmentation was made on (its reference geometry node)."""
        if segmentationNode is None:
            return None
        return segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())

    @staticmethod
    def uncertainSlicesOf(segmentationNode) -> list[UncertainSlice]:
        """The slices the engine marked as most uncertain for this segmentation (kept on the node)."""
        text = segmentationNode.GetAttribute(UNCERTAIN_SLICES_ATTRIBUTE) if segmentationNode else None
        if not text:
            return []
        return uncertainSlices({"uncertainty": {"most_uncertain_slices": json.loads(text)}})

    @staticmethod
    def jumpToSlice(volumeNode, entry: UncertainSlice) -> None:
        """Move the slice views to the centre of slice ``entry`` of ``volumeNode`` (through its transform)."""
        if entry.positionLps is not None:
            local = [-entry.positionLps[0], -entry.positionLps[1], entry.positionLps[2]]  # LPS -> RAS
        else:
            i, j, k = sliceCentreIJK(tuple(volumeNode.GetImageData().GetDimensions()), entry.axis, entry.index)
            ijkToRas = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASMatrix(ijkToRas)
            local = list(ijkToRas.MultiplyPoint((i, j, k, 1.0))[:3])
        world = [0.0, 0.0, 0.0]
        volumeNode.TransformPointToWorld(local, world)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *world)

    def saveTrainingCase(self, imageVolume, segmentationNode, folder: Path, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``images/<case>.nrrd`` and ``labels/<case>.seg.nrrd`` for ``kneeseg train`` (fine-tuning)."""
        imagePath, labelPath = trainingCasePaths(folder, caseName(imageVolume.GetName()))
        if not overwrite and (imagePath.exists() or labelPath.exists()):
            raise FileExistsError(_("{path} exists; pass overwrite=True to replace it").format(path=labelPath))
        imagePath.parent.mkdir(parents=True, exist_ok=True)
        labelPath.parent.mkdir(parents=True, exist_ok=True)
        self.exportVolume(imageVolume, imagePath)
        if not slicer.util.exportNode(segmentationNode, str(labelPath), {}):
            raise RuntimeError(_("Could not write {path}").format(path=labelPath))
        return imagePath, labelPath

    def surfaceModelsOf(self, segmentationNode) -> list:
        """The surface models KneeSeg made from this segmentation (its node references)."""
        return self.referencedNodes(segmentationNode, MODEL_ROLE)

    def exportSurfacesToStl(self, segmentationNode, folder: Path) -> list[Path]:
        """Write each surface model of this segmentation as ``<name>.stl`` in millimetres (LPS, as Slicer writes STL)."""
        models = self.surfaceModelsOf(segmentationNode)
        if not models:
            raise RuntimeError(_("No surface models for this segmentation: run Apply or Recompute with surfaces on."))
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for model in models:
            path = folder / f"{caseName(model.GetName())}.stl"
            if not slicer.util.exportNode(model, str(path), {}):
                raise RuntimeError(_("Could not write {path}").format(path=path))
            paths.append(path)
        return paths


#
# KneeSegTest
#


class KneeSegTest(ScriptedLoadableModuleTest):
    """Runs the real engine on the bundled samples and checks the numbers that reach the scene.

    The T1rho run needs no segmentation model: a spin-lock series is simulated from the sample
    label map (known T1rho, Rician noise) and `relax --kind t1rho` runs from the sample segmentation.

    The engine runs install PyTorch and MONAI (GBs) and take minutes on a CPU. As in
    SlicerTotalSegmentator's self-test, they are skipped on extension build machines, which
    start Slicer with ``--testing`` (ctest does), unless ``KNEESEG_TEST_ENGINE=1`` is set; the
    checks that need no engine (sample data, input kinds, sequences, 4D refusal) run there too.
    From the module panel (Reload and Test) everything runs.
    """

    ECHO_TIMES_MS = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_InputKindsWithoutEngine()
        if not self.engineRunsEnabled():
            logging.warning(f"KneeSegTest: engine runs skipped on a build machine (set {RUN_ENGINE_TESTS_VARIABLE}=1 to run them)")
            return
        self.setUp()
        self.test_RecomputeTwoScansOfOneStudy()
        self.setUp()
        self.test_SegmentTransformedInputIntoChosenSegmentation()
        self.setUp()
        self.test_MultiEchoSequenceAndRerun()
        self.setUp()
        self.test_RelaxT1rhoMapOfTheSampleKnee()

    @staticmethod
    def engineRunsEnabled() -> bool:
        return not slicer.app.commandOptions().testingEnabled or os.environ.get(RUN_ENGINE_TESTS_VARIABLE) == "1"

    def _logic(self) -> KneeSegLogic:
        logic = KneeSegLogic()
        if logic.missingDependencies():
            self.delayDisplay("Installing KneeSeg's Python dependencies (first run only)")
            logic.installDependencies()
        return logic

    @staticmethod
    def _sample(name: str):
        import SampleData

        registerSampleData()
        return SampleData.downloadSample(name)

    @staticmethod
    def _sequenceFrom(vectorVolume, indexName: str, indexUnit: str, values, multiVolumeTag: str = "") -> tuple:
        """(sequence, browser, proxy): one frame per component of ``vectorVolume``.

        With ``multiVolumeTag`` the sequence is made the way MultiVolumeImporter loads DICOM: an
        empty index of frame numbers, the frames' tag, unit and values in MultiVolume attributes.
        """
        logic = KneeSegLogic()
        array = slicer.util.arrayFromVolume(vectorVolume)
        sequence = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{vectorVolume.GetName()} sequence")
        sequence.SetIndexName("" if multiVolumeTag else indexName)
        sequence.SetIndexUnit("" if multiVolumeTag else indexUnit)
        if multiVolumeTag:
            sequence.SetAttribute("MultiVolume.FrameIdentifyingDICOMTagName", multiVolumeTag)
            sequence.SetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits", indexUnit)
            sequence.SetAttribute("MultiVolume.FrameLabels", ",".join(f"{value:g}" for value in values))
        for index, value in enumerate(values):
            frame = logic.volumeFromArray(array[..., index].copy(), vectorVolume, "frame")
            sequence.SetDataNodeAtValue(frame, str(index) if multiVolumeTag else f"{value:g}")
            logic.removeNodeCompletely(frame)
        browser = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{vectorVolume.GetName()} browser")
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
        return sequence, browser, browser.GetProxyNode(sequence)

    @staticmethod
    def _dice(a, b) -> float:
        return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)

    def test_InputKindsWithoutEngine(self):
        """Multi-echo vector volume, one-echo volume, multi-echo sequence (proxy, browser), 4D time series."""
        import numpy as np

        logic = KneeSegLogic()
        scan = self._sample("KneeMESE")
        self.assertEqual(logic.echoCount(scan), 8)
        self.assertIn("8 echoes", logic.describeInput(scan))
        oneEcho = logic.volumeFromArray(slicer.util.arrayFromVolume(scan)[..., 1].copy(), scan, "one echo")
        self.assertEqual(logic.echoCount(oneEcho), 1)
        self.assertIn("no T2 map", logic.describeInput(oneEcho))

        sequence, browser, proxy = self._sequenceFrom(scan, "EchoTime", "ms", self.ECHO_TIMES_MS)
        self.assertIsNotNone(proxy)
        self.assertEqual(proxy.GetImageData().GetNumberOfScalarComponents(), 1)  # the proxy shows one echo
        self.assertEqual(logic.echoCount(proxy), 8)
        for node in (proxy, browser, sequence):
            inputScan = logic.scanInput(node)
            self.assertEqual(inputScan.node.GetID(), proxy.GetID())  # results go beside what the views show
            self.assertEqual(inputScan.echoes, 8)
            self.assertEqual(inputScan.echoTimesMs, list(self.ECHO_TIMES_MS))
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(inputScan.source), slicer.util.arrayFromVolume(scan)))
            logic.removeNodeCompletely(inputScan.source)

        # As MultiVolumeImporter loads multi-echo DICOM: frame numbers as index, echo times in attributes.
        _imported, _importedBrowser, importedProxy = self._sequenceFrom(scan, "", "ms", self.ECHO_TIMES_MS, "EchoTime")
        imported = logic.scanInput(importedProxy)
        self.assertEqual((imported.echoes, imported.echoTimesMs), (8, list(self.ECHO_TIMES_MS)))
        logic.discardTemporaries(imported)
        _dynamic, _dynamicBrowser, dynamicProxy = self._sequenceFrom(scan, "time", "s", range(8))
        with self.assertRaisesRegex(ValueError, "4D"):
            logic.scanInput(dynamicProxy)
        _trigger, _triggerBrowser, triggerProxy = self._sequenceFrom(scan, "", "ms", range(0, 80, 10), "TriggerTime")
        with self.assertRaisesRegex(ValueError, "4D"):
            logic.describeInput(triggerProxy)
        with self.assertRaisesRegex(ValueError, "4D"):
            logic.describeInput(dynamicProxy)
        # Typed echo times say the unnamed frames are echoes after all.
        self.assertEqual(logic.scanInput(dynamicProxy, "10,20,30,40,50,60,70,80").echoes, 8)
        self.delayDisplay("Input kinds: passed")

    def test_RecomputeTwoScansOfOneStudy(self):
        """Baseline and follow-up in one study: each keeps its models, volumes and STL files; every voxel survives."""
        logic = self._logic()
        baseline = self._sample("KneeLabels")
        self.assertGreaterEqual(baseline.GetSegmentation().GetNumberOfSegments(), 10)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        study = shNode.CreateStudyItem(shNode.GetSceneItemID(), "Knee study")
        followUp = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "KneeLabels follow-up")
        followUp.CreateDefaultDisplayNodes()
        followUp.GetSegmentation().DeepCopy(baseline.GetSegmentation())
        followUp.GetSegmentation().RemoveSegment(followUp.GetSegmentation().GetNthSegmentID(
            followUp.GetSegmentation().GetNumberOfSegments() - 1))
        for node in (baseline, followUp):
            shNode.SetItemParent(shNode.GetItemByDataNode(node), study)
        labels = slicer.util.loadLabelVolume(str(sharedResource("SampleData", "knee_labels.nrrd")), {})
        labelArray = slicer.util.arrayFromVolume(labels)
        spacing = labels.GetSpacing()
        voxelVolume = spacing[0] * spacing[1] * spacing[2]

        outcome = logic.recompute(baseline, RunOptions(), blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        structures = outcome.result.results["surfaces"]["structures"]
        self.assertGreaterEqual(len(structures), 10)
        volumes = outcome.result.results["volumes_mm3"]
        for key, entry in structures.items():
            expected = float((labelArray == entry["label"]).sum()) * voxelVolume
            self.assertAlmostEqual(volumes[key], expected, delta=0.005 * expected, msg=key)
        baselineModels = logic.surfaceModelsOf(baseline)
        self.assertEqual(len(baselineModels), len(structures))
        for model in baselineModels:
            self.assertGreater(model.GetPolyData().GetNumberOfPoints(), 100, model.GetName())
            self.assertIsNone(model.GetStorageNode())  # saved with the scene, not left in the temporary folder
            self.assertTrue(model.GetModifiedSinceRead())
        self.assertFalse(baseline.GetDisplayNode().GetVisibility3D())  # the smoothed models are what 3D shows
        self.assertEqual(outcome.result.volumesTable.GetNumberOfRows(), len(structures))

        outcome = logic.recompute(followUp, RunOptions(), blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        followUpModels = logic.surfaceModelsOf(followUp)
        self.assertEqual(len(outcome.result.results["surfaces"]["structures"]), len(structures) - 1)
        self.assertEqual(len(followUpModels), len(structures) - 1)
        self.assertEqual([m for m in baselineModels if slicer.mrmlScene.IsNodePresent(m)], baselineModels)
        self.assertFalse(set(baselineModels) & set(followUpModels))
        exported = logic.exportSurfacesToStl(followUp, Path(slicer.util.tempDirectory("KneeSegTestStl")))
        self.assertEqual(sorted(p.stem for p in exported), sorted(caseName(m.GetName()) for m in followUpModels))
        self.assertTrue(all(p.stat().st_size > 1000 for p in exported))

        models = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLModelNode")
        tables = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode")
        outcome = logic.recompute(baseline, RunOptions(), blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLModelNode"), models)  # replaced, not added
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode"), tables)
        self.assertEqual(len(logic.surfaceModelsOf(followUp)), len(structures) - 1)
        self.delayDisplay("Recompute of two scans of one study: passed")

    def test_SegmentTransformedInputIntoChosenSegmentation(self):
        """A scan under a transform, written into a segmentation chosen beforehand: same node, exact overlay."""
        import numpy as np

        logic = self._logic()
        scan = self._sample("KneeMESE")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
        matrix = np.eye(4)
        matrix[:3, 3] = (20.0, -15.0, 10.0)
        slicer.util.updateTransformMatrixFromArray(transform, matrix)
        scan.SetAndObserveTransformNodeID(transform.GetID())
        chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
        chosen.CreateDefaultDisplayNodes()

        outcome = logic.segment(scan, RunOptions(), outputSegmentation=chosen, blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        result = outcome.result
        self.assertEqual(result.segmentation.GetID(), chosen.GetID())
        self.assertEqual(chosen.GetTransformNodeID(), transform.GetID())
        for key in ("femur", "tibia", "patella", "femoral_cartilage"):
            self.assertIsNotNone(chosen.GetSegmentation().GetSegment(key), key)
        volumes = result.results["volumes_mm3"]
        # The 160 x 160 x 96 mm field of view holds the distal femur and proximal tibia only.
        self.assertTrue(20e3 < volumes["femur"] < 600e3, volumes["femur"])
        self.assertTrue(10e3 < volumes["tibia"] < 600e3, volumes["tibia"])
        self.assertTrue(1e3 < volumes["femoral_cartilage"] < 40e3, volumes["femoral_cartilage"])

        # The segmentation, resampled onto the moved scan through both transforms, is the engine's
        # label map voxel for voxel (a transform applied twice would shift it by 27 mm).
        engineLabels = slicer.util.arrayFromVolume(
            slicer.util.loadLabelVolume(str(result.outputFolder / "segment" / SEGMENTATION_FILE), {}))
        for key in ("femur", "tibia"):
            value = chosen.GetSegmentation().GetSegment(key).GetLabelValue()
            inScan = slicer.util.arrayFromSegmentBinaryLabelmap(chosen, key, scan) > 0
            self.assertGreater(self._dice(inScan, engineLabels == value), 0.99, key)

        uncertainty = slicer.util.arrayFromVolume(result.uncertainty)
        self.assertGreaterEqual(float(uncertainty.min()), 0.0)
        self.assertLessEqual(float(uncertainty.max()), 1.0)
        display = result.uncertainty.GetScalarVolumeDisplayNode()
        self.assertTrue(display.GetApplyThreshold())
        self.assertAlmostEqual(display.GetLowerThreshold(), UNCERTAINTY_THRESHOLD)
        self.assertEqual(result.uncertainty.GetTransformNodeID(), transform.GetID())

        self.assertIsNotNone(result.t2)
        self.assertEqual(result.t2.GetVoxelValueUnits().GetCodeValue(), "ms")
        t2Display = result.t2.GetScalarVolumeDisplayNode()
        self.assertEqual((t2Display.GetWindowLevelMin(), t2Display.GetWindowLevelMax()), T2_WINDOW_MS)
        self.assertAlmostEqual(t2Display.GetLowerThreshold(), T2_THRESHOLD_MS)
        self.assertIsNotNone(slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(result.t2))
        t2 = slicer.util.arrayFromVolume(result.t2)
        cartilage = slicer.util.arrayFromSegmentBinaryLabelmap(chosen, "femoral_cartilage", result.t2) > 0
        self.assertGreater(int(cartilage.sum()), 100)
        median = float(np.median(t2[cartilage]))
        self.assertTrue(20.0 < median < 80.0, median)  # femoral cartilage T2 at 3 T: about 30-50 ms
        self.assertIsNotNone(result.regionsTable)

        self.assertGreaterEqual(len(result.models), 3)
        self.assertFalse(chosen.GetDisplayNode().GetVisibility3D())
        for node in [result.uncertainty, result.t2, result.volumesTable] + result.models:
            self.assertIsNone(node.GetStorageNode(), node.GetName())
        self.assertTrue(logic.madeByKneeSeg(chosen))
        self.assertTrue(chosen.GetAttribute("KneeSeg.ModelSha256"))
        self.assertGreater(len(logic.uncertainSlicesOf(chosen)), 0)
        self.delayDisplay("Transformed input into a chosen segmentation: passed")

    def test_MultiEchoSequenceAndRerun(self):
        """A multi-echo sequence (as MultiVolumeImporter loads DICOM) gives the vector volume's T2; a fast rerun replaces, not adds."""
        import numpy as np

        logic = self._logic()
        scan = self._sample("KneeMESE")
        echoTimes = logic.echoTimesOf(logic.scanInput(scan))
        self.assertEqual(len(echoTimes), 8)
        _sequence, _browser, proxy = self._sequenceFrom(scan, "", "ms", echoTimes, "EchoTime")  # as DICOM loads
        logic.removeNodeCompletely(scan)

        outcome = logic.segment(proxy, RunOptions(), blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        result = outcome.result
        self.assertIsNotNone(result.t2)
        self.assertEqual(logic.referenceVolumeOf(result.segmentation).GetID(), proxy.GetID())
        t2 = slicer.util.arrayFromVolume(result.t2)
        cartilage = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentation, "femoral_cartilage", result.t2) > 0
        median = float(np.median(t2[cartilage]))
        self.assertTrue(20.0 < median < 80.0, median)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLVectorVolumeNode"), 0)  # stacked copy removed

        counts = {name: slicer.mrmlScene.GetNumberOfNodesByClass(name)
                  for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLModelNode", "vtkMRMLTableNode", "vtkMRMLSegmentationNode")}
        fast = RunOptions(SegmentOptions(fast=True))
        rerun = logic.segment(proxy, fast, outputSegmentation=result.segmentation, blocking=True)
        self.assertTrue(rerun.succeeded, rerun.message)
        self.assertEqual(rerun.result.segmentation.GetID(), result.segmentation.GetID())
        self.assertTrue(json.loads(result.segmentation.GetAttribute("KneeSeg.Parameters"))["engine"]["fast"])
        for name, count in counts.items():
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass(name), count, name)
        self.delayDisplay("Multi-echo sequence and fast rerun: passed")

    def test_RelaxT1rhoMapOfTheSampleKnee(self):
        """`kneeseg relax --kind t1rho` from the module: spin-lock times from 0 ms, partial-volume
        exclusion; the map arrives in ms with its code, window and colour bar, its values right."""
        import numpy as np

        logic = self._logic()
        segmentation = self._sample("KneeLabels")
        labels = slicer.util.loadLabelVolume(str(sharedResource("SampleData", "knee_labels.nrrd")), {})
        labelArray = slicer.util.arrayFromVolume(labels)  # (k, j, i)
        spinLockMs = np.array([0.0, 10.0, 40.0, 80.0])
        cartilage = np.isin(labelArray, [1, 2, 3, 4])  # femoral, tibial, patellar cartilage (the engine's labels)
        truth = np.where(cartilage, 45.0, 80.0)
        clean = np.where(labelArray[..., None] > 0, 1000.0 * np.exp(-spinLockMs / truth[..., None]), 0.0)
        noise = np.random.default_rng(3).normal(0.0, 10.0, clean.shape + (2,))
        signal = np.hypot(clean + noise[..., 0], noise[..., 1]).astype(np.float32)  # Rician magnitude
        series = logic.volumeFromArray(signal, labels, "T1rho series")
        logic.removeNodeCompletely(labels)

        options = RunOptions(SegmentOptions(relaxationKind="t1rho", excludeSurface=True), echoTimes="0,10,40,80")
        outcome = logic.recompute(segmentation, options, t2Volume=series, blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        result = outcome.result
        self.assertIsNotNone(result.t2)
        self.assertTrue(result.t2.GetName().endswith("T1rho"), result.t2.GetName())
        self.assertEqual(result.t2.GetVoxelValueUnits().GetCodeValue(), "ms")
        self.assertEqual(result.t2.GetVoxelValueQuantity().GetCodeValue(), RELAXATION_MAPS["t1rho"][1][0])
        display = result.t2.GetScalarVolumeDisplayNode()
        self.assertEqual((display.GetWindowLevelMin(), display.GetWindowLevelMax()), RELAXATION_MAPS["t1rho"][2])
        self.assertIsNotNone(slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(result.t2))
        self.assertEqual(result.t2.GetTransformNodeID(), series.GetTransformNodeID())
        t1rho = slicer.util.arrayFromVolume(result.t2)
        femoral = labelArray == 1
        self.assertGreater(int(femoral.sum()), 100)
        self.assertAlmostEqual(float(np.median(t1rho[femoral])), 45.0, delta=2.0)
        self.assertAlmostEqual(float(np.median(t1rho[labelArray == 5])), 80.0, delta=4.0)  # femur
        self.assertIsNotNone(result.regionsTable)
        self.assertGreater(result.regionsTable.GetNumberOfRows(), 0)
        relax = readResults(result.outputFolder / "relax")["t1rho"]
        self.assertEqual((relax["quantity"], relax["unit"], relax["times"]), ("T1rho", "ms", "spin-lock times"))
        self.assertEqual(relax["echo_times_ms"], [0.0, 10.0, 40.0, 80.0])
        self.assertTrue(relax["cartilage"]["surface_layer_excluded"])
        self.assertEqual(logic.defaultOverlay(segmentation), "t2")  # the map is what the overlay shows first
        self.delayDisplay("T1rho map through kneeseg relax: passed")
