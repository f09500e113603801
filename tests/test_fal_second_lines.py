"""What the fal layer's own parts promise when called directly, behind the HTTP limits that normally stand in front of
them: a request record ends once (fal_api/jobs.py), sync_mode keeps nothing anywhere (fal: "the output data won't be
available in the request history"), and the uploads store (fal_api/storage.py) holds to its size, quota, slot and
type rules whatever its caller checked before."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import re
import time

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import HOUR, make_service, png_bytes, serving  # noqa: E402
from PIL import Image  # noqa: E402

from comfyui_krea.fal_api.http_limits import Refusal  # noqa: E402
from comfyui_krea.fal_api.jobs import COMPLETED, IN_PROGRESS, IN_QUEUE, Job, JobStore  # noqa: E402
from comfyui_krea.fal_api.records import RECORDS_SUBFOLDER  # noqa: E402
from comfyui_krea.fal_api.storage import Signer, Uploads, clean_name, image_type, is_token  # noqa: E402

T2I = "/fal-ai/flux/krea"


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


class SavedRecords:
    """A Records stand-in that counts what the store asks of it."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        self.removed: list[str] = []

    def save(self, job: Job) -> None:
        self.saved.append(job.id)

    def remove(self, request_id: str) -> None:
        self.removed.append(request_id)

    def load(self, retention_s: float) -> list[Job]:
        return []


# --- a record ends once ---

def test_a_record_keeps_its_first_ending():
    job = Job(endpoint=T2I, arguments=object(), seed=1)
    job.complete(output={"images": []})
    finished = job.finished
    job.complete(error="late cancel", error_type="request_cancelled")
    assert job.output == {"images": []} and job.error is None and job.error_type is None
    assert job.finished == finished and job.status == COMPLETED


def test_a_failure_first_stays_a_failure():
    job = Job(endpoint=T2I, arguments=object(), seed=1)
    job.complete(error="out of memory", error_type="internal_error")
    job.complete(output={"images": [{"url": "x"}]})
    assert job.output is None and job.error == "out of memory" and job.error_type == "internal_error"


def test_only_one_start_counts_and_none_after_the_end():
    job = Job(endpoint=T2I, arguments=object(), seed=1)
    assert job.status == IN_QUEUE
    assert job.start() is True and job.status == IN_PROGRESS
    started = job.started
    assert job.start() is False and job.started == started
    assert [entry["message"] for entry in job.logs] == ["started"]
    job.complete(output={})
    assert job.start() is False and job.status == COMPLETED

    ended_in_queue = Job(endpoint=T2I, arguments=object(), seed=1)
    ended_in_queue.complete(error="cancelled", error_type="request_cancelled")
    assert ended_in_queue.start() is False and ended_in_queue.started is None
    assert ended_in_queue.inference_time() is None


def test_end_actions_run_once_and_let_go_of_the_input():
    job = Job(endpoint=T2I, arguments={"image": "64 MB of data URI"}, seed=1)
    ran: list[str] = []
    job.on_end(lambda: ran.append("first"))
    job.on_end(lambda: ran.append("second"))
    job.complete(output={})
    job.complete(output={})
    assert ran == ["first", "second"] and job.arguments is None
    job.on_end(lambda: ran.append("after"))  # an action given after the end runs at once
    assert ran == ["first", "second", "after"]


def test_the_store_saves_an_ended_record_once_and_frees_its_queue_slot():
    records = SavedRecords()
    store = JobStore(retention_s=HOUR, max_active=1, records=records)
    first, second = Job(endpoint=T2I, arguments=None, seed=1), Job(endpoint=T2I, arguments=None, seed=2)
    assert store.add_if_room(first) and not store.add_if_room(second)  # one waiting or running at most
    first.complete(output={})
    first.complete(error="again", error_type="x")
    assert records.saved == [first.id]
    assert store.active() == 0 and store.add_if_room(second)  # an ended record takes no slot


def test_past_max_records_the_record_that_ended_first_is_dropped():
    records = SavedRecords()
    store = JobStore(retention_s=HOUR, max_active=4, records=records, max_records=2)
    first, second, third = (Job(endpoint=T2I, arguments=None, seed=n) for n in (1, 2, 3))
    for job in (first, second, third):
        store.add_if_room(job)
    second.complete(output={})  # ended in another order than they came
    first.complete(output={})
    second.finished, first.finished = 1000.0, 1001.0  # apart, however coarse the clock
    assert store.all() == [first, second, third] and records.removed == []  # two ended: both kept
    third.complete(output={})
    assert store.all() == [first, third] and records.removed == [second.id]


def test_a_restart_keeps_every_record_up_to_max_records():
    class Kept(SavedRecords):
        def load(self, retention_s: float) -> list[Job]:
            return [Job(endpoint=T2I, arguments=None, seed=n, status=COMPLETED, finished=1000.0 + n) for n in (2, 1)]

    records = Kept()
    store = JobStore(retention_s=HOUR, max_active=4, records=records, max_records=2)
    assert store.load() == 2 and records.removed == [] and len(store.all()) == 2
    assert JobStore(HOUR, 4, records, max_records=1).load() == 1 and len(records.removed) == 1  # the oldest
    assert JobStore(retention_s=HOUR, max_active=4).load() == 0  # no records folder: nothing to load


def test_a_discarded_request_leaves_no_record_when_it_ends():
    records = SavedRecords()
    store = JobStore(retention_s=HOUR, max_active=4, records=records)
    job = Job(endpoint=T2I, arguments=None, seed=1)
    assert store.add_if_room(job)
    store.discard(job)
    job.complete(error="refused", error_type="x")
    assert records.saved == [] and store.get(job.id) is None and store.all() == []


def test_records_expire_after_retention_and_not_before():
    records = SavedRecords()
    store = JobStore(retention_s=100.0, max_active=4, records=records)
    old, running = Job(endpoint=T2I, arguments=None, seed=1), Job(endpoint=T2I, arguments=None, seed=2)
    store.add_if_room(old)
    store.add_if_room(running)
    old.complete(output={})
    store.expire(now=old.finished + 100.0)  # served until the limit itself
    assert store.all() == [old, running] and records.removed == []
    store.expire(now=old.finished + 101.0)
    assert store.all() == [running] and records.removed == [old.id]  # a running request never expires


def test_expiry_scans_at_most_once_a_minute(tmp_path, monkeypatch):
    # A lookup scans every record and upload for expired ones: at most once every EXPIRY_INTERVAL_S (60 s), so
    # a record or an upload may outlive its retention by up to a minute.
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    store = JobStore(retention_s=100.0, max_active=4)
    job = Job(endpoint=T2I, arguments=None, seed=1)
    store.add_if_room(job)
    job.complete(output={})
    job.finished = 1000.0
    files = uploads(tmp_path, retention_s=100.0)
    file_id, _ = files.store(b"image", "image/png", "a.png")  # created at 1000, and scanned then
    for now, there in ((1000.0, True), (1060.0, True), (1101.0, True), (1120.0, False)):  # scans: 1000, 1060, 1120
        clock[0] = now
        assert (store.get(job.id) is job, files.get(file_id) is not None) == (there, there), now


def test_the_status_body_of_each_state():
    job = Job(endpoint=T2I, arguments=None, seed=1)
    urls = {"response_url": "r", "status_url": "s", "cancel_url": "c"}
    queued = job.status_json(urls, logs=False, position=3)
    assert queued == {"status": IN_QUEUE, "request_id": job.id, **urls, "logs": None, "queue_position": 3}
    assert job.status_json(urls, logs=False, position=None)["queue_position"] == 0
    job.start()
    job.log("step 1")
    running = job.status_json(urls, logs=True, position=None, since_log=1)
    assert running["status"] == IN_PROGRESS and [e["message"] for e in running["logs"]] == ["step 1"]
    assert "queue_position" not in running
    job.complete(error="boom", error_type="internal_error")
    failed = job.status_json(urls, logs=False, position=None)
    assert failed["status"] == COMPLETED and failed["error"] == "boom" and failed["error_type"] == "internal_error"


def test_a_log_entry_is_what_fals_clients_parse():
    job = Job(endpoint=T2I, arguments=None, seed=1)
    job.log("step 3/28")
    assert job.status_json({}, logs=True, position=None)["logs"] == job.logs  # asked for: every entry
    (entry,) = job.logs
    stamp = entry.pop("timestamp")
    assert entry == {"message": "step 3/28", "level": "INFO", "source": "USER", "labels": {}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)  # UTC, in milliseconds
    utc = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    assert abs(utc.timestamp() - time.time()) < 60


def test_the_inference_time_is_from_start_to_end_in_milliseconds():
    job = Job(endpoint=T2I, arguments=None, seed=1)
    job.start()
    job.complete(output={})
    job.started, job.finished = 1000.0, 1002.34567
    assert job.inference_time() == 2.346
    assert job.status_json({}, logs=False, position=None)["metrics"] == {"inference_time": 2.346}
    cancelled_in_queue = Job(endpoint=T2I, arguments=None, seed=1)
    cancelled_in_queue.complete(error="cancelled", error_type="request_cancelled")
    assert cancelled_in_queue.status_json({}, logs=False, position=None)["metrics"] == {}  # it never ran


def test_a_waiter_looks_at_the_record_every_50_ms(monkeypatch):
    # A sync request's answer waits on the record: it is sent at most 50 ms after the backend ends the request.
    job = Job(endpoint=T2I, arguments=None, seed=1)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:
            job.complete(output={})  # the backend, from its thread, ends it meanwhile

    monkeypatch.setattr(asyncio, "sleep", sleep)
    asyncio.run(job.wait())
    assert pauses == [0.05, 0.05]


# --- sync_mode keeps nothing ---

def test_sync_mode_keeps_no_file_no_record_output_and_nothing_after_a_restart(tmp_path):
    results = tmp_path / "output" / "fal"

    async def scenario() -> dict:
        service = make_service(tmp_path)
        async with serving(service) as client:
            synced = await (await client.post("/queue" + T2I, json={"prompt": "x", "sync_mode": True})).json()
            job = service.jobs.get(synced["request_id"])
            assert job.done and job.files == []
            assert not any(path.suffix == ".png" for path in results.iterdir())  # the image went out as a data URI
            first = await (await client.get(path_of(synced["response_url"]))).json()
            data = base64.b64decode(first["images"][0]["url"].split(",", 1)[1])
            assert Image.open(io.BytesIO(data)).size == (32, 16)
            assert (await client.get(f"/results/{job.id}/0.png")).status == 404
            return synced

    synced = asyncio.run(scenario())
    record = json.loads((results / RECORDS_SUBFOLDER / f"{synced['request_id']}.json").read_text())
    assert record["output"] is None and record["files"] == []

    async def after_restart() -> None:
        service = make_service(tmp_path)
        async with serving(service) as client:
            status = await (await client.get(path_of(synced["status_url"]))).json()
            assert status["status"] == COMPLETED
            again = await client.get(path_of(synced["response_url"]))
            assert again.status == 404 and (await again.json())["error_type"] == "not_kept"

    asyncio.run(after_restart())


# --- the uploads store on its own ---

def uploads(tmp_path, retention_s: float = HOUR, **options) -> Uploads:
    store = Uploads(tmp_path / "uploads", retention_s=retention_s, **options)
    store.prepare()
    return store


def test_an_upload_over_the_size_limit_is_refused_and_nothing_is_written(tmp_path):
    store = uploads(tmp_path, max_bytes=100)
    with pytest.raises(Refusal) as refused:
        store.store(b"x" * 101, "image/png", "a.png")
    assert refused.value.status == 413
    assert list(store.folder.iterdir()) == []
    store.store(b"x" * 100, "image/png", "a.png")  # the limit itself is allowed


def test_the_quota_counts_every_stored_byte_and_expiry_gives_it_back(tmp_path):
    store = uploads(tmp_path, quota_bytes=250)
    first_id, first = store.store(b"a" * 200, "image/png", "a.png")
    with pytest.raises(Refusal) as refused:
        store.store(b"b" * 51, "image/png", "b.png")
    assert refused.value.status == 413 and refused.value.error_type == "upload_quota"
    store.store(b"c" * 50, "image/png", "c.png")  # exactly at the quota
    store.expire(now=first.created + HOUR)  # kept until the limit itself
    assert store.get(first_id) is first
    first.path.unlink()  # deleted by someone else meanwhile: forgotten all the same
    store.expire(now=time.time() + 2 * HOUR)
    assert store.get(first_id) is None
    store.store(b"d" * 250, "image/png", "d.png")


def test_a_slot_takes_one_upload_and_a_refused_second_gives_its_bytes_back(tmp_path):
    store = uploads(tmp_path, quota_bytes=300)
    slot = store.open_slot()
    assert store.slot_open(slot)
    file_id, stored = store.store(b"first", "image/png", "a.png", file_id=slot)
    assert file_id == slot and not store.slot_open(slot)
    with pytest.raises(Refusal) as refused:
        store.store(b"second", "image/png", "b.png", file_id=slot)
    assert refused.value.status == 404
    assert stored.path.read_bytes() == b"first"
    assert [p.name for p in store.folder.iterdir()] == [slot]  # no partial file left
    store.store(b"z" * (300 - len(b"first")), "image/png", "z.png")  # the refused bytes were given back


def test_a_start_removes_files_left_in_the_uploads_folder_and_nothing_else(tmp_path):
    folder = tmp_path / "uploads"
    (folder / "kept folder").mkdir(parents=True)
    (folder / "left.png").write_bytes(b"from the last run")
    (tmp_path / "elsewhere.png").write_bytes(b"not ours")
    (folder / "link.png").symlink_to(tmp_path / "elsewhere.png")
    uploads(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["kept folder", "link.png"]
    assert (tmp_path / "elsewhere.png").exists()


def test_stored_uploads_are_readable_by_the_server_only(tmp_path):
    _, stored = uploads(tmp_path).store(b"data", "image/png", "a.png")
    assert stored.path.stat().st_mode & 0o777 == 0o600


def test_an_id_that_is_not_a_token_never_names_a_path(tmp_path):
    store = uploads(tmp_path)
    file_id, stored = store.store(b"data", "image/png", "../../x.png", file_id="../../escape")
    assert is_token(file_id) and stored.path.parent == store.folder
    assert not (tmp_path / "escape").exists()
    assert store.get("../../escape") is None and store.get(file_id) is stored
    assert stored.name == "x.png" and clean_name("..\\..\\<script>.html") == "script_.html"


def test_a_write_that_fails_gives_the_reserved_bytes_back(tmp_path):
    store = uploads(tmp_path, quota_bytes=100)
    store.folder.rmdir()  # the folder vanished under the server
    with pytest.raises(OSError):
        store.store(b"x" * 100, "image/png", "a.png")
    store.prepare()
    store.store(b"x" * 100, "image/png", "a.png")


def test_slots_and_tokens_are_signed_for_their_use_and_expire(tmp_path, monkeypatch):
    store = uploads(tmp_path)
    token, _ = store.issue_token()
    slot = store.open_slot()
    assert store.token_valid(token) and not store.slot_open(token)  # a CDN token is no upload slot
    assert store.slot_open(slot) and not store.token_valid(slot)
    other = Uploads(tmp_path / "other", retention_s=HOUR)  # another server (or a restart) has another key
    assert not other.token_valid(token) and not other.slot_open(slot)
    tampered = slot[:-2] + ("AA" if slot[-2:] != "AA" else "BB")
    assert not store.slot_open(tampered)
    assert not store.slot_open("not a token at all")
    assert not store.slot_open("A" * 41) and not store.token_valid("A" * 41)  # token letters, but not base64
    token, expires = store.issue_token()
    monkeypatch.setattr(time, "time", lambda: int(expires) - 0.5)
    assert store.token_valid(token)
    monkeypatch.setattr(time, "time", lambda: float(int(expires)))  # valid until its whole second, not at it
    assert not store.token_valid(token)
    expired = Signer()
    stale = expired.make(b"cdn", time.time() - 1)
    assert not expired.valid(b"cdn", stale)
    monkeypatch.setattr(time, "time", lambda: 1e12)
    assert not store.token_valid(token)


@pytest.mark.parametrize("content", [b"<html><script>alert(1)</script></html>",
                                     b'<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>', b""])
def test_only_images_get_a_type(content):
    with pytest.raises(Refusal) as refused:
        image_type(content)
    assert refused.value.status == 415


def test_each_image_format_is_served_with_its_own_type():
    for fmt, served in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif"),
                        ("BMP", "image/bmp"), ("TIFF", "image/tiff")):
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format=fmt)
        assert image_type(buffer.getvalue()) == served
    assert image_type(png_bytes()) == "image/png"


def test_a_decompression_bomb_is_too_large_not_an_unknown_type(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises past twice this
    with pytest.raises(Refusal) as refused:
        image_type(png_bytes(64, 64))
    assert refused.value.status == 413 and refused.value.error_type == "too_large"

