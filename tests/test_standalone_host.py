"""The standalone host's own answers (nodes/host/standalone_host.py, standalone_models.py, holding.py,
folders.py): model names and folders, the model cache's keys, what reaches the VAE and the reporter, the
interrupt, the save counter, the device, the transformer it hands the sampler, and the host interface's shared
checks (model_path, save_folder_problem) as the command line and the fal server see them."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from fal_protocol.servers import free_port

from comfyui_krea.model_loader import FileKind, ModelFileError
from comfyui_krea.nodes.host import standalone_models
from comfyui_krea.nodes.host.folders import model_extensions, model_name_problem, with_folders
from comfyui_krea.nodes.host.holding import LatestPerKind, ModelSlot, UnderPatchers
from comfyui_krea.nodes.host.standalone_host import Interrupted, StandaloneHost
from comfyui_krea.nodes.host.standalone_models import TextEncoderHandle, TransformerHandle, VaeHandle
from comfyui_krea.sampling.sequence_parallel import SequenceParallelFlux
from conftest import random_flux

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- names and folders

def test_only_the_transformer_and_text_encoder_folders_list_gguf_files():
    assert model_extensions("diffusion_models") == (".safetensors", ".sft", ".gguf")
    assert model_extensions("text_encoders") == (".safetensors", ".sft", ".gguf")
    for folder in ("vae", "loras", "safety_checker"):
        assert model_extensions(folder) == (".safetensors", ".sft")


@pytest.mark.parametrize("name", ["flux1-krea-dev.safetensors", "krea/flux1-krea-dev.safetensors",
                                  "krea\\ae.safetensors", "a..b.safetensors", "1:2.safetensors", "krea:v2.safetensors"])
def test_names_inside_the_model_folder_are_accepted(name):
    assert model_name_problem(name) is None


LEAVES = ("leaves the model folder: names are relative to it (e.g. 'flux1-krea-dev.safetensors' or "
          "'krea/flux1-krea-dev.safetensors'), without '..' or an absolute path. Put the file into the model folder "
          "(a link to it works too) and pick it by name")


@pytest.mark.parametrize("name", ["/etc/passwd", "\\server\\share.safetensors", "C:\\models\\ae.safetensors",
                                  "c:ae.safetensors", "../ae.safetensors", "krea\\..\\..\\ae.safetensors",
                                  "krea/../../ae.safetensors", "ae\0.safetensors"])
def test_names_leaving_the_model_folder_are_refused_with_what_to_do(name):
    assert model_name_problem(name) == f"the model name {name!r} {LEAVES}"


@pytest.mark.parametrize("name", [None, "", "   ", 3])
def test_what_is_not_a_file_name_is_refused(name):
    assert model_name_problem(name) == f"the model name {name!r} is not a file name"


def test_a_wrong_files_error_names_both_folders_keeping_its_kinds():
    err = with_folders(ModelFileError("x.safetensors is a VAE.", found=FileKind.VAE,
                                      expected=FileKind.FLUX_TRANSFORMER))
    assert str(err) == (f"x.safetensors is a VAE. {FileKind.VAE.short} files belong in models/vae; "
                        f"{FileKind.FLUX_TRANSFORMER.short} files in models/diffusion_models.")
    assert (err.found, err.expected) == (FileKind.VAE, FileKind.FLUX_TRANSFORMER)


def test_two_kinds_of_one_folder_are_named_once():
    err = with_folders(ModelFileError("t5.safetensors is T5.", found=FileKind.T5_TEXT, expected=FileKind.CLIP_TEXT))
    assert str(err) == (f"t5.safetensors is T5. {FileKind.T5_TEXT.short} and {FileKind.CLIP_TEXT.short} files "
                        "both belong in models/text_encoders.")


def test_an_error_with_only_the_expected_kind_names_its_folder():
    for found in (None, FileKind.VAE):  # unknown, or the kind it should be
        err = with_folders(ModelFileError("broken.", found=found, expected=FileKind.VAE))
        assert str(err) == f"broken. {FileKind.VAE.short} files in models/vae."
        assert (err.found, err.expected) == (found, FileKind.VAE)


def test_an_error_without_kinds_stays_as_it_is():
    err = ModelFileError("unreadable.")
    assert with_folders(err) is err


def test_a_missing_model_lists_the_folders_searched(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path)
    with pytest.raises(ModelFileError) as caught:
        host_state.model_path("diffusion_models", "gone.safetensors")
    assert str(caught.value) == (
        f"Model file 'gone.safetensors' not found. Searched the 'diffusion_models' folders: "
        f"{tmp_path.absolute() / 'diffusion_models'}, {tmp_path.absolute() / 'unet'}. "
        "Put the file in one of them (or pick another file in the node).")


def test_a_host_without_model_folders_says_so():
    class NoFolders(StandaloneHost):
        def model_search_paths(self, folder):
            return []

    with pytest.raises(ModelFileError, match=r"folders: \(no folder configured\)\. Put"):
        NoFolders().model_path("vae", "ae.safetensors")


def test_models_are_listed_from_every_folder_of_a_kind_with_their_endings(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path)
    (tmp_path / "unet" / "krea").mkdir(parents=True)  # only the second folder of the kind exists
    for name in ("krea/a.safetensors", "b.SFT", "c.gguf", "notes.txt"):
        (tmp_path / "unet" / name).write_bytes(b"x")
    (tmp_path / "unet" / "folder.safetensors").mkdir()
    assert host_state.list_models("diffusion_models") == ["b.SFT", "c.gguf", "krea/a.safetensors"]


# --------------------------------------------------------------------------------------- the host itself

def test_a_new_host_keeps_the_latest_model_of_each_kind_and_has_no_callbacks_or_group():
    fresh = StandaloneHost()
    assert isinstance(fresh.models, LatestPerKind)
    settings = fresh.settings()
    assert (settings.tokenizer_dir, settings.comfyui_dir, settings.progress, settings.interrupt,
            settings.process_group) == (None, None, None, None, None)
    assert fresh.output_directory() == settings.output_dir


def test_configure_sets_what_is_given_and_keeps_the_rest(tmp_path):
    fresh = StandaloneHost()
    group, event = object(), threading.Event()

    def progress(step, total, x0):
        return None

    fresh.configure(models_dir=tmp_path / "m", process_group=group, interrupt=event, progress=progress)
    fresh.configure(output_dir=tmp_path / "o")
    settings = fresh.settings()
    assert (settings.models_dir, settings.output_dir) == (tmp_path / "m", tmp_path / "o")
    assert (settings.process_group, settings.interrupt, settings.progress) == (group, event, progress)


def test_the_compute_device_is_cuda_when_torch_has_it(monkeypatch):
    fresh = StandaloneHost()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fresh.torch_device() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fresh.torch_device() == torch.device("cuda")
    assert fresh.model_devices("vae") == (torch.device("cuda"), torch.device("cuda"))


def test_without_an_event_nothing_checks_for_a_cancel_and_with_one_every_callback_does():
    fresh = StandaloneHost()
    assert fresh.block_interrupt_check() is None
    fresh.work_progress(3)(1, 3)  # nothing to raise
    event = threading.Event()
    fresh.configure(interrupt=event)
    assert fresh.block_interrupt_check() == fresh.throw_if_interrupted
    event.set()
    with pytest.raises(Interrupted):
        fresh.work_progress(3)(1, 3)
    assert not event.is_set()  # a cancel stops one run, not the next


def test_the_reporter_gets_every_step_with_its_image():
    seen = []
    fresh = StandaloneHost()
    fresh.configure(progress=lambda step, total, x0: seen.append((step, total, x0)))
    x0 = torch.zeros(1, 16, 2, 2)
    fresh.progress_callback(4)(2, 4, x0)
    assert len(seen) == 1 and seen[0][:2] == (2, 4) and seen[0][2] is x0


VAE_CALLS: list = []


class RecordingVae(VaeHandle):
    """A VaeHandle that records what the host hands its encode and decode (in VAE_CALLS)."""

    def encode(self, images, progress, interrupt=None):
        VAE_CALLS.append(("encode", progress, interrupt))
        return images

    def decode(self, latents, progress, interrupt=None):
        VAE_CALLS.append(("decode", progress, interrupt))
        return latents


def test_the_vae_gets_the_hosts_tile_progress_and_interrupt_check():
    fresh = StandaloneHost()
    event = threading.Event()
    fresh.configure(interrupt=event)
    vae = RecordingVae(Path("ae.safetensors"), CPU)
    VAE_CALLS.clear()
    fresh.encode_pixels(vae, torch.zeros(1, 8, 8, 3))
    fresh.decode_latents(vae, torch.zeros(1, 16, 1, 1))
    assert [c[0] for c in VAE_CALLS] == ["encode", "decode"]
    for _, progress, interrupt in VAE_CALLS:
        assert interrupt == fresh.throw_if_interrupted
        progress(1, 4)
        event.set()
        with pytest.raises(Interrupted):
            progress(2, 4)


@pytest.mark.parametrize("call, message", [
    ("encode_prompt", "text_encoder must be the text_encoder output of Krea Model Loader; got str."),
    ("encode_pixels", "vae must be the vae output of Krea Model Loader; got str."),
    ("decode_latents", "vae must be the vae output of Krea Model Loader; got str."),
])
def test_a_wrong_input_is_named_with_what_to_connect(call, message):
    with pytest.raises(ValueError) as caught:
        getattr(StandaloneHost(), call)("not a model", torch.zeros(1))
    assert str(caught.value) == message


def test_the_transformer_is_handed_over_resident_on_its_device_in_its_compute_dtype():
    module = random_flux()
    model = SimpleNamespace(load=lambda: module, device=CPU)
    loaded = StandaloneHost().loaded_transformer(model, (1, 16, 4, 4))
    assert loaded.module is module and loaded.device == CPU and loaded.compute_dtype == module.compute_dtype
    assert loaded.is_pack_model is True and loaded.streamed is False


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed's gloo")
def test_with_a_process_group_the_transformer_is_sampled_by_the_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        module = random_flux()
        fresh = StandaloneHost()
        fresh.configure(process_group=group)
        loaded = fresh.loaded_transformer(SimpleNamespace(load=lambda: module, device=CPU), (1, 16, 4, 4))
        assert isinstance(loaded.module, SequenceParallelFlux)
        assert loaded.module.model is module and loaded.module.collectives.group is group
        loaded.module.restore_attention()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ saving

def test_the_save_counter_continues_after_the_highest_image_of_that_prefix(tmp_path, host_state):
    host_state.configure(output_dir=tmp_path)
    (tmp_path / "krea").mkdir()
    for name in ("krea_00003_.png", "krea_00009_2_.png", "krea_extra_00050_.png", "kreax_00070_.png",
                 "krea_.png", "other_00080_.png"):
        (tmp_path / "krea" / name).write_bytes(b"")
    folder, filename, counter, subfolder = host_state.save_image_path("krea/krea", 16, 16)
    assert (folder, filename, counter, subfolder) == (tmp_path.resolve() / "krea", "krea", 10, "krea")
    (tmp_path / "krea" / "krea_12345_.png").write_bytes(b"")  # past five digits' first one
    assert host_state.save_image_path("krea/krea", 16, 16)[2] == 12346
    assert host_state.save_image_path("fresh", 16, 16) == (tmp_path.resolve(), "fresh", 1, "")


def test_a_prefix_outside_the_output_folder_is_refused(tmp_path, host_state):
    host_state.configure(output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="points outside the output folder"):
        host_state.save_image_path("../krea", 16, 16)
    problem = host_state.save_folder_problem("../krea")
    assert problem.startswith("filename_prefix '../krea' cannot be used: filename_prefix '../krea' points outside")
    assert problem.endswith(". Use a name inside the output folder, e.g. 'krea/krea'.")


def test_a_file_in_the_way_of_the_output_folder_is_a_problem_found_before_any_work(tmp_path, host_state):
    host_state.configure(output_dir=tmp_path)
    (tmp_path / "blocked").write_text("a file where a folder should be")
    problem = host_state.save_folder_problem("blocked/deeper/krea")
    assert problem == (f"filename_prefix: images cannot be written to {tmp_path.resolve() / 'blocked' / 'deeper'}: "
                       f"{tmp_path / 'blocked'} is a file, not a folder. Make the output folder a writable folder, "
                       "or choose another one (--output) or another filename_prefix.")
    assert host_state.save_folder_problem("krea/krea") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]  # the check creates nothing


@pytest.mark.skipif(not Path("/proc/self").is_dir() or os.name != "posix", reason="needs Linux's /proc")
def test_the_write_check_writes_in_the_folder_it_checks(host_state):
    # /proc takes no files, not even from root: a check writing anywhere else would find it writable.
    host_state.configure(output_dir=Path("/proc/self"))
    problem = host_state.save_folder_problem("krea/krea")
    assert problem is not None and problem.startswith("filename_prefix: images cannot be written to /proc/")


# ------------------------------------------------------------------------------------ what is kept, by key

def test_each_kind_keeps_its_own_latest_model(host_state):
    holder = LatestPerKind()
    built = []

    def build(name):
        return lambda: built.append(name) or name

    assert holder.keep(ModelSlot(), "vae", ("a",), build("vae a"), modules=lambda m: m) == "vae a"
    assert holder.keep(ModelSlot(), "transformer", ("a",), build("flux a"), modules=lambda m: m) == "flux a"
    assert holder.keep(ModelSlot(), "vae", ("a",), build("vae again"), modules=lambda m: m) == "vae a"
    assert built == ["vae a", "flux a"]


def test_under_patchers_a_model_is_shared_only_when_asked(host_state):
    made = []
    holder = UnderPatchers(manage=lambda module, load, offload: made.append(module) or f"patcher {len(made)}",
                           load_for_use=lambda patcher, memory: made.append(("loaded", patcher)),
                           devices=lambda kind: (CPU, CPU))
    one, two = ModelSlot(), ModelSlot()
    holder.keep(one, "vae", ("a",), lambda: object(), modules=lambda m: m)
    holder.keep(two, "vae", ("a",), lambda: object(), modules=lambda m: m)
    assert one.model is not two.model and one.patcher != two.patcher
    three, four = ModelSlot(), ModelSlot()
    holder.keep(three, "safety", ("a",), lambda: object(), modules=lambda m: m, shared=True)
    holder.keep(four, "safety", ("a",), lambda: object(), modules=lambda m: m, shared=True)
    assert three.model is four.model and three.patcher == four.patcher
    holder.ready(ModelSlot())  # an empty slot has nothing to load
    assert not any(isinstance(m, tuple) for m in made)
    holder.ready(one, 123)
    assert made[-1] == ("loaded", one.patcher)


def _counting(monkeypatch, module, name: str) -> list:
    builds = []
    monkeypatch.setattr(module, name, lambda *args, **kwargs: builds.append((args, kwargs)) or object())
    return builds


def test_another_device_is_another_transformer_and_the_file_is_loaded_for_that_device(tmp_path, host_state,
                                                                                        monkeypatch):
    path = tmp_path / "flux.safetensors"
    path.write_bytes(b"x")
    builds = _counting(monkeypatch, standalone_models, "load_flux")
    monkeypatch.setattr(standalone_models, "set_loras", lambda module, loras: module)
    TransformerHandle(path, "default", CPU).load()
    TransformerHandle(path, "default", CPU).load()
    TransformerHandle(path, "default", torch.device("meta")).load()
    assert builds == [((path, "default", CPU), {}), ((path, "default", torch.device("meta")), {})]


def test_another_device_or_tokenizer_folder_is_another_text_encoder(tmp_path, host_state, monkeypatch):
    builds = _counting(monkeypatch, standalone_models, "load_text_encoders")
    clip, t5 = tmp_path / "clip.safetensors", tmp_path / "t5.safetensors"
    clip.write_bytes(b"c")
    t5.write_bytes(b"t")
    shipped = {"clip": tmp_path / "c", "t5": tmp_path / "t"}
    TextEncoderHandle(clip, t5, None, CPU).load()
    TextEncoderHandle(clip, t5, None, CPU).load()
    TextEncoderHandle(clip, t5, None, torch.device("meta")).load()
    TextEncoderHandle(clip, t5, None, torch.device("meta"), shipped).load()
    assert len(builds) == 3
    assert builds[-1] == ((clip, t5, None, torch.device("meta")), {"extra_tokenizer_dirs": [shipped]})


def test_another_device_is_another_vae(tmp_path, host_state, monkeypatch):
    builds = _counting(monkeypatch, standalone_models, "load_autoencoder")
    path = tmp_path / "ae.safetensors"
    path.write_bytes(b"v")
    for device in (CPU, CPU, torch.device("meta")):
        VaeHandle(path, device).load()
    assert builds == [((path, CPU), {}), ((path, torch.device("meta")), {})]


def test_the_vae_handle_scales_the_decoded_image_to_0_1_and_passes_progress_and_interrupt(vae_handle):
    latents = torch.randn(1, 16, 3, 2, generator=torch.Generator().manual_seed(1))
    module = vae_handle.load()
    pixels = module.decode(latents)
    tiles, checks = [], []
    images = vae_handle.decode(latents, lambda done, total: tiles.append((done, total)), lambda: checks.append(1))
    assert images.dtype == torch.float32 and images.device == CPU and images.shape == (1, 24, 16, 3)
    torch.testing.assert_close(images, ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
    assert tiles and tiles[-1][0] == tiles[-1][1] and checks
    tiles.clear(), checks.clear()
    encoded = vae_handle.encode(images, lambda done, total: tiles.append((done, total)), lambda: checks.append(1))
    torch.testing.assert_close(encoded, module.encode(images.permute(0, 3, 1, 2) * 2 - 1))
    assert tiles and checks

