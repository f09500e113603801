"""The repo root loads the way ComfyUI loads custom node folders, under any folder name."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODES = {"KreaModelLoader", "KreaTextEncode", "KreaSampler", "KreaEncodeImage", "KreaDecode", "KreaSafetyCheck",
         "KreaSaveImage"}


def test_loads_like_comfyui_custom_nodes(tmp_path):
    # ComfyUI: spec_from_file_location(<folder path with '.' replaced>, <folder>/__init__.py, as a package)
    folder = tmp_path / "custom_nodes" / "comfyui-krea"
    folder.parent.mkdir()
    folder.symlink_to(ROOT, target_is_directory=True)
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == NODES
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == NODES
        assert module.WEB_DIRECTORY == "./web"
        for node_id, cls in module.NODE_CLASS_MAPPINGS.items():
            assert cls.CATEGORY.startswith("Krea/"), node_id
            cls.INPUT_TYPES()
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_import_loads_no_model_and_writes_nothing(tmp_path):
    code = ("import comfyui_krea, torch, gc\n"
            "big = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]\n"
            "assert not big, big[:3]\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert list(tmp_path.iterdir()) == []


def test_every_package_folder_is_installed_by_pip():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        # Only packages hold packages: tests/, bench/, web/ and hidden folders (.venv, .git) are not walked.
        subfolders[:] = [name for name in subfolders if (Path(folder) / name / "__init__.py").is_file()]
        if "__init__.py" in files:
            found.append(".".join(["comfyui_krea", *Path(folder).relative_to(ROOT).parts]))
    assert sorted(listed) == sorted(found)
