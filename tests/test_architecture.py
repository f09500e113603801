"""The tree's rules, checked on the source: engine packages never import ComfyUI or the graph side, no import
circles between modules, and no module reaches into another package's private names."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model_loader", "sampling", "nodes", "standalone", "image_io", "fal_api")


def _modules() -> dict[str, Path]:
    """'model_loader.flux.loading' -> its file, for every module of the pack's packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names) for the pack-relative imports of a module (absolute names)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, node.module] if node.module else base)
            out.append((target, [a.name for a in node.names]))
    return out


def test_engine_never_imports_comfyui_or_the_graph_side():
    for module, path in _modules().items():
        if not module.startswith(("model_loader", "sampling", "image_io")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("comfy", "folder_paths", "server", "nodes") for n in names), module
        for target, _ in _imports(module, path, top_level_only=False):
            assert not target.startswith(("nodes", "standalone")), f"{module} imports {target}"


def test_no_import_circles():
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _imports(module, path, top_level_only=True):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != module:
                    graph[module].add(candidate)
                    break
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
        for target, names in _imports(module, path, top_level_only=False):
            target_package = target if target in PACKAGES else target.rpartition(".")[0] or target
            private = [n for n in names if n.startswith("_")] + \
                [p for p in target.split(".") if p.startswith("_")]
            if private and not (target == package or target.startswith(package + ".")
                                or target_package == package):
                raise AssertionError(f"{module} imports private {private} from {target}")


def test_the_protocol_never_imports_comfyui():
    """fal_api serves both `serve` and ComfyUI: only nodes/host/fal_queue.py knows ComfyUI's queue."""
    for module, path in _modules().items():
        if not module.startswith("fal_api"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("comfy", "folder_paths", "server", "nodes", "execution",
                                               "comfy_execution") for n in names), module
