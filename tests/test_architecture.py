"""The tree's rules, checked on the source (imports inside functions included): the packages form layers and no
import runs back up them, there are no import circles, no module reaches into another package's private names,
only the ComfyUI host imports ComfyUI and only the host choice asks whether it runs inside it, and no source file
is over 400 lines."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model_loader", "sampling", "image_io", "fal_api", "nodes", "standalone")
# From the bottom up: a module may import its own layer and the ones below it, never one above.
LAYERS = ("model_loader", "sampling", "image_io", "fal_api", "nodes.host", "nodes", "standalone")
COMFYUI_MODULES = {"comfy", "comfy_execution", "comfy_api", "folder_paths", "server", "execution", "nodes",
                   "latent_preview"}
# The ComfyUI host: the only modules that import ComfyUI (the host choice only tries whether it imports).
COMFYUI_SIDE = {"nodes.host.comfyui_host", "nodes.host.comfyui_models", "nodes.host.fal_queue", "nodes.host"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """'model_loader.flux.loading' -> its file, for every module of the pack's packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for the pack-relative imports of a module (absolute names), wherever they are."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, node.module] if node.module else base)
            out.append((target, [a.name for a in node.names]))
    return out


def _absolute_imports(path: Path) -> set[str]:
    """The top-level names of the absolute imports of a file (`import comfy.ops` -> comfy)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _resolved(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The pack modules an import reaches: `from .x import y` is module x.y when that exists, else module x."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return found or ([target] if target in modules else [])


def _layer(module: str) -> int:
    """The index in LAYERS of the longest layer name the module is or lies in (nodes.host.x: nodes.host)."""
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return LAYERS.index(max(matches, key=len))


def test_the_host_package_lies_below_the_nodes():
    assert _layer("nodes.host.interface") < _layer("nodes.sampler") and _layer("nodes.host") < _layer("nodes")


def test_no_import_runs_back_up_the_layers():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for target, names in _imports(module, path):
            for reached in _resolved(target, names, modules):
                if _layer(reached) > _layer(module):
                    upward.append(f"{module} -> {reached}")
    assert upward == []


def test_the_layers_name_every_package():
    assert {m for m in _modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS)} == set()


def test_no_import_circles():
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _imports(module, path):
            graph[module] |= {r for r in _resolved(target, names, modules) if r != module}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import circle: " + " -> ".join([*trail, module])
        state[module] = "open"
        for target in graph[module]:
            # a package's __init__ importing its own modules is how packages work, not a circle
            if not target.startswith(module + "."):
                visit(target, [*trail, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_no_private_names_across_packages():
    for module, path in _modules().items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target, names in _imports(module, path):
            target_package = target if target in PACKAGES else target.rpartition(".")[0] or target
            private = [n for n in names if n.startswith("_")] + \
                [p for p in target.split(".") if p.startswith("_")]
            if private and not (target == package or target.startswith(package + ".")
                                or target_package == package):
                raise AssertionError(f"{module} imports private {private} from {target}")


def test_only_the_comfyui_host_imports_comfyui():
    """The engine, the protocol (fal_api: it serves both `serve` and ComfyUI), the nodes and the command line
    never import ComfyUI; nodes/host/comfyui_host.py and the modules it brings in do."""
    for module, path in _modules().items():
        if module not in COMFYUI_SIDE:
            assert not _absolute_imports(path) & COMFYUI_MODULES, module


def test_only_the_host_choice_asks_where_the_pack_runs():
    for module, path in _modules().items():
        if module != "nodes.host":
            assert "IN_COMFYUI" not in path.read_text(), module
    assert "IN_COMFYUI" not in (ROOT / "__init__.py").read_text()


def _source_files() -> list[Path]:
    """The tracked Python and JavaScript files (without git: those of the tree, installed packages left out)."""
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.js", "*.mjs"], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout.split()
    if tracked:
        return [ROOT / name for name in tracked]
    skipped = {"node_modules", ".venv", ".git", ".mutation"}
    return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".js", ".mjs") and not skipped & set(p.parts)]


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _source_files() if p.is_file()
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
