"""The file calls as fal's clients use them (fal_api/file_routes.py), in-process over a backend that runs no model:
the CDN token's fields (token, token_type "Bearer", base_url, expires_at in UTC), the Bearer token or the API key on
an upload, the initiate body's fields and bounds, and how stored files and result images are served (their own type
inline, anything else a download, nosniff, a sandboxing CSP, a clean file name) and where they are not.
"""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import make_service, png_bytes, serving  # noqa: E402

from comfyui_krea.fal_api.file_routes import served_file  # noqa: E402

SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}
CSP = "default-src 'none'; sandbox"


def run(scenario):
    return asyncio.run(scenario())


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def test_the_cdn_token_has_fals_fields_and_a_utc_expiry(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            answer = await client.post("/storage/auth/token", json={})
            assert answer.status == 200
            body = await answer.json()
            assert set(body) == {"token", "token_type", "base_url", "expires_at"}
            assert body["token_type"] == "Bearer" and body["base_url"] == f"http://{client.host}:{client.port}"
            expires = dt.datetime.fromisoformat(body["expires_at"])
            assert expires.utcoffset() == dt.timedelta(0) and expires > dt.datetime.now(dt.timezone.utc)

    run(scenario)


def test_an_upload_takes_a_valid_bearer_token_or_the_api_key(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path, api_key="k")) as client:
            token = (await (await client.post("/storage/auth/token", headers={"Authorization": "Key k"})).json())[
                "token"]
            for headers, status in (({"Authorization": f"Bearer {token}"}, 200), ({"Authorization": "Key k"}, 200),
                                    ({}, 401), ({"Authorization": f"bearer {token}"}, 401),
                                    ({"Authorization": "Bearer not-a-token"}, 401),
                                    ({"Authorization": f"Key {token}"}, 401)):
                answer = await client.post("/files/upload", data=png_bytes(),
                                           headers={"Content-Type": "image/png", **headers})
                assert answer.status == status, headers
                if status == 200:
                    assert (await answer.json())["access_url"].startswith(f"http://{client.host}:{client.port}/")
        async with serving(make_service(tmp_path / "open")) as client:  # no key: no header needed
            answer = await client.post("/files/upload", data=png_bytes(), headers={"Content-Type": "image/png"})
            assert answer.status == 200

    run(scenario)


@pytest.mark.parametrize("body, status, loc, name", [
    (b"", 200, None, "upload.bin"),
    (b'{"content_type": "image/png"}', 200, None, "upload.bin"),
    (b'{"file_name": "my cat.png"}', 200, None, "my_cat.png"),
    (b'{"content_type": "' + b"x" * 255 + b'", "file_name": "' + b"a" * 100 + b'"}', 200, None, "a" * 100),
    (b'{"content_type": "' + b"x" * 256 + b'"}', 422, ["body", "content_type"], None),
    (b'{"file_name": "' + b"a" * 1025 + b'"}', 422, ["body", "file_name"], None),
    (b"[]", 422, ["body"], None),
    (b'{"file_name": 5}', 422, ["body"], None),
])
def test_initiate_reads_its_two_fields_within_their_bounds(tmp_path, body, status, loc, name):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            answer = await client.post("/storage/upload/initiate", data=body,
                                       headers={"Content-Type": "application/json"})
            assert answer.status == status
            got = await answer.json()
            if status == 200:
                assert got["file_url"].rsplit("/", 1)[1] == name
            else:
                assert got["detail"][0]["loc"] == loc

    run(scenario)


def test_results_are_served_inline_with_their_type_and_only_at_their_own_name(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            output = await (await client.post("/fal-ai/flux/krea", json=SMALL)).json()
            url = path_of(output["images"][0]["url"])
            answer = await client.get(url)
            assert answer.status == 200 and (await answer.read())[:8] == b"\x89PNG\r\n\x1a\n"
            assert answer.headers["Content-Type"] == "image/png"
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
            assert answer.headers["Content-Security-Policy"] == CSP
            assert answer.headers["Content-Disposition"] == 'inline; filename="0.png"'
            for wrong in (url.replace("0.png", "0.jpeg"), url + "/x", url.replace("0.png", "1.png")):
                assert (await client.get(wrong)).status == 404, wrong

    run(scenario)


def test_a_stored_file_that_is_not_an_image_is_only_ever_a_download(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(b"<script>alert(1)</script>")

    async def scenario():
        async def handler(request):
            return served_file(path, "text/html", "../page one.html")

        from aiohttp import web
        from aiohttp.test_utils import TestClient, TestServer
        app = web.Application()
        app.router.add_get("/f", handler)
        async with TestClient(TestServer(app)) as client:
            answer = await client.get("/f")
            assert answer.headers["Content-Type"] == "application/octet-stream"
            assert answer.headers["Content-Disposition"] == 'attachment; filename="page_one.html"'
            assert answer.headers["Content-Security-Policy"] == CSP
            assert answer.headers["X-Content-Type-Options"] == "nosniff"

    run(scenario)


def test_on_a_keyed_server_only_the_signed_upload_slot_and_the_files_go_without_the_key(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path, api_key="k")) as client:
            key = {"Authorization": "Key k"}
            slot = await (await client.post("/storage/upload/initiate", json={"file_name": "cat.png"},
                                            headers=key)).json()
            upload, file = path_of(slot["upload_url"]), path_of(slot["file_url"])
            assert (await client.get(upload, headers=key)).status == 404  # a slot takes a PUT, nothing else
            assert (await client.post(upload, data=b"", headers=key)).status == 404
            assert (await client.put(upload, data=png_bytes(), headers={"Content-Type": "image/png"})).status == 200
            served = await client.get(file)  # no key: the file's URL is what fal's clients hand on
            assert served.status == 200 and served.headers["Content-Disposition"] == 'inline; filename="cat.png"'
            assert (await client.put(file, data=png_bytes(), headers=key)).status == 404
            for method, path in (("GET", upload), ("PUT", "/storage/upload/initiate"), ("PUT", "/queue/x"),
                                 ("POST", "/storage/upload/initiate")):
                refused = await client.request(method, path, data=b"{}")
                assert refused.status == 401, (method, path)
                assert "Authorization: Key" in (await refused.json())["detail"]
            # request calls need an app, a request id and the word "requests" where fal's clients put it
            for path in ("/queue/fal-ai/flux/requests", "/queue/fal-ai/flux/krea", "/queue/other/app/requests/x"):
                assert (await client.get(path, headers=key)).status == 404, path
            assert (await client.get(file.replace(file.split("/")[3], "0" * 32), headers=key)).status == 404
            output = await (await client.post("/fal-ai/flux/krea", json=SMALL, headers=key)).json()
            result = path_of(output["images"][0]["url"])
            assert (await client.get(result)).status == 200  # results too: their URLs are handed on
            assert (await client.post(result, data=b"{}")).status == 401

    run(scenario)


def test_an_upload_keeps_the_name_its_client_gave(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            answer = await client.post("/files/upload", data=png_bytes(),
                                       headers={"Content-Type": "image/png", "X-Fal-File-Name": "my cat.png"})
            url = (await answer.json())["access_url"]
            assert url.endswith("/my_cat.png")
            served = await client.get(path_of(url))
            assert served.headers["Content-Disposition"] == 'inline; filename="my_cat.png"'

    run(scenario)
