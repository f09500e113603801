"""Benchmark: `serve` under load and under a slow-body attack, each against a reference measured in the same run.

`python -m comfyui_krea serve --demo` runs in its own process (http on 127.0.0.1, default limits), and:
  polling  GET .../requests/<id>/status as fast as --clients clients can for --poll-s seconds: requests/s, and the
           ratio to a bare aiohttp server answering a JSON body of the same size (the protocol's own cost);
  memory   the server's resident memory before and after --mixed mixed requests (status, results, result images,
           uploads, submits and cancels, refused requests), after a warm-up round of the same: flat means within 5 %;
  attack   --attackers connections each announcing a 1 MB body and sending a byte a second, reopened as soon as the
           server closes them, for --attack-s seconds: how many the server sheds per minute (the bound: each lives
           the grace, 10 s), and the status-poll latency of a well-behaved client meanwhile against before.

    python bench/serve_load.py [--clients 8] [--poll-s 5] [--mixed 1000] [--attackers 200] [--attack-s 60]
                               [--server-path DIR]   (DIR/comfyui_krea: another version's server, e.g. before a fix)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from PIL import Image

from comfyui_krea.fal_api.settings import BODY_GRACE_S

T2I = "fal-ai/flux/krea"
SMALL = {"prompt": "a fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
BARE_SERVER = """
import json, sys
from aiohttp import web
body = json.loads(sys.argv[2])
async def status(request):
    return web.json_response(body)
app = web.Application()
app.router.add_get("/{tail:.*}", status)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (20, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


async def wait_ready(url: str, process: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(1200):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode})")
            try:
                async with session.get(url) as answer:
                    await answer.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.25)
    raise RuntimeError(f"{url} did not answer")


async def poll_rate(url: str, clients: int, seconds: float) -> float:
    """Status requests per second, `clients` at a time, for `seconds`."""
    count = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            async with session.get(url) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            count += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return count / (time.perf_counter() - started)


async def mixed(base: str, request_id: str, image_path: str, total: int) -> dict[int, int]:
    """`total` requests of every kind a client makes, refused ones among them; a count per status code."""
    codes: dict[int, int] = {}
    upload = png_bytes()
    async with aiohttp.ClientSession() as session:
        async def call(method: str, path: str, **kwargs) -> dict | bytes:
            async with session.request(method, base + path, **kwargs) as answer:
                codes[answer.status] = codes.get(answer.status, 0) + 1
                raw = await answer.read()
            try:
                return json.loads(raw)
            except ValueError:
                return raw

        while sum(codes.values()) < total:  # 13 requests a round
            for _ in range(4):
                await call("GET", f"/queue/fal-ai/flux/requests/{request_id}/status?logs=1")
            await call("GET", f"/queue/fal-ai/flux/requests/{request_id}")
            await call("GET", image_path)
            slot = await call("POST", "/storage/upload/initiate", json={"content_type": "image/png",
                                                                          "file_name": "in.png"})
            await call("PUT", "/" + slot["upload_url"].split("/", 3)[3], data=upload)
            submitted = await call("POST", f"/queue/{T2I}", json={**SMALL, "num_inference_steps": 50})
            if isinstance(submitted, dict) and "cancel_url" in submitted:
                await call("PUT", "/" + submitted["cancel_url"].split("/", 3)[3])
            await call("POST", f"/{T2I}", json={"prompt": 5})  # 422
            await call("POST", f"/{T2I}", data=json.dumps(SMALL), headers={"Content-Type": "text/plain"})  # 415
            await call("GET", f"/queue/fal-ai/flux/requests/{request_id}/status", headers={"Host": "evil.example"})
    return codes


async def attack(port: int, attackers: int, seconds: float) -> tuple[int, int]:
    """(connections the server closed, of which answered 503 at once) while `attackers` trickle 1 MB bodies."""
    shed = busy = 0
    deadline = time.monotonic() + seconds
    head = (f"POST /queue/{T2I} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1024 * 1024}\r\n\r\n").encode()

    async def attacker() -> None:
        nonlocal shed, busy
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                while time.monotonic() < deadline:
                    writer.write(b" ")
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 1.0)
                    except asyncio.TimeoutError:
                        continue
                    if data.startswith(b"HTTP/1.1 503"):
                        busy += 1
                    if not data or data.startswith(b"HTTP/1.1"):
                        shed += 1
                        break
                writer.close()
            except (ConnectionError, OSError):
                shed += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(attacker() for _ in range(attackers)))
    return shed, busy


async def latency_ms(url: str, count: int = 20) -> float:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.get(url) as answer:
                await answer.read()
            times.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)
    return statistics.median(times)


async def bench(args: argparse.Namespace, work: Path) -> bool:
    port, bare_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log = (work / "serve.log").open("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.server_path, os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen([sys.executable, "-m", "comfyui_krea", "serve", "--demo", "--port", str(port),
                               "--output", str(work / "output")], stdout=log, stderr=subprocess.STDOUT, env=env)
    bare = None
    try:
        await wait_ready(base + "/", server)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/{T2I}", json=SMALL) as answer:
                output = await answer.json()
                request_id = answer.headers["x-fal-request-id"]
        status_url = f"{base}/queue/fal-ai/flux/requests/{request_id}/status"
        async with aiohttp.ClientSession() as session, session.get(status_url) as answer:
            status_body = await answer.json()
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port), json.dumps(status_body)])
        await wait_ready(f"http://127.0.0.1:{bare_port}/", bare)

        pack_rate = await poll_rate(status_url, args.clients, args.poll_s)
        bare_rate = await poll_rate(f"http://127.0.0.1:{bare_port}/status", args.clients, args.poll_s)
        print(f"polling: {pack_rate:.0f} status requests/s ({args.clients} clients, {args.poll_s:g} s); a bare aiohttp "
              f"server with the same body: {bare_rate:.0f}/s; ratio {pack_rate / bare_rate:.2f}")

        image_path = "/" + output["images"][0]["url"].split("/", 3)[3]
        await mixed(base, request_id, image_path, args.mixed // 5)  # warm-up: every path taken once at least
        before = rss_mb(server.pid)
        codes = await mixed(base, request_id, image_path, args.mixed)
        await asyncio.sleep(1)
        after = rss_mb(server.pid)
        growth = (after - before) / before
        flat = abs(growth) <= 0.05
        print(f"memory: {sum(codes.values())} mixed requests (status codes {dict(sorted(codes.items()))}); resident "
              f"{before:.0f} MB before, {after:.0f} MB after ({growth:+.1%}; flat means within 5%)")

        calm = await latency_ms(status_url)
        attack_task = asyncio.ensure_future(attack(port, args.attackers, args.attack_s))
        await asyncio.sleep(min(args.attack_s / 2, 20))
        under_attack = await latency_ms(status_url)
        shed, busy = await attack_task
        per_minute = shed * 60 / args.attack_s
        bound = args.attackers * 60 / BODY_GRACE_S
        print(f"attack: {args.attackers} slow-body connections for {args.attack_s:g} s: {per_minute:.0f} shed per "
              f"minute ({busy} of {shed} with 503 at once; one connection shed per {BODY_GRACE_S:g} s grace would be "
              f"{bound:.0f}/min); status latency {calm:.1f} ms calm, {under_attack:.1f} ms under attack (ratio "
              f"{under_attack / calm:.2f}); server still answers: {server.poll() is None}")
        return flat and server.poll() is None and shed > 0
    finally:
        for process in (server, bare):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--poll-s", type=float, default=5.0)
    parser.add_argument("--mixed", type=int, default=1000)
    parser.add_argument("--attackers", type=int, default=200)
    parser.add_argument("--attack-s", type=float, default=60.0)
    parser.add_argument("--server-path", default=None, help="put DIR first on the server's PYTHONPATH")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="krea-bench-load-") as scratch:
        ok = asyncio.run(bench(args, Path(scratch)))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
