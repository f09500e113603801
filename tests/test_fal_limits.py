"""The limits of fal's protocol library (fal_api), in-process over a backend that runs no model: what a hostile client
sends is refused or bounded with fal's JSON error shape, and nothing it does grows the server's state. The same
requests against both real servers (`serve` and ComfyUI's /fal) are tests/test_fal_exposure.py.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import tracemalloc

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import make_service, png_bytes, raw_request, serving  # noqa: E402

from comfyui_krea.fal_api.http_limits import Refusal, host_name, read_body, require_json  # noqa: E402

T2I, I2I = "/fal-ai/flux/krea", "/fal-ai/flux/krea/image-to-image"
SMALL = {"image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


def run(scenario):
    return asyncio.run(scenario())


# -- 1. active content ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, claimed", [
    (b"<html><script>fetch('/prompt', {method: 'POST'})</script></html>", "text/html"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml"),
    (b"%PDF-1.4 not an image", "application/pdf"),
])
def test_uploads_that_are_not_images_are_refused(tmp_path, content, claimed):
    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            token = (await (await client.post("/storage/auth/token", json={})).json())["token"]
            answer = await client.post("/files/upload", data=content,
                                       headers={"Authorization": f"Bearer {token}", "Content-Type": claimed})
            assert answer.status == 415, await answer.text()
            assert "png, jpeg, webp" in (await answer.json())["detail"]
            slot = await (await client.post("/storage/upload/initiate", json={"content_type": claimed,
                                                                                "file_name": "x.html"})).json()
            path = "/" + slot["upload_url"].split("/", 3)[3]
            assert (await client.put(path, data=content, headers={"Content-Type": claimed})).status == 415
        assert list((tmp_path / "uploads").iterdir()) == []

    run(scenario)


def test_stored_files_are_served_with_their_own_type_and_never_run(tmp_path):
    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            token = (await (await client.post("/storage/auth/token", json={})).json())["token"]
            answer = await client.post("/files/upload", data=png_bytes(),  # a png that claims to be a page
                                       headers={"Authorization": f"Bearer {token}", "Content-Type": "text/html",
                                                "X-Fal-File-Name": "page.html"})
            url = (await answer.json())["access_url"]
            served = await client.get("/" + url.split("/", 3)[3])
            assert served.status == 200 and served.headers["Content-Type"] == "image/png"
            assert served.headers["X-Content-Type-Options"] == "nosniff"
            assert "sandbox" in served.headers["Content-Security-Policy"]
            assert served.headers["Content-Disposition"].startswith("inline; filename=")
            output = await (await client.post(T2I, json={"prompt": "x", **SMALL})).json()
            result = await client.get("/" + output["images"][0]["url"].split("/", 3)[3])
            assert result.headers["Content-Type"] == "image/png" and result.headers["X-Content-Type-Options"] == \
                "nosniff"

    run(scenario)


# -- 2. size ----------------------------------------------------------------------------------------------------

def test_sizes_over_the_megapixel_cap_are_refused_before_queueing(tmp_path):
    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            huge = {"prompt": "x", "image_size": {"width": 14142, "height": 14142}, "num_images": 4}
            answer = await client.post(T2I, json=huge)
            detail = (await answer.json())["detail"]
            assert answer.status == 422 and detail[0]["loc"] == ["body", "image_size"], detail
            assert "14128x14128" in detail[0]["msg"] and "limit of 4 megapixels" in detail[0]["msg"]
            assert (await client.post(T2I, json={"prompt": "x", "image_size": {"width": 2048, "height": 2048},
                                                 "sync_mode": True})).status == 200  # 4 MP exactly: fal's limit
            image = "data:image/png;base64," + base64.b64encode(png_bytes(2100, 2100)).decode()
            answer = await client.post(I2I, json={"prompt": "x", "image_url": image})
            detail = (await answer.json())["detail"]
            assert answer.status == 422 and detail[0]["loc"] == ["body", "image_url"], detail
            assert "2100x2100" in detail[0]["msg"] and "megapixels" in detail[0]["msg"]
        assert service.jobs.active() == 0 and len(service.jobs.all()) == 1

    run(scenario)


def test_the_cap_is_a_setting(tmp_path):
    async def scenario():
        service = make_service(tmp_path, max_pixels=512 * 512)
        async with serving(service) as client:
            answer = await client.post(T2I, json={"prompt": "x", "image_size": "square_hd"})
            assert answer.status == 422 and "limit of 0.25 megapixels" in json.dumps(await answer.json())

    run(scenario)


# -- 3. slow bodies ---------------------------------------------------------------------------------------------

def test_a_declared_body_over_the_limit_is_413_without_reading_it(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            head = (f"POST {T2I} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {100 * 1024 * 1024}\r\n").encode()
            started = time.monotonic()
            status, body = await raw_request(client.port, head, b"{")  # one byte of the 100 MB it announces
            assert status == 413 and body["error_type"] == "too_large", body
            assert time.monotonic() - started < 5

    run(scenario)


def test_a_trickled_body_is_cut_off_after_the_grace(tmp_path):
    async def scenario():
        service = make_service(tmp_path, body_grace_s=1.0, body_min_rate=1024)
        async with serving(service) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write((f"POST {T2I} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {1024 * 1024}\r\n\r\n").encode())
            started = time.monotonic()
            answer = b""
            while time.monotonic() - started < 10:
                try:
                    writer.write(b" ")  # a byte every 0.1 s: far below 1 KiB/s
                    await writer.drain()
                except (ConnectionResetError, BrokenPipeError):
                    pass  # closed by the server after its answer, which the reads below still get
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 0.1)
                except asyncio.TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):  # closed after the answer already read
                    break
                if not chunk:
                    break  # closed by the server
                answer += chunk
            elapsed = time.monotonic() - started
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer, answer[:300]
            assert 1.0 <= elapsed < 4, elapsed

    run(scenario)


# -- 4. unbounded state ---------------------------------------------------------------------------------------------

def test_upload_slots_and_tokens_keep_nothing_and_fields_are_bounded(tmp_path):
    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            answer = await client.post("/storage/upload/initiate", json={"content_type": "x" * 60_000,
                                                                          "file_name": "a.png"})
            assert answer.status == 422 and "content_type" in json.dumps(await answer.json())
            for _ in range(50):  # warm caches before measuring
                await client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a"})
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for index in range(1000):
                await client.post("/storage/upload/initiate", json={"content_type": "image/png",
                                                                     "file_name": f"{index}.png"})
                await client.post("/storage/auth/token", json={})
            grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename")
                        if "comfyui_krea" in str(stat.traceback) or "fal_api" in str(stat.traceback))
            tracemalloc.stop()
            assert grown < 64 * 1024, grown  # 2,000 slots and tokens handed out, nothing kept for them
            slot = await (await client.post("/storage/upload/initiate", json={"file_name": "a.png"})).json()
            path = "/" + slot["upload_url"].split("/", 3)[3]
            assert (await client.put(path, data=png_bytes())).status == 200
            again = await client.put(path, data=png_bytes())
            assert again.status == 404 and "one PUT" in (await again.json())["detail"]

    run(scenario)


def test_upload_slots_expire(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path, retention_s=1.0)) as client:
            slot = await (await client.post("/storage/upload/initiate", json={})).json()
            await asyncio.sleep(2.1)
            answer = await client.put("/" + slot["upload_url"].split("/", 3)[3], data=png_bytes())
            assert answer.status == 404

    run(scenario)


def test_uploads_are_bounded_by_a_quota_that_expiry_gives_back(tmp_path):
    image = png_bytes(64, 64)

    async def scenario():
        service = make_service(tmp_path, quota_bytes=3 * len(image))
        async with serving(service) as client:
            token = (await (await client.post("/storage/auth/token", json={})).json())["token"]
            statuses = [(await client.post("/files/upload", data=image,
                                           headers={"Authorization": f"Bearer {token}"})).status for _ in range(4)]
            assert statuses == [200, 200, 200, 413]
            service.uploads.expire(now=time.time() + 2 * 3600)
            assert (await client.post("/files/upload", data=image,
                                      headers={"Authorization": f"Bearer {token}"})).status == 200

    run(scenario)


# -- 5. cross-site and rebinding ------------------------------------------------------------------------------------

def test_json_only_as_json_and_the_host_must_be_this_server(tmp_path):
    async def scenario():
        service = make_service(tmp_path, allowed_hosts=frozenset({"fal.example"}))
        async with serving(service) as client:
            body = json.dumps({"prompt": "x", **SMALL})
            answer = await client.post(T2I, data=body, headers={"Content-Type": "text/plain"})
            assert answer.status == 415 and "application/json" in (await answer.json())["detail"]
            answer = await client.post(T2I, data=body, headers={"Content-Type": "application/json",
                                                                "Host": "attacker.example"})
            assert answer.status == 400 and "attacker.example" in (await answer.json())["detail"]
            answer = await client.post("/queue" + T2I, data=body, headers={"Content-Type": "application/json",
                                                                           "Host": "fal.example:8443"})
            assert answer.status == 200 and (await answer.json())["status_url"].startswith("http://fal.example:8443/")
            for host in ("127.0.0.1:1", "[::1]:8443", "localhost", "LOCALHOST.:9"):
                answer = await client.get("/queue/fal-ai/flux/requests/none/status", headers={"Host": host})
                assert answer.status == 404, host  # passed the Host check
            assert service.jobs.active() == 0 and len(service.jobs.all()) == 1

    run(scenario)


@pytest.mark.parametrize("host", ["fal.example/x", "fal.example?x=1", "fal.example#top", "user@fal.example", ":8443",
                                  "fal.example:99999", ""])
def test_a_host_header_is_a_host_and_a_port_and_nothing_else(host):
    assert host_name(host) is None
    assert host_name("Fal.Example.:8443") == "fal.example"


def test_a_body_sent_as_another_type_is_refused_naming_that_type():
    from aiohttp.test_utils import make_mocked_request

    long = "text/plain; charset=" + "x" * 200
    for headers, shown in (({"Content-Type": long}, repr(long[:100])), ({}, "'none'")):
        with pytest.raises(Refusal) as refused:
            require_json(make_mocked_request("POST", T2I, headers=headers))
        assert refused.value.status == 415 and f"(got {shown}); other types" in refused.value.detail


class ChunkedBody:
    """A request whose body arrives as aiohttp's request.content hands it out: in two chunks, then the end (with
    `stall`, the second chunk never comes); `declared`: its Content-Length, if it sent one."""

    def __init__(self, data: bytes, declared: int | None = None, stall: bool = False) -> None:
        self.content, self.content_length, self.stall = self, declared, stall
        self._chunks = [data[:60], data[60:], b""]

    async def readany(self) -> bytes:
        if self.stall and len(self._chunks) < 3:
            await asyncio.Event().wait()
        return self._chunks.pop(0)


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413():
    for declared in (None, 100):
        assert asyncio.run(read_body(ChunkedBody(b"x" * 100, declared), 100)) == b"x" * 100
    for declared in (None, 101):
        with pytest.raises(Refusal) as refused:
            asyncio.run(read_body(ChunkedBody(b"x" * 101, declared), 100))
        assert refused.value.status == 413 and refused.value.error_type == "too_large"


def test_a_body_that_stops_arriving_is_cut_off_after_the_grace():
    with pytest.raises(Refusal) as refused:
        asyncio.run(read_body(ChunkedBody(b"x" * 100, stall=True), 1000, grace_s=0.05))
    assert refused.value.status == 408 and refused.value.close


def test_a_refusal_keeps_the_connection_open_unless_it_says_close():
    plain = Refusal(404, "no such request")
    assert str(plain) == "no such request" and plain.response().keep_alive is not False
    assert Refusal(408, "too slow", close=True).response().keep_alive is False


# -- 6. the queue limit holds while images are fetched -------------------------------------------------------------

def test_the_queue_slot_is_taken_before_the_image_is_fetched(tmp_path):
    async def slow_fetch(url: str) -> bytes:
        await asyncio.sleep(0.5)
        return png_bytes()

    async def scenario():
        service = make_service(tmp_path, max_active=2, hold=True, allow_remote_images=True, fetch=slow_fetch)
        async with serving(service) as client:
            body = {"prompt": "x", "image_url": "https://images.example/a.png"}
            answers = await asyncio.gather(*(client.post("/queue" + I2I, json=body) for _ in range(6)))
            assert sorted(answer.status for answer in answers) == [200, 200, 503, 503, 503, 503]
            assert service.jobs.active() == 2

    run(scenario)


# -- 7. odd inputs are 4xx in fal's shape -------------------------------------------------------------------------

ODD = [  # (name, method, path, raw body, extra header lines, status)
    ("an integer past Python's digit limit", "POST", T2I, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", b"", 422),
    ("JSON nested past the recursion limit", "POST", T2I, b"[" * 100_000 + b"]" * 100_000, b"", 422),
    ("a non-ASCII API key", "GET", "/queue/fal-ai/flux/requests/x/status", b"", "Authorization: Key clé\r\n".encode(),
     401),
    ("bytes that are not UTF-8 in the key", "GET", "/queue/fal-ai/flux/requests/x/status", b"",
     b"Authorization: Key \xff\xfe\r\n", 401),
    ("an over-long host label in image_url", "POST", I2I,
     json.dumps({"prompt": "x", "image_url": "https://" + "a" * 70 + ".example/x.png"}).encode(), b"", 422),
    ("a broken IPv6 host in image_url", "POST", I2I,
     json.dumps({"prompt": "x", "image_url": "https://[::1/x.png"}).encode(), b"", 422),
    ("a port out of range in image_url", "POST", I2I,
     json.dumps({"prompt": "x", "image_url": "https://images.example:99999/x.png"}).encode(), b"", 422),
    ("a broken proxy target", "POST", "/proxy", b"{}", b"x-fal-target-url: https://[fal.run/x\r\n", 400),
    ("a Host that is no host", "GET", "/queue/fal-ai/flux/requests/x/status", b"", None, 400),
]


@pytest.mark.parametrize("name, method, path, body, extra, status", ODD, ids=[o[0] for o in ODD])
def test_odd_inputs_are_4xx_in_fals_shape(tmp_path, caplog, name, method, path, body, extra, status):
    async def scenario():
        service = make_service(tmp_path, api_key="right-key", allow_remote_images=True)
        async with serving(service) as client:
            host = b"Host: [::1\r\n" if extra is None else b"Host: 127.0.0.1\r\n"
            key = b"" if b"Authorization" in (extra or b"") else b"Authorization: Key right-key\r\n"
            head = (f"{method} {path} HTTP/1.1\r\n".encode() + host + key + (extra or b"") +
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n".encode())
            return await raw_request(client.port, head, body)

    got, answer = run(scenario)
    assert got == status, (name, answer)
    assert isinstance(answer, dict) and "detail" in answer, answer
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def test_odd_result_file_names_are_404(tmp_path, caplog):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            output = await (await client.post(T2I, json={"prompt": "x", **SMALL})).json()
            base = "/" + output["images"][0]["url"].split("/", 3)[3].rsplit("/", 1)[0]
            assert (await client.get(base + "/0.png")).status == 200
            for name in ("%C2%B2.png", "%D9%A0.png", "9" * 5000 + ".png", "0.png.png", "-0.png", "%200.png"):
                answer = await client.get(f"{base}/{name}")
                assert answer.status == 404 and "detail" in await answer.json(), name

    run(scenario)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


# -- 8. clients that leave a status stream ------------------------------------------------------------------------

def test_a_dropped_status_stream_logs_nothing(tmp_path, caplog):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            submitted = await (await client.post("/queue" + T2I, json={"prompt": "x", **SMALL})).json()
            path = f"/queue/fal-ai/flux/requests/{submitted['request_id']}/status/stream"
            for _ in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                await writer.drain()
                assert b"IN_QUEUE" in await reader.readuntil(b"IN_QUEUE")
                writer.transport.abort()  # a reset, as a closed browser tab or a killed client
            await asyncio.sleep(0.5)  # the streams notice on their next write
            service.backend.cancel(service.backend.waiting[0])
            await asyncio.sleep(0.3)

    with caplog.at_level("INFO"):
        run(scenario)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")], caplog.text
    assert "Traceback" not in caplog.text


def test_the_limits_inside_comfyui_come_from_checked_environment_variables(monkeypatch):
    from comfyui_krea.fal_api.settings import ServiceSettings

    monkeypatch.setenv("KREA_FAL_MAX_MEGAPIXELS", "2.5")
    monkeypatch.setenv("KREA_FAL_UPLOAD_QUOTA_MB", "64")
    monkeypatch.setenv("KREA_FAL_ALLOWED_HOSTS", " Fal.Example., other.example ,")
    settings = ServiceSettings.from_environment()
    assert settings.max_pixels == int(2.5 * 1024 * 1024) and settings.upload_quota_bytes == 64 << 20
    assert settings.allowed_hosts == ("fal.example", "other.example")
    for name, value in (("KREA_FAL_MAX_MEGAPIXELS", "nan"), ("KREA_FAL_UPLOAD_QUOTA_MB", "-1"),
                        ("KREA_FAL_MAX_QUEUE", "2.5")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            ServiceSettings.from_environment()
        monkeypatch.delenv(name)
