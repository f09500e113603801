"""The pre-flight of a workflow (standalone/preflight.py), from small model files written here: the weights are the
bytes of every file the workflow names (the transformer at its weight_dtype, a quantized GGUF with its largest layer
dequantized), the activations and pictures follow the documented per-token estimate (sequence-parallel shares,
the step cache), the size is the preset's, the custom one or the input image's as Krea Encode Image rounds it; a run
over the memory given is refused with each part. The LoRAs' part: tests/test_preflight_loras.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_krea.standalone import preflight

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
IMAGE_TO_IMAGE = ROOT / "workflows" / "api" / "krea_image_to_image.json"


def _load_image_node(prompt: dict) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == "LoadImage")


# ------------------------------------------------------------------------- image-to-image: the input file's size

def test_an_image_to_image_estimate_is_made_for_the_input_file_rounded_to_multiples_of_16(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path / "no_models")  # no weights known: only the sizes are under test
    picture = tmp_path / "input.png"
    Image.new("RGB", (200, 90)).save(picture)
    prompt = json.loads(IMAGE_TO_IMAGE.read_text())
    _load_image_node(prompt)["inputs"]["image"] = str(picture)
    need = preflight.estimate(prompt)
    # 200 -> 208 and 90 -> 96: Krea Encode Image rounds each side to the nearest multiple of 16, halves up
    assert need.summary == "1 image of 208x96"
    # four float32 RGB copies of the picture (pixels, clamp, permute, save)
    assert need.pictures == 4 * 208 * 96 * 4 * 4


@pytest.mark.parametrize("value", [7, None, ["9", 0]])
def test_an_image_value_that_is_no_file_name_leaves_the_size_unknown(tmp_path, host_state, value):
    """A hand-edited workflow's LoadImage value that is not a file name: no estimate (the node says what is wrong),
    never a crash of the pre-flight."""
    host_state.configure(models_dir=tmp_path / "no_models")
    prompt = json.loads(IMAGE_TO_IMAGE.read_text())
    _load_image_node(prompt)["inputs"]["image"] = value
    assert preflight.estimate(prompt) is None


# ------------------------------------------------------------------ the estimate's numbers, from small files

# Model files of known sizes: the transformer stored in float32 with an img_in of hidden size 48 (3072 weights).
MODEL_FILES = {
    ("diffusion_models", "flux1-krea-dev.safetensors"): {"img_in.weight": ((48, 16), torch.float32),
                                                         "double_blocks.0.img_attn.proj.weight": ((48, 48),
                                                                                                  torch.float32)},
    ("text_encoders", "clip_l.safetensors"): {"w": ((10, 10), torch.float32)},
    ("text_encoders", "t5xxl_fp16.safetensors"): {"w": ((5, 4), torch.float16)},
    ("vae", "ae.safetensors"): {"w": ((3,), torch.float32)},
    ("safety_checker", "nsfw_image_detection.safetensors"): {"w": ((7,), torch.float32)},
}
TRANSFORMER_WEIGHTS = 48 * 16 + 48 * 48  # 3072
OTHER_BYTES = 10 * 10 * 4 + 5 * 4 * 2 + 3 * 4  # CLIP, T5 and VAE as stored
CHECKER_BYTES = 7 * 4


@pytest.fixture(scope="module")
def small_model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_models")
    for (kind, name), tensors in MODEL_FILES.items():
        (folder / kind).mkdir(exist_ok=True)
        save_file({k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in tensors.items()},
                  str(folder / kind / name))
    # a transformer stored in 1 byte a weight already (uint8 stands in for fp8)
    save_file({"img_in.weight": torch.zeros((48, 16), dtype=torch.uint8)},
              str(folder / "diffusion_models" / "small.safetensors"))
    return folder


@pytest.fixture
def small_models(small_model_files, host_state):
    host_state.configure(models_dir=small_model_files)
    return small_model_files


def _text_to_image(width: int = 80, height: int = 48, num_images: int = 2, **sampler) -> dict:
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["3"]["inputs"].update(image_size="custom", width=width, height=height, num_images=num_images, **sampler)
    return prompt


def _activations(batch: int, image_tokens: int, text_tokens: int, hidden: int, vectors: int) -> int:
    """The documented activation estimate: tokens x hidden x vectors x float32."""
    return batch * (image_tokens + text_tokens) * hidden * vectors * 4


@pytest.mark.parametrize(("weight_dtype", "transformer_bytes"), [
    ("default", TRANSFORMER_WEIGHTS * 4),  # as stored: float32
    ("fp8_e4m3fn", TRANSFORMER_WEIGHTS),  # 1 byte a weight
    ("fp8_e5m2", TRANSFORMER_WEIGHTS),
    ("bf16", TRANSFORMER_WEIGHTS * 2),  # 2 bytes a weight
    ("fp16", TRANSFORMER_WEIGHTS * 2),
])
def test_the_weights_are_every_named_file_with_the_transformer_at_its_weight_dtype(small_models, weight_dtype,
                                                                                     transformer_bytes):
    prompt = _text_to_image()
    prompt["1"]["inputs"]["weight_dtype"] = weight_dtype
    assert preflight.estimate(prompt).weights == transformer_bytes + OTHER_BYTES + CHECKER_BYTES


def test_an_fp8_weight_dtype_never_counts_more_than_the_file_holds(small_models):
    prompt = _text_to_image()
    prompt["1"]["inputs"].update(model_name="small.safetensors", weight_dtype="fp8_e4m3fn")
    assert preflight.estimate(prompt).weights == 48 * 16 + OTHER_BYTES + CHECKER_BYTES


def test_a_disabled_safety_checker_and_unknown_names_add_no_weights(small_models):
    prompt = _text_to_image()
    prompt["5"]["inputs"]["enable_safety_checker"] = False
    prompt["1"]["inputs"]["vae_name"] = "absent.safetensors"  # the node's validation reports it, not the estimate
    prompt["1"]["inputs"]["clip_name"] = 5
    assert preflight.estimate(prompt).weights == TRANSFORMER_WEIGHTS * 4 + 5 * 4 * 2


def test_the_activations_and_pictures_follow_the_documented_per_token_estimate(small_models):
    need = preflight.estimate(_text_to_image(80, 48, 2))
    # 80x48 pixels are 5x3 = 15 image tokens, plus 512 text tokens, per image; hidden size 48 from img_in
    assert need.activations == _activations(2, 15, 512, 48, 14)
    assert need.pictures == 4 * 2 * 80 * 48 * 4 * 4
    assert need.summary == "2 images of 80x48" and need.loras == 0
    assert need.total == need.weights + need.activations + need.pictures


def test_acceleration_adds_the_step_cache_two_residuals_per_image_token(small_models):
    plain = preflight.estimate(_text_to_image(80, 48, 2, acceleration="none"))
    cached = preflight.estimate(_text_to_image(80, 48, 2, acceleration="regular"))
    assert cached.activations - plain.activations == 2 * 2 * 15 * 48 * 4


@pytest.mark.parametrize("model_name", ["absent.safetensors", ["30", 0]], ids=["absent-file", "a-link"])
def test_an_unknown_hidden_size_is_taken_as_flux_3072(small_models, model_name):
    prompt = _text_to_image(80, 48, 1)
    prompt["1"]["inputs"]["model_name"] = model_name
    assert preflight.estimate(prompt).activations == _activations(1, 15, 512, 3072, 14)
    prompt["3"]["inputs"]["acceleration"] = "high"
    assert preflight.estimate(prompt).activations == _activations(1, 15, 512, 3072, 14) + 2 * 15 * 3072 * 4


@pytest.mark.parametrize(("ranks", "image_tokens", "text_tokens"), [(2, 8, 256), (3, 5, 171), (4, 4, 128)])
def test_sequence_parallel_ranks_each_hold_their_share_of_tokens_rounded_up_and_the_all_to_all(small_models, ranks,
                                                                                                image_tokens,
                                                                                                text_tokens):
    need = preflight.estimate(_text_to_image(80, 48, 2, acceleration="regular"), ranks=ranks)
    # 15 image and 512 text tokens split over `ranks` processes, rounded up; 14 + 12 vectors a local token
    assert need.activations == _activations(2, image_tokens, text_tokens, 48, 26) + 2 * 2 * image_tokens * 48 * 4
    assert need.pictures == 4 * 2 * 80 * 48 * 4 * 4  # each process saves whole images


@pytest.mark.parametrize(("size", "expected"), [("landscape_4_3", "1024x768"), ("portrait_16_9", "576x1024"),
                                                ("square", "512x512")])
def test_a_preset_image_size_wins_over_width_and_height(small_models, size, expected):
    prompt = _text_to_image(80, 48, 1)
    prompt["3"]["inputs"]["image_size"] = size
    assert preflight.estimate(prompt).summary == f"1 image of {expected}"


def test_the_largest_sampler_sets_the_peak_and_each_is_named(small_models):
    prompt = _text_to_image(80, 48, 1)
    prompt["9"] = {"class_type": "KreaSampler", "inputs": {**prompt["3"]["inputs"], "width": 160, "num_images": 3}}
    prompt["10"] = {"class_type": "KreaSampler", "inputs": {**prompt["3"]["inputs"], "num_images": "3"}}  # unknown
    need = preflight.estimate(prompt)
    assert need.summary == "1 image of 80x48, 3 images of 160x48"
    assert need.activations == _activations(3, 30, 512, 48, 14)
    assert need.pictures == 4 * 3 * 160 * 48 * 4 * 4


@pytest.mark.parametrize("change", [
    {"image_size": "custom", "width": "80"},  # not a number
    {"image_size": "custom", "height": None},
    {"image_size": "huge"},  # no preset and width/height not both numbers
], ids=["width-text", "height-none", "unknown-preset"])
def test_a_sampler_whose_size_is_not_known_gives_no_estimate(small_models, change):
    prompt = _text_to_image(80, 48, 1)
    prompt["3"]["inputs"].update(change)
    if change.get("image_size") == "huge":
        prompt["3"]["inputs"].update(width=80.0)
    assert preflight.estimate(prompt) is None


def test_a_sampler_without_num_images_or_acceleration_makes_one_image_without_the_step_cache(small_models):
    prompt = _text_to_image(80, 48, 2, acceleration="high")
    del prompt["3"]["inputs"]["num_images"], prompt["3"]["inputs"]["acceleration"]  # the node's defaults apply
    need = preflight.estimate(prompt)
    assert need.summary == "1 image of 80x48"
    assert need.activations == _activations(1, 15, 512, 48, 14)


def test_a_sampler_of_unknown_size_is_skipped_and_the_next_still_counted(small_models):
    known = _text_to_image(80, 48, 1)
    unknown = {"class_type": "KreaSampler", "inputs": {**known["3"]["inputs"], "num_images": None}}
    prompt = {"0": unknown, **known}  # the unknown one comes first
    assert preflight.estimate(prompt).summary == "1 image of 80x48"


def test_loader_and_checker_nodes_without_inputs_add_nothing(small_models):
    prompt = _text_to_image()
    before = preflight.estimate(prompt)
    prompt["20"] = {"class_type": "KreaModelLoader"}  # hand-written nodes: their validation says what is missing
    prompt["21"] = {"class_type": "KreaSafetyCheck"}
    assert preflight.estimate(prompt) == before


def test_a_sampler_making_no_images_needs_no_activation_or_picture_memory(small_models):
    need = preflight.estimate(_text_to_image(80, 48, 0))
    assert (need.activations, need.pictures, need.summary) == (0, 0, "0 image of 80x48")


def test_a_workflow_without_a_sampler_gives_no_estimate_and_no_memory_problem(small_models):
    prompt = _text_to_image()
    del prompt["3"]
    assert preflight.estimate(prompt) is None
    assert preflight.memory_problem(prompt, torch.device("cpu"), available=(0, "nowhere")) is None


def test_an_image_to_image_size_comes_from_the_size_function_given(small_models):
    prompt = json.loads(IMAGE_TO_IMAGE.read_text())
    seen = []
    need = preflight.estimate(prompt, image_size=lambda value: seen.append(value) or (96, 64))
    assert seen == ["example.png"] and need.summary == "1 image of 96x64"


@pytest.mark.parametrize("break_it", ["encode-image-not-linked", "not-a-load-image", "encode-missing",
                                      "load-image-missing"])
def test_an_image_to_image_size_without_a_load_image_is_unknown(small_models, break_it):
    prompt = json.loads(IMAGE_TO_IMAGE.read_text())
    if break_it == "encode-image-not-linked":
        prompt["8"]["inputs"]["image"] = "example.png"
    elif break_it == "not-a-load-image":
        prompt["7"]["class_type"] = "LoadImageMask"
    elif break_it == "encode-missing":
        prompt["3"]["inputs"]["latent"] = ["77", 0]
    else:
        prompt["8"]["inputs"]["image"] = ["77", 0]
    assert preflight.estimate(prompt, image_size=lambda value: (96, 64)) is None


def test_a_load_image_without_inputs_has_no_known_size(small_models):
    prompt = json.loads(IMAGE_TO_IMAGE.read_text())
    prompt["7"] = {"class_type": "LoadImage"}
    seen = []
    assert preflight.estimate(prompt, image_size=lambda value: seen.append(value)) is None
    assert seen == [None]  # asked about no file at all


def test_the_refusal_is_made_for_the_image_size_the_caller_gives(small_models):
    """`serve` knows the size of a request's decoded image, which no file holds: memory_problem uses its function."""
    prompt = json.loads(IMAGE_TO_IMAGE.read_text())
    problem = preflight.memory_problem(prompt, torch.device("cpu"), image_size=lambda value: (4096, 2048),
                                       available=(0, "RAM"))
    assert problem.startswith("this run needs about ") and "(1 image of 4096x2048: model weights" in problem


# --------------------------------------------------------------------------- the refusal and what it compares

def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"


def test_a_run_over_the_memory_given_is_refused_with_each_part_and_the_advice(small_models):
    prompt = _text_to_image(4096, 4096, 4)
    need = preflight.estimate(prompt)
    problem = preflight.memory_problem(prompt, torch.device("cpu"), available=(need.total - 1, "the test's RAM"),
                                       advice="Try less.")
    assert problem == (f"this run needs about {_gib(need.total)} GiB (4 images of 4096x4096: model weights "
                       f"{_gib(need.weights)} GiB, transformer activations {_gib(need.activations)} GiB, images "
                       f"{_gib(need.pictures)} GiB) but the test's RAM has {_gib(need.total - 1)} GiB free. Try less.")
    # exactly what is free still fits
    assert preflight.memory_problem(prompt, torch.device("cpu"), available=(need.total, "the test's RAM")) is None


def test_without_given_memory_the_refusal_compares_with_the_device_and_gives_the_command_line_advice(small_models,
                                                                                                     monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: (3 * 1024**3, f"RAM of {device.type}"))
    prompt = _text_to_image(4096, 4096, 4)
    problem = preflight.memory_problem(prompt, torch.device("cpu"))
    assert problem.endswith("but RAM of cpu has 3.0 GiB free. Make fewer or smaller images, use weight_dtype "
                            "fp8_e4m3fn (--set), or pass --no-memory-check to try anyway.")


def test_the_free_memory_is_named_by_the_device_it_is_on(monkeypatch):
    monkeypatch.setattr(preflight.memory, "available_memory", lambda device: 12345 if device.type == "cpu" else 678)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Test GPU {device.index}")
    assert preflight.available_memory(torch.device("cpu")) == (12345, "this machine's RAM")
    assert preflight.available_memory(torch.device("cuda", 1)) == (678, "the GPU (Test GPU 1)")
