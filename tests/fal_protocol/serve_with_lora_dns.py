"""`python -m comfyui_krea serve ...` with LoRA URLs of loras.example led to the test's file server (lora_dns)."""
import sys

import lora_dns

import comfyui_krea.fal_api.remote_fetch  # noqa: F401  (the module lora_dns patches)
from comfyui_krea.standalone.cli import main

assert lora_dns.patch_now() == 1
sys.exit(main(sys.argv[1:]))
