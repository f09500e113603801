"""fal's response from what a request's workflow saved (fal_api/workflow.py `finish`): every image of every Krea Save
Image node, in order, with its size, its type and its safety flag, the timings, the seed and the prompt; the other
nodes' outputs are not images of the response."""
from __future__ import annotations

import pytest
from PIL import Image

pytest.importorskip("pydantic", reason="the fal schemas need pydantic: pip install -e '.[serve]'")

from comfyui_krea.fal_api.endpoints import ENDPOINTS, TEXT_TO_IMAGE  # noqa: E402
from comfyui_krea.fal_api.jobs import COMPLETED, Job, ResultFile  # noqa: E402
from comfyui_krea.fal_api.workflow import finish  # noqa: E402

BASE = "https://127.0.0.1:8443/fal"


def saved(folder, name: str, size: tuple[int, int]) -> dict:
    (folder / "fal").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(folder / "fal" / name)
    return {"filename": name, "subfolder": "fal", "type": "output"}


def test_every_saved_image_is_in_the_response_with_its_size_type_and_flag(tmp_path):
    png, jpeg = saved(tmp_path, "r_00001_.png", (32, 16)), saved(tmp_path, "r_00002_.jpeg", (8, 24))
    webp, gif = saved(tmp_path, "s_00001_.webp", (16, 8)), saved(tmp_path, "other.gif", (4, 4))
    prompt = {"9": {"class_type": "KreaSaveImage"}, "12": {"class_type": "KreaSaveImage"},
              "14": {"class_type": "KreaSaveImage"}, "3": {"class_type": "PreviewImage"}}
    uis = {"9": {"images": [{**png, "has_nsfw_concept": True}, jpeg]},  # no flag: no safety check linked in
           "3": {"images": [saved(tmp_path, "preview.png", (2, 2))]},  # not a save node: not a result
           "12": {"images": [{**webp, "has_nsfw_concept": False}, gif]},
           "77": {"images": [png]},  # a node the prompt does not hold
           "14": {"text": ["no images"]}}
    job = Job(endpoint=TEXT_TO_IMAGE, arguments=ENDPOINTS[TEXT_TO_IMAGE].parse({"prompt": "a fox"}), seed=5,
              base_url=BASE)
    job.start()
    finish(job, prompt, uis, tmp_path, 1.23456)
    assert job.status == COMPLETED and job.error is None
    url = f"{BASE}/results/{job.id}"
    assert job.output == {
        "images": [{"url": f"{url}/0.png", "width": 32, "height": 16, "content_type": "image/png"},
                   {"url": f"{url}/1.jpeg", "width": 8, "height": 24, "content_type": "image/jpeg"},
                   {"url": f"{url}/2.webp", "width": 16, "height": 8, "content_type": "image/webp"},
                   {"url": f"{url}/3.gif", "width": 4, "height": 4, "content_type": "application/octet-stream"}],
        "timings": {"inference": 1.235}, "seed": 5, "has_nsfw_concepts": [True, False, False, False],
        "prompt": "a fox"}
    folder = (tmp_path / "fal").resolve()
    assert job.files == [ResultFile(folder / "r_00001_.png", "image/png", ".png"),
                         ResultFile(folder / "r_00002_.jpeg", "image/jpeg", ".jpeg"),
                         ResultFile(folder / "s_00001_.webp", "image/webp", ".webp"),
                         ResultFile(folder / "other.gif", "application/octet-stream", ".gif")]


def test_an_image_without_a_subfolder_is_in_the_output_folder_itself(tmp_path):
    Image.new("RGB", (6, 2)).save(tmp_path / "top.png")
    job = Job(endpoint=TEXT_TO_IMAGE, arguments=ENDPOINTS[TEXT_TO_IMAGE].parse({"prompt": "a fox"}), seed=5)
    finish(job, {"9": {"class_type": "KreaSaveImage"}}, {"9": {"images": [{"filename": "top.png"}]}}, tmp_path, 0.5)
    assert [(image["width"], image["height"]) for image in job.output["images"]] == [(6, 2)]
    assert job.files[0].path == (tmp_path / "top.png").resolve()


def test_a_reported_file_outside_the_output_folder_ends_nothing(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere.png")
    job = Job(endpoint=TEXT_TO_IMAGE, arguments=ENDPOINTS[TEXT_TO_IMAGE].parse({"prompt": "a fox"}), seed=5)
    uis = {"9": {"images": [{"filename": "../elsewhere.png", "subfolder": "", "type": "output"}]}}
    with pytest.raises(FileNotFoundError, match="not in"):
        finish(job, {"9": {"class_type": "KreaSaveImage"}}, uis, tmp_path / "output", 0.5)
    assert job.status != COMPLETED and job.files == []
