"""web/krea_migrate.js, run by Node.js on the workflow files as saved before the loader's outputs became MODEL, CLIP
and VAE (KREA_MODEL, KREA_TEXT_ENCODER, KREA_VAE), in the workflow and in a subgraph; and the server-less runner
runs such an old file as it is."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
OLD_NAMES = {'"MODEL"': '"KREA_MODEL"', '"CLIP"': '"KREA_TEXT_ENCODER"', '"VAE"': '"KREA_VAE"'}


def as_saved_before(workflow: dict) -> dict:
    text = json.dumps(workflow)
    for new, old in OLD_NAMES.items():
        text = text.replace(new, old)
    return json.loads(text)


def migrated(graph: dict, tmp_path: Path) -> dict:
    (tmp_path / "old.json").write_text(json.dumps(graph))
    script = (f"import {{ migrateOldTypes }} from {json.dumps((ROOT / 'web' / 'krea_migrate.js').as_uri())};"
              "import {{ readFileSync }} from 'node:fs';".replace("{{", "{").replace("}}", "}") +
              f"const g = JSON.parse(readFileSync({json.dumps(str(tmp_path / 'old.json'))}, 'utf8'));"
              "const n = migrateOldTypes(g); console.log(JSON.stringify({n, g}));")
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend module")
@pytest.mark.parametrize(("name", "places"), [("krea_text_to_image", 9), ("krea_image_to_image", 11)])
def test_old_pack_types_become_comfyuis_standard_types(name, places, tmp_path):
    shipped = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    old = as_saved_before(shipped)
    assert old != shipped
    result = migrated(old, tmp_path)
    # each loader output, each link from it and each input it feeds
    assert result["n"] == places and result["g"] == shipped


@pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend module")
def test_old_types_inside_a_subgraph_are_renamed(tmp_path):
    shipped = json.loads((ROOT / "workflows" / "krea_text_to_image.json").read_text())
    inner = {"id": "sub", "nodes": shipped["nodes"], "links": [{"id": 1, "origin_id": 1, "origin_slot": 2,
                                                                "target_id": 4, "target_slot": 0, "type": "VAE"}],
             "inputs": [{"name": "vae", "type": "VAE"}], "outputs": []}
    graph = {"nodes": [], "links": [], "definitions": {"subgraphs": [inner]}}
    result = migrated(as_saved_before(graph), tmp_path)
    assert result["g"] == graph
    assert result["n"] == 8  # the nodes' 6 slots, the object link, the subgraph's own input


def test_the_runner_runs_a_workflow_saved_with_the_old_types(tmp_path):
    """The server-less converter reads links by slot, not by type name: an old file converts to the same prompt."""
    from comfyui_krea.standalone.node_classes import PACK_CLASSES
    from comfyui_krea.standalone.ui_workflow import local_definitions, to_api

    shipped = json.loads((ROOT / "workflows" / "krea_image_to_image.json").read_text())
    definitions = local_definitions(PACK_CLASSES)
    assert to_api(as_saved_before(shipped), definitions) == to_api(shipped, definitions)
