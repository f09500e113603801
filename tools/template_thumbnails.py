"""The shipped UI workflows -> their template thumbnails: workflows/<name>.jpg beside workflows/<name>.json.

ComfyUI's template browser (frontend 1.27) shows a custom node pack's workflows/<name>.json as a template card
whose picture is workflows/<name>.jpg, served beside it. No FLUX.1 Krea image can be made where this pack is
built (no GPU, no weights), so the picture is a drawing of the workflow itself: its nodes in the order they run
and the links between them, under the template's title. Run it after a workflow's layout
changes, and commit the pictures:

    python tools/template_thumbnails.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
SIZE = 512
MARGIN = 28
TITLE_HEIGHT = 96
COLOURS = {"background": (24, 26, 31), "node": (53, 57, 66), "header": (88, 96, 112), "text": (230, 232, 238),
           "link": (125, 160, 220), "accent": (236, 120, 80)}
SHORT_NAMES = {"KreaModelLoader": "Model Loader", "KreaTextEncode": "Text Encode", "KreaSampler": "Sampler",
               "KreaDecode": "Decode", "KreaSafetyCheck": "Safety Check", "KreaSaveImage": "Save Image",
               "KreaEncodeImage": "Encode Image", "LoadImage": "Load Image", "LoadImageMask": "Load Mask"}


def depths(workflow: dict) -> dict[int, int]:
    """Each node's row: the longest chain of links that leads to it (sources at 0)."""
    parents: dict[int, list[int]] = {node["id"]: [] for node in workflow["nodes"]}
    for link in workflow["links"]:  # [id, origin node, origin slot, target node, target slot, type]
        parents[link[3]].append(link[1])
    found: dict[int, int] = {}

    def depth(node_id: int) -> int:
        if node_id not in found:
            found[node_id] = 1 + max((depth(p) for p in parents[node_id]), default=-1)
        return found[node_id]

    return {node_id: depth(node_id) for node_id in parents}


def draw(workflow: dict, subtitle: str) -> Image.Image:
    """The picture of one workflow: title and subtitle on top, below them the nodes in rows, from the loaders
    down to the save node, each link an arrow from one row to a later one."""
    image = Image.new("RGB", (SIZE, SIZE), COLOURS["background"])
    pen = ImageDraw.Draw(image)
    pen.text((MARGIN, MARGIN), "FLUX.1 Krea [dev]", font=ImageFont.load_default(size=34), fill=COLOURS["text"])
    pen.text((MARGIN, MARGIN + 44), subtitle, font=ImageFont.load_default(size=24), fill=COLOURS["accent"])
    nodes = {node["id"]: node for node in workflow["nodes"]}
    rows: dict[int, list[int]] = {}
    for node_id, row in sorted(depths(workflow).items(), key=lambda item: nodes[item[0]]["pos"][0]):
        rows.setdefault(row, []).append(node_id)
    pitch = (SIZE - TITLE_HEIGHT - MARGIN) / len(rows)
    height, gap = min(34.0, pitch - 14), 20
    boxes = {}
    for row, members in rows.items():
        width = min(220, (SIZE - 2 * MARGIN - gap * (len(members) - 1)) / len(members))
        x = (SIZE - len(members) * width - gap * (len(members) - 1)) / 2
        y = TITLE_HEIGHT + row * pitch + (pitch - height) / 2
        for node_id in members:
            boxes[node_id] = (x, y, x + width, y + height)
            x += width + gap
    for link in workflow["links"]:
        start, end = boxes[link[1]], boxes[link[3]]
        a = ((start[0] + start[2]) / 2, start[3])
        b = ((end[0] + end[2]) / 2, end[1] - 2)
        pen.line([a, b], fill=COLOURS["link"], width=2)
        pen.polygon([(b[0] - 5, b[1] - 7), (b[0] + 5, b[1] - 7), b], fill=COLOURS["link"])
    label = ImageFont.load_default(size=17)
    for node_id, (x0, y0, x1, y1) in boxes.items():
        pen.rounded_rectangle((x0, y0, x1, y1), radius=8, fill=COLOURS["node"], outline=COLOURS["header"], width=2)
        name = SHORT_NAMES.get(nodes[node_id]["type"], nodes[node_id]["type"])
        pen.text(((x0 + x1) / 2, (y0 + y1) / 2), name, font=label, fill=COLOURS["text"], anchor="mm")
    return image


def main() -> int:
    for path in sorted((ROOT / "workflows").glob("*.json")):  # ComfyUI lists these (not workflows/api/)
        subtitle = path.stem.removeprefix("krea_").replace("_", " ")  # krea_text_to_image: "text to image"
        draw(json.loads(path.read_text()), subtitle).save(path.with_suffix(".jpg"), quality=88, optimize=True)
        print(f"wrote {path.with_suffix('.jpg').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
