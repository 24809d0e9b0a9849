"""Checks of the Slicer module that run without Slicer (Slicer cannot be installed here).

- Every ``slicer.*`` attribute chain ``KneeSeg.py`` uses (``slicer.util``, ``slicer.mrmlScene``,
  ``slicer.vtk*`` classes, ``slicer.app``, ``slicer.modules``), every ``SampleData`` call, every
  scripted-module base method and every MRML / segmentation method exists in Slicer 5.8.1, the
  oldest release the module supports, as listed from Slicer's source in
  ``../shared/slicer-api/v5.8.1/`` (skipped when absent). Names found only in the 5.10.0 lists or
  the 5.13 development snapshot (the folder's top level) sit under a version or ``hasattr`` check.
- The module's files are valid Python 3.9 (Slicer 5.8's Python); nothing evaluates ``X | Y`` at run time.
- Every widget the code uses exists in the ``.ui``; every parameter-node field is bound to a widget
  of a matching kind; folder pickers do not filter for executables.
- The module reaches the engine only through its command line and output folder.
- The CMake lists name every file the module and the engine need (an engine file added without
  being listed fails here), and an install tree built from those lists runs the engine.
- ``KneeSeg.json`` and the root CMake lists pass what the Extensions Index checker
  (``scripts/check_description_files.py`` in Slicer/ExtensionsIndex) checks; sample checksums match.
- The module's Slicer-free helpers (``KneeSegLib``) work against the real engine: its command-line
  parser, its output folders, its progress and error lines, model packages, and real process trees.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "KneeSegExtension"
MODULE_FILE = MODULE_DIR / "KneeSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "KneeSeg.ui"
SLICER_API = REPO.parent / "shared" / "slicer-api"

sys.path.insert(0, str(MODULE_DIR))
from KneeSegLib import (  # noqa: E402
    compatibility,
    dependencies,
    engine,
    inputs,
    packages,
    processtree,
    results,
)

TREE = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
MINIMUM = compatibility.MINIMUM_SLICER_VERSION

# Lists per release, oldest first. The top level is a 5.13 development snapshot (SOURCE.txt).
API_FOLDERS = {(5, 8): SLICER_API / "v5.8.1", (5, 10): SLICER_API / "v5.10.0", (5, 13): SLICER_API}
# First release of names the lists cannot date more precisely than "after 5.10" (SOURCE.txt,
# "SLICER VERSION DIFFERENCES", and Slicer's SampleData.py at v5.12.0); other snapshot-only names count as 5.13.
FIRST_RELEASE = {"executePythonModule": (5, 12), "registerCustomSampleDataCategory": (5, 12)}

# Names a release's list misses although its header declares them (the list's parser skips
# "vtkGetVector3Macro (Spacing, double)" with a space before the parenthesis), read at that tag.
LIST_GAPS = {(5, 8): {"vtkMRMLVolumeNode": {"GetSpacing"}}}  # Libs/MRML/Core/vtkMRMLVolumeNode.h:118 at v5.8.1

# Slicer API the module uses that the shared lists do not cover (classes outside them), each read
# from Slicer's source at tag v5.8.1 (file named) or from Qt / VTK. Member names per class.
EXTRA_API = {
    "vtkMRMLSliceNode": {"JumpAllSlices"},  # Libs/MRML/Core/vtkMRMLSliceNode.h (static)
    "vtkCodedEntry": {"SetValueSchemeMeaning", "GetCodeValue"},  # Libs/MRML/Core/vtkCodedEntry.h
    "vtkMRMLTableNode": {"GetNumberOfRows"},  # Libs/MRML/Core/vtkMRMLTableNode.h
    "vtkMRMLStorageNode": {"GetFileName"},  # Libs/MRML/Core/vtkMRMLStorageNode.h
    # Modules/Loadable/Colors/Logic/vtkSlicerColorLogic.h (static)
    "vtkSlicerColorLogic": {"AddDefaultColorLegendDisplayNode", "GetColorLegendDisplayNode"},
    # Modules/Loadable/Sequences/Logic/vtkSlicerSequencesLogic.h (slicer.modules.sequences.logic())
    "vtkSlicerSequencesLogic": {"UpdateProxyNodesFromSequences"},
    "vtkMRMLLinearTransformNode": set(),  # Libs/MRML/Core/vtkMRMLLinearTransformNode.h (created by class name)
    "VTK: vtkImageData, vtkMatrix4x4, vtkCollection, vtkPolyData": {
        "GetDimensions", "GetNumberOfScalarComponents", "MultiplyPoint", "GetNumberOfPoints"},
}
# Event ids (enums, not methods, so not in the lists), from the headers at v5.8.1.
EVENTS = {
    "vtkSegmentation": {"SourceRepresentationModified", "SegmentAdded", "SegmentRemoved"},  # Libs/vtkSegmentationCore/vtkSegmentation.h
    "vtkMRMLScene": {"StartCloseEvent", "EndCloseEvent"},  # Libs/MRML/Core/vtkMRMLScene.h
}
# slicer.app (qSlicerApplication, Base/QTGUI/qSlicerApplication.h and Base/QTCore/qSlicerCoreApplication.h
# at v5.8.1: Q_PROPERTY majorVersion/minorVersion, Q_INVOKABLE commandOptions; connect from QObject).
APP_MEMBERS = {"majorVersion", "minorVersion", "commandOptions", "connect"}
# slicer.modules.<name>: core modules of Slicer 5.8.1 the module uses (Modules/Loadable/Sequences).
MODULES_USED = {"sequences"}
# Python submodules of slicer (Base/Python/slicer/ at v5.8.1); slicer.packaging is newer (5.12).
SLICER_SUBMODULES = {"util", "i18n", "parameterNodeWrapper", "ScriptedLoadableModule"}
SUBMODULE_MEMBERS = {  # read from those files at v5.8.1
    "i18n": {"tr", "translate"},
    "parameterNodeWrapper": {"Choice", "WithinRange", "parameterNodeWrapper"},
}
# Module-level functions of Modules/Scripted/SampleData/SampleData.py at v5.8.1 (the lists hold the Logic's).
SAMPLEDATA_FUNCTIONS = {"downloadSample", "downloadSamples", "downloadFromURL"}

NEWER_UTIL_KEYWORDS = {
    "launchConsoleProcess": ({"blocking", "logCallback", "completedCallback"}, (5, 12)),
    "logProcessOutput": ({"logCallback"}, (5, 12)),
}
PACKAGING_VERSION = (5, 12)
# slicer.util functions with a mutable default ``properties={}`` that they write into (util.py at v5.8.1).
PROPERTIES_FUNCTIONS = {"exportNode": 2, "loadSegmentation": 1, "loadVolume": 1, "loadLabelVolume": 1,
                        "loadNodeFromFile": 2, "loadNodesFromFile": 2}
# Class names are constructors, not methods.
CONSTRUCTOR_PREFIXES = ("vtk", "Q", "ctk", "qMRML", "qSlicer")


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


PARENTS = _parents(TREE)


def _module_constant(name: str):
    for node in TREE.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not defined at module level of {MODULE_FILE.name}")


def _guards(node: ast.AST) -> tuple[tuple[int, int], set[str]]:
    """(highest ``slicerVersionAtLeast(a, b)``, names tested with ``hasattr(X, "name")``) guarding ``node``.

    A guard counts only for code in the ``if``'s body (not its ``else``).
    """
    best, names = MINIMUM, set()
    child, parent = node, PARENTS.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and child in parent.body:
            for call in ast.walk(parent.test):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                    continue
                if call.func.id == "slicerVersionAtLeast":
                    best = max(best, tuple(ast.literal_eval(arg) for arg in call.args))
                elif call.func.id == "hasattr" and len(call.args) == 2 and isinstance(call.args[1], ast.Constant):
                    names.add(call.args[1].value)
        child, parent = parent, PARENTS.get(parent)
    return best, names


def _guard_version(node: ast.AST) -> tuple[int, int]:
    return _guards(node)[0]


def _is_guarded(node: ast.AST, name: str, needed: tuple[int, int]) -> bool:
    version, names = _guards(node)
    return version >= needed or name in names


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def _words(path: Path) -> set[str]:
    return set(path.read_text().split()) if path.is_file() else set()


def _release_api(folder: Path) -> dict[str, set[str]]:
    """Names of one release's lists: util, SampleDataLogic, ScriptedLoadableModule, each class, all methods."""
    api = {"util": _words(folder / "util.txt"), "SampleDataLogic": _words(folder / "SampleDataLogic.txt"),
           "ScriptedLoadableModule": _words(folder / "ScriptedLoadableModule.txt")}
    source = folder / "SOURCE.txt"
    classes = re.search(r"util\.py also defines these top-level CLASSES.*?\n\s*(.+?)\n", source.read_text()) if source.is_file() else None
    if classes:
        api["util"] |= {name.strip() for name in classes.group(1).split(",")}
    methods = set()
    for path in folder.glob("vtk*.txt"):
        api[path.stem] = _words(path)
        methods |= api[path.stem]
    api["methods"] = methods
    return api


def _api() -> dict[tuple[int, int], dict[str, set[str]]]:
    if not API_FOLDERS[MINIMUM].is_dir():
        pytest.skip(f"{API_FOLDERS[MINIMUM]} not present (Slicer API name lists are development data)")
    api = {version: _release_api(folder) for version, folder in API_FOLDERS.items()}
    for version, classes in LIST_GAPS.items():
        for cls, names in classes.items():
            assert not names & api[version][cls], f"{cls} {version} lists {names} now: remove them from LIST_GAPS"
            api[version][cls] |= names
            api[version]["methods"] |= names
    return api


def _first_release(name: str, kind: str, api) -> tuple[int, int] | None:
    """The oldest release whose ``kind`` list holds ``name`` (None: in none of them)."""
    for version in sorted(api):
        if name in api[version].get(kind, set()):
            return FIRST_RELEASE.get(name, version) if version > (5, 10) else version
    return FIRST_RELEASE.get(name)


def _chain(node: ast.AST) -> list[str] | None:
    """``slicer.util.exportNode`` -> ["slicer", "util", "exportNode"]; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        # slicer.modules.sequences.logic().X: the chain up to the call
        inner = _chain(node.func)
        return inner + ["()"] + list(reversed(parts)) if inner else None
    if isinstance(node, ast.Name):
        return [node.id] + list(reversed(parts))
    return None


def _maximal_chains(root: str) -> list[tuple[list[str], ast.AST]]:
    """Every attribute chain starting at ``root`` (only the longest of nested ones)."""
    chains = []
    for node in ast.walk(TREE):
        if not isinstance(node, ast.Attribute) or isinstance(PARENTS.get(node), ast.Attribute):
            continue
        chain = _chain(node)
        if chain and chain[0] == root:
            chains.append((chain, node))
    return chains


def _method_calls() -> list[tuple[str, ast.Call]]:
    modules = _imported_modules(TREE)
    calls = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, receiver = node.func.attr, node.func.value
            if not name[:1].isupper() or name.startswith(CONSTRUCTOR_PREFIXES):
                continue
            if isinstance(receiver, ast.Name) and receiver.id in modules:
                continue  # a module's class (subprocess.Popen, PyTorchUtils.PyTorchUtilsLogic)
            calls.append((name, node))
    return calls


def _check_name(name: str, kind: str, node: ast.AST, api, problems: list[str], where: str) -> None:
    """``name`` must be in the oldest release's ``kind`` list, or in a newer one behind a guard."""
    first = _first_release(name, kind, api)
    if first is None:
        problems.append(f"line {node.lineno}: {where}{name} is in no Slicer API list")
    elif first > MINIMUM and not _is_guarded(node, name, first):
        problems.append(f"line {node.lineno}: {where}{name} needs Slicer {first}: put it behind "
                        f"slicerVersionAtLeast{first} or hasattr(..., {name!r})")


def _slicer_chain_problems(chain: list[str], node: ast.AST, api) -> list[str]:
    """Problems of one ``slicer.*`` chain against the per-release lists."""
    problems: list[str] = []
    if len(chain) < 2:
        return problems
    head, member = chain[1], chain[2] if len(chain) > 2 else None
    if head == "util":
        if member is not None:
            _check_name(member, "util", node, api, problems, "slicer.util.")
    elif head == "mrmlScene":
        if member is not None and member not in EVENTS["vtkMRMLScene"]:
            _check_name(member, "vtkMRMLScene", node, api, problems, "slicer.mrmlScene.")
    elif head == "app":
        if member not in APP_MEMBERS:
            problems.append(f"line {node.lineno}: slicer.app.{member} is not a checked qSlicerApplication member")
    elif head == "modules":
        if member not in MODULES_USED:
            problems.append(f"line {node.lineno}: slicer.modules.{member} is not a checked core module")
    elif head.startswith("vtk"):
        known = set().union(*(api[version].get(head, set()) for version in api))
        extra = EXTRA_API.get(head)
        if not known and extra is None:
            problems.append(f"line {node.lineno}: class slicer.{head} is in no Slicer API list")
        elif member is not None:
            if member not in (extra or set()) | EVENTS.get(head, set()):
                _check_name(member, head, node, api, problems, f"slicer.{head}.")
    elif head not in SLICER_SUBMODULES:
        problems.append(f"line {node.lineno}: slicer.{head} is not a checked part of Slicer")
    return problems


# --- Slicer API -----------------------------------------------------------------------------


def test_every_slicer_attribute_chain_exists_in_the_oldest_release():
    """``slicer.*`` chains, lower-case members included, against the 5.8.1 lists (newer ones guarded)."""
    api = _api()
    chains = _maximal_chains("slicer")
    assert len(chains) > 100
    problems = [problem for chain, node in chains for problem in _slicer_chain_problems(chain, node, api)]
    assert not problems, "\n".join(problems)


def test_slicer_imports_exist_in_the_oldest_release():
    api = _api()
    problems = []
    for node in ast.walk(TREE):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("slicer"):
            continue
        submodule = (node.module or "").partition(".")[2]
        for alias in node.names:
            if node.module == "slicer":  # a submodule, or a class listed for 5.8.1 (slicer.packaging: 5.12, guarded)
                ok = alias.name in SLICER_SUBMODULES or alias.name in api[MINIMUM] and alias.name.startswith("vtk") \
                    or (alias.name == "packaging" and _guard_version(node) >= PACKAGING_VERSION)
            elif submodule == "util":
                ok = alias.name in api[MINIMUM]["util"]
            elif submodule == "ScriptedLoadableModule":
                ok = alias.name in api[MINIMUM]["ScriptedLoadableModule"]
            else:
                ok = alias.name in SUBMODULE_MEMBERS.get(submodule, set())
            if not ok:
                problems.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    assert not problems, "\n".join(problems)


def test_sampledata_calls_exist_in_the_oldest_release():
    """``registerCustomSampleDataCategory`` (5.12) must sit behind a guard; the rest is in 5.8.1."""
    api = _api()
    chains = _maximal_chains("SampleData")
    assert any(chain[-1] == "registerCustomSampleDataSource" for chain, _ in chains)
    problems = []
    for chain, node in chains:
        if chain[1:2] == ["SampleDataLogic"] and len(chain) == 2:
            continue  # the class itself (a hasattr guard's receiver)
        if chain[1:2] == ["SampleDataLogic"]:
            _check_name(chain[2], "SampleDataLogic", node, api, problems, "SampleData.SampleDataLogic.")
        elif len(chain) == 2 and chain[1] not in SAMPLEDATA_FUNCTIONS:
            problems.append(f"line {node.lineno}: SampleData.{chain[1]} is not a function of SampleData.py at v5.8.1")
    assert not problems, "\n".join(problems)


def test_scripted_module_base_methods_exist_in_the_oldest_release():
    """``self.x()`` in the Widget, Logic and Test classes: their own, or Slicer's base classes' (5.8.1)."""
    api = _api()
    base = api[MINIMUM]["ScriptedLoadableModule"] | api[MINIMUM]["util"] | set(dir(unittest.TestCase))
    problems, checked = [], 0
    for cls in (n for n in TREE.body if isinstance(n, ast.ClassDef)):
        bases = {ast.unparse(b) for b in cls.bases}
        if not any(b.startswith("ScriptedLoadable") for b in bases):
            continue
        own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)} | {
            t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(cls):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, (ast.Name, ast.Call)) and ast.unparse(node.func.value) in ("self", "super()"):
                checked += 1
                if node.func.attr not in own and node.func.attr not in base:
                    problems.append(f"{cls.name} line {node.lineno}: {node.func.attr} is neither its own nor Slicer's")
    assert checked > 30
    assert not problems, "\n".join(problems)


def test_mrml_and_segmentation_methods_exist():
    """Methods called on MRML objects: in the 5.8.1 lists, or in a newer one behind a guard."""
    api = _api()
    extra = set().union(*EXTRA_API.values())
    redundant = extra & set().union(*(api[version]["methods"] for version in api))
    assert not redundant, f"already in the shared lists, remove from EXTRA_API: {sorted(redundant)}"
    calls = _method_calls()
    assert len(calls) > 60
    problems: list[str] = []
    for name, call in calls:
        if name not in extra:
            _check_name(name, "methods", call, api, problems, "")
    assert not problems, "\n".join(problems)


def test_newer_call_signatures_are_version_guarded():
    _api()
    problems = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in NEWER_UTIL_KEYWORDS:
            keywords, needed = NEWER_UTIL_KEYWORDS[node.func.attr]
            if any(k.arg is None for k in node.keywords):
                problems.append(f"line {node.lineno}: **kwargs to {node.func.attr} cannot be checked")
            if {k.arg for k in node.keywords} & keywords and _guard_version(node) < needed:
                problems.append(f"line {node.lineno}: {node.func.attr}({sorted(keywords)}) needs Slicer {needed}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "pip_install" \
                and (node.keywords or len(node.args) > 1) and _guard_version(node) < PACKAGING_VERSION:
            problems.append(f"line {node.lineno}: pip_install with options needs Slicer {PACKAGING_VERSION}")
        packaging_import = (isinstance(node, ast.ImportFrom) and node.module == "slicer" and any(a.name == "packaging" for a in node.names)) \
            or (isinstance(node, ast.Import) and any(a.name.startswith("slicer.packaging") for a in node.names)) \
            or (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slicer.packaging"))
        if packaging_import and _guard_version(node) < PACKAGING_VERSION:
            problems.append(f"line {node.lineno}: slicer.packaging needs Slicer {PACKAGING_VERSION}")
    assert not problems, "\n".join(problems)


def test_guard_check_catches_unguarded_calls():
    """The checks themselves: a 5.12 call outside any guard is flagged; inside either guard it is not."""
    tree = ast.parse(
        "def f():\n"
        "    slicer.util.launchConsoleProcess(a, blocking=False)\n"
        "    SampleData.SampleDataLogic.registerCustomSampleDataCategory('c', title='t')\n"
        "    if slicerVersionAtLeast(5, 12):\n        slicer.util.launchConsoleProcess(a, blocking=False)\n"
        "    if hasattr(SampleData.SampleDataLogic, 'registerCustomSampleDataCategory'):\n"
        "        SampleData.SampleDataLogic.registerCustomSampleDataCategory('c', title='t')\n"
        "    else:\n        SampleData.SampleDataLogic.registerCustomSampleDataCategory('c', title='t')\n")
    global PARENTS
    saved = PARENTS
    PARENTS = _parents(tree)
    try:
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "launchConsoleProcess"]
        assert sorted(_guard_version(c) for c in calls) == [MINIMUM, (5, 12)]
        category = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "registerCustomSampleDataCategory"]
        assert sorted(n.lineno for n in category if _is_guarded(n, "registerCustomSampleDataCategory", (5, 12))) == [7]
        if API_FOLDERS[MINIMUM].is_dir():
            api = _api()
            assert _first_release("registerCustomSampleDataCategory", "SampleDataLogic", api) == (5, 12)
            assert _first_release("registerCustomSampleDataSource", "SampleDataLogic", api) == MINIMUM
            assert _first_release("SetTerminology", "methods", api) == (5, 10)  # absent in 5.8.1 (SOURCE.txt)
            assert _first_release("GetTransformedImageData", "methods", api) == (5, 13)
            problems: list[str] = []
            _check_name("SetTerminology", "methods", calls[0], api, problems, "")
            assert problems and "needs Slicer (5, 10)" in problems[0]
    finally:
        PARENTS = saved


def test_util_calls_pass_a_fresh_properties_dict():
    """exportNode/load* write into their ``properties`` argument; the shared default would carry
    one call's file format or flags into the next."""
    calls = [n for n in ast.walk(TREE) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and _chain(n.func) and _chain(n.func)[:2] == ["slicer", "util"] and n.func.attr in PROPERTIES_FUNCTIONS]
    assert len(calls) >= 8
    for call in calls:
        position = PROPERTIES_FUNCTIONS[call.func.attr]
        given = call.args[position] if len(call.args) > position else next(
            (k.value for k in call.keywords if k.arg == "properties"), None)
        assert isinstance(given, ast.Dict), f"line {call.lineno}: {call.func.attr} without a fresh properties dict"


def test_no_event_loop_spinning_in_blocking_runs():
    """processEvents inside a blocking run lets the user press Apply (or Import) again meanwhile."""
    assert not [n.lineno for n in ast.walk(TREE) if isinstance(n, ast.Attribute) and n.attr == "processEvents"]


# --- Python 3.9 (Slicer 5.8) ------------------------------------------------------------------

PY39_TYPES = {"str", "int", "float", "bool", "bytes", "list", "dict", "tuple", "set", "Path", "Callable", "object", "type"}


def _runtime_unions(tree: ast.AST) -> list[int]:
    """Lines where ``X | Y`` of types is evaluated at run time (a TypeError before Python 3.10)."""
    in_annotation = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs] + [node.returns]
            annotations += [a.annotation for a in (node.args.vararg, node.args.kwarg) if a is not None]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            if annotation is not None:
                in_annotation |= {id(n) for n in ast.walk(annotation)}

    def typeish(operand: ast.AST) -> bool:
        return (isinstance(operand, ast.Constant) and operand.value is None) or isinstance(operand, ast.Subscript) \
            or (isinstance(operand, ast.Name) and (operand.id in PY39_TYPES or operand.id.startswith("vtk")))

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)
            and id(node) not in in_annotation and (typeish(node.left) or typeish(node.right))]


def test_module_files_are_python_3_9():
    """Slicer 5.8 runs Python 3.9: its grammar, and annotations never evaluated (``from __future__ import annotations``)."""
    for path in _module_sources():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, feature_version=(3, 9))
        assert not [n for n in ast.walk(tree) if type(n).__name__ in ("Match", "TryStar")], path.name
        has_annotations = any(isinstance(n, ast.AnnAssign) or (isinstance(n, ast.FunctionDef) and n.returns) for n in ast.walk(tree))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                     for n in tree.body)
        assert future or not has_annotations, f"{path.name}: add `from __future__ import annotations`"
        assert not _runtime_unions(tree), f"{path.name}: X | Y evaluated at run time on lines {_runtime_unions(tree)}"
    # Slicer evaluates the parameter node's annotations (typing.get_type_hints): no X | Y there.
    for field in _parameter_fields().values():
        assert not [n for n in ast.walk(field.annotation) if isinstance(n, ast.BinOp)], ast.unparse(field.annotation)


def test_runtime_union_check_catches_one():
    tree = ast.parse("x: int | None = None\ndef f(a: str | None) -> list | None:\n    return isinstance(a, str | bytes)\n")
    assert _runtime_unions(tree) == [3]


def _python39() -> str | None:
    candidates = [shutil.which("python3.9")] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for candidate in filter(None, candidates):
        run = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if run.returncode == 0 and run.stdout.strip() == "(3, 9)":
            return candidate
    return None


def test_module_files_compile_and_helpers_import_under_a_real_python_3_9(tmp_path):
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter here")
    sources = [str(path) for path in _module_sources()]
    compiled = subprocess.run([python, "-c", "import sys\nfor p in sys.argv[1:]: compile(open(p, encoding='utf-8').read(), p, 'exec')",
                               *sources], capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
    # The Slicer-free helpers are imported and used (dataclasses built, defaults evaluated) by 3.9 itself.
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from KneeSegLib import compatibility, engine, inputs, packages, processtree, results\n"
              "assert engine.segmentCommand('py', 'i', 'o', engine.SegmentOptions(fast=True))[-2:] == ['--members', '1']\n"
              "assert inputs.frameEchoTimes('s', 'EchoTime', 'ms', ['10', '20']) == [10.0, 20.0]\n"
              "assert compatibility.unsupportedReason((3, 9), (5, 8)) is None\n"
              "print('ok')\n")
    imported = subprocess.run([python, "-c", script, str(MODULE_DIR)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert imported.returncode == 0 and imported.stdout.strip() == "ok", imported.stderr


def test_supported_versions_are_refused_or_accepted_before_installing():
    assert compatibility.unsupportedReason((3, 9, 10), (5, 8)) is None  # Slicer 5.8: Python 3.9
    assert compatibility.unsupportedReason((3, 12, 4), (5, 12)) is None
    too_old_python = compatibility.unsupportedReason((3, 8, 10), (5, 8))
    assert "3.9" in too_old_python and "Nothing was installed" in too_old_python
    assert "5.8" in compatibility.unsupportedReason((3, 9), (5, 6))
    assert MINIMUM == (5, 8) and compatibility.TESTED_SLICER_RELEASES[0] == MINIMUM
    # setup() asks before refreshModels/refreshDevice start anything; installDependencies asks first too.
    setup = next(n for n in ast.walk(TREE) if isinstance(n, ast.FunctionDef) and n.name == "setup")
    text = ast.unparse(setup)
    assert text.index("notSupportedHere()") < text.index("self.refreshModels()")
    install = next(n for n in ast.walk(TREE) if isinstance(n, ast.FunctionDef) and n.name == "installDependencies")
    first = next(n for n in install.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)))
    assert "notSupportedHere()" in ast.unparse(first)


# --- GUI and parameter node -----------------------------------------------------------------


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _parameter_fields() -> dict[str, ast.AnnAssign]:
    for node in TREE.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {f.target.id: f for f in node.body if isinstance(f, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class")


def test_every_widget_the_code_uses_is_in_the_ui():
    widgets = _ui_widgets()
    used = {node.attr for node in ast.walk(TREE) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert len(used) > 10
    assert used <= set(widgets), f"used in KneeSeg.py but missing in KneeSeg.ui: {sorted(used - set(widgets))}"


WIDGET_KINDS = {  # parameter type -> widget classes whose parameterNodeWrapper connector accepts it
    "bool": {"QCheckBox"}, "int": {"QSpinBox", "QSlider"}, "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    "str": {"QLineEdit", "QComboBox", "QLabel"}, "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}


def test_every_parameter_is_bound_to_a_matching_widget():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, widget.get("class"))
    # modelId's choices come from the engine's registry, device's from the device probe (MPS and
    # CUDA only where PyTorch offers them), both at run time: the code binds them by hand.
    unbound = set(fields) - set(bound)
    assert unbound == {"modelId", "device"}, f"parameters without a widget: {sorted(unbound)}"
    text = MODULE_FILE.read_text()
    assert "self._parameterNode.modelId = " in text and "self._parameterNode.device = " in text
    assert set(bound) <= set(fields), f"widgets bound to no parameter: {sorted(set(bound) - set(fields))}"
    for field, (widget, cls) in bound.items():
        annotation = ast.unparse(fields[field].annotation)
        base = re.sub(r"Annotated\[(\w+),.*", r"\1", annotation)
        if base.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", (field, cls)
            continue
        assert cls in WIDGET_KINDS[base], (field, base, cls)
        if cls == "QComboBox":
            assert "Choice(" in annotation, f"{field}: a QComboBox binding needs Choice([...])"


def test_mrml_widgets_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    node_boxes = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert node_boxes and node_boxes <= receivers


def test_folder_pickers_do_not_filter_for_executables():
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        if widget.get("class") != "ctkPathLineEdit":
            continue
        properties = {p.get("name"): (p.findtext("set") or "") for p in widget.findall("property")}
        if "ShowDirsOnly" in properties.get("options", ""):
            assert "Executable" not in properties.get("filters", ""), widget.get("name")
            assert "Dirs" in properties.get("filters", ""), widget.get("name")


# --- Engine isolation -------------------------------------------------------------------------


def _module_sources() -> list[Path]:
    return [MODULE_FILE] + sorted((MODULE_DIR / "KneeSegLib").glob("*.py"))


def test_module_uses_the_engine_only_through_its_command_line():
    for path in _module_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == engine.ENGINE_PACKAGE], f"{path.name} imports the engine"
        assert "import_module" not in path.read_text(encoding="utf-8"), path.name
    # The one way in: python -m KneeSegLogic COMMAND
    assert engine.segmentCommand("py", "in.nrrd", "out", engine.SegmentOptions())[:4] == ["py", "-m", "KneeSegLogic", "segment"]


def test_helpers_stay_slicer_free():
    for path in sorted((MODULE_DIR / "KneeSegLib").glob("*.py")):
        imported = _imported_modules(ast.parse(path.read_text(encoding="utf-8")))
        assert not imported & {"slicer", "qt", "ctk", "vtk"}, path.name


def test_the_engine_package_is_named_in_one_place_only():
    """In KneeSeg.py ``KneeSegLogic`` is the Logic class only; the engine package's name lives in engine.ENGINE_PACKAGE."""
    strings = [n.value for n in ast.walk(TREE) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [text for text in strings if engine.ENGINE_PACKAGE in text], "KneeSeg.py names the engine package in text"
    names = {n.id for n in ast.walk(TREE) if isinstance(n, ast.Name) and n.id == "KneeSegLogic"}
    classes = [n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "KneeSegLogic"]
    assert names and len(classes) == 1 and any(ast.unparse(b) == "ScriptedLoadableModuleLogic" for b in classes[0].bases)
    for path in sorted((MODULE_DIR / "KneeSegLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        holders = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and engine.ENGINE_PACKAGE in n.value]
        if path.name == "engine.py":
            assert [ast.unparse(PARENT) for PARENT in [n for n in tree.body if isinstance(n, ast.Assign)
                    and any(h in ast.walk(n) for h in holders)]] == [f"ENGINE_PACKAGE = {engine.ENGINE_PACKAGE!r}"]
        else:
            assert not holders, path.name


# --- Inputs, model packages, replacement ------------------------------------------------------


def test_sequence_frames_are_echoes_or_refused_as_4d():
    assert inputs.frameEchoTimes("s", "EchoTime", "ms", ["6.3", "12.6", "18.9"]) == [6.3, 12.6, 18.9]
    assert inputs.frameEchoTimes("s", "TE", "s", ["0.01", "0.02"]) == pytest.approx([10.0, 20.0])
    assert inputs.frameEchoTimes("s", "(0018,0081)", "", ["10", "20"]) == [10.0, 20.0]
    # Typed echo times win (an unnamed index), but must match the frames.
    assert inputs.frameEchoTimes("s", "", "", ["0", "1"], [8.0, 16.0]) == [8.0, 16.0]
    with pytest.raises(ValueError, match="3 frames but 2 echo times"):
        inputs.frameEchoTimes("s", "EchoTime", "ms", ["1", "2", "3"], [8.0, 16.0])
    for name, unit in (("time", "s"), ("TriggerTime", "ms"), ("", ""), ("b-value", "s/mm2")):
        with pytest.raises(ValueError, match="4D series"):
            inputs.frameEchoTimes("dyn", name, unit, ["0", "1", "2"])
    with pytest.raises(ValueError, match="not usable"):
        inputs.frameEchoTimes("s", "EchoTime", "ms", ["20", "10"])  # not increasing
    assert inputs.isEchoIndex("EchoTime") and not inputs.isEchoIndex("time") and not inputs.isEchoIndex("TriggerTime")


def test_multivolume_importer_attributes_describe_a_sequence():
    """MultiVolumeImporter's sequences: empty index of frame numbers, echo times in MultiVolume attributes."""
    frames = ["0", "1", "2"]
    described = inputs.frameDescription("", "", frames, "EchoTime", "ms", ["10", "20", "30"])
    assert described == ("EchoTime", "ms", ["10", "20", "30"])
    assert inputs.frameEchoTimes("MESE", *described) == [10.0, 20.0, 30.0]
    # Attributes that do not describe every frame (a sequence edited since) leave the index in charge.
    assert inputs.frameDescription("time", "s", frames, "EchoTime", "ms", ["10", "20"]) == ("time", "s", frames)
    assert inputs.frameDescription("EchoTime", "ms", ["10", "20"], "", "", []) == ("EchoTime", "ms", ["10", "20"])
    with pytest.raises(ValueError, match="4D series"):
        inputs.frameEchoTimes("dyn", *inputs.frameDescription("", "", frames, "TriggerTime", "ms", ["0", "40", "80"]))


def test_echo_message_says_when_an_input_has_one_echo():
    assert inputs.echoMessage("MESE", 8, False, True) == "'MESE': 8 echoes: the T2 map is fitted on them."
    assert "no T2 map" in inputs.echoMessage("PD", 1, False, True)
    assert "chosen multi-echo series" in inputs.echoMessage("PD", 1, True, True)
    assert inputs.echoMessage("PD", 1, False, False) == "'PD' has one echo."


def test_model_package_size_card_and_checksum(tmp_path):
    bundled = REPO / "Resources" / "Models" / "kneeseg-knee-2p5d"
    size = packages.packageSize(bundled)
    assert size == sum(p.stat().st_size for p in bundled.iterdir()) and size > 100_000
    card = packages.modelCard(bundled)
    assert card.startswith("# kneeseg-knee-2p5d") and "Intended use" in card
    archive = tmp_path / "package.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for item in bundled.iterdir():
            zipped.write(item, f"kneeseg-knee-2p5d/{item.name}")
    assert packages.modelCard(archive) == card and packages.packageSize(archive) == archive.stat().st_size
    assert packages.modelCard(tmp_path) is None and packages.packageSize(tmp_path / "absent") == 0
    assert packages.humanSize(512) == "512 bytes" and packages.humanSize(1536) == "1.5 KB"
    assert packages.humanSize(3 * 2**30) == "3.0 GB"
    digest = "AB" * 32
    assert packages.normaliseSha256(f"SHA256: {digest}") == digest.lower()
    for bad in ("", "ab" * 31, "xy" * 32):
        with pytest.raises(ValueError):
            packages.normaliseSha256(bad)


def test_model_package_rows_from_the_real_registry():
    listing = subprocess.run(engine.modelsCommand(sys.executable), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert listing.returncode == 0, listing.stderr
    summaries = json.loads(listing.stdout.strip().splitlines()[-1])["packages"]
    default = next(p for p in summaries if p["default"])
    row = packages.packageRow(default)
    assert row[:3] == (default["id"], default["version"], default["license"]) and row[3].endswith("MB")
    assert packages.modelCard(default["location"]).startswith(f"# {default['id']}")


def test_replacing_a_segmentation_asks_only_when_work_would_be_lost():
    assert results.replacementWarning(madeByKneeSeg=True, edited=False, segmentCount=10) == ""
    assert results.replacementWarning(madeByKneeSeg=True, edited=True, segmentCount=10) == "edited"
    assert results.replacementWarning(madeByKneeSeg=False, edited=True, segmentCount=3) == "foreign"  # never "edited"
    assert results.replacementWarning(madeByKneeSeg=False, edited=True, segmentCount=0) == ""


# --- CMake lists, index entry, resources ------------------------------------------------------


def _cmake_sets(path: Path) -> dict[str, list[str]]:
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    values = {}
    for name, body in re.findall(r"set\((\w+)\s+(.*?)\)", text, flags=re.S):
        values[name] = [item.strip('"') for item in body.split()]
    return values


def _listed(name: str) -> list[str]:
    sets = _cmake_sets(MODULE_DIR / "CMakeLists.txt")
    module_name = sets["MODULE_NAME"][0]
    return [item.replace("${MODULE_NAME}", module_name) for item in sets[name]]


def test_module_cmake_lists_every_module_file():
    scripts = set(_listed("MODULE_PYTHON_SCRIPTS"))
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk, f"unlisted: {sorted(on_disk - scripts)}, listed but absent: {sorted(scripts - on_disk)}"
    resources = set(_listed("MODULE_PYTHON_RESOURCES"))
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert resources == on_disk, f"unlisted: {sorted(on_disk - resources)}, listed but absent: {sorted(resources - on_disk)}"


def test_module_cmake_lists_every_engine_file():
    """Fails when an engine file is added without being listed in KneeSegExtension/CMakeLists.txt."""
    listed = set(_listed("ENGINE_PYTHON_SCRIPTS"))
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "KneeSegLogic").rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == on_disk, (f"add to ENGINE_PYTHON_SCRIPTS: {sorted(on_disk - listed)}; "
                               f"listed but absent: {sorted(listed - on_disk)}")
    resources = set(_listed("ENGINE_RESOURCES"))
    data_files = {p.relative_to(REPO).as_posix() for p in (REPO / "KneeSegLogic").rglob("*")
                  if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    models = {p.relative_to(REPO).as_posix() for p in (REPO / "Resources" / "Models").rglob("*")
              if p.is_file() and p.name != "README.md"}
    samples = {f"Resources/SampleData/{file}" for file, _, _ in _module_constant("SAMPLES").values()}
    needed = data_files | models | samples
    assert needed <= resources, f"add to ENGINE_RESOURCES: {sorted(needed - resources)}"
    assert all((REPO / item).is_file() for item in resources), "ENGINE_RESOURCES names a missing file"


def test_extension_cmake_and_index_entry():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for required in ("project(KneeSeg)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     "add_subdirectory(KneeSegExtension)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                     "include(${Slicer_EXTENSION_CPACK})"):
        assert required in text, required
    sets = _cmake_sets(REPO / "CMakeLists.txt")
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                 "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert name in sets, name
    assert "PyTorch" in sets["EXTENSION_DEPENDS"]
    for name in ("EXTENSION_README_FILE", "EXTENSION_LICENSE_FILE"):
        path = REPO / sets[name][0].replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
        assert path.is_file(), f"{name}: {path} missing (CPack refuses to package without it)"
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in module_cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake

    entry = json.loads((REPO / "KneeSeg.json").read_text(encoding="utf-8"))
    schema_keys = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                   "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # catalog schema v1.0.2
    assert {"$schema", "category", "scm_url"} <= set(entry) <= schema_keys
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["scm_type"] in ("git", "local") and 1 <= entry["tier"] <= 5
    assert isinstance(entry["build_dependencies"], list) and "PyTorch" in entry["build_dependencies"]
    assert entry["category"] == " ".join(sets["EXTENSION_CATEGORY"]).strip('"')
    assert entry["scm_url"].removesuffix(".git") == sets["EXTENSION_HOMEPAGE"][0]


# The regular expressions scripts/check_description_files.py (Slicer/ExtensionsIndex) reads the
# root CMakeLists.txt with; it then downloads each URL and wants an image content type.
INDEX_ICON_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
INDEX_SCREENSHOTS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
INDEX_PROJECT_PATTERN = r'project\s*\(\s*([^\s\)\n\r]+)'
RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/([^/]+)/([^/]+)/([^/]+)/(.+)")


def _repository_file_of(url: str, entry: dict) -> Path:
    """The file of this repository a raw.githubusercontent.com URL serves, at the branch the index builds."""
    match = RAW_URL.fullmatch(url)
    assert match, f"{url}: not a raw file of the GitHub repository"
    owner, name, branch, path = match.groups()
    assert f"https://github.com/{owner}/{name}" == entry["scm_url"].removesuffix(".git"), f"{url}: another repository"
    assert branch == entry["scm_revision"], f"{url}: branch {branch}, but the index builds {entry['scm_revision']}"
    return REPO / path


def test_extensions_index_checker_fields():
    """What the Extensions Index checker checks: names, category, scm_url, icon and screenshots, licence, size."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    entry_path = REPO / "KneeSeg.json"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    assert b"\r" not in entry_path.read_bytes()  # LF line endings only
    name = entry_path.stem
    assert re.findall(INDEX_PROJECT_PATTERN, text, re.IGNORECASE)[0] == name and not name.lower().startswith("slicer")
    assert entry["category"] in ("Segmentation", "Quantification")  # both in its ACCEPTED_EXTENSION_CATEGORIES
    scm = entry["scm_url"]
    assert scm.startswith("https://") and Path(scm.rstrip("/")).stem.startswith("Slicer")  # repository named Slicer*
    icons = re.findall(INDEX_ICON_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    screenshots = re.findall(INDEX_SCREENSHOTS_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    assert len(icons) == 1 and len(screenshots) == 1, "one literal icon URL and one screenshot list"
    urls = icons + screenshots[0].split()
    assert len(urls) >= 2, "EXTENSION_SCREENSHOTURLS is empty"
    for url in urls:
        path = _repository_file_of(url, entry)
        assert path.is_file(), f"{url}: {path} is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{url}: not a PNG"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=REPO, capture_output=True)
        assert tracked.returncode == 0, f"{path} is not committed: the URL would not download"
    shown = {_repository_file_of(url, entry) for url in screenshots[0].split()}
    assert shown == set((REPO / "Resources" / "Screenshots").glob("*.png")), "use every screenshot the repository has"
    assert (REPO / "LICENSE").is_file()
    size = sum(p.stat().st_size for p in map(REPO.joinpath, subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")) if p.is_file())
    assert size < 100 * 2**20, f"the repository is {size / 2**20:.0f} MB; the checker's limit is 100 MB"
    # Every web address of the extension sits in the root CMakeLists.txt only.
    for path in [MODULE_FILE, *sorted((MODULE_DIR / "KneeSegLib").glob("*.py")), MODULE_DIR / "CMakeLists.txt"]:
        assert "raw.githubusercontent.com" not in path.read_text(encoding="utf-8"), path.name


def test_readme_states_supported_versions_and_installation():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## In 3D Slicer")
    section = text[start:text.index("\n## ", start + 5)]
    for version in compatibility.TESTED_SLICER_RELEASES:
        assert "{}.{}".format(*version) in section
    for needed in ("Extensions Manager", "From a build", "PyTorch extension", _module_constant("RUN_ENGINE_TESTS_VARIABLE")):
        assert needed in section, needed
    description = re.search(r'set\(EXTENSION_DESCRIPTION\s+"([^"]*)"', (REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert "Slicer 5.8" in description.group(1)  # the Extensions Index entry states it too


def test_sample_checksums_match_the_files():
    import hashlib

    for file, sha256, _ in _module_constant("SAMPLES").values():
        digest = hashlib.sha256((REPO / "Resources" / "SampleData" / file).read_bytes()).hexdigest()
        assert digest == sha256, f"{file}: update the SHA256 in KneeSeg.py SAMPLES"


def test_requirements_follow_the_engine_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    engine_requirements = {r.name.lower(): str(r.specifier) for r in map(dependencies.Requirement, project["dependencies"])}
    ours = {r.name.lower(): str(r.specifier) for r in dependencies.readRequirements(MODULE_DIR / "Resources" / "requirements.txt")}
    slicer_owned = {"numpy", "simpleitk", "vtk"}
    assert ours == {k: v for k, v in engine_requirements.items() if k not in slicer_owned}
    assert not dependencies.missingRequirements(dependencies.readRequirements(MODULE_DIR / "Resources" / "requirements.txt")), \
        "the versions the engine is tested with here must satisfy the module's requirements"


def test_install_tree_from_the_cmake_lists_runs_the_engine(tmp_path):
    """Copy what the CMake lists install into one qt-scripted-modules folder and run the engine from there."""
    installed = tmp_path / "qt-scripted-modules"
    for item in _listed("MODULE_PYTHON_SCRIPTS") + _listed("MODULE_PYTHON_RESOURCES"):
        (installed / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODULE_DIR / item, installed / item)
    for item in _listed("ENGINE_PYTHON_SCRIPTS") + _listed("ENGINE_RESOURCES"):
        (installed / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / item, installed / item)
    root = engine.findEngineRoot(installed)
    assert root == installed.resolve()
    environment = {**os.environ, **engine.engineEnvironment(root, os.environ.get("PYTHONPATH"))}
    where = subprocess.run([sys.executable, "-c", "import KneeSegLogic; print(KneeSegLogic.__file__)"],
                           capture_output=True, text=True, env=environment, cwd=tmp_path, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed.resolve())
    sample = installed / "Resources" / "SampleData" / "mese_t2_knee.nrrd"
    info = subprocess.run(engine.infoCommand(sys.executable, sample), capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=120)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout.strip().splitlines()[-1])
    assert described["size"] == [128, 128, 24] and len(described["echo_times_ms"]) == 8


# --- Helpers against the real engine ----------------------------------------------------------


def _engine_parser():
    from KneeSegLogic.commands.main import build_parser

    return build_parser()


def _parse(args: list[str]):
    try:
        return _engine_parser().parse_args(args[3:])
    except SystemExit:
        raise AssertionError(f"the engine's parser refuses {args[3:]}") from None


@pytest.mark.parametrize("options", [
    engine.SegmentOptions(),
    engine.SegmentOptions(model="kneeseg-knee-2p5d", device="cpu", closingRadiusMm=2.5, surfaces=False),
    engine.SegmentOptions(surfaceSmoothing="laplacian-idw", t2Model="mono"),
    engine.SegmentOptions(device="cuda", ensembleMembers=2),
    engine.SegmentOptions(regionVariant="thomas"),
    engine.SegmentOptions(fast=True, ensembleMembers=2),
], ids=["defaults", "model-cpu-closing-nosurf", "smoothing-t2model", "members", "regions", "fast"])
def test_planned_commands_are_accepted_by_the_engine(tmp_path, options):
    plan = engine.planSegmentRun("python", tmp_path, tmp_path / "in.nrrd", [10, 20, 30], tmp_path / "t2in.nrrd",
                                 [10, 20, 30], options)
    plan += engine.planRecompute("python", tmp_path, tmp_path / "edit.seg.nrrd", tmp_path / "t2in.nrrd", [10, 20, 30], options)
    for command in plan:
        _parse(command.args)
    segment = _parse(plan[0].args)
    assert segment.members == (1 if options.fast else options.ensembleMembers)  # fast mode: one member
    models = _parse(engine.modelsCommand("python", tmp_path / "p.zip"))
    assert models.json and models.import_path == tmp_path / "p.zip"
    download = _parse(engine.modelsCommand("python", downloadUrl="https://example.org/p.zip", sha256="ab" * 32))
    assert download.json and download.download == "https://example.org/p.zip" and download.sha256 == "ab" * 32
    with pytest.raises(ValueError):
        engine.modelsCommand("python", downloadUrl="https://example.org/p.zip")
    assert _parse(engine.infoCommand("python", tmp_path / "x.nrrd")).json


def test_apple_gpu_device_reaches_the_engine(tmp_path):
    """The GUI offers mps only where torch has it; the engine's --device must take it then."""
    args = engine.segmentCommand("python", "in.nrrd", tmp_path, engine.SegmentOptions(device="mps"))
    try:
        _engine_parser().parse_args(args[3:])
    except SystemExit:
        pytest.xfail("the engine's --device does not take mps yet (another engineer adds it); the module already offers it")


def test_plan_runs_only_what_segment_does_not_do_itself(tmp_path):
    scan, t2 = tmp_path / "in.nrrd", tmp_path / "t2.nrrd"
    # Multi-echo input, default choices: segment fits T2 and builds surfaces itself.
    plan = engine.planSegmentRun("py", tmp_path, scan, [10, 20], scan, [10, 20], engine.SegmentOptions())
    assert [c.name for c in plan] == ["segment"] and "--no-surfaces" not in plan[0].args
    assert plan[0].args[plan[0].args.index("--echo-times") + 1] == "10,20"
    # Another smoothing: segment skips surfaces, `surfaces` runs on its segmentation.
    plan = engine.planSegmentRun("py", tmp_path, scan, None, None, None, engine.SegmentOptions(surfaceSmoothing="none"))
    assert [c.name for c in plan] == ["segment", "surfaces"] and "--no-surfaces" in plan[0].args
    assert plan[1].args[4] == str(tmp_path / "segment" / results.SEGMENTATION_FILE)
    # A separate T2 series: `t2` runs with the new segmentation as mask; not at all when T2 is off.
    plan = engine.planSegmentRun("py", tmp_path, scan, None, t2, [8, 16, 24], engine.SegmentOptions())
    assert [c.name for c in plan] == ["segment", "t2"]
    assert plan[1].args[plan[1].args.index("--mask") + 1] == str(tmp_path / "segment" / results.SEGMENTATION_FILE)
    assert plan[1].outputFolder == tmp_path / "t2"
    assert [c.name for c in engine.planSegmentRun("py", tmp_path, scan, None, t2, [8], engine.SegmentOptions(t2=False))] == ["segment"]
    with pytest.raises(ValueError):
        engine.planSegmentRun("py", tmp_path, scan, None, None, None, engine.SegmentOptions(device="gpu"))


def test_progress_lines_from_the_engine_progress_writer():
    import io

    from KneeSegLogic.io.outputs import Progress

    stream = io.StringIO()
    report = Progress(stream)
    report("inference", 0.42, "slice 67/160")
    report("surfaces", 1.7, "femur")
    lines = stream.getvalue().splitlines()
    parsed = [engine.parseProgressLine(line) for line in lines]
    assert parsed[0] == engine.ProgressLine("inference", 0.42, "slice 67/160")
    assert parsed[1].progress == 1.0
    for other in ("warning: skipped x", "{not json}", '{"stage": "a"}', '{"stage": "a", "progress": "nan"}', "[1, 2]"):
        assert engine.parseProgressLine(other) is None, other
    assert engine.overallProgress(1, 4, parsed[0]) == pytest.approx((1 + 0.42) / 4)
    assert engine.overallProgress(3, 4, parsed[1]) == 1.0


def test_error_message_from_a_real_engine_failure(tmp_path):
    missing = tmp_path / "no_such_scan.nrrd"
    run = subprocess.run([sys.executable, "-m", "KneeSegLogic", "surfaces", str(missing), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == engine.EXIT_BAD_INPUT
    # Slicer merges stderr into stdout: feed both, progress lines included.
    lines = run.stdout.splitlines() + ['{"stage": "read", "progress": 0.0, "message": ""}'] + run.stderr.splitlines()
    message = engine.engineErrorMessage(lines, run.returncode)
    assert "no_such_scan.nrrd" in message and not message.startswith("kneeseg")
    assert engine.engineErrorMessage(["kneeseg t2: cancelled"], 130) == "cancelled"
    assert "memory" in engine.engineErrorMessage([], -9)
    assert "CPU" in engine.engineErrorMessage(["RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"], 3)
    assert "different versions" in engine.engineErrorMessage(["kneeseg segment: error: unrecognized arguments: --x"], 2)
    torch_missing = ["kneeseg models: internal error: ModuleNotFoundError: No module named 'torch' (rerun with --debug)"]
    assert "'torch' is not installed" in engine.engineErrorMessage(torch_missing, 3)
    assert "reinstall the extension" in engine.engineErrorMessage(["/usr/bin/python: No module named 'KneeSegLogic'"], 1)


def test_device_probe_reports_what_torch_sees():
    import torch

    run = subprocess.run(engine.probeCommand(sys.executable), capture_output=True, text=True, timeout=120)
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe["torch"] == torch.__version__
    assert probe["cuda"] == (torch.backends.cuda.is_built() and torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    assert probe["mps"] == bool(mps is not None and mps.is_available())
    text = engine.describeDevice(probe)
    assert (probe["name"] in text) if probe["cuda"] else text.startswith("Runs on the CPU")
    assert "not installed" in engine.describeDevice({"torch": None, "error": "ModuleNotFoundError: No module named 'torch'"})


def test_device_choices_and_the_line_shown_before_the_run():
    cpu = {"torch": "2.5.1", "cuda_built": False, "cuda": False, "mps": False}
    apple = {**cpu, "mps": True}
    nvidia = {"torch": "2.5.1", "cuda_built": True, "cuda": True, "mps": False, "name": "RTX 4090", "memory_gb": 24.0,
              "cuda_version": "12.1"}
    assert engine.availableDevices(None) == ["auto", "cpu"]
    assert engine.availableDevices(cpu) == ["auto", "cpu"]
    assert engine.availableDevices(apple) == ["auto", "cpu", "mps"]
    assert engine.availableDevices(nvidia) == ["auto", "cpu", "cuda"]
    assert set(engine.availableDevices(nvidia)) <= set(engine.DEVICES)
    assert engine.describeDevice(nvidia, "auto").startswith("Runs on the GPU: RTX 4090, 24.0 GB")
    assert engine.describeDevice(nvidia, "cpu").startswith("Runs on the CPU although a GPU")
    assert engine.describeDevice(apple, "mps").startswith("Runs on the Apple GPU (MPS")
    assert engine.describeDevice(apple, "auto").startswith("Runs on the CPU")  # the engine's auto picks CUDA only
    assert "not usable" in engine.describeDevice(cpu, "cuda")
    assert engine.resolvedDevice(nvidia, "auto") == "cuda" and engine.resolvedDevice(apple, "auto") == "cpu"


def test_echo_times():
    assert engine.parseEchoTimes("6.3, 12.6;18.9 25.2") == [6.3, 12.6, 18.9, 25.2]
    assert engine.parseEchoTimes("") == []
    for bad in ("10,abc", "10,10", "20,10", "-5,10", "nan"):
        with pytest.raises(ValueError):
            engine.parseEchoTimes(bad)
    assert engine.formatEchoTimes([6.312, 12.624]) == "6.312,12.624"


def test_engine_root_and_environment(tmp_path):
    assert engine.findEngineRoot(MODULE_DIR) == REPO  # source checkout: the engine is beside the module folder
    assert engine.findEngineRoot(tmp_path) is None
    environment = engine.engineEnvironment(REPO, os.pathsep.join(["/a", str(REPO), "/b"]))
    assert environment["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/a", "/b"]
    assert environment["PYTHONUNBUFFERED"] == "1"
    assert "PYTHONPATH" not in engine.engineEnvironment(None, "/a")


@pytest.mark.skipif(os.name == "nt", reason="POSIX process tree")
def test_kill_process_tree_stops_grandchildren():
    # A launcher-like parent that starts two children, each of which starts a grandchild.
    # Each child reports its grandchild on its own pipe and the parent prints all four on one line
    # (two shells writing to one shared pipe could interleave their digits).
    script = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen(['sh', '-c', 'sleep 60 & echo $!; wait'], stdout=subprocess.PIPE, text=True)"
        " for _ in range(2)]\n"
        "print(*(k.pid for k in kids), *(k.stdout.readline().strip() for k in kids), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = {parent.pid} | {int(p) for p in parent.stdout.readline().split()}
    assert len(pids) == 5, pids
    assert set(processtree.descendants(parent.pid, processtree.processParents())) == pids - {parent.pid}
    processtree.killProcessTree(parent.pid)
    parent.wait(timeout=10)

    def alive(pid: int) -> bool:
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        return bool(state) and not state.startswith("Z")

    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)]


def test_descendants_order_and_cycles():
    parents = {2: 1, 3: 1, 4: 2, 5: 4, 6: 99, 1: 0}
    assert processtree.descendants(1, parents) == [2, 3, 4, 5]
    assert processtree.descendants(6, parents) == []
    assert processtree.descendants(7, {7: 8, 8: 7}) == [8]


def test_dependencies_plan_and_protection():
    requirements = [dependencies.Requirement(r) for r in ("torch>=2.1,<3", "monai>=1.3,<2", "edt>=2.3", "scipy")]
    installed = {"torch": "2.5.1+cu121", "monai": "1.2.0", "edt": "2.4.1", "numpy": "2.1.0", "SimpleITK": "2.4.0"}
    missing = dependencies.missingRequirements(requirements, installed.get)
    assert [r.name for r in missing] == ["monai", "scipy"]
    torch, others = dependencies.splitTorch(dependencies.missingRequirements(requirements, {}.get))
    assert str(torch) == "torch<3,>=2.1" and [r.name for r in others] == ["monai", "edt", "scipy"]
    constraints = dependencies.protectionConstraints(installed.get).splitlines()
    assert constraints == ["numpy==2.1.0", "SimpleITK==2.4.0", "vtk<0", "requests<0", "torch==2.5.1+cu121"]
    for line in constraints:  # each is a valid pip constraint
        dependencies.Requirement(line)


def _write_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    from KneeSegLogic.io.scans import write_volume
    from KneeSegLogic.io.volume import Volume

    array = np.zeros((14, 30, 34), np.uint8)  # (k, j, i)
    array[2:12, 5:25, 4:16] = 5  # femur
    array[2:12, 5:25, 18:30] = 6  # tibia
    array[5:9, 10:20, 16:18] = 1  # femoral cartilage between them
    spacing = (0.5, 0.6, 1.5)
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    write_volume(Volume(array, spacing, (-10.0, 20.0, 5.0), direction), path)
    return array, spacing


def test_results_of_a_real_surfaces_run(tmp_path):
    """Run ``kneeseg surfaces`` and read its output folder the way the module does."""
    array, spacing = _write_labels(tmp_path / "labels.nrrd")
    out = tmp_path / "out"
    command = engine.surfacesCommand(sys.executable, tmp_path / "labels.nrrd", out, "none")
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    progress = [engine.parseProgressLine(line) for line in run.stdout.splitlines()]
    assert progress and all(p is not None for p in progress)

    data = results.readResults(out)
    volumes = results.structureVolumes(data)
    voxel = spacing[0] * spacing[1] * spacing[2]
    assert volumes == pytest.approx({"femur": (array == 5).sum() * voxel, "tibia": (array == 6).sum() * voxel,
                                     "femoral_cartilage": (array == 1).sum() * voxel})
    files = results.surfaceFiles(out, data)
    assert set(files) == set(volumes) and all(path.suffix == ".vtp" and path.is_file() for path in files.values())
    names = {"femur": "Femur", "tibia": "Tibia"}
    table = results.writeVolumesTable(data, names, tmp_path / "volumes.csv")
    rows = list(csv.DictReader(open(table, encoding="utf-8")))
    assert {row["Structure"] for row in rows} == {"Femur", "Tibia", "femoral_cartilage"}
    femur = next(row for row in rows if row["Key"] == "femur")
    assert float(femur["Volume (mm3)"]) == pytest.approx(volumes["femur"], abs=0.05)

    attributes = results.provenanceAttributes(data, {"device": "cpu"})
    assert attributes["KneeSeg.EngineCommand"] == "surfaces"
    assert json.loads(attributes["KneeSeg.Parameters"]) == {"device": "cpu"}
    assert json.loads(attributes["KneeSeg.Packages"])["KneeSegLogic"]


def test_uncertain_slices_in_the_engine_format():
    from KneeSegLogic.segmentation.uncertainty import most_uncertain_slices

    rng = np.random.default_rng(3)
    labels = np.zeros((12, 20, 22), np.uint8)
    labels[:, 5:15, 6:16] = 5
    uncertainty = rng.random(labels.shape).astype(np.float32) * 0.1
    uncertainty[7] = 0.9  # slice 7 (the scan's own slice axis, K) is the least certain
    index_to_physical = np.eye(4)
    index_to_physical[:3, 3] = (1.0, 2.0, 3.0)
    entries = most_uncertain_slices(uncertainty, labels, index_to_physical, count=3)
    slices = results.uncertainSlices({"uncertainty": {"most_uncertain_slices": entries}})
    assert len(slices) == 3 and slices[0].index == 7 and slices[0].axis == 2
    assert slices[0].positionLps == pytest.approx((1.0 + 10.5, 2.0 + 9.5, 3.0 + 7.0))
    assert "femur" in slices[0].label and "K = 7" in slices[0].label
    assert results.uncertainSlices({}) == []


def test_slice_centre_and_training_paths(tmp_path):
    assert results.sliceCentreIJK((128, 128, 24), 2, 5) == (63.5, 63.5, 5.0)
    with pytest.raises(ValueError):
        results.sliceCentreIJK((128, 128, 24), 2, 24)
    assert results.caseName(" Knee MESE (left) #2 ") == "Knee_MESE_left_2"
    assert results.caseName("***") == "case"
    image, label = results.trainingCasePaths(tmp_path, "case_1")
    assert image == tmp_path / "images" / "case_1.nrrd" and label == tmp_path / "labels" / "case_1.seg.nrrd"


# --- Quantitative MRI: what the module starts and shows -------------------------------------

# Parameter -> widget of the "Quantitative MRI" section (relax kinds, T2 model with EPG and DESS,
# region recipe or file, partial-volume exclusion, DESS sequence parameters).
QUANTITATIVE_PARAMETERS = {
    "relaxationKind": "relaxationKindComboBox", "t2Model": "t2ModelComboBox", "regionVariant": "regionVariantComboBox",
    "regionFile": "regionFilePathLineEdit", "excludeSurface": "excludeSurfaceCheckBox",
    "dessRepetitionTimeMs": "dessRepetitionTimeSpinBox", "dessFlipAngleDeg": "dessFlipAngleSpinBox",
}


def test_quantitative_controls_sit_in_their_section_and_reach_the_logic():
    root = ET.parse(UI_FILE).getroot()
    section = next(w for w in root.iter("widget") if w.get("name") == "quantitativeCollapsibleButton")
    assert section.get("class") == "ctkCollapsibleButton"
    assert section.find("property[@name='text']").findtext("string") == "Quantitative MRI"
    bound = {}
    for widget in section.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("name")
    assert bound == QUANTITATIVE_PARAMETERS
    # Every control reaches SegmentOptions in RunOptions.fromParameterNode (the Logic needs no GUI).
    method = next(n for n in ast.walk(TREE) if isinstance(n, ast.FunctionDef) and n.name == "fromParameterNode")
    read = {n.attr for n in ast.walk(method) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "parameters"}
    assert set(QUANTITATIVE_PARAMETERS) <= read
    call = next(n for n in ast.walk(method) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "SegmentOptions")
    assert {"relaxationKind", "regionFile", "excludeSurface", "repetitionTimeMs", "flipAngleDeg"} <= {k.arg for k in call.keywords}
    # The choices offered are the engine's.
    from KneeSegLogic.commands.relax import KINDS
    from KneeSegLogic.commands.t2 import T2_MODELS

    assert set(engine.RELAXATION_KINDS) == set(KINDS) and set(engine.T2_MODELS) == set(T2_MODELS)
    assert engine.RELAXATION_KINDS[0] == "t2" and engine.T2_MODELS[0] == "ncexp"


def test_relaxation_maps_load_with_units_codes_and_colour_maps():
    assignment = next(n for n in TREE.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "RELAXATION_MAPS")
    maps = eval(compile(ast.Expression(assignment.value), "RELAXATION_MAPS", "eval"),
                {"T2_WINDOW_MS": _module_constant("T2_WINDOW_MS")})
    assert maps["t2"][2] == maps["t2star"][2] == (0.0, 100.0) and maps["t1rho"][2] == (0.0, 200.0)
    assert set(maps) == set(results.RELAXATION_FILES) == set(engine.RELAXATION_KINDS)
    assert maps["t2"][1] == ("113065", "DCM", "T2") and maps["t2star"][1] == ("113064", "DCM", "T2*")
    assert maps["t1rho"][1][1].startswith("99")  # no DICOM code for T1rho: a private scheme
    source = MODULE_FILE.read_text(encoding="utf-8")
    loader = source[source.index("    def loadT2Map("):source.index("    def defaultOverlay(")]
    assert '("ms", "UCUM", "millisecond")' in loader and "ColorTableNodeFileViridis" in loader
    assert "SetVoxelValueQuantity" in loader and "AddDefaultColorLegendDisplayNode" in loader
    assert "RELAXATION_FILES[kind]" in source  # the map loaded is the one relax or t2 wrote


def _quantitative(tmp_path, **fields):
    return engine.SegmentOptions(**fields), tmp_path / "scan.nrrd", tmp_path / "series.nrrd"


@pytest.mark.parametrize("kind, model", [("t1rho", "ncexp"), ("t2star", "mono"), ("t1rho", "mono-offset")])
def test_relax_argv_parses_as_the_cli_does(tmp_path, kind, model):
    options, scan, series = _quantitative(tmp_path, relaxationKind=kind, t2Model=model, regionFile=str(tmp_path / "r.nrrd"),
                                          excludeSurface=True, device="cpu")
    times = [0.0, 10.0, 40.0, 80.0] if kind == "t1rho" else [4.0, 8.0, 12.0, 16.0]
    plan = engine.planSegmentRun("py", tmp_path, scan, None, series, times, options)
    assert [c.name for c in plan] == ["segment", "relax"] and plan[1].outputFolder == tmp_path / "relax"
    args = _parse(plan[1].args)
    assert args.command == "relax" and args.kind == kind and args.model == model and args.times == times
    assert args.input == series and args.output == tmp_path / "relax"
    assert args.mask == tmp_path / "segment" / results.SEGMENTATION_FILE
    assert args.regions == str(tmp_path / "r.nrrd") and args.exclude_surface and args.device == "cpu"
    recompute = engine.planRecompute("py", tmp_path, tmp_path / "edited.seg.nrrd", series, times, options)
    assert [c.name for c in recompute] == ["surfaces", "relax"]
    assert _parse(recompute[1].args).mask == tmp_path / "edited.seg.nrrd"
    # The input itself a T1rho series: the zero spin-lock time cannot go to segment as an echo time.
    if kind == "t1rho":
        with pytest.raises(ValueError, match="spin-lock"):
            engine.planSegmentRun("py", tmp_path, series, times, series, times, options)
    # EPG and DESS map T2 only, as the engine says.
    for t2Only in ("epg", "dess"):
        with pytest.raises(ValueError, match="T2 only"):
            engine.planSegmentRun("py", tmp_path, scan, None, series, times,
                                  engine.SegmentOptions(relaxationKind=kind, t2Model=t2Only))


def test_t2_argv_for_epg_regions_and_partial_volume_parses_as_the_cli_does(tmp_path):
    options, scan, series = _quantitative(tmp_path, t2Model="epg", regionVariant="thomas")
    plan = engine.planSegmentRun("py", tmp_path, scan, [10, 20, 30, 40], scan, [10, 20, 30, 40], options)
    assert [c.name for c in plan] == ["segment", "t2"]
    args = _parse(plan[1].args)
    assert args.command == "t2" and args.model == "epg" and args.regions == "thomas" and not args.exclude_surface
    assert args.echo_times == [10, 20, 30, 40]
    # A region file wins over the recipe; the partial-volume exclusion alone already needs the t2 step.
    options, _, _ = _quantitative(tmp_path, regionVariant="thomas", regionFile=str(tmp_path / "mine.json"), excludeSurface=True)
    plan = engine.planSegmentRun("py", tmp_path, scan, [10, 20, 30], scan, [10, 20, 30], options)
    args = _parse(plan[1].args)
    assert args.model == "ncexp" and args.regions == str(tmp_path / "mine.json") and args.exclude_surface
    assert [c.name for c in engine.planSegmentRun("py", tmp_path, scan, [10, 20, 30], scan, [10, 20, 30],
                                                  engine.SegmentOptions())] == ["segment"]


def test_dess_argv_parses_as_the_cli_does(tmp_path):
    options, scan, series = _quantitative(tmp_path, repetitionTimeMs=25.0, flipAngleDeg=30.0)
    # A two-echo series at the default model is DESS; the typed TR and flip angle go with it.
    plan = engine.planSegmentRun("py", tmp_path, scan, None, series, [7.48, 42.52], options)
    args = _parse(plan[1].args)
    assert args.command == "t2" and args.model == "dess" and args.tr == 25.0 and args.flip_angle == 30.0
    assert args.echo_times == [7.48, 42.52]
    # The input itself DESS: segment fits it with defaults only from DICOM, so the t2 step runs too.
    plan = engine.planSegmentRun("py", tmp_path, series, [7.48, 42.52], series, [7.48, 42.52], options)
    assert [c.name for c in plan] == ["segment", "t2"] and _parse(plan[1].args).model == "dess"
    # Without TR and flip angle: segment alone tries (and warns); a separate series or a recompute is refused.
    bare = engine.SegmentOptions()
    assert [c.name for c in engine.planSegmentRun("py", tmp_path, series, [7.5, 42.5], series, [7.5, 42.5], bare)] == ["segment"]
    with pytest.raises(ValueError, match="repetition time and the flip angle"):
        engine.planSegmentRun("py", tmp_path, scan, None, series, [7.5, 42.5], bare)
    with pytest.raises(ValueError, match="repetition time and the flip angle"):
        engine.planRecompute("py", tmp_path, tmp_path / "e.seg.nrrd", series, [7.5, 42.5], engine.SegmentOptions(t2Model="dess"))
    assert engine.parseEchoTimes("0, 10, 40", allowZero=True) == [0.0, 10.0, 40.0]
    with pytest.raises(ValueError):
        engine.parseEchoTimes("0, 10, 40")


def _small_knee():
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.io.volume import Volume

    labels = read_volume(REPO / "Resources" / "SampleData" / "knee_labels.nrrd")
    return Volume(np.ascontiguousarray(labels.array[::2, ::4, ::4]), tuple(s * f for s, f in zip(labels.spacing, (4, 4, 2))),
                  labels.origin, labels.direction)


def test_planned_relax_run_writes_what_the_module_loads(tmp_path, capsys):
    """The relax command the Logic builds, run by the real engine on a T1rho series of the sample
    knee (cartilage 45 ms, elsewhere 80 ms), with a user region file; read back as the module does."""
    from KneeSegLogic.commands.main import main
    from KneeSegLogic.io.scans import write_volume
    from KneeSegLogic.io.volume import Volume
    from KneeSegLogic.training.phantom import rician, tissue_maps

    small = _small_knee()
    density, _ = tissue_maps(small)
    truth = np.where(np.isin(small.array, [1, 2, 3, 4]), 45.0, 80.0)
    tsl = np.array([0.0, 10.0, 40.0, 80.0])
    signal = rician(1000.0 * density[..., None] * np.exp(-tsl / truth[..., None]), 10.0, np.random.default_rng(1))
    # As the module writes a vector volume: the file carries no times, the command line gives them.
    series = write_volume(Volume(signal.astype(np.float32), small.spacing, small.origin, small.direction, (1.0, 2.0, 3.0, 4.0)),
                          tmp_path / "t2input.nrrd")
    mask = write_volume(small, tmp_path / "edited.nrrd")
    regionFile = write_volume(small.with_array(np.where(small.array == 1, 7, 0).astype(np.uint8)), tmp_path / "mine.nrrd")
    options = engine.SegmentOptions(relaxationKind="t1rho", regionFile=str(regionFile), device="cpu")
    plan = engine.planRecompute(sys.executable, tmp_path, mask, series, list(tsl), options)
    assert main(plan[1].args[3:]) == 0, capsys.readouterr().err
    found = results.relaxationMapIn(tmp_path / "relax", tmp_path / "t2", tmp_path / "segment")
    assert found == (tmp_path / "relax", "t1rho")
    data = results.readResults(found[0])
    summary = results.relaxationSummary(data, "t1rho")
    assert summary["quantity"] == "T1rho" and summary["unit"] == "ms" and summary["times"] == "spin-lock times"
    assert summary["echo_times_ms"] == [0.0, 10.0, 40.0, 80.0]
    rows = data["t1rho"]["cartilage"]["regions"]
    assert [row["name"] for row in rows] == ["region_7"] and rows[0]["t2_mean_ms"] == pytest.approx(45.0, abs=1.5)
    assert (found[0] / results.REGIONS_TABLE_FILE).is_file()


def test_planned_dess_run_on_an_nrrd_copy_writes_what_the_module_loads(tmp_path, capsys):
    """The module hands DESS over as NRRD (no DICOM header): TR and flip angle from the panel."""
    from KneeSegLogic.commands.main import main
    from KneeSegLogic.io.scans import write_volume
    from KneeSegLogic.io.volume import Volume
    from KneeSegLogic.quantification.dess import DESS_TIMES, DessParameters, dess_signals

    small = _small_knee()
    truth = np.where(np.isin(small.array, [1, 2, 3, 4]), 35.0, 60.0)
    signal = dess_signals(truth, DessParameters(25.0, 7.48, 30.0), 800.0).astype(np.float32)
    series = write_volume(Volume(signal, small.spacing, small.origin, small.direction, (7.48, 42.52)), tmp_path / "dess.nrrd")
    mask = write_volume(small, tmp_path / "edited.nrrd")
    options = engine.SegmentOptions(repetitionTimeMs=25.0, flipAngleDeg=30.0, excludeSurface=True, device="cpu")
    plan = engine.planRecompute(sys.executable, tmp_path, mask, series, [7.48, 42.52], options)
    assert main(plan[1].args[3:]) == 0, capsys.readouterr().err
    found = results.relaxationMapIn(tmp_path / "relax", tmp_path / "t2")
    assert found == (tmp_path / "t2", "t2")
    data = results.readResults(found[0])
    assert results.relaxationSummary(data, "t2")["times"] == DESS_TIMES
    assert data["t2"]["model"] == "dess" and data["t2"]["dess_parameters"]["flip_angle_deg"] == 30.0
    assert data["t2"]["cartilage"]["surface_layer_excluded"] is True
    femoral = next(p for p in data["t2"]["cartilage"]["plates"] if p["name"] == "femoral_cartilage")
    assert femoral["t2_mean_ms"] == pytest.approx(35.0, rel=1e-3)
