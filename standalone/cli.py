"""Command line -> a workflow run without a ComfyUI server: `python -m comfyui_krea run WORKFLOW.json [options]`.

The options write into the inputs of the workflow's nodes; their choices and ranges come from the fal parameter
table (sampling.parameters), and the run goes through the in-process runner with the same nodes as ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..model_loader import ModelFileError
from ..nodes import NODE_CLASS_MAPPINGS, host
from ..sampling.parameters import (
    ACCELERATION,
    GUIDANCE_SCALE,
    IMAGE_SIZE,
    IMAGE_TO_IMAGE_STEPS,
    MAX_SIDE,
    NUM_IMAGES,
    NUM_INFERENCE_STEPS,
    OUTPUT_FORMAT,
    SEED,
    SIZE_MULTIPLE,
    STRENGTH,
    NumericParameter,
)
from .runner import LoadImage, WorkflowError, run

log = logging.getLogger("comfyui_krea")

PACK_DIR = Path(__file__).resolve().parent.parent


def comfyui_root() -> Path | None:
    """The ComfyUI folder when the pack sits in its custom_nodes folder."""
    parent = PACK_DIR.parent
    if parent.name == "custom_nodes" and (parent.parent / "models").is_dir():
        return parent.parent
    return None


def range_help(parameter: NumericParameter, default: str | None = None) -> str:
    """'<name>, <min>-<max> (fal default: <default>)' for an option's help."""
    return f"{parameter.name}, {parameter.min}-{parameter.max} (fal default: {default or parameter.default})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    root = comfyui_root()
    parser = argparse.ArgumentParser(prog="python -m comfyui_krea", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an API-format workflow of the pack's nodes")
    p.add_argument("workflow", type=Path, help="API-format workflow JSON, e.g. workflows/api/krea_text_to_image.json")
    p.add_argument("--models", type=Path, default=(root / "models") if root else Path("models"),
                   help="models folder with ComfyUI's layout (diffusion_models/, text_encoders/, vae/, "
                        "safety_checker/); default: ComfyUI's when the pack is in its custom_nodes, else ./models")
    p.add_argument("--output", type=Path, default=(root / "output") if root else Path("output"),
                   help="where images are written")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="folder with clip/ (vocab.json, merges.txt) and t5/ (tokenizer.json) tokenizer files")
    p.add_argument("--prompt")
    p.add_argument("--seed", type=int, help=f"{SEED.name}, {SEED.min}-{SEED.max}")
    side = f"a multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}"
    p.add_argument("--width", type=int, help=f"custom width, {side} (sets image_size to custom)")
    p.add_argument("--height", type=int, help=f"custom height, {side} (sets image_size to custom)")
    p.add_argument("--image-size", choices=IMAGE_SIZE.choices,
                   help=f"{IMAGE_SIZE.name}: a fal preset or custom (fal default: {IMAGE_SIZE.default})")
    p.add_argument("--steps", type=int,
                   help=range_help(NUM_INFERENCE_STEPS, f"{NUM_INFERENCE_STEPS.default}, image-to-image "
                                                        f"{IMAGE_TO_IMAGE_STEPS}"))
    p.add_argument("--guidance", type=float, help=range_help(GUIDANCE_SCALE))
    p.add_argument("--num-images", type=int, help=range_help(NUM_IMAGES))
    p.add_argument("--acceleration", choices=ACCELERATION.choices,
                   help=f"{ACCELERATION.name} (fal default: {ACCELERATION.default})")
    p.add_argument("--strength", type=float, help=f"image-to-image {range_help(STRENGTH)}")
    p.add_argument("--image", type=Path, help="input image for image-to-image workflows")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMAT.choices,
                   help=f"{OUTPUT_FORMAT.name} (fal default: {OUTPUT_FORMAT.default})")
    p.add_argument("--no-safety-checker", action="store_true", help="disable the safety checker")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                   help="set any input, e.g. --set 5.num_images=2 (value parsed as JSON, else a string)")
    p.add_argument("--demo", action="store_true",
                   help="build small random-weight models in a temporary folder and run on them: the image is "
                        "noise and only proves the install works")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def apply_overrides(prompt: dict, args: argparse.Namespace) -> None:
    """Write the command-line options into the inputs of the nodes they belong to."""
    by_class: dict[str, dict[str, object]] = {
        "KreaTextEncode": {"prompt": args.prompt},
        "KreaSampler": {"seed": args.seed, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
                        "num_images": args.num_images, "acceleration": args.acceleration,
                        "strength": args.strength, "image_size": args.image_size},
        "KreaSaveImage": {"output_format": args.output_format},
        "LoadImage": {"image": str(args.image) if args.image else None},
        "KreaSafetyCheck": {"enable_safety_checker": False if args.no_safety_checker else None},
    }
    if args.width is not None or args.height is not None:
        by_class["KreaSampler"].update(image_size="custom", width=args.width, height=args.height)
    for node in prompt.values():
        for name, value in by_class.get(node.get("class_type"), {}).items():
            if value is not None:
                node["inputs"][name] = value
    for item in args.set:
        target, _, raw = item.partition("=")
        node_id, _, name = target.partition(".")
        if node_id not in prompt or not name:
            raise WorkflowError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE with a node id of the workflow")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[node_id]["inputs"][name] = value


class TextProgress:
    """A one-line progress bar on stderr."""

    def __init__(self) -> None:
        self.started = self.first = time.perf_counter()

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        if step == 1:
            self.started, self.first = now, now
        done = int(30 * step / total)
        rate = f" ({(now - self.first) / (step - 1):.2f} s/step)" if step > 1 else ""
        sys.stderr.write(f"\r  sampling [{'#' * done}{'.' * (30 - done)}] {step}/{total}{rate}")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        prompt = json.loads(args.workflow.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: cannot read the workflow {args.workflow}: {err}", file=sys.stderr)
        return 2
    if not isinstance(prompt, dict) or "nodes" in prompt:
        print(f"error: {args.workflow} is not an API-format workflow (use the file in workflows/api/, or "
              "'Export (API)' in ComfyUI)", file=sys.stderr)
        return 2
    classes = {**NODE_CLASS_MAPPINGS, "LoadImage": LoadImage}
    with tempfile.TemporaryDirectory(prefix="krea-demo-") as scratch:
        models, tokenizers = args.models, args.tokenizers
        if args.demo:
            from .demo import DEMO_SETTINGS, write_demo_models

            print("--demo: building small RANDOM-WEIGHT models; the image will be noise. It only proves that "
                  "the install, the nodes and the workflow run.", file=sys.stderr)
            models, tokenizers = write_demo_models(Path(scratch))
            for name, value in DEMO_SETTINGS.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
        host.configure_standalone(models_dir=models, output_dir=args.output, progress=TextProgress(),
                                  tokenizer_dir=tokenizers)
        try:
            apply_overrides(prompt, args)
            started = time.perf_counter()
            uis = run(prompt, classes)
        except (WorkflowError, ModelFileError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    saved = [Path(args.output) / img["subfolder"] / img["filename"]
             for ui in uis.values() for img in ui.get("images", [])]
    for node_id, ui in uis.items():
        for text in ui.get("text", []):
            label = "has_nsfw_concepts" if prompt[node_id]["class_type"] == "KreaSafetyCheck" else "sampler"
            print(f"{label}: {text}")
    for path in saved:
        print(f"saved {path}")
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0

