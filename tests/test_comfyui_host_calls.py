"""What the pack's host inside ComfyUI (nodes/host/comfyui_host.py) asks of ComfyUI and tells it, run in-process over
the stand-ins of tests/comfyui_adapter_stand_ins.py: the model folders it reads and lists (GGUF files too), the
safety checker it hands to ModelPatcher and load_models_gpu, progress bars, previews and the terminal bar, the
interrupt check, the `krea.report` message to the browser, save paths, --disable-metadata, and the tokenizer files
ComfyUI ships.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from comfyui_adapter_stand_ins import CPU, ExecutionContext, adapter_over_stand_ins, start_server
from tqdm import tqdm

from comfyui_krea.nodes.host.holding import ModelSlot
from reference_tokenizers import TOKENIZERS, needs_tokenizers


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    yield from adapter_over_stand_ins(monkeypatch, tmp_path)


def put(comfy, *names: str) -> None:
    for name in names:
        path = comfy.root / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_model_folders_are_comfyuis_own(comfy):
    host = comfy.host.ComfyHost()
    assert host.model_search_paths("vae") == [comfy.root / "models" / "vae"]
    assert host.output_directory() == comfy.root / "output"


def test_gguf_files_are_listed_and_found_beside_comfyuis_own_in_the_gguf_folders_only(comfy):
    put(comfy, "diffusion_models/krea.safetensors", "diffusion_models/krea-Q8_0.gguf", "diffusion_models/a.gguf",
        "text_encoders/t5-Q5_K.gguf", "vae/ae.safetensors", "vae/stray.gguf")
    host = comfy.host.ComfyHost()
    assert host.list_models("diffusion_models") == ["a.gguf", "krea-Q8_0.gguf", "krea.safetensors"]
    assert host.list_models("text_encoders") == ["t5-Q5_K.gguf"]
    assert host.list_models("vae") == ["ae.safetensors"]  # ComfyUI's VAE folder takes no GGUF
    models = comfy.root / "models"
    assert host.find_model("diffusion_models", "krea.safetensors") == models / "diffusion_models" / "krea.safetensors"
    assert host.find_model("diffusion_models", "a.gguf") == models / "diffusion_models" / "a.gguf"
    assert host.find_model("diffusion_models", "missing.gguf") is None
    assert host.find_model("vae", "ae.safetensors") == models / "vae" / "ae.safetensors"
    assert host.find_model("vae", "missing.safetensors") is None


def test_the_safety_checker_folder_is_registered_when_nothing_configured_it(comfy):
    del comfy.stand_ins["folder_paths"].folder_names_and_paths["safety_checker"]  # no extra_model_paths.yaml entry
    comfy.host.ComfyHost()
    paths, _ = comfy.stand_ins["folder_paths"].folder_names_and_paths["safety_checker"]
    assert paths == [str(comfy.root / "models" / "safety_checker")]


def test_the_safety_checker_is_handed_to_a_modelpatcher_on_comfyuis_devices_and_loaded_by_comfyui(comfy):
    host = comfy.host.ComfyHost()
    slot, module = ModelSlot(), torch.nn.Linear(2, 2)
    held = host.models.keep(slot, "safety_checker", ("checker",), lambda: {"module": module}, lambda m: m["module"])
    assert held == {"module": module}
    patcher = slot.patcher
    assert isinstance(patcher, comfy.stand_ins["comfy.model_patcher"].ModelPatcher)
    assert patcher.model is module and (patcher.load_device, patcher.offload_device) == (CPU, CPU)
    host.models.ready(slot, 123_456)
    assert comfy.calls.load_models_gpu == [([patcher], 123_456)]
    text_encoder = ModelSlot()
    host.models.keep(text_encoder, "text_encoder", ("t5",), lambda: module, lambda m: m)
    assert text_encoder.patcher.load_device == torch.device("meta")  # ComfyUI's text encoder device


def test_work_progress_moves_comfyuis_bar_after_the_interrupt_check(comfy):
    update = comfy.host.ComfyHost().work_progress(4, node_id="7")
    update(1, 4)
    assert comfy.calls.events == [("bar", 4, "7"), "interrupt check", ("update", 1, 4, None)]
    comfy.calls.interrupted = True
    with pytest.raises(InterruptedError):
        update(2, 4)
    assert comfy.calls.events[-1] == "interrupt check"


def test_a_step_shows_comfyuis_preview_of_the_latent_on_the_bar(comfy):
    comfy.calls.previews = True
    callback = comfy.host.ComfyHost().progress_callback(2, node_id="3")
    x0 = torch.ones(1, 16, 2, 2)
    callback(1, 2, x0)
    (device, latent_format), = comfy.calls.previewer_asked
    assert device == CPU and isinstance(latent_format, comfy.stand_ins["comfy.latent_formats"].Flux)
    (_, value, total, preview), = [event for event in comfy.calls.events if event[0] == "update"]
    assert (value, total) == (1, 2)
    assert preview[0] == "JPEG" and preview[1][1] is x0 and preview[2] == 512


def live_bars() -> list:
    """tqdm's open bars (tqdm keeps them to place nested bars; a closed bar leaves the set). Its drawing waits
    0.1 s between frames, so the counts in between are read off the bar rather than off the terminal."""
    return list(getattr(tqdm, "_instances", []))


def test_the_terminal_bar_counts_the_steps_and_closes_once_full(comfy, capsys):
    comfy.stand_ins["comfy.utils"].PROGRESS_BAR_ENABLED = True
    before = set(map(id, live_bars()))
    callback = comfy.host.ComfyHost().progress_callback(3)
    bar, = [b for b in live_bars() if id(b) not in before]
    seen = []
    for step in (1, 2):
        callback(step, 3, torch.zeros(1))
        seen.append((bar.n, bar.total))
    callback(3, 3, torch.zeros(1))
    assert seen == [(1, 3), (2, 3)]
    assert bar not in live_bars() and bar.n == 3  # closed
    drawn = capsys.readouterr().err
    frames = drawn.split("\r")
    assert "0/3" in frames[1] and "3/3" in frames[-1] and drawn.endswith("\n")


def test_no_terminal_bar_when_comfyui_turns_progress_bars_off(comfy, capsys):
    callback = comfy.host.ComfyHost().progress_callback(2)
    callback(1, 2, torch.zeros(1))
    callback(2, 2, torch.zeros(1))
    assert capsys.readouterr().err == ""


def test_a_report_goes_to_the_browser_that_queued_the_prompt(comfy, monkeypatch):
    host = comfy.host.ComfyHost()
    assert host.node_report("no server", {"a": 1}) == {}  # ComfyUI's server not in this process: nothing sent
    start_server(monkeypatch, comfy.calls)
    assert host.node_report("outside a node", {"a": 1}) == {} and comfy.calls.sent == []
    comfy.calls.context = ExecutionContext(prompt_id="p9", node_id="12.4", list_index=None)
    comfy.calls.display["12.4"] = "12"  # a node a group node expanded: the browser knows it as 12
    fields = {"seed": 7}
    assert host.node_report("seed 7", fields) == {}
    assert comfy.calls.sent == [("krea.report", {"node": "12.4", "display_node": "12", "prompt_id": "p9",
                                                 "text": "seed 7", "report": fields}, "browser-1")]


def test_a_report_of_a_node_the_prompt_shows_as_itself(comfy, monkeypatch):
    start_server(monkeypatch, comfy.calls, client_id=None)
    comfy.calls.context = ExecutionContext(prompt_id="p2", node_id="5", list_index=0)
    comfy.host.ComfyHost().node_report("t", {})
    (_, data, sid), = comfy.calls.sent
    assert data["display_node"] == "5" and sid is None


def test_save_paths_come_from_comfyui_with_the_image_size(comfy):
    host = comfy.host.ComfyHost()
    out = comfy.root / "output"
    assert host.save_image_path("krea/%width%x%height%", 1024, 768) == (out / "krea", "1024x768", 1, "krea")
    (out / "krea" / "1024x768_00001_.png").write_bytes(b"png")
    assert host.save_image_path("krea/%width%x%height%", 1024, 768)[2] == 2
    with pytest.raises(Exception, match="outside the output folder"):
        host.save_image_path("../escape", 8, 8)


def test_metadata_follows_disable_metadata(comfy):
    host = comfy.host.ComfyHost()
    assert host.metadata_enabled() is True
    comfy.stand_ins["comfy.cli_args"].args.disable_metadata = True
    assert host.metadata_enabled() is False


def test_the_tokenizers_are_the_ones_comfyui_ships(comfy):
    assert comfy.host.ComfyHost().shipped_tokenizer_dirs() == {
        "clip": comfy.root / "comfy" / "sd1_tokenizer", "t5": comfy.root / "comfy" / "text_encoders" / "t5_tokenizer"}


def ship_tokenizers(root):
    shutil.copytree(TOKENIZERS / "clip", root / "comfy" / "sd1_tokenizer")
    shutil.copytree(TOKENIZERS / "t5", root / "comfy" / "text_encoders" / "t5_tokenizer")


@needs_tokenizers
def test_the_tokenizers_are_loaded_once_per_comfyui_folder(comfy, tmp_path_factory):
    ship_tokenizers(comfy.root)
    host = comfy.host.ComfyHost()
    clip, t5 = host.prompt_tokenizers()
    assert clip([" a cat"]).ids.shape == (1, 77) and t5(["a cat"]).ids.shape == (1, 512)
    assert host.prompt_tokenizers()[0] is clip
    other = tmp_path_factory.mktemp("other_comfyui")
    ship_tokenizers(other)
    comfy.stand_ins["comfy.utils"].__file__ = str(other / "comfy" / "utils.py")
    assert host.prompt_tokenizers()[0] is not clip


def test_the_fal_routes_are_added_to_comfyuis_server_with_the_hosts_step_listener(comfy, monkeypatch, tmp_path):
    from comfyui_server_stand_ins import Comfy, forget_fal_queue, import_fal_queue

    server_side = Comfy(tmp_path / "server")
    import_fal_queue(monkeypatch, server_side)
    try:
        server = server_side.start_server()
        comfy.host.ComfyHost().register_routes()
        assert [(route.method, route.path) for route in server.routes] == [("*", "/fal/{tail:.*}")]
    finally:
        forget_fal_queue()
