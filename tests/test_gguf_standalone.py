"""GGUF transformer files outside ComfyUI: a --models folder lists and runs them as it does safetensors (the
command line, the fal server's --model), the loader's validation names a GGUF of another model, names that
leave the folder are refused, and the pre-flight estimate counts the file's real bytes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

from comfyui_krea.model_loader import open_checkpoint  # noqa: E402
from comfyui_krea.model_loader.checkpoints import GGUFFile  # noqa: E402
from comfyui_krea.model_loader.flux import RandomFluxSource  # noqa: E402
from comfyui_krea.model_loader.flux.gguf_files import write_flux_gguf  # noqa: E402
from comfyui_krea.model_loader.gguf.writing import write_gguf  # noqa: E402
from comfyui_krea.model_loader.text_encoders.t5 import llama_cpp_name  # noqa: E402
from comfyui_krea.nodes import model_files  # noqa: E402
from comfyui_krea.nodes.host import forget_loaded, host  # noqa: E402
from comfyui_krea.standalone import preflight  # noqa: E402
from comfyui_krea.standalone.cli import main  # noqa: E402
from comfyui_krea.standalone.demo import DEMO_FLUX, write_demo_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
GGUF_NAME = "flux1-krea-dev-Q8_0.gguf"
T5_GGUF_NAME = "t5-v1_1-xxl-encoder-Q8_0.gguf"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo models, plus the demo transformer's weights as a Q8_0 GGUF and a T5 GGUF in diffusion_models."""
    models, tokenizers = write_demo_models(tmp_path_factory.mktemp("gguf_demo"))
    write_flux_gguf(models / "diffusion_models" / GGUF_NAME, RandomFluxSource(DEMO_FLUX, 0, torch.bfloat16), "Q8_0")
    write_gguf(models / "diffusion_models" / "t5xxl-Q8_0.gguf",
               [("encoder.block.0.layer.0.SelfAttention.q.weight", lambda: torch.zeros(64, 64), "Q8_0"),
                ("shared.weight", lambda: torch.zeros(32, 64), "F16")], "t5encoder")
    # the demo's T5 as an encoder-only GGUF in llama.cpp's names, where it belongs
    t5 = open_checkpoint(models / "text_encoders" / "t5xxl_fp16.safetensors")
    write_gguf(models / "text_encoders" / T5_GGUF_NAME,
               [(llama_cpp_name(k), lambda k=k: t5.tensor(k), "Q8_0" if len(t5.shape(k)) == 2 and
                 "relative_attention_bias" not in k else "F32") for k in t5.keys()], "t5encoder")
    yield models, tokenizers
    forget_loaded()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    saved = host.settings()
    host.restore(dataclasses.replace(saved, tokenizer_dir=None))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    host.restore(saved)


def run(models, out: Path, *options: str) -> tuple[int, list[Path]]:
    code = main(["run", str(TEXT_TO_IMAGE), "--models", str(models[0]), "--tokenizers", str(models[1]),
                 "--output", str(out), "--width", "64", "--height", "48", "--steps", "2", "--format", "png",
                 "--no-safety-checker", *options])
    return code, sorted(out.rglob("*.png"))


def test_the_models_folder_lists_gguf_transformers(models, host_state):
    host_state.configure(models_dir=models[0])
    listed = host.list_models("diffusion_models")
    assert GGUF_NAME in listed and "flux1-krea-dev.safetensors" in listed
    assert not [n for n in host.list_models("vae") if n.endswith(".gguf")]


def test_run_with_a_gguf_transformer_makes_the_bf16_files_image_closely(models, cli, capsys):
    code, bf16 = run(models, cli / "bf16")
    assert code == 0, capsys.readouterr().err
    code, gguf_images = run(models, cli / "gguf", "--set", f"1.model_name={GGUF_NAME}")
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    a, b = (np.asarray(Image.open(p[0]), dtype=np.float32) for p in (bf16, gguf_images))
    assert a.shape == b.shape == (48, 64, 3)
    assert 0 < np.abs(a - b).mean() < 2.0  # 8-bit blocks: a few levels at most, not another image
    code, both = run(models, cli / "both", "--set", f"1.model_name={GGUF_NAME}", "--set", f"1.t5_name={T5_GGUF_NAME}")
    assert code == 0, capsys.readouterr().err
    c = np.asarray(Image.open(both[0]), dtype=np.float32)
    assert 0 < np.abs(c - a).mean() < 3.0  # the T5 from GGUF blocks too


def test_the_loaders_validation_names_a_gguf_of_another_model(models, host_state):
    host_state.configure(models_dir=models[0])
    with pytest.raises(ValueError, match="model_name: 't5xxl-Q8_0.gguf' is a T5 text encoder"):
        model_files.check_model_file("diffusion_models", "t5xxl-Q8_0.gguf", model_files.TRANSFORMER, "model_name")
    with pytest.raises(ValueError, match="leaves the model folder"):
        model_files.check_model_file("diffusion_models", f"../{GGUF_NAME}", model_files.TRANSFORMER, "model_name")
    model_files.check_model_file("diffusion_models", GGUF_NAME, model_files.TRANSFORMER, "model_name")


def test_the_pre_flight_counts_the_gguf_files_real_bytes(models, host_state):
    host_state.configure(models_dir=models[0])
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    safetensors_estimate = preflight.estimate(prompt)
    prompt["1"]["inputs"]["model_name"] = GGUF_NAME
    gguf_estimate = preflight.estimate(prompt)
    gguf_file = GGUFFile(models[0] / "diffusion_models" / GGUF_NAME)
    safetensors_bytes = open_checkpoint(models[0] / "diffusion_models" / "flux1-krea-dev.safetensors").nbytes()
    largest = max(int(torch.Size(gguf_file.shape(k)).numel()) for k in gguf_file.keys())
    # the tensors' bytes as stored, plus the largest layer dequantized (float32 and a compute-dtype copy)
    assert gguf_estimate.weights - safetensors_estimate.weights == gguf_file.nbytes() + 6 * largest - \
        safetensors_bytes
    prompt["1"]["inputs"]["weight_dtype"] = "bf16"
    elements = sum(int(torch.Size(gguf_file.shape(k)).numel()) for k in gguf_file.keys())
    assert preflight.estimate(prompt).weights - gguf_estimate.weights == 2 * elements - gguf_file.nbytes() - \
        6 * largest


def test_the_fal_servers_model_option_runs_every_request_on_that_file(models, tmp_path, host_state):
    pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")
    from aiohttp.test_utils import TestClient, TestServer

    from comfyui_krea.standalone.fal_server import ServeOptions, make_app

    body = {"prompt": "a fox", "image_size": {"width": 64, "height": 48}, "num_inference_steps": 2,
            "enable_safety_checker": False, "seed": 3, "output_format": "png"}

    async def request(model: str | None) -> tuple[int, dict]:
        app, _ = make_app(ServeOptions(output=tmp_path / "out", models=models[0], tokenizers=models[1], model=model))
        async with TestClient(TestServer(app)) as client:
            answer = await client.post("/fal-ai/flux/krea", json=body)
            return answer.status, await answer.json()

    status, output = asyncio.run(request(GGUF_NAME))
    assert status == 200, output
    assert [(image["width"], image["height"]) for image in output["images"]] == [(64, 48)]
    status, refused = asyncio.run(request("t5xxl-Q8_0.gguf"))  # the option reaches the loader's checks
    assert status != 200 and "is a T5 text encoder" in json.dumps(refused)


def test_a_lora_on_a_gguf_transformer_runs_beside_its_blocks_and_the_pre_flight_counts_its_factors(models, cli,
                                                                                                    capsys):
    from safetensors.torch import save_file

    from comfyui_krea.fal_api.lora_nodes import add_loras

    gen = torch.Generator().manual_seed(3)
    layers = {"double_blocks_0_img_attn_qkv": (192, 64), "single_blocks_0_linear1": (448, 64)}  # DEMO_FLUX's
    (models[0] / "loras").mkdir(exist_ok=True)
    save_file({**{f"lora_unet_{n}.lora_down.weight": torch.randn(4, i, generator=gen) for n, (o, i) in layers.items()},
               **{f"lora_unet_{n}.lora_up.weight": torch.randn(o, 4, generator=gen) for n, (o, i) in layers.items()}},
              str(models[0] / "loras" / "gguf_style.safetensors"))
    code, plain = run(models, cli / "plain", "--set", f"1.model_name={GGUF_NAME}")
    assert code == 0, capsys.readouterr().err
    code, styled = run(models, cli / "lora", "--set", f"1.model_name={GGUF_NAME}", "--lora", "gguf_style.safetensors")
    assert code == 0, capsys.readouterr().err
    a, b = (np.asarray(Image.open(p[0]), dtype=np.float32) for p in (plain, styled))
    assert np.abs(a - b).mean() > 1.0  # the LoRA acts
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["1"]["inputs"]["model_name"] = GGUF_NAME
    add_loras(prompt, [("gguf_style.safetensors", 1.0)])
    # float32 factors beside the quantized layers (rank x (in + out)), not merged copies of the layers
    assert preflight.lora_bytes(prompt) == sum(4 * (o + i) * 4 for o, i in layers.values())
