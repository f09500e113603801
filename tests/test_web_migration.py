"""web/krea_migrate.js, run by Node.js on the workflow files saved before the loader output became MODEL."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend module")
@pytest.mark.parametrize("name", ["krea_text_to_image", "krea_image_to_image"])
def test_old_krea_model_links_become_model_links(name, tmp_path):
    shipped = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    old = json.loads(json.dumps(shipped).replace('"MODEL"', '"KREA_MODEL"'))  # as saved before the change
    assert old != shipped
    (tmp_path / "old.json").write_text(json.dumps(old))
    script = (f"import {{ migrateModelType }} from {json.dumps((ROOT / 'web' / 'krea_migrate.js').as_uri())};"
              "import {{ readFileSync }} from 'node:fs';".replace("{{", "{").replace("}}", "}") +
              f"const g = JSON.parse(readFileSync({json.dumps(str(tmp_path / 'old.json'))}, 'utf8'));"
              "const n = migrateModelType(g); console.log(JSON.stringify({n, g}));")
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60,
                         check=True)
    result = json.loads(out.stdout)
    assert result["n"] == 3  # the loader's output, the link and the sampler's input
    assert result["g"] == shipped
