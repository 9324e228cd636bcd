"""Layering of ``lrformer_edge``, checked on its static import graph (issue 17).

The graph is read from the source with ``ast`` (``tests/import_graph.py``, which documents what
counts as an import): module-level and function-level imports alike, since a deferred import is
still a dependency. Importing ``lrformer_edge.x.y`` also runs the ``__init__`` of
``lrformer_edge.x``; that implied edge is left out where the importer is inside ``lrformer_edge.x``
(Python has started that package before running any of its modules, so the edge would only
invent a cycle with every ``__init__`` that imports its children), while a module that takes a
*name* from its own package's ``__init__`` (``from lrformer_edge.backends import load_runner``)
keeps that edge.

Rules:
* no import cycles;
* every module has a layer in ``LAYERS`` and imports only its own layer or lower ones;
* a backend folder ``backends/<x>/`` imports, of the backends layer, only the shared
  ``backends/base.py`` and ``backends/nncf_support.py``, its own folder, and the ONNX building
  blocks ``backends/onnxruntime/{export,format}.py`` (the ONNX-based backends start from them);
  never another folder's runner nor the registry ``backends/__init__.py``. The shared modules
  import no backend folder. Checked on the written imports only: the implied run of
  ``backends/onnxruntime/__init__.py`` comes with an allowed import of its export or format;
* above the backends layer (pipeline, evaluation, training, quant, validation, benchmark, live,
  cli), code reaches a backend only through the registry ``backends/__init__.py``, the record
  types ``backends/base.py`` and the shared ``backends/nncf_support.py``, never a backend
  folder: adding a backend must not touch the harness, the benchmark, QAT or the CLIs (issue 17's
  acceptance for the ExecuTorch backend). The one exception is ``backends/pytorch/runner.py``:
  PyTorch is the framework the models are written in, and the pipeline, training and QAT wrap a
  live ``nn.Module`` in a ``TorchRunner``;
* ``NEVER_REACHES``: the low layers (data, metrics, models, registry) never import backends,
  validation or live; no exporter imports evaluation or the pipeline; ``registry.py`` does not
  import the scene generator for class names. These are checked through the whole chain of
  imports, not only the direct ones (the registry must not get the scene generator through
  ``data/classes.py`` either).

Where training belongs: ``quant/qat.py`` trains with ``training.py``'s loop helpers
(``init_distributed``, ``training_device``, ``AugmentedSegmentation``, ``finish_run``,
``DistInfo``, ``summed_over_processes``), and ``training.py`` evaluates with ``evaluation.py``,
so the sound order is evaluation < training < quant, each in its own layer (training is not an
application beside validation/benchmark/live: QAT builds on it). Nothing in the library imports
training or quant except each other; the scripts sit above the CLI.
"""
from __future__ import annotations

import shutil
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from import_graph import (
    ImportGraph,
    build_import_graph,
    describe_chain,
    find_cycles,
    function_level_imports,
    reach_path,
)

PACKAGE_DIR = Path(__file__).parents[1] / "lrformer_edge"

# Lowest first; a module may import its own layer and the layers below it. A pattern ending in
# ".*" is that module or package and everything inside it.
LAYERS = (
    ("core", ("lrformer_edge", "lrformer_edge.files", "lrformer_edge.cpu",
              "lrformer_edge.registry", "lrformer_edge.data.*", "lrformer_edge.metrics",
              "lrformer_edge.models.*", "lrformer_edge.preprocess", "lrformer_edge.postprocess",
              "lrformer_edge.resources", "lrformer_edge.reference", "lrformer_edge.summary",
              "lrformer_edge.progress")),
    ("artifacts", ("lrformer_edge.artifacts.*",)),
    ("backends", ("lrformer_edge.backends.*",)),
    ("pipeline", ("lrformer_edge.pipeline",)),
    ("evaluation", ("lrformer_edge.evaluation",)),
    ("training", ("lrformer_edge.training",)),
    ("quantization", ("lrformer_edge.quant.*",)),
    ("applications", ("lrformer_edge.validation.*", "lrformer_edge.benchmark",
                      "lrformer_edge.live.*")),
    ("cli", ("lrformer_edge.cli",)),
    # What an export command does around the export (variant note, --validate): it uses the
    # shared arguments of cli.py, and only the registry below.
    ("commands", ("lrformer_edge.export_flow",)),
)

BACKENDS = "lrformer_edge.backends"
SHARED_BACKEND_MODULES = ("lrformer_edge.backends.base", "lrformer_edge.backends.nncf_support",
                          "lrformer_edge.backends.nncf_statistics",
                          "lrformer_edge.backends.activation_statistics",
                          "lrformer_edge.backends.nncf_collectors",
                          "lrformer_edge.backends.layer_names")
ONNX_BUILDING_BLOCKS = ("lrformer_edge.backends.onnxruntime.export",
                        "lrformer_edge.backends.onnxruntime.format")

# Backend-folder modules that code above the backends layer may import by name (see docstring)
NAMED_FROM_ABOVE = ("lrformer_edge.backends.pytorch.runner",)

# (importers, modules they must not reach through any chain of imports, why)
NEVER_REACHES = (
    (("lrformer_edge.data.*", "lrformer_edge.metrics", "lrformer_edge.models.*",
      "lrformer_edge.registry"),
     ("lrformer_edge.backends.*", "lrformer_edge.validation.*", "lrformer_edge.live.*"),
     "the low layers never import backends, validation or live"),
    (("lrformer_edge.backends.*.export",),
     ("lrformer_edge.evaluation", "lrformer_edge.pipeline"),
     "no exporter imports evaluation or the pipeline"),
    (("lrformer_edge.registry",),
     ("lrformer_edge.data.procedural",),
     "registry.py does not import the scene generator to get class names"),
)


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return module == pattern[:-2] or module.startswith(pattern[:-1])
    return fnmatchcase(module, pattern)


def layer_of(module: str, layers=LAYERS) -> int | None:
    for level, (_, patterns) in enumerate(layers):
        if any(matches(module, p) for p in patterns):
            return level
    return None


def _describe(imp, reason: str) -> str:
    where = " (in a function)" if imp.in_function else ""
    runs = " (runs its __init__)" if imp.implied else ""
    return f"{imp.where()}: {imp.importer} imports {imp.target}{runs}{where}: {reason}"


def upward_imports(graph: ImportGraph, layers=LAYERS) -> list[str]:
    """Modules without a layer, and every import of a higher layer."""
    problems = [f"{graph.modules[m]}: {m} has no layer: place it in LAYERS"
                for m in sorted(graph.modules) if layer_of(m, layers) is None]
    explicit_upward = set()
    for imp in sorted(graph.imports, key=lambda i: (str(i.file), i.line, i.implied)):
        low, high = layer_of(imp.importer, layers), layer_of(imp.target, layers)
        if low is None or high is None or high <= low:
            continue
        if imp.implied and (imp.file, imp.line) in explicit_upward:
            continue  # the same import statement is already reported
        explicit_upward.add((imp.file, imp.line))
        problems.append(_describe(imp, f"layer {layers[low][0]} imports layer {layers[high][0]}"))
    return problems


def backend_folder(graph: ImportGraph, module: str) -> str | None:
    """``x`` for a module of ``lrformer_edge/backends/<x>/``."""
    parts = module.split(".")
    if len(parts) < 3 or ".".join(parts[:2]) != BACKENDS:
        return None
    folder = ".".join(parts[:3])
    return parts[2] if graph.modules.get(folder, Path()).name == "__init__.py" else None


def backend_folder_violations(graph: ImportGraph) -> list[str]:
    problems = []
    for imp in graph.imports:
        if imp.implied or not matches(imp.target, BACKENDS + ".*"):
            continue
        folder = backend_folder(graph, imp.importer)
        if folder is not None:
            allowed = (imp.target in SHARED_BACKEND_MODULES or imp.target in ONNX_BUILDING_BLOCKS
                       or backend_folder(graph, imp.target) == folder)
            if not allowed:
                problems.append(_describe(imp, f"backends/{folder}/ imports only artifacts, "
                                               f"backends/base.py, backends/nncf_support.py, "
                                               f"backends/nncf_statistics.py, "
                                               f"backends/activation_statistics.py, "
                                               f"backends/nncf_collectors.py, "
                                               f"backends/layer_names.py, its "
                                               f"own folder and onnxruntime/{{export,format}}.py"))
        elif imp.importer in SHARED_BACKEND_MODULES and imp.target not in SHARED_BACKEND_MODULES:
            problems.append(_describe(imp, "the shared backend modules import no backend"))
    return sorted(problems)


def backends_named_from_above(graph: ImportGraph, layers=LAYERS) -> list[str]:
    """Imports of a backend folder's module by code above the backends layer."""
    backends_layer = layer_of(BACKENDS, layers)
    problems = []
    for imp in graph.imports:
        above = (layer_of(imp.importer, layers) or 0) > backends_layer
        if (above and not imp.implied and backend_folder(graph, imp.target) is not None
                and imp.target not in NAMED_FROM_ABOVE):
            problems.append(_describe(imp, "above the backends, ask the registry "
                                           "(lrformer_edge.backends), not a backend's folder"))
    return sorted(problems)


def forbidden_reaches(graph: ImportGraph, rules=NEVER_REACHES) -> list[str]:
    problems = []
    for importers, targets, reason in rules:
        for source in sorted(m for m in graph.modules if any(matches(m, p) for p in importers)):
            for goal in sorted(m for m in graph.modules if any(matches(m, p) for p in targets)):
                chain = reach_path(graph, source, goal)
                if chain:
                    problems.append(f"{reason}: {describe_chain(graph, chain)}")
    return problems


def layer_violations(graph: ImportGraph, layers=LAYERS) -> list[str]:
    return (upward_imports(graph, layers) + backend_folder_violations(graph)
            + backends_named_from_above(graph, layers) + forbidden_reaches(graph))


def _report(title: str, problems: list[str]) -> str:
    return f"{len(problems)} {title}:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_import_graph(PACKAGE_DIR, root=PACKAGE_DIR.parent)


def test_the_graph_is_read_from_the_source(graph):
    assert "lrformer_edge.backends.openvino.export" in graph.modules
    assert graph.modules["lrformer_edge.backends"] == Path("lrformer_edge/backends/__init__.py")
    registry_imports = {i.target for i in graph.imports if i.importer == "lrformer_edge"}
    assert "lrformer_edge.registry" in registry_imports


def test_every_import_of_the_package_names_a_module_of_it(graph):
    unresolved = [f"{where}: imports {name}, which is no module of lrformer_edge"
                  for where, name in graph.unresolved]
    assert not unresolved, _report("imports of missing modules", unresolved)


def test_no_import_cycles(graph):
    cycles = [describe_chain(graph, cycle) for cycle in find_cycles(graph)]
    assert not cycles, _report("import cycles", cycles)


def test_every_module_imports_only_its_layer_or_lower(graph):
    problems = upward_imports(graph)
    assert not problems, _report("imports of a higher layer", problems)


def test_backend_folders_import_only_shared_code(graph):
    problems = backend_folder_violations(graph)
    assert not problems, _report("imports across backend folders", problems)


def test_code_above_the_backends_goes_through_the_registry(graph):
    problems = backends_named_from_above(graph)
    assert not problems, _report("imports of a backend folder from above the backends", problems)


def test_low_layers_exporters_and_registry_stay_clear(graph):
    problems = forbidden_reaches(graph)
    assert not problems, _report("forbidden import chains", problems)


# --- the checker itself ------------------------------------------------------------------------

def _copy_package(tmp_path: Path) -> Path:
    copy = tmp_path / "lrformer_edge"
    shutil.copytree(PACKAGE_DIR, copy, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or (Path(folder, n).is_file()
                                                   and not n.endswith(".py"))])
    return copy


def test_a_planted_cycle_and_upward_import_are_reported(tmp_path, graph):
    copy = _copy_package(tmp_path)
    with open(copy / "metrics.py", "a", encoding="utf-8") as metrics:
        metrics.write("\nfrom lrformer_edge.benchmark import run_benchmark  # planted\n")
    planted = build_import_graph(copy, root=tmp_path)
    line = len((copy / "metrics.py").read_text(encoding="utf-8").splitlines())

    before = {tuple(c) for c in find_cycles(graph)}
    new_cycles = [c for c in find_cycles(planted) if tuple(c) not in before]
    assert any(("lrformer_edge.metrics", "lrformer_edge.benchmark") in zip(c, c[1:])
               for c in new_cycles), new_cycles
    upward = upward_imports(planted)
    assert (f"{Path('lrformer_edge/metrics.py')}:{line}: lrformer_edge.metrics imports "
            f"lrformer_edge.benchmark: layer core imports layer applications") in upward
    assert not any("lrformer_edge.metrics imports" in p for p in upward_imports(graph))


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return root / "pkg"


def test_two_modules_importing_each_other_are_a_cycle(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import helper\n",
        "b.py": "def helper():\n    from . import a  # relative, in a function\n",
    })
    graph = build_import_graph(package)
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert describe_chain(graph, ["pkg.a", "pkg.b", "pkg.a"]).splitlines()[1:] == [
        f"    pkg.a -> pkg.b  at {Path('pkg/a.py')}:1",
        f"    pkg.b -> pkg.a  at {Path('pkg/b.py')}:2",
    ]
    assert {i.target: i.in_function for i in graph.imports} == {"pkg.b": False, "pkg.a": True}


def test_a_package_init_importing_its_children_is_no_cycle(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "from pkg.sub.child import VALUE\n",
        "sub/__init__.py": "import pkg.sub.child\n",
        "sub/child.py": "from pkg.sub import sibling\nVALUE = 1\n",
        "sub/sibling.py": "",
        "user.py": "import importlib\nsibling = importlib.import_module('pkg.sub.sibling')\n",
    })
    graph = build_import_graph(package)
    assert find_cycles(graph) == []
    # importing pkg.sub.<x> from outside pkg.sub runs pkg/sub/__init__.py: an implied edge
    implied = {(i.importer, i.target) for i in graph.imports if i.implied}
    assert implied == {("pkg", "pkg.sub"), ("pkg.user", "pkg.sub")}


def test_taking_a_name_from_the_own_package_init_is_a_cycle(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "from pkg.child import helper\nREGISTRY = {}\n",
        "child.py": "from pkg import REGISTRY\ndef helper():\n    pass\n",
    })
    assert find_cycles(build_import_graph(package)) == [["pkg", "pkg.child", "pkg"]]


def test_imports_of_missing_modules_are_listed(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.moved.away import thing\n",
    })
    assert build_import_graph(package).unresolved == [(f"{Path('pkg/a.py')}:2", "pkg.moved.away")]


def main(argv: list[str]) -> int:
    """Print every cycle, rule violation and function-level import of lrformer_edge (or of a
    copy of it: ``python tests/test_import_graph.py /tmp/copy/lrformer_edge``)."""
    graph = build_import_graph(Path(argv[0]) if argv else PACKAGE_DIR)
    cycles = find_cycles(graph)
    violations = layer_violations(graph)
    unresolved = [f"{where}: imports {name}" for where, name in graph.unresolved]
    print(f"{len(graph.modules)} modules, {len(graph.imports)} import edges\n")
    print(_report("import cycles", [describe_chain(graph, c) for c in cycles]) + "\n")
    print(_report("rule violations", violations) + "\n")
    print(_report("imports of missing modules", unresolved) + "\n")
    counts = function_level_imports(graph)
    print(f"{sum(counts.values())} function-level imports of lrformer_edge modules, by file:")
    for file, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{count:4d}  {file}")
    return 1 if cycles or violations or unresolved else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
