"""The code's shape: no import cycles, no flags defined on import, and a code map that names every module."""

import ast
import importlib
import pathlib
import pkgutil

from helpers import ROOT

PACKAGES = ("trainer", "launch")


def project_imports(path: pathlib.Path) -> set[str]:
    """The project modules a file imports anywhere in it (top level or inside functions)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES:
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                imported.add(node.module)
    modules = {f"{package}.{file.stem}" for package in PACKAGES for file in (ROOT / package).glob("*.py")}
    return {name for name in imported if name in modules}


def import_graph() -> dict[str, set[str]]:
    return {f"{package}.{file.stem}": project_imports(file)
            for package in PACKAGES for file in sorted((ROOT / package).glob("*.py")) if file.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state, stack = {}, []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_module_of_trainer_or_launch_imports_itself_in_a_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_importing_every_trainer_module_defines_no_flags():
    from absl import flags

    import trainer

    for module in pkgutil.iter_modules(trainer.__path__):
        importlib.import_module(f"trainer.{module.name}")
    assert [name for name in flags.FLAGS.flags_by_module_dict() if name.startswith("trainer")] == []


def test_the_package_docstring_maps_every_module():
    import trainer

    code_map = trainer.__doc__
    missing = [file.stem for file in (ROOT / "trainer").glob("*.py")
               if file.stem != "__init__" and f"{file.stem}.py" not in code_map]
    assert not missing, f"trainer/__init__.py's code map does not name {missing}"
