"""The real, unchanged fal-client against the LoRA endpoints of a server of the pack (in a subprocess: the client
reads FAL_RUN_HOST once, at import). Prints one JSON report: scenario -> what the client returned or raised; images
come back as sync_mode PNG data URIs and are reported as lists of pixels. tests/test_fal_lora_endpoints.py asserts.

    python lora_client.py HOST:PORT/PREFIX WORK_DIR FILES_URL   (env: FAL_KEY, SSL_CERT_FILE)
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import traceback
from pathlib import Path

ADDRESS, WORK, FILES = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
os.environ["FAL_RUN_HOST"] = ADDRESS
os.environ["FAL_QUEUE_RUN_HOST"] = ADDRESS + "/queue"
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

import fal_client  # noqa: E402  (after the environment is set)
import numpy as np  # noqa: E402
from fal_client import client as fal_module  # noqa: E402
from PIL import Image  # noqa: E402

fal_module.MAX_ATTEMPTS = 2

T2I, I2I = "fal-ai/flux-krea-lora", "fal-ai/flux-krea-lora/image-to-image"
INPAINT = "fal-ai/flux-krea-lora/inpainting"
BASE = {"prompt": "a lighthouse at dusk", "seed": 5, "output_format": "png", "sync_mode": True,
        "num_inference_steps": 3}
SMALL = {**BASE, "image_size": {"width": 64, "height": 48}}
TWO = [{"path": "style.safetensors", "scale": 0.7}, {"path": "sub/detail.safetensors", "scale": 0.4}]
report: dict[str, object] = {}


def scenario(name: str):
    def wrap(fn):
        try:
            report[name] = {"ok": fn()}
        except BaseException as err:  # noqa: BLE001 - every outcome is reported
            report[name] = {"error": {"class": type(err).__name__, "str": str(err)[:2000],
                                      "status_code": getattr(err, "status_code", None)},
                            "trace": traceback.format_exc()[-1500:]}
        return fn
    return wrap


def pixels(url: str) -> list:
    header, _, payload = url.partition(",")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as img:
        return np.asarray(img.convert("RGB")).tolist()


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run(endpoint: str, **arguments) -> dict:
    out = fal_client.run(endpoint, arguments=arguments)
    return {**out, "images": [pixels(i["url"]) for i in out["images"]]}


# The input of image-to-image and inpainting: a gradient; the mask repaints the left half (white), keeps the right.
gradient = np.zeros((48, 64, 3), np.uint8)
gradient[..., 0] = np.linspace(0, 255, 64)[None, :]
gradient[..., 2] = np.linspace(255, 0, 48)[:, None]
IMAGE = data_uri(Image.fromarray(gradient))
mask = np.zeros((48, 64), np.uint8)
mask[:, :32] = 255
MASK = data_uri(Image.fromarray(mask).convert("RGB"))

report["input_image"] = {"ok": gradient.tolist()}
for name, loras in (("t2i_none", []), ("t2i_two", TWO), ("t2i_one", TWO[:1]),
                    ("t2i_url", [{"path": f"{FILES}/style.safetensors", "scale": 0.7}, TWO[1]]),
                    ("t2i_url_again", [{"path": f"{FILES}/style.safetensors", "scale": 0.7}, TWO[1]])):
    scenario(name)(lambda loras=loras: run(T2I, **SMALL, loras=loras))
scenario("i2i_two")(lambda: run(I2I, **BASE, image_url=IMAGE, strength=0.8, loras=TWO))
for seed in (5, 6):
    scenario(f"inpaint_seed{seed}")(lambda seed=seed: run(INPAINT, **{**BASE, "seed": seed}, image_url=IMAGE,
                                                          mask_url=MASK, loras=TWO))


@scenario("stream")
def _():
    # fal_client.stream(app) posts to <app>/stream: fal-ai/flux-krea-lora/stream
    events = list(fal_client.stream(T2I, arguments={**SMALL, "num_inference_steps": 4, "loras": TWO}))
    return [{**e, "images": [{k: (v[:30] if k == "url" else v) for k, v in i.items()} for i in e.get("images", [])]}
            for e in events[:-1]] + [{**events[-1], "images": [pixels(i["url"]) for i in events[-1]["images"]]}]


HOSTILE = {"pickle": "pickled.safetensors", "truncated": "truncated.safetensors", "sdxl": "sdxl.safetensors",
           "wide": "wide.safetensors", "escape": "../diffusion_models/flux1-krea-dev.safetensors",
           "absolute": "/etc/passwd", "missing": "nowhere.safetensors", "huge_url": f"{FILES}/huge",
           "pickle_url": f"{FILES}/pickled.safetensors", "file_url": "file:///etc/passwd"}
for name, path in HOSTILE.items():
    scenario(f"hostile_{name}")(lambda path=path: run(T2I, **SMALL, loras=[{"path": path}]))

print(json.dumps(report))
