"""Command line -> a workflow run without a ComfyUI server: `python -m comfyui_krea run WORKFLOW.json [options]`.

The options write into the inputs of the workflow's nodes; their choices and ranges come from the fal parameter
table (sampling.parameters), and the run goes through the in-process runner with the same nodes as ComfyUI.
Everything that can be checked without the weights is checked first (the nodes' validation: values, model files
and their kinds, the input image, the output folder; then the memory the run needs). Every error is one
`error: ...` paragraph, exit code 2 for bad input, 130 for Ctrl-C (143 for SIGTERM); --debug adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
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
from .preflight import memory_problem
from .runner import LoadImage, WorkflowError, is_link, run, structure_problems, validate

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
    parser = argparse.ArgumentParser(prog="python -m comfyui_krea", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an API-format workflow of the pack's nodes")
    p.add_argument("workflow", type=Path, help="API-format workflow JSON, e.g. workflows/api/krea_text_to_image.json")
    p.add_argument("--models", type=Path, default=None,
                   help="models folder with ComfyUI's layout (diffusion_models/, text_encoders/, vae/, "
                        "safety_checker/); default: ComfyUI's when the pack is in its custom_nodes, else ./models")
    p.add_argument("--output", type=Path, default=None,
                   help="where images are written (default: ComfyUI's output folder when the pack is in its "
                        "custom_nodes, else ./output)")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="folder with clip/ (vocab.json, merges.txt) and t5/ (tokenizer.json) tokenizer files")
    p.add_argument("--prompt")
    p.add_argument("--seed", type=int, help=f"{SEED.name}, {SEED.min}-{SEED.max}")
    side = f"a multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}"
    p.add_argument("--width", type=int, help=f"custom width, {side} (sets image_size to custom; text-to-image)")
    p.add_argument("--height", type=int, help=f"custom height, {side} (sets image_size to custom; text-to-image)")
    p.add_argument("--image-size", choices=IMAGE_SIZE.choices,
                   help=f"{IMAGE_SIZE.name}: a fal preset or custom (fal default: {IMAGE_SIZE.default}; text-to-image)")
    p.add_argument("--steps", type=int,
                   help=range_help(NUM_INFERENCE_STEPS, f"{NUM_INFERENCE_STEPS.default}, image-to-image "
                                                        f"{IMAGE_TO_IMAGE_STEPS}"))
    p.add_argument("--guidance", type=float, help=range_help(GUIDANCE_SCALE))
    p.add_argument("--num-images", type=int, help=range_help(NUM_IMAGES))
    p.add_argument("--acceleration", choices=ACCELERATION.choices,
                   help=f"{ACCELERATION.name} (fal default: {ACCELERATION.default})")
    p.add_argument("--strength", type=float, help=f"image-to-image {range_help(STRENGTH)}")
    p.add_argument("--image", type=Path, help="input image of image-to-image workflows")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMAT.choices,
                   help=f"{OUTPUT_FORMAT.name} (fal default: {OUTPUT_FORMAT.default})")
    p.add_argument("--no-safety-checker", action="store_true", help="disable the safety checker")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                   help="set any input of a node, e.g. --set 6.quality=80 (value parsed as JSON, else a string)")
    p.add_argument("--demo", action="store_true",
                   help="build small random-weight models in a temporary folder (removed on exit) and run on them: "
                        "the image is noise and only proves the install works")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the estimated memory of the run exceeds what the machine has free")
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
    p.add_argument("-v", "--verbose", action="store_true")
    add_serve_commands(sub)
    return parser.parse_args(argv)


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve fal's API (fal-ai/flux/krea, .../image-to-image) for the fal clients",
                       description="Serves fal's protocol over the in-process runner, one request at a time. "
                                   "Set KREA_FAL_API_KEY to require 'Authorization: Key <it>'.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8443, help="port (default: 8443)")
    s.add_argument("--models", type=Path, default=None, help="models folder with ComfyUI's layout (as for run)")
    s.add_argument("--output", type=Path, default=Path("output"),
                   help="where result images (fal/) and uploads (fal-uploads/) go (default: ./output)")
    s.add_argument("--tokenizers", type=Path, default=None, help="tokenizer folder (as for run)")
    s.add_argument("--demo", action="store_true", help="small random-weight models (noise images), as run --demo")
    s.add_argument("--tls-cert", type=Path, help="server certificate (PEM), e.g. from make-cert: https")
    s.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="fetch image_url from other hosts (never from loopback, private or link-local addresses)")
    s.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting or running at most; more are answered 503 (default: 32)")
    s.add_argument("--retention-hours", type=float, default=24.0,
                   help="how long results, uploads and request records stay available (default: 24)")
    s.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("make-cert", help="make a local CA and a server certificate for https (serve, ComfyUI)")
    c.add_argument("folder", type=Path, help="where ca.pem, server.pem and server-key.pem are written (never over "
                                            "existing files)")
    c.add_argument("--name", action="append", default=None, metavar="HOST",
                   help="a host name or IP the certificate is for (repeatable; default: localhost, 127.0.0.1, ::1)")
    c.add_argument("--port", type=int, default=8443, help="the port shown in the settings printed (default: 8443)")
    c.add_argument("--prefix", default="", help="'/fal' for ComfyUI's routes (in the settings printed)")


def _sampler_nodes(prompt: dict) -> list[dict]:
    return [n for n in prompt.values() if isinstance(n, dict) and n.get("class_type") == "KreaSampler"]


def _is_image_to_image(prompt: dict) -> bool:
    return any(is_link(n.get("inputs", {}).get("latent")) for n in _sampler_nodes(prompt))


def unused_options(prompt: dict, args: argparse.Namespace) -> list[str]:
    """The options given that the workflow has nowhere to put, each with why."""
    classes = {n.get("class_type") for n in prompt.values() if isinstance(n, dict)}
    samplers, image_to_image = _sampler_nodes(prompt), _is_image_to_image(prompt)
    wants = {  # option -> (given, the workflow uses it, what it needs)
        "--prompt": (args.prompt, "KreaTextEncode" in classes, "a Krea Text Encode node"),
        "--image": (args.image, "LoadImage" in classes, "a LoadImage node (an image-to-image workflow)"),
        "--strength": (args.strength, image_to_image, "an image-to-image sampler (a latent connected)"),
        "--width": (args.width, samplers and not image_to_image,
                    "a text-to-image sampler (image-to-image keeps the input image's size)"),
        "--height": (args.height, samplers and not image_to_image,
                     "a text-to-image sampler (image-to-image keeps the input image's size)"),
        "--image-size": (args.image_size, samplers and not image_to_image,
                         "a text-to-image sampler (image-to-image keeps the input image's size)"),
        "--format": (args.output_format, "KreaSaveImage" in classes, "a Krea Save Image node"),
        "--no-safety-checker": (args.no_safety_checker or None, "KreaSafetyCheck" in classes,
                                "a Krea Safety Check node"),
    }
    for option, name in (("--seed", "seed"), ("--steps", "steps"), ("--guidance", "guidance"),
                         ("--num-images", "num_images"), ("--acceleration", "acceleration")):
        wants[option] = (getattr(args, name), bool(samplers), "a Krea Sampler node")
    if args.demo:
        wants["--models"] = (args.models, False, "no --demo (the demo builds its own models)")
        wants["--tokenizers"] = (args.tokenizers, False, "no --demo (the demo builds its own tokenizers)")
    return [f"{option} is not used by this workflow: it needs {needs}" for option, (given, used, needs)
            in wants.items() if given is not None and not used]


def apply_overrides(prompt: dict, args: argparse.Namespace, classes: dict[str, type] | None = None) -> None:
    """Write the command-line options into the inputs of the nodes they belong to; refuse options the
    workflow does not use and --set inputs its nodes do not have."""
    classes = classes if classes is not None else {**NODE_CLASS_MAPPINGS, "LoadImage": LoadImage}
    unused = unused_options(prompt, args)
    if unused:
        raise WorkflowError("; ".join(unused) + ".")
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
            raise WorkflowError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE with a node id of the workflow "
                                f"({', '.join(prompt)})")
        cls = classes.get(prompt[node_id].get("class_type"))
        if cls is not None:
            spec = cls.INPUT_TYPES()
            declared = [*spec.get("required", {}), *spec.get("optional", {})]
            if name not in declared:
                raise WorkflowError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                                    f"{name!r}; its inputs are {', '.join(declared)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[node_id]["inputs"][name] = value


class TextProgress:
    """A one-line progress bar on stderr."""

    def __init__(self) -> None:
        self.started = self.first = time.perf_counter()
        self.line_open = False  # a bar is on screen without its newline: an error message starts below it

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        if step == 1:
            self.started, self.first = now, now
        done = int(30 * step / total)
        rate = f" ({(now - self.first) / (step - 1):.2f} s/step)" if step > 1 else ""
        sys.stderr.write(f"\r  sampling [{'#' * done}{'.' * (30 - done)}] {step}/{total}{rate}")
        self.line_open = step != total
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `with` blocks (the demo's temporary folder) clean up."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_workflow(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise WorkflowError(f"cannot read the workflow {path}: {err.strerror or err}") from None
    try:
        prompt = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise WorkflowError(f"the workflow {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON, "
                            "e.g. with ComfyUI's 'Export (API)'") from None
    except json.JSONDecodeError as err:
        raise WorkflowError(f"the workflow {path} is not valid JSON ({err}); use the files in workflows/api/ or "
                            "ComfyUI's 'Export (API)'") from None
    if not isinstance(prompt, dict) or "nodes" in prompt:
        raise WorkflowError(f"{path} is not an API-format workflow (use the file in workflows/api/, or "
                            "'Export (API)' in ComfyUI)")
    return prompt


# Errors that come from what the user gave (exit code 2); anything else is a failure of the run itself (1).
BAD_INPUT = (WorkflowError, ModelFileError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    progress = TextProgress()

    def fail(message: str, code: int) -> int:
        if getattr(args, "debug", False):
            traceback.print_exc()
        sys.stderr.write(("\n" if progress.line_open else "") + f"error: {message}\n")
        return code

    try:
        with sigterm_raises():
            if args.command == "serve":
                return serve_command(args)
            if args.command == "make-cert":
                return make_cert_command(args)
            return run_command(args, progress)
    except KeyboardInterrupt:
        return fail("interrupted (Ctrl-C); the run stopped and nothing more was written.", 130)
    except Terminated:
        return fail("terminated (SIGTERM); the run stopped and nothing more was written.", 143)
    except (*BAD_INPUT, FileExistsError) as err:
        return fail(str(err), 2)
    except Exception as err:
        return fail(f"the run failed: {type(err).__name__}: {err}" + ("" if getattr(args, "debug", False) else
                    " (run again with --debug for the traceback)"), 1)


def run_command(args: argparse.Namespace, progress: TextProgress) -> int:
    """`run`: read, override, pre-flight, run, report. Raises on every error (main turns it into a line)."""
    prompt = read_workflow(args.workflow)
    classes = {**NODE_CLASS_MAPPINGS, "LoadImage": LoadImage}
    problems = structure_problems(prompt, classes)  # before the options are written into the nodes
    if problems:
        raise WorkflowError("the workflow cannot run:\n  " + "\n  ".join(problems))
    for node in prompt.values():
        node.setdefault("inputs", {})
    unused = unused_options(prompt, args)
    if unused:
        raise WorkflowError("; ".join(unused) + ".")
    if args.demo:
        from .demo import DEMO_SETTINGS, write_demo_models

        sized_elsewhere = args.image_size is not None or _is_image_to_image(prompt)  # by the user or the input
        for name, value in DEMO_SETTINGS.items():
            if getattr(args, name) is None and not (sized_elsewhere and name in ("width", "height")):
                setattr(args, name, value)
    apply_overrides(prompt, args, classes)
    root = comfyui_root()
    output = args.output if args.output is not None else (root / "output" if root else Path("output"))
    # Only --demo makes a temporary folder; it is removed on exit, on Ctrl-C and on SIGTERM (main).
    scratch = tempfile.TemporaryDirectory(prefix="krea-demo-") if args.demo else contextlib.nullcontext(None)
    with scratch as scratch_dir:
        models = args.models if args.models is not None else (root / "models" if root else Path("models"))
        tokenizers = args.tokenizers
        if args.demo:
            print("--demo: building small RANDOM-WEIGHT models; the image will be noise. It only proves that "
                  "the install, the nodes and the workflow run.", file=sys.stderr)
            models, tokenizers = write_demo_models(Path(scratch_dir))
        host.configure_standalone(models_dir=models, output_dir=output, progress=progress,
                                  tokenizer_dir=tokenizers)
        problems = validate(prompt, classes)
        if problems:
            raise WorkflowError("the workflow cannot run:\n  " + "\n  ".join(problems))
        if not args.no_memory_check:
            problem = memory_problem(prompt, host.torch_device())
            if problem:
                raise WorkflowError(problem)
        started = time.perf_counter()
        uis = run(prompt, classes)
    saved = [Path(output) / img["subfolder"] / img["filename"]
             for ui in uis.values() for img in ui.get("images", [])]
    for node_id, ui in uis.items():
        for text in ui.get("text", []):
            label = "has_nsfw_concepts" if prompt[node_id]["class_type"] == "KreaSafetyCheck" else "sampler"
            print(f"{label}: {text}")
    for path in saved:
        print(f"saved {path}")
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from ..fal_api.server import ServeOptions, api_key_from_env, serve, tls_context

    if (args.tls_cert is None) != (args.tls_key is None):
        raise WorkflowError("--tls-cert and --tls-key go together")
    if args.max_queue < 1 or args.retention_hours <= 0:
        raise WorkflowError("--max-queue must be at least 1 and --retention-hours above 0")
    if args.demo and (args.models is not None or args.tokenizers is not None):
        raise WorkflowError("--demo builds its own models and tokenizers: leave out --models and --tokenizers")
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    options = ServeOptions(output=args.output, models=args.models, tokenizers=args.tokenizers,
                           retention_hours=args.retention_hours, max_queue=args.max_queue,
                           allow_remote_images=args.allow_remote_images, api_key=api_key_from_env())
    serve(options, args.host, args.port, tls, args.demo)
    return 0


def make_cert_command(args: argparse.Namespace) -> int:
    from ..fal_api.certificates import client_settings, make_certificates

    certs = make_certificates(args.folder, hosts=tuple(args.name)) if args.name else make_certificates(args.folder)
    host_name = args.name[0] if args.name else "127.0.0.1"
    print(client_settings(certs, host=host_name, port=args.port, prefix=args.prefix))
    return 0
