"""The package's import structure: one-way layers, no circle, no deferred imports of its own modules,
no private name taken from another module (read from the source, nothing imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bayes_adalora"
# The command-line entry and the package's __init__ may defer imports (a fast --help, a light import).
MAY_DEFER = {"cli", "__init__"}
# Lower layers first: a module may import only from its own layer's earlier modules or from lower layers.
LAYERS = [
    {"errors", "paths", "tasks", "methods", "importance", "posterior", "schedules", "metrics", "evaluation", "recipes",
     "steps", "sharding", "ivon_inplace", "lm_metrics", "ivon_settings"},
    {"config", "data", "models", "adapters", "checkpoint", "fast_adalora", "lm_data"},
    {"allocator", "build", "predict", "run_folder", "lm_predict", "kinds", "trackers", "trainer_args",
     "trainer_metrics"},
    {"trainer_callback", "trainer_checkpoints", "trainer_fsdp", "train", "run_io", "hf_trainer", "export"},
    {"cli", "plots", "__init__"},
]


def package_imports(path: Path) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, imported module, imported names, at module level) for each import of a package module."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.append((node, node.module.split(".")[0], [a.name for a in node.names], id(node) in top))
            elif node.level == 1:  # `from . import x`: module x, or a name of the package's __init__
                for alias in node.names:
                    module = alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__"
                    found.append((node, module, [] if module == alias.name else [alias.name], id(node) in top))
            elif (node.module or "").startswith("bayes_adalora"):
                module = node.module.split(".")[1] if "." in node.module else "__init__"
                found.append((node, module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bayes_adalora"):
                    found.append((node, alias.name.partition(".")[2] or "__init__", [], id(node) in top))
    return found


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(modules()) == placed, "place new modules in LAYERS"


def test_no_package_module_is_imported_inside_a_function():
    deferred = [f"{name}.py line {node.lineno}: {module}" for name, path in modules().items() if name not in MAY_DEFER
                for node, module, _, at_top in package_imports(path) if not at_top]
    assert not deferred


def test_no_private_name_crosses_a_module():
    private = [f"{name}.py line {node.lineno}: {module}.{n}" for name, path in modules().items()
               for node, module, names, _ in package_imports(path) for n in names
               if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]  # a dunder is public
    assert not private


def test_imports_point_down_the_layers_and_form_no_circle():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = []
    graph = {}
    for name, path in modules().items():
        graph[name] = {module for _, module, _, at_top in package_imports(path) if at_top}
        upward += [f"{name} -> {m}" for m in graph[name] if layer_of[m] > layer_of[name]]
    assert not upward
    # no circle, within a layer too: a topological order exists
    remaining = dict(graph)
    while remaining:
        free = [m for m, deps in remaining.items() if not deps & set(remaining)]
        assert free, f"an import circle among {sorted(remaining)}"
        for m in free:
            del remaining[m]


def test_the_structure_checks_see_what_they_look_for(tmp_path):
    """A deferred import and a private name are found (so the checks above can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from .a import _hidden\n\ndef f():\n    from .b import g\n")
    found = package_imports(probe)
    assert [(m, names, top) for _, m, names, top in found] == [("a", ["_hidden"], True), ("b", ["g"], False)]


def test_one_place_enters_ivons_sampled_step():
    users = [p.name for p in PACKAGE.glob("*.py")
             if re.search(r"\.(_sample_params|sampled_params)\(", p.read_text())]  # calls, not definitions
    assert users == ["steps.py"]
