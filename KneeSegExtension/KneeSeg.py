"""KneeSeg: knee MRI segmentation, uncertainty heatmap, T2 map and surface models in 3D Slicer.

The module is the face of the KneeSeg engine (the ``KneeSegLogic`` package). It writes the input
node(s) to a temporary folder, runs the engine as a child process with Slicer's own Python
(``PythonSlicer -m KneeSegLogic segment|t2|surfaces ...``), turns the engine's JSON progress lines
into a progress bar, can cancel the whole process tree, and loads the engine's output folder into
scene nodes. It computes nothing itself: a crash or an out-of-memory error in PyTorch stays in
the child process, and the GUI stays responsive.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
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

from KneeSegLib.dependencies import missingRequirements, protectionConstraints, readRequirements, splitTorch
from KneeSegLib.engine import (
    DEVICES,
    REGION_VARIANTS,
    SURFACE_SMOOTHING,
    T2_MODELS,
    PlannedCommand,
    SegmentOptions,
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
from KneeSegLib.processtree import killProcessTree
from KneeSegLib.results import (
    REGIONS_TABLE_FILE,
    SEGMENTATION_FILE,
    SURFACES_FOLDER,
    T2_FILE,
    UNCERTAINTY_FILE,
    UncertainSlice,
    caseName,
    provenanceAttributes,
    readResults,
    sliceCentreIJK,
    surfaceFiles,
    trainingCasePaths,
    uncertainSlices,
    writeVolumesTable,
)

# Slicer 5.10 is the first release whose Python (3.12) runs the engine (it needs Python >= 3.10).
MINIMUM_SLICER_VERSION = (5, 10)

SAMPLE_CATEGORY = "KneeSeg"
# Sample name -> (file in Resources/SampleData, SHA256, Slicer file type). The MESE scan loads as a
# multi-echo (vector) volume; the label map loads as a segmentation with one segment per label.
SAMPLES = {
    "KneeMESE": ("mese_t2_knee.nrrd", "23bdc8772595e50f3b01ab516a998cf2dacffe52cc1a26dc1966272a33433c84", "VolumeFile"),
    "KneeLabels": ("knee_labels.nrrd", "d6307205761bd0197545b6f3d265a71fb410948f9c96f8a72e1fc1e14b7ba246", "SegmentationFile"),
}

EDITED_ATTRIBUTE = "KneeSeg.Edited"
OUTPUT_FOLDER_ATTRIBUTE = "KneeSeg.OutputFolder"
RECOMPUTED_FOLDER_ATTRIBUTE = "KneeSeg.RecomputedFolder"
SURFACES_FOLDER_NAME = "KneeSeg surfaces"
T2_WINDOW_MS = (0.0, 100.0)
UNCERTAINTY_OPACITY = 0.5


def slicerVersionAtLeast(major: int, minor: int) -> bool:
    """True when this Slicer is ``major.minor`` or newer."""
    return (slicer.app.majorVersion, slicer.app.minorVersion) >= (major, minor)


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
(uncertainty heatmap), fits a quantitative T2 map with cartilage subregion statistics on
multi-echo scans, and builds smoothed surface models for 3D viewing, printing and planning.
Correct the segmentation in Segment Editor, then recompute surfaces, volumes and T2 statistics,
or save the corrected case for fine-tuning.
""")
        self.parent.acknowledgementText = _("""
KneeSeg brings together methods of KneeXNet-2.5D, multi-planar fusion (Luan et al.), low-field bone
segmentation (Listone et al.) and MESE cartilage T2 mapping (Thomas et al.). The bundled sample is
derived from the MIT-licensed pymskt example data.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the bundled, checksummed samples to the Sample Data module."""
    import SampleData

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

    inputVolume - scan to segment (single- or multi-echo).
    t2Volume - multi-echo series for T2 when it is not the input itself.
    echoTimes - echo times in ms ("" = from the series' header or attributes).
    modelId - model package id ("" = the registry's default). Chosen in modelComboBox, whose items
        come from the engine's registry at run time, so it has no static Choice to bind.
    device - auto / cuda / cpu.
    ensembleMembers - how many ensemble members to run (0 = all in the package).
    closingRadiusMm - morphological closing radius (-1 = as the model package says).
    surfaceSmoothing - smoothing of the surface models.
    t2Model - T2 signal model.
    regionVariant - femoral cartilage subregion recipe ("default": the engine's).
    outputSegmentation - segmentation to write into (none = a new one).
    showUncertainty, computeT2, computeSurfaces - which outputs to produce.
    trainingFolder - where corrected cases are saved for fine-tuning.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    echoTimes: str = ""
    modelId: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    ensembleMembers: Annotated[int, WithinRange(0, 16)] = 0
    closingRadiusMm: Annotated[float, WithinRange(-1.0, 20.0)] = -1.0
    surfaceSmoothing: Annotated[str, Choice(list(SURFACE_SMOOTHING))] = "windowed-sinc"
    t2Model: Annotated[str, Choice(list(T2_MODELS))] = "ncexp"
    regionVariant: Annotated[str, Choice(list(REGION_VARIANTS))] = "default"
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
    Blocking (self-test, scripts): lines are read in a loop. Either way ``onProgress(fraction,
    text)`` and ``onLog(line)`` are called on the main thread, and ``onFinished(RunOutcome)`` once.
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
            slicer.app.processEvents()
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
        """Read ``process``'s output on a thread; hand it to the main thread from a timer."""
        lines: queue.Queue = queue.Queue()

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

        def drain() -> None:
            while True:
                try:
                    kind, value = lines.get_nowait()
                except queue.Empty:
                    return
                if kind == "line":
                    self._onLine(value)
                else:
                    self._timer.stop()
                    self._onStepCompleted(value)
                    return

        threading.Thread(target=read, daemon=True).start()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", drain)
        self._timer.start()

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
# Results in the scene
#


@dataclass
class SceneResult:
    """The nodes one run put into the scene (absent outputs are None / empty)."""

    outputFolder: Path
    results: dict
    segmentation: object = None
    uncertainty: object = None
    t2: object = None
    models: list = field(default_factory=list)
    surfacesFolderItem: int = 0
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
            surfaces=parameters.computeSurfaces,
            surfaceSmoothing=parameters.surfaceSmoothing,
            t2=parameters.computeT2,
            t2Model=parameters.t2Model,
            regionVariant=parameters.regionVariant,
        )
        return RunOptions(engine, parameters.echoTimes, parameters.showUncertainty)

    def asParameters(self) -> dict:
        """The choices as plain values, recorded with the results (provenance)."""
        return asdict(self)


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
        self._modelsQuery: EngineRunner | None = None
        self._models: list[dict] = []
        self._dependenciesChecked = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KneeSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KneeSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecompute)
        self.ui.uncertainSlicesButton.connect("clicked(bool)", self.onListUncertainSlices)
        self.ui.uncertainSlicesListWidget.connect("currentRowChanged(int)", self.onUncertainSliceSelected)
        self.ui.saveTrainingCaseButton.connect("clicked(bool)", self.onSaveTrainingCase)
        self.ui.exportStlButton.connect("clicked(bool)", self.onExportStl)
        self._uncertainSlices: list[UncertainSlice] = []

        self.initializeParameterNode()
        with slicer.util.tryWithErrorDisplay(_("KneeSeg could not query its engine.")):
            self.refreshModels()
            self.refreshDevice()

    def cleanup(self) -> None:
        for runner in (self.runner, self._probe, self._modelsQuery):
            if runner is not None and runner.running:
                runner.cancel()
        self.removeObservers()

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
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        running = self.runner is not None and self.runner.running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or bool(parameters and parameters.inputVolume)
        self.ui.applyButton.toolTip = _("Stop the engine and everything it started") if running else (
            _("Segment the input volume") if parameters and parameters.inputVolume else _("Select an input volume"))
        hasSegmentation = bool(parameters and parameters.outputSegmentation)
        for button in (self.ui.recomputeButton, self.ui.uncertainSlicesButton, self.ui.saveTrainingCaseButton,
                       self.ui.exportStlButton):
            button.enabled = hasSegmentation and not running
        self.ui.importModelButton.enabled = not running

    # -- registry and device

    def refreshModels(self) -> None:
        """Fill the model list from ``kneeseg models --json`` (child process, GUI stays live)."""
        self.ui.modelInfoLabel.text = _("Looking for model packages...")

        def finished(outcome: RunOutcome) -> None:
            if not outcome.succeeded:
                self.ui.modelInfoLabel.text = _("Model registry not available: {message}").format(message=outcome.message)
                return
            self._models = KneeSegLogic.modelsFromOutput(outcome.steps[0].lines)
            self._fillModelComboBox()

        self._modelsQuery = self.logic.startModelsCommand(onFinished=finished)

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

    def _showModelInfo(self, modelId: str) -> None:
        packages = [p for p in self._models if p.get("id") == modelId] or [p for p in self._models if p.get("default")]
        if not packages:
            if not self._models:
                self.ui.modelInfoLabel.text = _("No model package found yet; import one (zip or folder).")
            return
        package = packages[0]
        members = package.get("members") or []
        self.ui.modelInfoLabel.text = _("{id} {version} - licence: {license} - {count} ensemble member(s). {description}").format(
            id=package.get("id"), version=package.get("version"), license=package.get("license") or _("not stated"),
            count=len(members), description=package.get("description") or "")
        self.ui.ensembleMembersSpinBox.maximum = max(len(members), 1)

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a KneeSeg model package"), "",
                                              _("Model package (*.zip model.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not import the model package."), waitCursor=True):
            packageFile = Path(path)
            source = packageFile.parent if packageFile.name == "model.json" else packageFile
            self._models = self.logic.importModelPackage(source)
            self._fillModelComboBox()

    def refreshDevice(self) -> None:
        """Show what PyTorch sees (GPU name and memory) from a child process."""
        self.ui.deviceInfoLabel.text = _("Detecting PyTorch and GPU...")

        def finished(outcome: RunOutcome) -> None:
            probe = KneeSegLogic.lastJsonObject(outcome.steps[0].lines) if outcome.steps else None
            self.ui.deviceInfoLabel.text = describeDevice(probe)

        self._probe = self.logic.startDeviceProbe(onFinished=finished)

    # -- run

    def onApplyButton(self) -> None:
        if self.runner is not None and self.runner.running:
            self.appendLog(_("Cancelling..."))
            self.runner.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("KneeSeg could not start."), waitCursor=True):
            if not self.ensureDependencies():
                return
            parameters = self._parameterNode
            replace = parameters.outputSegmentation
            if replace is not None and self.logic.isEdited(replace):
                overwrite = slicer.util.confirmYesNoDisplay(
                    _("The segmentation '{name}' has been edited. Replace it with the new result?\n\n"
                      "Yes: replace it. No: keep it and put the new result in a new segmentation.").format(name=replace.GetName()),
                    windowTitle=_("KneeSeg: edited segmentation"))
                if not overwrite:
                    replace = None
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self.runner = self.logic.segment(
                parameters.inputVolume, RunOptions.fromParameterNode(parameters), t2Volume=parameters.t2Volume,
                replaceSegmentation=replace, onProgress=self.onProgress, onLog=self.appendLog,
                onFinished=self.onRunFinished)
            self._updateButtons()

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
        warnings = (result.results.get("warnings") if result else None) or []
        for warning in warnings:
            self.appendLog(_("warning: {warning}").format(warning=warning))
        self.ui.statusLabel.text = _("Done.") + (_(" {count} warning(s): see the log.").format(count=len(warnings)) if warnings else "")
        self._uncertainSlices = []
        self.ui.uncertainSlicesListWidget.clear()
        self._updateButtons()

    # -- review and correction

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
# KneeSegLogic
#


class KneeSegLogic(ScriptedLoadableModuleLogic, VTKObservationMixin):
    """Runs the engine and puts its outputs into the scene; usable without the widget.

    Example (Slicer's Python console)::

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

    def startModelsCommand(self, onFinished: Callable[[RunOutcome], None]) -> EngineRunner:
        runner = self.runner([EngineStep("models", modelsCommand(self.pythonExecutable()))], onFinished=onFinished,
                             onLog=logging.debug)
        runner.start()
        return runner

    def listModelPackages(self) -> list[dict]:
        """Model packages the engine's registry finds (id, version, licence, members...)."""
        outcome = self.runner([EngineStep("models", modelsCommand(self.pythonExecutable()))]).start(blocking=True)
        if not outcome.succeeded:
            raise RuntimeError(outcome.message)
        return self.modelsFromOutput(outcome.steps[0].lines)

    def importModelPackage(self, source: Path) -> list[dict]:
        """Copy a package folder or zip into the engine's user cache (offline sites); returns the new listing."""
        outcome = self.runner([EngineStep("models", modelsCommand(self.pythonExecutable(), source))]).start(blocking=True)
        if not outcome.succeeded:
            raise RuntimeError(outcome.message)
        return self.modelsFromOutput(outcome.steps[0].lines)

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

        pip runs under constraints pinning Slicer's numpy, SimpleITK, VTK, requests and torch, so
        it fails with a message rather than replace them.
        """
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
    def echoCount(volumeNode) -> int:
        imageData = volumeNode.GetImageData() if volumeNode else None
        return imageData.GetNumberOfScalarComponents() if imageData else 0

    def t2SeriesFor(self, inputVolume, t2Volume):
        """The multi-echo series T2 is fitted on: the chosen one, else the input when it has echoes."""
        if t2Volume is not None:
            return t2Volume
        return inputVolume if self.echoCount(inputVolume) > 1 else None

    def echoTimesOf(self, volumeNode, text: str = "") -> list[float] | None:
        """Echo times (ms) of a multi-echo node: typed by the user, else from the node, else its file.

        ``None`` when the node has one echo. Multi-volumes keep them in ``MultiVolume.FrameLabels``;
        a node read from an unmodified file gets them from the engine's own reader (``info``).
        """
        count = self.echoCount(volumeNode)
        if count <= 1:
            return None
        times = parseEchoTimes(text) if text.strip() else []
        if not times and volumeNode.GetAttribute("MultiVolume.FrameLabels"):
            times = parseEchoTimes(volumeNode.GetAttribute("MultiVolume.FrameLabels"))
        storage = volumeNode.GetStorageNode()
        if not times and storage is not None and storage.GetFileName() and Path(storage.GetFileName()).is_file():
            outcome = self.runner([EngineStep("info", infoCommand(self.pythonExecutable(), storage.GetFileName()))]).start(blocking=True)
            info = self.lastJsonObject(outcome.steps[0].lines) if outcome.succeeded else None
            times = list((info or {}).get("echo_times_ms") or [])
        if not times:
            raise ValueError(_("The echo times of '{name}' are not known: type them in milliseconds, e.g. 10,20,30.").format(name=volumeNode.GetName()))
        if len(times) != count:
            raise ValueError(_("'{name}' has {count} echoes but {given} echo times were given.").format(
                name=volumeNode.GetName(), count=count, given=len(times)))
        return times

    @staticmethod
    def workFolder() -> Path:
        """A new, short temporary folder for one run (long paths break tools on Windows)."""
        return Path(slicer.util.tempDirectory("KneeSeg"))

    @staticmethod
    def exportVolume(volumeNode, path: Path) -> Path:
        """Write a volume node as the engine reads it (NRRD, LPS); the node's own storage is untouched."""
        if not slicer.util.exportNode(volumeNode, str(path)):
            raise RuntimeError(_("Could not write '{name}' to {path}").format(name=volumeNode.GetName(), path=path))
        return path

    # -- runs

    def segment(self, inputVolume, options: RunOptions | None = None, t2Volume=None, replaceSegmentation=None,
                onProgress=None, onLog=None, onFinished=None, blocking: bool = False):
        """Segment ``inputVolume``; with T2 when a multi-echo series is there; load the outputs.

        Returns the :class:`EngineRunner` (``blocking=False``) or the :class:`RunOutcome`.
        ``replaceSegmentation`` is removed and replaced by the new result only when the run
        succeeds; the caller asks the user first when it was edited.
        """
        if inputVolume is None:
            raise ValueError(_("Select an input volume."))
        options = options or RunOptions()
        work = self.workFolder()
        inputPath = self.exportVolume(inputVolume, work / "input.nrrd")
        t2Series = self.t2SeriesFor(inputVolume, t2Volume) if options.engine.t2 else None
        t2Input = None
        if t2Series is not None:
            t2Input = inputPath if t2Series is inputVolume else self.exportVolume(t2Series, work / "t2input.nrrd")
        plan = planSegmentRun(self.pythonExecutable(), work, inputPath, self.echoTimesOf(inputVolume, options.echoTimes),
                              t2Input, self.echoTimesOf(t2Series, options.echoTimes) if t2Series is not None else None,
                              options.engine)

        def loadOutputs(outcome: RunOutcome) -> SceneResult:
            result = self.loadOutputs(inputVolume, work, options, replaceSegmentation=replaceSegmentation, t2Series=t2Series)
            for copy in {inputPath, t2Input} - {None}:
                copy.unlink(missing_ok=True)  # copies of the scans; the outputs stay with the scene
            return result

        return self._run(plan, loadOutputs, onProgress, onLog, onFinished, blocking)

    def recompute(self, segmentationNode, options: RunOptions | None = None, t2Volume=None,
                  onProgress=None, onLog=None, onFinished=None, blocking: bool = False):
        """Surfaces, volumes and T2 region statistics again, from the (edited) segmentation in the scene."""
        if segmentationNode is None:
            raise ValueError(_("Select the segmentation to recompute from."))
        options = options or RunOptions()
        work = self.workFolder()
        segmentationPath = work / "edited.seg.nrrd"
        if not slicer.util.exportNode(segmentationNode, str(segmentationPath)):
            raise RuntimeError(_("Could not write the segmentation to {path}").format(path=segmentationPath))
        t2Input = self.exportVolume(t2Volume, work / "t2input.nrrd") if t2Volume is not None and options.engine.t2 else None
        plan = planRecompute(self.pythonExecutable(), work, segmentationPath, t2Input,
                             self.echoTimesOf(t2Volume, options.echoTimes) if t2Input is not None else None, options.engine)

        def loadOutputs(outcome: RunOutcome) -> SceneResult:
            return self.loadRecomputed(segmentationNode, work, options, t2Series=t2Volume if t2Input is not None else None)

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

    def loadOutputs(self, inputVolume, work: Path, options: RunOptions, replaceSegmentation=None, t2Series=None) -> SceneResult:
        """Nodes from a run's output folders (``segment``, then ``surfaces`` / ``t2`` when they ran)."""
        segmentFolder = work / "segment"
        results = readResults(segmentFolder)
        parameters = options.asParameters()
        result = SceneResult(work, results)
        result.segmentation = self.loadSegmentation(segmentFolder / SEGMENTATION_FILE, inputVolume, results, parameters)
        if replaceSegmentation is not None and replaceSegmentation is not result.segmentation:
            slicer.mrmlScene.RemoveNode(replaceSegmentation)
        result.segmentation.SetAttribute(OUTPUT_FOLDER_ATTRIBUTE, str(work))
        if options.showUncertainty and (segmentFolder / UNCERTAINTY_FILE).is_file():
            result.uncertainty = self.loadUncertainty(segmentFolder / UNCERTAINTY_FILE, inputVolume, results, parameters)
        if options.engine.surfaces:
            surfacesFolder = self.firstFolderWith(SURFACES_FOLDER, work / "surfaces", segmentFolder)
            if surfacesFolder is not None:
                self.loadSurfaces(result, surfacesFolder, readResults(surfacesFolder), inputVolume, parameters)
        if t2Series is not None:
            self.loadT2Outputs(result, self.firstFolderWith(T2_FILE, work / "t2", segmentFolder), t2Series, parameters)
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
        self.loadSurfaces(result, surfacesFolder, results, reference, parameters)
        result.volumesTable = self.loadVolumesTable(segmentationNode, results, work, reference)
        if t2Series is not None:
            self.loadT2Outputs(result, self.firstFolderWith(T2_FILE, work / "t2"), t2Series, parameters)
        segmentationNode.SetAttribute(RECOMPUTED_FOLDER_ATTRIBUTE, str(work))
        return result

    def loadT2Outputs(self, result: SceneResult, folder: Path | None, t2Series, parameters: dict) -> None:
        """The T2 map and the per-region T2 table of an output folder."""
        if folder is None:
            return
        t2Results = readResults(folder)
        result.t2 = self.loadT2Map(folder / T2_FILE, t2Series, t2Results, parameters)
        if (folder / REGIONS_TABLE_FILE).is_file():
            result.regionsTable = self.loadTable(folder / REGIONS_TABLE_FILE, f"{t2Series.GetName()} T2 per region", t2Series)

    @staticmethod
    def placeBeside(node, inputNode) -> None:
        """Put ``node`` under the input's subject-hierarchy parent and under its transform."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        shNode.SetItemParent(shNode.GetItemByDataNode(node), shNode.GetItemParent(shNode.GetItemByDataNode(inputNode)))
        if inputNode.GetTransformNodeID():
            node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())

    @staticmethod
    def setAttributes(node, attributes: dict[str, str]) -> None:
        for name, value in attributes.items():
            node.SetAttribute(name, value)

    def loadSegmentation(self, path: Path, inputVolume, results: dict, parameters: dict):
        """The engine's ``.seg.nrrd`` (names, colours and terminology come with it) as an editable segmentation."""
        segmentation = slicer.util.loadSegmentation(str(path))
        if segmentation is None:
            raise RuntimeError(_("Slicer could not read {path}").format(path=path))
        segmentation.SetName(slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} KneeSeg segmentation"))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
        self.placeBeside(segmentation, inputVolume)
        self.setAttributes(segmentation, provenanceAttributes(results, parameters))
        segmentation.CreateClosedSurfaceRepresentation()
        return segmentation

    def loadScalarMap(self, path: Path, name: str, besideVolume, units: tuple[str, str, str], colorNodeID: str,
                      window: tuple[float, float], results: dict, parameters: dict):
        """A quantitative map: coded units (UCUM), a colour map, a fixed window, placed beside its scan."""
        volume = slicer.util.loadVolume(str(path), {"name": name, "show": False})
        unitsEntry = slicer.vtkCodedEntry()
        unitsEntry.SetValueSchemeMeaning(*units)
        volume.SetVoxelValueUnits(unitsEntry)
        display = volume.GetScalarVolumeDisplayNode()
        display.SetAndObserveColorNodeID(colorNodeID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(*window)
        self.placeBeside(volume, besideVolume)
        self.setAttributes(volume, provenanceAttributes(results, parameters))
        return volume

    def loadUncertainty(self, path: Path, inputVolume, results: dict, parameters: dict):
        """Normalised entropy (0-1) with the Inferno colour map, fixed 0-1 window, over the input."""
        volume = self.loadScalarMap(path, f"{inputVolume.GetName()} uncertainty", inputVolume, ("1", "UCUM", "no units"),
                                    "vtkMRMLColorTableNodeFileInferno.txt", (0.0, 1.0), results, parameters)
        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=volume, foregroundOpacity=UNCERTAINTY_OPACITY)
        return volume

    def loadT2Map(self, path: Path, seriesVolume, results: dict, parameters: dict):
        """T2 in ms with a colour map, fixed 0-100 ms window, quantity and units coded (DICOM / UCUM)."""
        volume = self.loadScalarMap(path, f"{seriesVolume.GetName()} T2", seriesVolume, ("ms", "UCUM", "millisecond"),
                                    "vtkMRMLColorTableNodeFileViridis.txt", T2_WINDOW_MS, results, parameters)
        quantity = slicer.vtkCodedEntry()
        quantity.SetValueSchemeMeaning("113065", "DCM", "T2")
        volume.SetVoxelValueQuantity(quantity)
        return volume

    def loadSurfaces(self, result: SceneResult, folder: Path, results: dict, inputNode, parameters: dict) -> None:
        """Surface models (LPS, mm) into one subject-hierarchy folder, coloured like their segments."""
        files = surfaceFiles(folder, results)
        if not files:
            return
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(inputNode))
        previous = shNode.GetItemChildWithName(parent, SURFACES_FOLDER_NAME)
        if previous:
            shNode.RemoveItem(previous)  # models derived from an older segmentation, never edited by hand
        result.surfacesFolderItem = shNode.CreateFolderItem(parent, SURFACES_FOLDER_NAME)
        segmentation = result.segmentation.GetSegmentation() if result.segmentation else None
        attributes = provenanceAttributes(results, parameters)
        for key, path in files.items():
            model = slicer.util.loadModel(str(path))
            segment = segmentation.GetSegment(key) if segmentation else None
            model.SetName(segment.GetName() if segment else key)
            if segment is not None:
                model.GetDisplayNode().SetColor(*segment.GetColor())
            shNode.SetItemParent(shNode.GetItemByDataNode(model), result.surfacesFolderItem)
            if inputNode.GetTransformNodeID():
                model.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
            self.setAttributes(model, attributes)
            result.models.append(model)
        shNode.SetItemExpanded(result.surfacesFolderItem, False)

    def loadTable(self, path: Path, name: str, inputNode):
        table = slicer.util.loadTable(str(path))
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
        if path is None:
            return None
        return self.loadTable(path, f"{segmentationNode.GetName()} volumes", inputNode)

    # -- correction and planning

    EDIT_EVENTS = ("SourceRepresentationModified", "SegmentAdded", "SegmentRemoved")

    def watchForEdits(self, segmentationNode) -> None:
        """Mark the segmentation edited at its first change (Segment Editor), so no rerun overwrites it silently."""
        segmentationNode.SetAttribute(EDITED_ATTRIBUTE, "false")
        for eventName in self.EDIT_EVENTS:
            self.addObserver(segmentationNode, getattr(slicer.vtkSegmentation, eventName), self._onSegmentationEdited)

    def _onSegmentationEdited(self, segmentationNode, event) -> None:
        segmentationNode.SetAttribute(EDITED_ATTRIBUTE, "true")
        for eventName in self.EDIT_EVENTS:
            self.removeObserver(segmentationNode, getattr(slicer.vtkSegmentation, eventName), self._onSegmentationEdited)

    def isEdited(self, segmentationNode) -> bool:
        """True unless this session watched the segmentation since KneeSeg wrote it and saw no edit.

        A segmentation from elsewhere, or from a reloaded scene, counts as edited: asking once too
        often is better than losing a correction.
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
        """The slices the engine marked as most uncertain for this segmentation (from its results.json)."""
        folder = segmentationNode.GetAttribute(OUTPUT_FOLDER_ATTRIBUTE) if segmentationNode else None
        if not folder:
            return []
        return uncertainSlices(readResults(Path(folder) / "segment"))

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
        if not slicer.util.exportNode(segmentationNode, str(labelPath)):
            raise RuntimeError(_("Could not write {path}").format(path=labelPath))
        return imagePath, labelPath

    @staticmethod
    def surfaceModelsOf(segmentationNode) -> list:
        """Model nodes in the surfaces folder beside the segmentation."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(segmentationNode))
        folder = shNode.GetItemChildWithName(parent, SURFACES_FOLDER_NAME)
        if not folder:
            return []
        collection = vtk.vtkCollection()
        shNode.GetDataNodesInBranch(folder, collection, "vtkMRMLModelNode")
        return [collection.GetItemAsObject(index) for index in range(collection.GetNumberOfItems())]

    def exportSurfacesToStl(self, segmentationNode, folder: Path) -> list[Path]:
        """Write each surface model as ``<name>.stl`` in millimetres (LPS, as Slicer writes STL)."""
        models = self.surfaceModelsOf(segmentationNode)
        if not models:
            raise RuntimeError(_("No surface models beside this segmentation: run Apply or Recompute with surfaces on."))
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for model in models:
            path = folder / f"{caseName(model.GetName())}.stl"
            if not slicer.util.exportNode(model, str(path)):
                raise RuntimeError(_("Could not write {path}").format(path=path))
            paths.append(path)
        return paths


#
# KneeSegTest
#


class KneeSegTest(ScriptedLoadableModuleTest):
    """Runs the real engine on the bundled samples and checks the numbers that reach the scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RecomputeFromLabelMap()
        self.setUp()
        self.test_SegmentAndT2OnSample()

    def _logic(self) -> KneeSegLogic:
        logic = KneeSegLogic()
        if logic.missingDependencies():
            self.delayDisplay("Installing KneeSeg's Python dependencies (first run only)")
            logic.installDependencies()
        return logic

    def test_RecomputeFromLabelMap(self):
        """Surfaces and volumes from a segmentation in the scene: every voxel survives the export."""
        import SampleData

        registerSampleData()
        segmentation = SampleData.downloadSample("KneeLabels")
        self.assertIsNotNone(segmentation)
        self.assertGreaterEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 10)
        labels = slicer.util.loadLabelVolume(str(sharedResource("SampleData", "knee_labels.nrrd")))
        labelArray = slicer.util.arrayFromVolume(labels)
        spacing = labels.GetSpacing()
        voxelVolume = spacing[0] * spacing[1] * spacing[2]

        outcome = self._logic().recompute(segmentation, RunOptions(), blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        structures = outcome.result.results["surfaces"]["structures"]
        self.assertGreaterEqual(len(structures), 10)
        volumes = outcome.result.results["volumes_mm3"]
        for key, entry in structures.items():
            expected = float((labelArray == entry["label"]).sum()) * voxelVolume
            self.assertAlmostEqual(volumes[key], expected, delta=0.005 * expected, msg=key)
        self.assertEqual(len(outcome.result.models), len(structures))
        for model in outcome.result.models:
            self.assertGreater(model.GetPolyData().GetNumberOfPoints(), 100, model.GetName())
        self.assertEqual(outcome.result.volumesTable.GetNumberOfRows(), len(structures))
        self.delayDisplay("Recompute from a label map: passed")

    def test_SegmentAndT2OnSample(self):
        """Segmentation, uncertainty, T2 and surfaces of the bundled MESE scan, in plausible ranges."""
        import numpy as np
        import SampleData

        registerSampleData()
        scan = SampleData.downloadSample("KneeMESE")
        self.assertEqual(KneeSegLogic.echoCount(scan), 8)

        outcome = self._logic().segment(scan, RunOptions(), blocking=True)
        self.assertTrue(outcome.succeeded, outcome.message)
        result = outcome.result

        segmentation = result.segmentation.GetSegmentation()
        for key in ("femur", "tibia", "patella", "femoral_cartilage"):
            self.assertIsNotNone(segmentation.GetSegment(key), key)
        volumes = result.results["volumes_mm3"]
        # The 160 x 160 x 96 mm field of view holds the distal femur and proximal tibia only.
        self.assertTrue(20e3 < volumes["femur"] < 600e3, volumes["femur"])
        self.assertTrue(10e3 < volumes["tibia"] < 600e3, volumes["tibia"])
        self.assertTrue(1e3 < volumes["femoral_cartilage"] < 40e3, volumes["femoral_cartilage"])

        uncertainty = slicer.util.arrayFromVolume(result.uncertainty)
        self.assertGreaterEqual(float(uncertainty.min()), 0.0)
        self.assertLessEqual(float(uncertainty.max()), 1.0)

        self.assertIsNotNone(result.t2)
        self.assertEqual(result.t2.GetVoxelValueUnits().GetCodeValue(), "ms")
        t2 = slicer.util.arrayFromVolume(result.t2)
        cartilage = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentation, "femoral_cartilage", result.t2) > 0
        self.assertGreater(int(cartilage.sum()), 100)
        median = float(np.median(t2[cartilage]))
        self.assertTrue(20.0 < median < 80.0, median)  # femoral cartilage T2 at 3 T: about 30-50 ms
        self.assertIsNotNone(result.regionsTable)

        self.assertGreaterEqual(len(result.models), 3)
        for model in result.models:
            self.assertGreater(model.GetPolyData().GetNumberOfPoints(), 100, model.GetName())
        self.assertTrue(result.segmentation.GetAttribute("KneeSeg.ModelId"))
        self.assertTrue(result.segmentation.GetAttribute("KneeSeg.ModelSha256"))
        self.delayDisplay("Segmentation, uncertainty, T2 and surfaces of the sample: passed")
