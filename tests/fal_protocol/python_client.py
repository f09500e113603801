"""The real, unchanged fal-client against a server of the pack: run in a subprocess, because the client reads
FAL_RUN_HOST / FAL_QUEUE_RUN_HOST once, at import. Prints one JSON report: scenario -> what the client returned
or raised. tests/test_fal_clients.py asserts on it.

    python python_client.py HOST:PORT/PREFIX WORK_DIR   (env: FAL_KEY, SSL_CERT_FILE set by the test)
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

ADDRESS, WORK = sys.argv[1], Path(sys.argv[2])
os.environ["FAL_RUN_HOST"] = ADDRESS
os.environ["FAL_QUEUE_RUN_HOST"] = ADDRESS + "/queue"
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

import fal_client  # noqa: E402  (after the environment is set)
import httpx  # noqa: E402
from fal_client import client as fal_module  # noqa: E402
from PIL import Image  # noqa: E402

# Uploads: the client hard-codes rest.fal.ai and v3.fal.media (no env var); these are its module constants.
fal_module.REST_URL = fal_module.CDN_URL = f"https://{ADDRESS}"
fal_module.MAX_ATTEMPTS = 2  # a refused call fails in one retry, not in ten (it retries transport errors)

T2I, I2I = "fal-ai/flux/krea", "fal-ai/flux/krea/image-to-image"
SMALL = {"image_size": {"width": 64, "height": 48}, "num_inference_steps": 2}
LONG = {"image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}
report: dict[str, object] = {}


def error_of(err: BaseException) -> dict:
    out = {"class": type(err).__name__, "str": str(err)[:2000]}
    for name in ("status_code", "error_type"):
        if hasattr(err, name):
            out[name] = getattr(err, name)
    if hasattr(err, "message"):
        out["message"] = err.message if isinstance(err.message, (list, str)) else str(err.message)
    return out


def scenario(name: str):
    def wrap(fn):
        try:
            report[name] = {"ok": fn()}
        except BaseException as err:  # noqa: BLE001 - every outcome is reported
            report[name] = {"error": error_of(err), "trace": traceback.format_exc()[-1500:]}
        return fn
    return wrap


def image_of_data_uri(url: str) -> dict:
    header, _, payload = url.partition(",")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as img:
        return {"header": header, "size": list(img.size), "format": img.format}


def png_file(width: int, height: int) -> Path:
    path = WORK / f"input_{width}x{height}.png"
    Image.new("RGB", (width, height), (200, 120, 40)).save(path)
    return path


def fetch(url: str) -> dict:
    response = httpx.get(url, verify=os.environ["SSL_CERT_FILE"]) if url.startswith("https") else httpx.get(url)
    size = None
    if response.status_code == 200:
        with Image.open(io.BytesIO(response.content)) as img:
            size = list(img.size)
    return {"status": response.status_code, "content_type": response.headers.get("content-type"), "size": size}


@scenario("run_sync_mode")
def _():
    out = fal_client.run(T2I, arguments={"prompt": "a red fox", "sync_mode": True, **SMALL})
    return {"output": {**out, "images": None}, "images": [image_of_data_uri(i["url"]) for i in out["images"]],
            "described": [{k: v for k, v in i.items() if k != "url"} for i in out["images"]]}


@scenario("run_url_png_seeded")
def _():
    out = fal_client.run(T2I, arguments={"prompt": "a red fox", "output_format": "png", "seed": 7, "num_images": 2,
                                         **SMALL})
    return {"output": out, "fetched": [fetch(i["url"]) for i in out["images"]]}


@scenario("run_image_to_image_data_uri")
def _():
    image = fal_client.encode_file(png_file(80, 48))
    out = fal_client.run(I2I, arguments={"prompt": "x", "image_url": image, "num_inference_steps": 2, "strength": 0.5,
                                         "sync_mode": True})
    return {"images": [image_of_data_uri(i["url"]) for i in out["images"]], "seed": out["seed"]}


@scenario("run_invalid")
def _():
    return fal_client.run(T2I, arguments={})


@scenario("run_invalid_fields")
def _():
    return fal_client.run(T2I, arguments={"prompt": "x", "num_images": 9, "acceleration": "max",
                                          "image_size": "huge", "seed": -1})


@scenario("submit_status_result")
def _():
    handle = fal_client.submit(T2I, arguments={"prompt": "x", **SMALL}, webhook_url="https://example.com/hook",
                               priority="low", hint="h", start_timeout=30)
    statuses = []
    while True:
        status = handle.status(with_logs=True)
        statuses.append(type(status).__name__)
        if isinstance(status, fal_client.Completed):
            break
        time.sleep(0.05)
    result = handle.get()
    return {"request_id": handle.request_id, "statuses": statuses, "metrics": status.metrics,
            "logs": [entry["message"] for entry in status.logs or []], "seed": result["seed"],
            "by_id_status": type(fal_client.status(I2I, handle.request_id)).__name__,
            "by_id_result_seed": fal_client.result(I2I, handle.request_id)["seed"]}


@scenario("subscribe_with_logs")
def _():
    updates, enqueued = [], []
    out = fal_client.subscribe(T2I, arguments={"prompt": "x", "image_size": {"width": 128, "height": 128},
                                               "num_inference_steps": 6},
                               with_logs=True, on_enqueue=enqueued.append,
                               on_queue_update=lambda s: updates.append(
                                   {"type": type(s).__name__, "logs": [e["message"] for e in
                                                                       getattr(s, "logs", None) or []]}))
    return {"enqueued": enqueued, "updates": updates, "images": len(out["images"])}


@scenario("subscribe_plain")
def _():
    return fal_client.subscribe(T2I, arguments={"prompt": "x", **SMALL})["seed"]


@scenario("cancel_queued_and_running")
def _():
    running = fal_client.submit(T2I, arguments={"prompt": "long", **LONG})
    waiting = fal_client.submit(T2I, arguments={"prompt": "waits", **SMALL})
    first = waiting.status()
    queued_position = getattr(first, "position", None)
    waiting.cancel()
    after_cancel = waiting.status()
    outcome = {"queued_status": type(first).__name__, "queued_position": queued_position,
               "after_cancel": type(after_cancel).__name__, "after_cancel_error": after_cancel.error}
    try:
        waiting.get()
        outcome["waiting_result"] = "returned"
    except fal_client.FalClientHTTPError as err:
        outcome["waiting_result"] = error_of(err)
    try:
        waiting.cancel()
        outcome["cancel_again"] = "accepted"
    except fal_client.FalClientHTTPError as err:
        outcome["cancel_again"] = error_of(err)
    for _ in range(600):
        if isinstance(running.status(), fal_client.InProgress):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    started = time.perf_counter()
    fal_client.cancel(T2I, running.request_id)
    while not isinstance(last := running.status(), fal_client.Completed):
        time.sleep(0.05)
    outcome["running_stopped_s"] = round(time.perf_counter() - started, 2)
    outcome["running_error"] = last.error
    try:
        running.get()
        outcome["running_result"] = "returned"
    except fal_client.FalClientHTTPError as err:
        outcome["running_result"] = error_of(err)
    return outcome


@scenario("wrong_key")
def _():
    return fal_client.SyncClient(key="wrong-key").run(T2I, arguments={"prompt": "x", **SMALL})


@scenario("upload_then_image_to_image")
def _():
    url = fal_client.SyncClient().upload_file(png_file(96, 64))
    out = fal_client.run(I2I, arguments={"prompt": "x", "image_url": url, "num_inference_steps": 2})
    fetched = fetch(url)
    return {"url": url, "fetched": fetched, "result": out["images"][0]}


@scenario("unknown_request_id")
def _():
    return fal_client.status(T2I, "00000000-0000-0000-0000-000000000000")


@scenario("async_client")
def _():
    async def main() -> dict:
        client = fal_client.AsyncClient()
        ran = await client.run(T2I, arguments={"prompt": "x", "sync_mode": True, **SMALL})
        handle = await client.submit(T2I, arguments={"prompt": "x", **SMALL})
        got = await handle.get()
        updates = []

        async def on_update(status) -> None:
            updates.append(type(status).__name__)

        subscribed = await client.subscribe(T2I, arguments={"prompt": "x", **SMALL}, with_logs=True,
                                            on_queue_update=on_update)
        return {"run": image_of_data_uri(ran["images"][0]["url"]), "submit_seed": got["seed"],
                "updates": updates, "subscribed_images": len(subscribed["images"])}

    return asyncio.run(main())


print(json.dumps(report))
