"""The code's shape: no import cycles, no flags defined on import, a flag registry per entry point, and a code map
that names every module."""

import ast
import importlib
import pathlib

from helpers import ROOT

PACKAGES = ("trainer", "launch")
# trainer's three concerns, one subpackage each; its entry points and shared declarations stay at the top.
SUBPACKAGES = ("training", "results", "serving")
ENTRY_POINTS = ("task", "evaluate", "predict", "compare", "serve")


def module_files(package: str) -> list[tuple[str, pathlib.Path]]:
    """(dotted module name, file) for every module of a top-level package, its subpackages included."""
    root = ROOT / package
    return [(".".join((package, *path.relative_to(root).with_suffix("").parts)), path)
            for path in sorted(root.rglob("*.py")) if path.stem != "__init__" and "static" not in path.parts]


def project_imports(path: pathlib.Path) -> set[str]:
    """The project modules a file imports anywhere in it (top level or inside functions)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES or node.module in {f"trainer.{sub}" for sub in SUBPACKAGES}:
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                imported.add(node.module)
    modules = {name for package in PACKAGES for name, _ in module_files(package)}
    return {name for name in imported if name in modules}


def import_graph() -> dict[str, set[str]]:
    return {name: project_imports(file) for package in PACKAGES for name, file in module_files(package)}


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


# Modules that the layout tests do not import: they run in another environment, without absl.
NOT_IMPORTED = {"benchmarks.parity_reference": "runs in the parity harness's torch environment (argparse, no absl)"}
# Entry points that add their flags to another's registry instead of making one, and why.
SHARED_REGISTRIES = {"launch.vertex_tune": "`launch.vertex tune`: each trial is launch.vertex's CustomJob, so its "
                     "flags join launch.vertex's registry"}


def own_modules() -> list[str]:
    """Every module of trainer/, launch/ and benchmarks/ (as the benchmarks package, which they import as)."""
    return [name for package in (*PACKAGES, "benchmarks") for name, _ in module_files(package)]


def entry_points() -> list[str]:
    """The modules that parse a command line: they start through cli.start or absl's app.run."""
    return [module for module in own_modules() if module not in NOT_IMPORTED and any(
        call in (ROOT / f"{module.replace('.', '/')}.py").read_text() for call in ("cli.start(", "app.run("))
        and module != "trainer.cli"]


def test_importing_any_module_defines_no_flags_on_the_global_registry():
    """Each import is compared with the registry before it, in this process, as entry points and tests import them."""
    from absl import flags

    for module in own_modules():
        if module in NOT_IMPORTED:
            assert "absl" not in (ROOT / f"{module.replace('.', '/')}.py").read_text(), module
            continue
        before = set(flags.FLAGS)
        importlib.import_module(module)
        # Libraries may define theirs (TFDS does); only ours are counted.
        added = {name for name in set(flags.FLAGS) - before
                 if flags.FLAGS.find_module_defining_flag(name).startswith((*PACKAGES, "benchmarks"))}
        assert not added, f"importing {module} defined {sorted(added)} on absl's global registry"


def test_every_entry_point_makes_its_flags_in_a_registry_of_its_own():
    from absl import flags

    registries = {}
    for module_name in entry_points():
        if module_name in SHARED_REGISTRIES:
            continue
        module = importlib.import_module(module_name)
        registry = getattr(module, "FLAGS", None)
        assert isinstance(registry, flags.FlagValues) and registry is not flags.FLAGS, \
            f"{module_name} must make its flags in its own registry: FLAGS = cli.flag_registry()"
        assert id(registry) not in registries, f"{module_name} shares {registries.get(id(registry))}'s registry"
        registries[id(registry)] = module_name
    assert {"trainer.task", "launch.vertex", "launch.vertex_deploy", "launch.gke_serve",
            "benchmarks.run"} <= set(registries.values())


def test_the_shared_registries_are_still_shared():
    """Drop an entry of SHARED_REGISTRIES once its module makes a registry of its own."""
    for module_name in SHARED_REGISTRIES:
        assert not hasattr(importlib.import_module(module_name), "FLAGS"), module_name


def test_the_package_docstring_maps_every_module():
    import trainer

    code_map = trainer.__doc__
    missing = [str(path.relative_to(ROOT / "trainer")) for _, path in module_files("trainer")
               if f" {path.relative_to(ROOT / 'trainer')} " not in code_map]
    assert not missing, f"trainer/__init__.py's code map does not name {missing}"


def test_trainer_keeps_its_three_concerns_in_subpackages_and_only_entry_points_and_declarations_on_top():
    top = sorted(path.stem for path in (ROOT / "trainer").glob("*.py") if path.stem != "__init__")
    assert set(top) <= {*ENTRY_POINTS, "cli", "errors", "config", "recipes", "image_files", "display_text"}, top
    for sub in SUBPACKAGES:
        assert (ROOT / "trainer" / sub / "__init__.py").is_file(), sub
    assert (ROOT / "trainer" / "serving" / "static" / "index.html").is_file()


def test_the_tools_entry_points_hold_no_library_code():
    """`python -m trainer.evaluate` and the like only start their subpackage's module: code that other modules use
    lives there (trainer.task, which turns flags into a Config and calls the trainer, is the one entry point with a
    function of its own)."""
    for name in ENTRY_POINTS:
        if name == "task":
            continue
        tree = ast.parse((ROOT / "trainer" / f"{name}.py").read_text())
        # A `with` block may hold imports only (cli.without_garbage_collection around them).
        body = [inner for node in tree.body for inner in (node.body if isinstance(node, ast.With) else [node])]
        kinds = {type(node).__name__ for node in body} - {"Import", "ImportFrom", "Expr", "If"}
        assert not kinds, f"trainer/{name}.py defines {kinds}: move it to its subpackage"


def test_no_class_of_trainer_or_launch_is_over_150_lines():
    long_classes = {f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
                    for package in PACKAGES for _, path in module_files(package)
                    for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
                    and node.end_lineno - node.lineno + 1 > 150}
    assert not long_classes, f"split these by what changes together: {long_classes}"


def test_no_module_reads_a_checkpoint_by_its_internal_names():
    """A checkpoint's entries come from checkpoint_schema.checkpoint_objects, for writers and readers alike."""
    readers = [str(path.relative_to(ROOT)) for package in PACKAGES for _, path in module_files(package)
               if ".ATTRIBUTES" in path.read_text() or "VARIABLE_VALUE" in path.read_text()]
    assert not readers, readers


def test_no_model_name_rules_outside_the_model_specs():
    """Each network's differences live in its trainer/training/model_specs.py entry, not in rules on its name."""
    rules = [f"{path.relative_to(ROOT)}:{number}" for _, path in module_files("trainer")
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if "model ==" in line or "model !=" in line or '["model"] ==' in line]
    assert not rules, rules
