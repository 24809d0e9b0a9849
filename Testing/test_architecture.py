"""The engine's layout: layers import only downward, no import circles, a lazy public API, and
source that Python 3.9 (Slicer 5.8) can run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "KneeSegLogic"

# Lower number = lower layer. A module may import from its own layer or any lower one.
LAYERS = {
    "errors": 0, "tissues": 0, "resources": 0, "device": 0, "distances": 0,
    "io": 1,
    "segmentation": 2, "quantification": 2, "evaluation": 2,
    "training": 3, "pipeline": 3,
    "commands": 4,
    "__main__": 5,
}  # fmt: skip
# Within layer 2, quantification and evaluation are measurement layers that a segmentation
# module must not need, and segmentation must not need them either way round.
FORBIDDEN = {("segmentation", "quantification"), ("segmentation", "evaluation"), ("quantification", "segmentation"),
             ("evaluation", "segmentation"), ("evaluation", "quantification"), ("pipeline", "training")}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Engine modules imported by ``path`` anywhere (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("KneeSegLogic"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("KneeSegLogic"))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the engine uses absolute imports")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name and m != "KneeSegLogic"}
    return graph


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "KneeSegLogic"
    return top, LAYERS.get(top, -1)


def test_every_module_is_in_a_known_layer():
    unknown = sorted(m for m in _graph() if m != "KneeSegLogic" and _layer(m)[1] < 0)
    assert not unknown, f"modules outside the layer table: {unknown}"


def test_imports_run_downward_only():
    problems = []
    for module, imported in _graph().items():
        if module == "KneeSegLogic":
            continue
        top, level = _layer(module)
        for target in imported:
            target_top, target_level = _layer(target)
            if target_level > level or (top, target_top) in FORBIDDEN:
                problems.append(f"{module} imports {target}")
    assert not problems, "imports against the layer order:\n" + "\n".join(sorted(problems))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_subpackages_hold_a_readable_number_of_modules():
    for package in (p for p in ENGINE.iterdir() if (p / "__init__.py").is_file()):
        modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
        assert 2 <= len(modules) <= 11, f"{package.name}: {len(modules)} modules"


def test_public_api_is_complete_and_lazy():
    code = ("import sys, KneeSegLogic as ks; heavy = [m for m in ('torch', 'monai', 'vtk') if m in sys.modules]; "
            "print(heavy); print(sorted(ks.__all__) == sorted(['__version__', *ks._API]));"
            "print(all(callable(getattr(ks, n)) for n in ks._API))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True", "True"]


def test_public_api_names_the_library_functions():
    import KneeSegLogic as ks
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline.segment import segment_scan

    assert ks.read_volume is read_volume and ks.segment is segment_scan
    with pytest.raises(AttributeError, match="no attribute 'segment_volume'"):
        _ = ks.segment_volume


def test_engine_source_runs_on_python_3_9():
    """Slicer 5.8 ships Python 3.9: no 3.10 syntax, and annotations are never evaluated."""
    problems = []
    for path in ENGINE.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(), feature_version=(3, 9))  # match statements etc. fail here
        except SyntaxError as error:
            problems.append(f"{path.name}:{error.lineno}: not Python 3.9 syntax ({error.msg})")
            continue
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
        code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if code and not future and path.name != "__main__.py":
            problems.append(f"{path.name}: no `from __future__ import annotations`")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            # X | Y evaluated at run time needs 3.10 (annotations are strings with the future import).
            if name in ("isinstance", "issubclass") and any(
                isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr) for a in node.args[1:]
            ):
                problems.append(f"{path.name}:{node.lineno}: isinstance with X | Y")
            if name == "zip" and any(k.arg == "strict" for k in node.keywords):
                problems.append(f"{path.name}:{node.lineno}: zip(strict=) is Python 3.10")
            if name == "dataclass" and any(k.arg in ("slots", "kw_only") for k in node.keywords):
                problems.append(f"{path.name}:{node.lineno}: dataclass(slots/kw_only) is Python 3.10")
    assert not problems, "\n".join(problems)


def test_readme_code_map_matches_the_tree():
    readme = (ENGINE.parent / "README.md").read_text()
    section = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            named.update(name.strip().strip("`") for name in row.split("|")[1].split(","))
    packages = {f"{p.name}/" for p in ENGINE.iterdir() if (p / "__init__.py").is_file()}
    top_modules = {p.name for p in ENGINE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert named == packages | top_modules, f"README code map {sorted(named)} vs tree {sorted(packages | top_modules)}"


def test_tests_mirror_the_subpackages():
    testing = ENGINE.parent / "Testing"
    packages = {p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in testing.iterdir() if p.is_dir() and list(p.glob("test_*.py"))}
    assert packages <= folders | {"commands"} and folders <= packages | {"slicer"}, (packages, folders)
    assert sorted(p.name for p in testing.glob("test_*.py")) == ["test_architecture.py"]
