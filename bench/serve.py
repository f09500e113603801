"""Benchmark: what fal's protocol costs over a direct run of the same workflow, and a queue of 50 requests.

In one process, on the demo models (random weights, `--size` pixels, `--steps` steps), with the model cache warm:
  overhead  a request through `serve`'s HTTP protocol (POST run, the output JSON, the image fetched back) against
            the in-process runner on the very workflow the request becomes; measured alternately, the ratio of
            the medians is printed (target: close to 1.0; the protocol adds JSON, a thread hop and a file read);
  queue     50 requests submitted at once to the queue, polled until all are COMPLETED: all must complete, in the
            order submitted, and the resident memory after the last 25 must be within --flat-mb of after the
            first 25 (nothing kept per request grows without bound).

    python bench/serve.py [--size 256] [--steps 4] [--repeats 7] [--queue 50] [--flat-mb 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from aiohttp import web

from comfyui_krea.fal_api.endpoints import ENDPOINTS, TEXT_TO_IMAGE
from comfyui_krea.fal_api.settings import ServiceSettings
from comfyui_krea.fal_api.workflow import workflow_for
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.fal_server import ServeOptions, make_app
from comfyui_krea.standalone.node_classes import PACK_CLASSES
from comfyui_krea.standalone.runner import run


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(options: ServeOptions) -> tuple[str, object]:
    """The app on a free port in a background event loop; returns its URL and the service."""
    ready = threading.Event()
    holder: dict = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app, service = make_app(options)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        holder["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        holder["service"] = service
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(60)
    return holder["url"], holder["service"]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as answer:
        return answer.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--queue", type=int, default=50)
    parser.add_argument("--flat-mb", type=float, default=64.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="krea-bench-serve-") as scratch:
        models, tokenizers = write_demo_models(Path(scratch))
        output = Path(scratch) / "output"
        url, service = start_server(ServeOptions(output=output, models=models, tokenizers=tokenizers,
                                                 service=ServiceSettings(max_queue=args.queue + 8)))
        body = {"prompt": "a red fox in the snow", "image_size": {"width": args.size, "height": args.size},
                "num_inference_steps": args.steps, "seed": 1}
        endpoint = ENDPOINTS[TEXT_TO_IMAGE]
        arguments = endpoint.parse(body)

        def direct() -> None:
            run(workflow_for(endpoint, arguments, 1, f"direct-{time.perf_counter_ns()}"), PACK_CLASSES)

        def protocol() -> None:
            out = post(f"{url}/{TEXT_TO_IMAGE}", body)
            get(out["images"][0]["url"])

        direct(), protocol()  # warm: models loaded and cached
        times: tuple[list[float], list[float]] = ([], [])
        for index in range(args.repeats):
            pair = (direct, protocol) if index % 2 == 0 else (protocol, direct)
            for call in pair:
                started = time.perf_counter()
                call()
                times[call is protocol].append(time.perf_counter() - started)
        direct_s, protocol_s = statistics.median(times[0]), statistics.median(times[1])
        print(f"overhead: direct run {direct_s * 1000:.1f} ms, through the protocol {protocol_s * 1000:.1f} ms "
              f"(median of {args.repeats}); ratio {protocol_s / direct_s:.3f}")

        small = {**body, "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
        ids = [post(f"{url}/queue/{TEXT_TO_IMAGE}", {**small, "seed": i})["request_id"] for i in range(args.queue)]
        memory: dict[int, float] = {}
        started = time.perf_counter()
        while True:
            states = [json.loads(get(f"{url}/queue/fal-ai/flux/requests/{i}/status"))["status"] for i in ids]
            done = sum(s == "COMPLETED" for s in states)
            for mark in (args.queue // 2, args.queue):
                if done >= mark and mark not in memory:
                    memory[mark] = rss_mb()
            if done == len(ids):
                break
            time.sleep(0.2)
        jobs = {job.id: job for job in service.jobs.all()}
        finished = sorted(ids, key=lambda i: jobs[i].finished)
        failed = [i for i in ids if jobs[i].error is not None]
        in_order = finished == ids
        growth = memory[args.queue] - memory[args.queue // 2]
        print(f"queue: {len(ids)} submitted, {len(ids) - len(failed)} completed, {len(failed)} failed, "
              f"{'in order' if in_order else 'OUT OF ORDER'}, {time.perf_counter() - started:.1f} s; resident memory "
              f"{memory[args.queue // 2]:.0f} MB after {args.queue // 2}, {memory[args.queue]:.0f} MB after "
              f"{args.queue} ({growth:+.1f} MB; flat means within {args.flat_mb:g} MB)")
        ok = not failed and in_order and growth <= args.flat_mb
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
