"""The package's import structure (read from the sources, nothing imported): no import
circles; the core never imports the layers above it (ROS, command lines, evaluation,
training, data generation); backends never import the segmenter; the console scripts all
live in tdnet_ros/cli."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tdnet_ros"
#: Layers above the core: the core may not import them.
UPPER = ("tdnet_ros.ros", "tdnet_ros.cli", "tdnet_ros.evaluation", "tdnet_ros.training", "tdnet_ros.data")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of tdnet_ros that `path` imports, at any depth of its code (lazy ones too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {target for target in found if target in modules and target != name}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def is_core(name: str) -> bool:
    return name != "tdnet_ros" and not any(name == upper or name.startswith(upper + ".") for upper in UPPER)


def test_no_import_circles() -> None:
    # Package __init__ files that only re-export (lazily) are left out: importing a
    # submodule runs its package's __init__, which is not a circle of the code.
    edges = {name: {t for t in targets if not PACKAGE.joinpath(*t.split(".")[1:], "__init__.py").is_file()}
             for name, targets in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                circle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_the_core_imports_nothing_above_it() -> None:
    for name, targets in graph().items():
        if is_core(name):
            above = sorted(t for t in targets if not is_core(t) and t != "tdnet_ros")
            assert not above, f"{name} (core) imports {above}"


def test_backends_never_import_the_segmenter() -> None:
    for name, targets in graph().items():
        if name.startswith("tdnet_ros.backends"):
            assert "tdnet_ros.segmenter" not in targets, name


def test_the_core_never_imports_rclpy() -> None:
    for path in PACKAGE.rglob("*.py"):
        if is_core(module_name(path)):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] in ("rclpy", "rosidl_runtime_py") for n in names), module_name(path)


def test_console_scripts_live_in_the_cli_package() -> None:
    setup = (PACKAGE.parent / "setup.py").read_text()
    scripts = [line.split("=", 1)[1].strip().strip('",') for line in setup.splitlines() if " = tdnet_ros." in line]
    assert len(scripts) >= 8
    for target in scripts:
        module = target.split(":")[0]
        assert module.startswith("tdnet_ros.cli.") or module == "tdnet_ros.ros.entry", target
