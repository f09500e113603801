"""The real, unchanged fal-client sending many mixed requests at once to `serve --ray` (tests/test_fal_ray.py).
Prints one JSON line: a list with, per request, its kind and what the client returned (sizes, seed, formats) or
raised.

    python ray_python_client.py HOST:PORT COUNT WORK_DIR   (env: FAL_KEY, SSL_CERT_FILE set by the test)
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ADDRESS, COUNT, WORK = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
os.environ["FAL_RUN_HOST"] = ADDRESS
os.environ["FAL_QUEUE_RUN_HOST"] = ADDRESS + "/queue"
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

import fal_client  # noqa: E402  (after the environment is set)
import httpx  # noqa: E402
from fal_client import client as fal_module  # noqa: E402
from PIL import Image  # noqa: E402

fal_module.REST_URL = fal_module.CDN_URL = f"https://{ADDRESS}"  # uploads go to the server too

T2I, I2I = "fal-ai/flux/krea", "fal-ai/flux/krea/image-to-image"


def sizes(output: dict) -> list[list[int]]:
    """The size of each image as decoded from what its URL serves (a data URI or this server's file)."""
    out = []
    for image in output["images"]:
        if image["url"].startswith("data:"):
            data = base64.b64decode(image["url"].partition(",")[2])
        else:
            data = httpx.get(image["url"], verify=os.environ["SSL_CERT_FILE"]).content
        with Image.open(io.BytesIO(data)) as img:
            out.append(list(img.size))
    return out


def one(index: int) -> dict:
    kind = ("run", "submit", "subscribe", "sync_mode", "image_to_image")[index % 5]
    size = {"width": 64 + 16 * (index % 3), "height": 48}
    arguments = {"prompt": f"request {index}", "image_size": size, "num_inference_steps": 2 + index % 3,
                 "seed": index, "num_images": 1 + index % 2, "output_format": ("jpeg", "png")[index % 2]}
    try:
        if kind == "run":
            output = fal_client.run(T2I, arguments=arguments)
        elif kind == "submit":
            handle = fal_client.submit(T2I, arguments=arguments)
            output = handle.get()
        elif kind == "subscribe":
            output = fal_client.subscribe(T2I, arguments=arguments, with_logs=True, on_queue_update=lambda u: None)
        elif kind == "sync_mode":
            output = fal_client.run(T2I, arguments={**arguments, "sync_mode": True})
        else:
            picture = WORK / f"input-{index}.png"
            Image.new("RGB", (80, 48), (index * 10 % 255, 90, 160)).save(picture)
            url = fal_client.upload_file(picture)
            arguments = {k: v for k, v in arguments.items() if k != "image_size"}
            output = fal_client.run(I2I, arguments={**arguments, "image_url": url, "strength": 0.8})
            size = {"width": 80, "height": 48}
        return {"index": index, "kind": kind, "seed": output["seed"], "sizes": sizes(output),
                "expected": [[size["width"], size["height"]]] * arguments["num_images"]}
    except BaseException as err:  # noqa: BLE001 - reported
        return {"index": index, "kind": kind, "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-1500:]}


with ThreadPoolExecutor(max_workers=6) as pool:
    report = list(pool.map(one, range(COUNT)))
print(json.dumps(report))
