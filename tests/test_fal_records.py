"""Request records (fal_api/jobs.py, records.py): what ended is written beside its results and served again after a
restart until retention, and what the server holds per record stays bounded (inputs let go when a request ends,
sync_mode outputs handed out once, at most MAX_RECORDS ended records)."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import HOUR, make_service, png_bytes, serving  # noqa: E402

from comfyui_krea.fal_api.jobs import Job, ResultFile  # noqa: E402
from comfyui_krea.fal_api.records import RECORDS_SUBFOLDER, RecordFolder  # noqa: E402

T2I, I2I = "/fal-ai/flux/krea", "/fal-ai/flux/krea/image-to-image"


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def test_results_and_records_are_served_again_after_a_restart(tmp_path):
    async def first_run() -> tuple[str, str, str]:
        async with serving(make_service(tmp_path)) as client:
            done = await (await client.post("/queue" + T2I, json={"prompt": "a fox"})).json()
            output = await (await client.get(path_of(done["response_url"]))).json()
            held = make_service(tmp_path / "other", hold=True)  # a cancelled request is recorded too
            async with serving(held) as other:
                waiting = await (await other.post("/queue" + T2I, json={"prompt": "x"})).json()
                assert (await other.put(path_of(waiting["cancel_url"]))).status == 202
            return done["request_id"], output["images"][0]["url"], waiting["request_id"]

    async def second_run(request_id: str, image_url: str, cancelled_id: str) -> None:
        async with serving(make_service(tmp_path)) as client:  # a new process over the same folders
            status = await (await client.get(f"/queue/fal-ai/flux/requests/{request_id}/status")).json()
            assert status["status"] == "COMPLETED" and "error" not in status
            result = await client.get(f"/queue/fal-ai/flux/requests/{request_id}")
            assert (await result.json())["images"][0]["url"] == image_url
            image = await client.get(path_of(image_url))
            assert image.status == 200 and image.headers["Content-Type"] == "image/png"
        async with serving(make_service(tmp_path / "other")) as other:
            status = await (await other.get(f"/queue/fal-ai/flux/requests/{cancelled_id}/status")).json()
            assert status["status"] == "COMPLETED" and status["error_type"] == "request_cancelled"

    ids = asyncio.run(first_run())
    asyncio.run(second_run(*ids))


def test_records_past_retention_or_not_ours_are_removed_at_start(tmp_path):
    async def scenario() -> str:
        async with serving(make_service(tmp_path)) as client:
            done = await (await client.post("/queue" + T2I, json={"prompt": "x"})).json()
            return done["request_id"]

    request_id = asyncio.run(scenario())
    records = tmp_path / "output" / "fal" / RECORDS_SUBFOLDER
    record = json.loads((records / f"{request_id}.json").read_text())
    (records / f"{request_id}.json").write_text(json.dumps({**record, "finished": time.time() - 2 * HOUR}))
    forged = {**record, "id": "00000000-0000-4000-8000-000000000000",
              "files": [{"name": "../../../etc/passwd", "content_type": "image/png", "suffix": ".png"}]}
    (records / "00000000-0000-4000-8000-000000000000.json").write_text(json.dumps(forged))
    (records / "junk.json").write_text("{")
    service = make_service(tmp_path)
    assert service.jobs.all() == [] and list(records.iterdir()) == []
    assert (tmp_path / "output" / "fal" / f"{request_id}_00001_.png").is_file()  # images are outputs: they stay


def test_ended_records_let_go_of_their_inputs_and_sync_outputs_are_handed_out_once(tmp_path):
    image = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()

    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            done = await (await client.post("/queue" + I2I, json={"prompt": "x", "image_url": image})).json()
            job = service.jobs.get(done["request_id"])
            assert job.done and job.arguments is None
            synced = await (await client.post("/queue" + T2I, json={"prompt": "x", "sync_mode": True})).json()
            first = await client.get(path_of(synced["response_url"]))
            assert (await first.json())["images"][0]["url"].startswith("data:image/png;base64,")
            again = await client.get(path_of(synced["response_url"]))
            assert again.status == 404 and (await again.json())["error_type"] == "not_kept"
            direct = await client.post(T2I, json={"prompt": "x", "sync_mode": True})
            assert direct.status == 200 and service.jobs.get(direct.headers["x-fal-request-id"]).output is None

    asyncio.run(scenario())


def test_at_most_max_records_ended_records_are_kept(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        service.jobs.max_records = 3
        async with serving(service) as client:
            ids = []
            for _ in range(5):
                submitted = await (await client.post("/queue" + T2I, json={"prompt": "x"})).json()
                ids.append(submitted["request_id"])
                assert (await client.put(path_of(submitted["cancel_url"]))).status == 202
            kept = {job.id for job in service.jobs.all()}
            assert kept == set(ids[2:])
            records = tmp_path / "output" / "fal" / RECORDS_SUBFOLDER
            assert {p.stem for p in records.iterdir()} == set(ids[2:])
            return ids

    ids = asyncio.run(scenario())
    restarted = make_service(tmp_path, max_records=2)  # a restart with a lower bound keeps the newest
    assert {job.id for job in restarted.jobs.all()} == set(ids[3:])
    assert {p.stem for p in (tmp_path / "output" / "fal" / RECORDS_SUBFOLDER).iterdir()} == set(ids[3:])


def test_a_record_read_back_is_the_request_as_it_ended(tmp_path):
    """Everything the status and result routes answer from survives the restart: seed, base URL, times, logs,
    output, error, files."""
    results = tmp_path / "fal"
    results.mkdir()
    (results / "a_00001_.png").write_bytes(png_bytes())
    job = Job(endpoint="fal-ai/flux/krea", arguments=None, seed=987654321, base_url="https://gpu.example/fal",
              created=1000.5, files=[ResultFile(results / "a_00001_.png", "image/png", ".png")])
    job.log("queued")
    job.start()
    job.complete(output={"images": [{"url": "https://gpu.example/fal/results/x/0.png"}], "seed": 987654321},
                 error="a failure", error_type="runner_error")
    folder = RecordFolder(results)
    folder.save(job)
    [loaded] = folder.load(HOUR)
    fields = ("id", "endpoint", "seed", "base_url", "created", "started", "finished", "logs", "output", "error",
              "error_type", "status")
    assert {name: getattr(loaded, name) for name in fields} == {name: getattr(job, name) for name in fields}
    assert [(f.path, f.content_type, f.suffix) for f in loaded.files] == [(results.resolve() / "a_00001_.png",
                                                                          "image/png", ".png")]
    assert isinstance(loaded.seed, int) and isinstance(loaded.created, float) and job.started is not None


def test_records_naming_a_file_outside_the_results_or_a_deleted_image_are_removed_at_start(tmp_path):
    results = tmp_path / "fal"
    results.mkdir()
    (tmp_path / "elsewhere.png").write_bytes(png_bytes())  # exists, but not in the results folder
    folder = RecordFolder(results)
    for name in ("../elsewhere.png", "deleted_00001_.png"):
        job = Job(endpoint="fal-ai/flux/krea", arguments=None, seed=1,
                  files=[ResultFile(results / "deleted_00001_.png", "image/png", ".png")])
        job.complete(output={"images": []})
        folder.save(job)
        record = json.loads(folder.path(job.id).read_text())
        folder.path(job.id).write_text(json.dumps({**record, "files": [{**record["files"][0], "name": name}]}))
        assert folder.load(HOUR) == [] and not folder.path(job.id).exists()


def test_retention_is_counted_from_the_end_up_to_the_moment_given_and_folders_inside_are_left(tmp_path):
    results = tmp_path / "fal"
    results.mkdir()
    folder = RecordFolder(results)
    job = Job(endpoint="fal-ai/flux/krea", arguments=None, seed=1)
    job.complete(output={"images": []})
    job.finished = 1000.0
    folder.save(job)
    (folder.folder / "a folder").mkdir()  # not a record: never removed, never an error
    assert [j.id for j in folder.load(100.0, now=1100.0)] == [job.id]  # exactly at retention: kept
    assert folder.load(100.0, now=1100.5) == [] and not folder.path(job.id).exists()
    assert (folder.folder / "a folder").is_dir()


def test_removing_a_record_that_was_never_written_is_no_error(tmp_path):
    """A record whose write failed (a full disk) still expires and is dropped: its removal finds nothing."""
    folder = RecordFolder(tmp_path / "fal")
    folder.remove("00000000-0000-4000-8000-000000000000")
    folder.remove("not-a-request-id")


def test_an_id_that_is_not_a_request_id_names_no_record_file(tmp_path):
    """Ids come from URLs: one that is not a request id (a path, `..`) reaches no file, inside the folder or out."""
    results = tmp_path / "fal"
    (results / RECORDS_SUBFOLDER).mkdir(parents=True)
    victims = [results / "victim.json", results / RECORDS_SUBFOLDER / "notes.json"]
    for victim in victims:
        victim.write_text("{}")
    folder = RecordFolder(results)
    for request_id in ("../victim", "notes"):
        assert folder.path(request_id) is None
        folder.remove(request_id)
    assert all(victim.is_file() for victim in victims)


def test_a_request_that_has_not_ended_gets_no_record(tmp_path):
    folder = RecordFolder(tmp_path / "fal")
    job = Job(endpoint="fal-ai/flux/krea", arguments=None, seed=1)
    job.start()
    folder.save(job)
    assert not folder.path(job.id).exists()


@pytest.mark.parametrize("blocker", ["a dangling link", "a file"])
def test_a_record_that_cannot_be_written_is_logged_and_the_request_goes_on(tmp_path, caplog, blocker):
    """The records folder is a dangling link (a moved disk) or a file: nothing is written, nothing raised (the
    request's other end-of-request steps still run), a warning says where."""
    results = tmp_path / "fal"
    results.mkdir()
    if blocker == "a file":
        (results / RECORDS_SUBFOLDER).write_text("not a folder")
    else:
        (results / RECORDS_SUBFOLDER).symlink_to(tmp_path / "gone")
    job = Job(endpoint="fal-ai/flux/krea", arguments=None, seed=1)
    job.complete(output={"images": []})
    with caplog.at_level("WARNING"):
        RecordFolder(results).save(job)
    assert job.id in caplog.text and RECORDS_SUBFOLDER in caplog.text
