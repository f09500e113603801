"""`run --server`'s downloads (standalone/remote.py): every image the server saved comes into the same sub-folder of
--output, a taken name gets the next free counter (no file is ever replaced), nothing lands outside --output, no
half-written file is left; the previews the server kept in its temp folder are not downloaded."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="run --server needs aiohttp: pip install -e '.[serve]'")

from comfyui_http_standin import NODE_TYPES, PNG, NodeRun, Plan, StandInComfyUI, i2i, run, saving  # noqa: E402

from comfyui_krea.standalone import remote  # noqa: E402
from comfyui_krea.standalone.remote import RunFailed, free_name, inside, write_new  # noqa: E402


@pytest.fixture
def standin(tmp_path) -> StandInComfyUI:
    return StandInComfyUI(tmp_path / "comfyui", NODE_TYPES)


def test_each_saved_image_comes_into_its_sub_folder_and_never_over_another_file(standin, tmp_path):
    out = tmp_path / "out"
    (out / "krea").mkdir(parents=True)
    (out / "krea" / "krea_00001_.png").write_bytes(b"an earlier run's")
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), ("krea", "krea_00002_.png", PNG[::-1], "output"),
                          ("", "ComfyUI_00001_.png", PNG[:20], "output"))
    standin.plan.nodes[4].images = [("", "ComfyUI_temp_abcde_00001_.png", b"preview", "temp")]  # a PreviewImage's
    written, _, _ = run(standin, i2i(), out)
    assert written == [out / "krea" / "krea_00001__1.png", out / "krea" / "krea_00002_.png",
                       out / "ComfyUI_00001_.png"]
    assert [path.read_bytes() for path in written] == [PNG, PNG[::-1], PNG[:20]]
    assert (out / "krea" / "krea_00001_.png").read_bytes() == b"an earlier run's"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "ComfyUI_00001_.png", "krea", "krea/krea_00001_.png", "krea/krea_00001__1.png", "krea/krea_00002_.png"]
    assert standin.views == [{"filename": "krea_00001_.png", "subfolder": "krea", "type": "output"},
                             {"filename": "krea_00002_.png", "subfolder": "krea", "type": "output"},
                             {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]


def test_custom_nodes_outputs_without_images_or_sub_folders_or_with_mixed_image_types(standin, tmp_path):
    standin.plan = Plan(nodes=[
        NodeRun("4", ui={"text": ["a caption"]}),  # e.g. PreviewAny: no images at all
        NodeRun("5", images=[("", "preview_00001_.png", b"preview", "temp"),  # a node that previews and saves
                             ("masks", "mask_00001_.png", PNG, "output")]),
        NodeRun("6", images=[(None, "krea_00001_.png", PNG[::-1], "output")])])  # no "subfolder": the output folder
    written, _, _ = run(standin, i2i(), tmp_path / "out")
    assert written == [tmp_path / "out" / "masks" / "mask_00001_.png", tmp_path / "out" / "krea_00001_.png"]
    assert [path.read_bytes() for path in written] == [PNG, PNG[::-1]]


def test_an_image_gone_from_the_server_fails_its_download(standin, tmp_path):
    standin.plan = Plan(nodes=[NodeRun("6", images=[("krea", "krea_00001_.png", PNG, "output")]),
                               NodeRun("3", steps=2)], hold_at_step=1)

    async def deleted_meanwhile(url, task):
        await standin.holding.wait()
        (standin.dirs["output"] / "krea" / "krea_00001_.png").unlink()
        standin.resume.set()

    with pytest.raises(RunFailed, match="^downloading krea_00001_.png failed: HTTP 404$"):
        run(standin, i2i(), tmp_path / "out", during=deleted_meanwhile)
    assert not (tmp_path / "out").exists()


def test_a_history_recorded_late_is_looked_up_again(standin, tmp_path):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), history_late=2)  # e.g. a caching proxy
    written, _, _ = run(standin, i2i(), tmp_path / "out")
    assert [path.read_bytes() for path in written] == [PNG] and standin.history_asked == 3


def test_free_names_count_up_past_every_taken_one(tmp_path):
    assert free_name(tmp_path, "a.png") == tmp_path / "a.png"
    for name in ("a.png", "a_1.png", "b"):
        (tmp_path / name).write_bytes(b"")
    assert free_name(tmp_path, "a.png") == tmp_path / "a_2.png"
    assert free_name(tmp_path, "b") == tmp_path / "b_1"  # no suffix: the counter at the end
    assert free_name(tmp_path, "x.tar.gz") == tmp_path / "x.tar.gz"
    assert free_name(tmp_path, "../../sub/a.png") == tmp_path / "a_2.png"  # the server's name, never its path


def test_write_new_makes_the_folders_keeps_every_file_and_leaves_nothing_half_written(tmp_path):
    folder = tmp_path / "out" / "krea" / "day"
    assert write_new(folder, "a.png", b"1") == folder / "a.png"
    assert write_new(folder, "a.png", b"2") == folder / "a_1.png"
    assert write_new(folder, "../a.png", b"3") == folder / "a_2.png"
    assert [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())] == [
        ("a.png", b"1"), ("a_1.png", b"2"), ("a_2.png", b"3")]


def test_write_new_takes_the_next_name_when_another_writer_took_its_pick(tmp_path, monkeypatch):
    """Between the look for a free name and the link, another process may take that name: the link refuses, and
    the next free name is taken."""
    picks = []

    def raced(folder: Path, name: str) -> Path:
        pick = free_name(folder, name)
        if not picks:
            pick.write_bytes(b"the other writer's")
        picks.append(pick)
        return pick

    monkeypatch.setattr(remote, "free_name", raced)
    assert write_new(tmp_path, "a.png", b"ours") == tmp_path / "a_1.png"
    assert picks == [tmp_path / "a.png", tmp_path / "a_1.png"]
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a_1.png"]
    assert (tmp_path / "a.png").read_bytes() == b"the other writer's" and (tmp_path / "a_1.png").read_bytes() == b"ours"


def test_write_new_leaves_no_partial_file_when_the_link_fails(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(13, "Operation not permitted", str(target))

    monkeypatch.setattr(remote.os, "link", no_links)
    with pytest.raises(PermissionError):
        write_new(tmp_path, "a.png", b"x")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("subfolder", ["..", "../elsewhere", "krea/../../elsewhere", "/etc", "/"])
def test_a_sub_folder_outside_the_output_folder_is_refused(tmp_path, subfolder):
    with pytest.raises(RunFailed, match="the server named an image sub-folder outside the output folder: "):
        inside(tmp_path / "out", subfolder)


def test_a_sub_folder_through_a_link_out_of_the_output_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "krea").symlink_to(tmp_path)
    with pytest.raises(RunFailed, match="'krea/x'"):
        inside(tmp_path / "out", "krea/x")


@pytest.mark.parametrize("subfolder, expected", [(None, ""), ("", ""), ("krea", "krea"), ("krea/day/..", "krea/day/.."),
                                                 ("a/b", "a/b")])
def test_sub_folders_inside_the_output_folder_are_kept(tmp_path, subfolder, expected):
    assert inside(tmp_path / "out", subfolder) == tmp_path / "out" / expected


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """The client's waits between looks at the history, counted instead of waited."""
    import asyncio
    from types import SimpleNamespace

    waits = []

    async def counted(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(remote, "asyncio", SimpleNamespace(sleep=counted, CancelledError=asyncio.CancelledError))
    return waits


def test_a_late_history_is_looked_up_again_every_tenth_of_a_second(standin, tmp_path, slept):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), history_late=99)
    written, _, _ = run(standin, i2i(), tmp_path / "out")
    assert [path.read_bytes() for path in written] == [PNG]
    assert standin.history_asked == 100 and slept == [0.1] * 99


def test_a_run_the_server_kept_no_record_of_is_an_error_not_an_empty_success(standin, tmp_path, slept):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), history_late=100)  # 10 s of looking
    with pytest.raises(RunFailed) as failed:
        run(standin, i2i(), tmp_path / "out")
    (prompt_id,) = standin.history
    assert str(failed.value) == (f"the run ended but the server has no record of it (GET /history/{prompt_id} "
                                 "stayed empty for 10 s): its images are in the server's output folder")
    assert standin.history_asked == 100 and not (tmp_path / "out").exists()


def test_an_image_linked_into_place_is_kept_when_its_temporary_file_vanished_meanwhile(tmp_path, monkeypatch):
    """Something else may clear the output folder's hidden files (a sync tool, a cleanup) between the link and
    the removal of the temporary file: the image is in place, so that is no error."""
    link = os.link

    def link_then_cleared(source, target):
        link(source, target)
        os.unlink(source)

    monkeypatch.setattr(remote.os, "link", link_then_cleared)
    assert write_new(tmp_path, "a.png", b"x") == tmp_path / "a.png"
    assert os.listdir(tmp_path) == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"x"


def test_a_history_record_without_outputs_is_a_run_that_saved_nothing(tmp_path):
    class WithoutOutputs(StandInComfyUI):  # a server whose record leaves out an empty "outputs"
        async def get_history(self, request):
            for record in self.history.values():
                record.pop("outputs", None)
            return await super().get_history(request)

    standin = WithoutOutputs(tmp_path / "comfyui", NODE_TYPES)
    standin.plan = saving()
    written, reports, _ = run(standin, i2i(), tmp_path / "out")
    assert written == [] and reports == [("3", "2 of 2 steps computed")] and not (tmp_path / "out").exists()
