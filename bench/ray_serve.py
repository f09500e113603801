"""Benchmark: `serve --ray` with N replicas against 1 (requests per second), and what the protocol over Ray costs per
request against a direct run of the same workflow.

On a local Ray cluster started here, with the demo models on CPU replicas (one core and one torch thread each):
  throughput  for 1 and for --replicas replicas: an ingress (`serve --ray ADDRESS --replicas R --demo`, its own
              process, http), each replica warmed, then --requests requests submitted at once to the queue and
              polled until all are COMPLETED; requests/s and their ratio are printed (expect about N for N <= cores:
              the replicas share nothing but the ingress);
  overhead    with 1 replica: a request through the protocol (POST run, the output JSON, the image fetched back),
              one at a time, against the in-process runner on the very workflow the request becomes, with one torch
              thread as a replica has; measured alternately, the ratio of the medians is printed.

    python bench/ray_serve.py [--replicas 2] [--requests 24] [--size 128] [--steps 4] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from comfyui_krea.fal_api.endpoints import ENDPOINTS, TEXT_TO_IMAGE
from comfyui_krea.fal_api.workflow import workflow_for
from comfyui_krea.nodes.host import standalone_host
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.node_classes import PACK_CLASSES
from comfyui_krea.standalone.ray_registry import NAMESPACE
from comfyui_krea.standalone.runner import run

PORT = 18473


def call(url: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return answer.read()


def start_ingress(address: str, replicas: int, output: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "comfyui_krea", "serve", "--ray", address, "--replicas", str(replicas), "--demo",
               "--port", str(PORT), "--output", str(output), "--max-queue", "64"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            call(f"http://127.0.0.1:{PORT}/")
        except urllib.error.HTTPError:
            return process  # it answers
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:]) from None
            time.sleep(0.5)
    raise RuntimeError("the ingress did not start")


def stop_ingress(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


def throughput(url: str, body: dict, count: int, replicas: int) -> float:
    with ThreadPoolExecutor(replicas) as pool:  # warm: every replica loads its models
        list(pool.map(lambda i: call(f"{url}/{TEXT_TO_IMAGE}", {**body, "seed": i}), range(2 * replicas)))
    started = time.perf_counter()
    ids = [json.loads(call(f"{url}/queue/{TEXT_TO_IMAGE}", {**body, "seed": i}))["request_id"] for i in range(count)]
    waiting = set(ids)
    while waiting:
        for request_id in list(waiting):
            status = json.loads(call(f"{url}/queue/fal-ai/flux/requests/{request_id}/status"))
            if status["status"] == "COMPLETED":
                if "error" in status:
                    raise RuntimeError(f"request {request_id} failed: {status['error']}")
                waiting.discard(request_id)
        time.sleep(0.05)
    return count / (time.perf_counter() - started)


def overhead(url: str, body: dict, repeats: int, models: Path, tokenizers: Path, output: Path) -> tuple[float, float]:
    torch.set_num_threads(1)  # as a CPU replica runs
    standalone_host().configure(models_dir=models, tokenizer_dir=tokenizers, output_dir=output)
    endpoint = ENDPOINTS[TEXT_TO_IMAGE]
    arguments = endpoint.parse({**body, "seed": 1})

    def direct() -> None:
        run(workflow_for(endpoint, arguments, 1, f"direct-{time.perf_counter_ns()}"), PACK_CLASSES)

    def protocol() -> None:
        out = json.loads(call(f"{url}/{TEXT_TO_IMAGE}", {**body, "seed": 1}))
        call(out["images"][0]["url"])

    direct(), protocol()
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(repeats):
        for fn in ((direct, protocol) if index % 2 == 0 else (protocol, direct)):
            started = time.perf_counter()
            fn()
            times[fn is protocol].append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    body = {"prompt": "a red fox in the snow", "image_size": {"width": args.size, "height": args.size},
            "num_inference_steps": args.steps}
    url = f"http://127.0.0.1:{PORT}"
    ray.init(num_cpus=max(args.replicas, 1), namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    rates = {}
    try:
        with tempfile.TemporaryDirectory(prefix="krea-bench-ray-") as scratch:
            work = Path(scratch)
            for replicas in (1, args.replicas):
                ingress = start_ingress(address, replicas, work / "output", work / f"ingress-{replicas}.log")
                try:
                    rates[replicas] = throughput(url, body, args.requests, replicas)
                    print(f"{replicas} replica(s): {rates[replicas]:.2f} requests/s ({args.requests} requests, "
                          f"{args.size}x{args.size}, {args.steps} steps)", flush=True)
                    if replicas == 1:
                        models, tokenizers = write_demo_models(work / "direct")
                        direct_s, protocol_s = overhead(url, body, args.repeats, models, tokenizers, work / "direct")
                        print(f"overhead: direct run {direct_s * 1000:.1f} ms, through serve --ray "
                              f"{protocol_s * 1000:.1f} ms (median of {args.repeats}); ratio "
                              f"{protocol_s / direct_s:.3f}", flush=True)
                finally:
                    stop_ingress(ingress)
    finally:
        ray.shutdown()
    print(f"throughput: {args.replicas} replicas over 1: {rates[args.replicas] / rates[1]:.2f}x "
          f"(this machine has {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
