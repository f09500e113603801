"""A LoRA request's workflow, in-process over a backend that runs no model (fal_protocol/service.py) with a loras
folder and a reduced base transformer: each LoRA of `loras` becomes a LoraLoaderModelOnly node with its file name
and scale, checked against the workflow's base transformer before anything is queued (a LoRA made for another
width is a 422 on its path, and nothing reaches the backend).
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import make_service, serving  # noqa: E402

from comfyui_krea.fal_api.lora_input import LoraSources  # noqa: E402
from comfyui_krea.fal_api.lora_nodes import LORA_LOADER  # noqa: E402
from comfyui_krea.model_loader.flux import write_random_flux_checkpoint  # noqa: E402
from conftest import TINY_FLUX  # noqa: E402
from lora_files import write_lora  # noqa: E402

SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


def test_loras_become_loader_nodes_checked_against_the_base_transformer(tmp_path):
    models = tmp_path / "models"
    base = dataclasses.replace(TINY_FLUX, depth_single_blocks=3)  # the LoRA files touch single block 2
    write_random_flux_checkpoint(models / "diffusion_models" / "flux1-krea-dev.safetensors", base)
    write_lora(models / "loras" / "style.safetensors", base, "kohya")
    write_lora(models / "loras" / "wide.safetensors", dataclasses.replace(base, hidden_size=64, num_heads=4), "kohya")

    def model_file(kind: str, name: str):
        path = models / kind / name
        return path if path.is_file() else None

    async def scenario():
        service = make_service(tmp_path, loras=LoraSources(models / "loras", lambda name: model_file("loras", name)))
        service.backend.model_file = model_file  # where the backend finds the base transformer
        async with serving(service) as client:
            wide = await client.post("/queue/fal-ai/flux-krea-lora",
                                     json={**SMALL, "loras": [{"path": "wide.safetensors", "scale": 1.0}]})
            assert wide.status == 422, await wide.text()
            (error,) = (await wide.json())["detail"]
            assert error["loc"] == ["body", "loras", 0, "path"]
            assert service.backend.submitted == []

            answer = await client.post("/queue/fal-ai/flux-krea-lora",
                                       json={**SMALL, "loras": [{"path": "style.safetensors", "scale": 0.7}]})
            assert answer.status == 200, await answer.text()
            (_, prompt), = service.backend.submitted
            loaders = [node["inputs"] for node in prompt.values() if node["class_type"] == LORA_LOADER]
            assert [(n["lora_name"], n["strength_model"]) for n in loaders] == [("style.safetensors", 0.7)]

    asyncio.run(scenario())
