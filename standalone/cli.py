"""Command line -> a workflow run: `python -m comfyui_krea run WORKFLOW.json [options] [--server URL]`, and the
fal server's `serve` and `make-cert` (serve_commands.py).

The workflow is API or UI format (converted as ComfyUI's frontend would). The options write into the inputs of the
workflow's nodes (overrides.py); their choices and ranges come from the fal parameter table (sampling.parameters).
The run goes through the in-process runner with the same nodes as ComfyUI, or, with --server, to a running ComfyUI
(remote.py).
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

from ..model_loader import ModelFileError
from ..nodes import NODE_DISPLAY_NAME_MAPPINGS
from ..nodes.host import Interrupted, standalone_host
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
from .node_classes import PACK_CLASSES
from .overrides import (
    api_prompt,
    apply_overrides,
    is_image_to_image,
    option_problems,
    read_workflow,
    sampler_nodes,
    unused_options,
)
from .preflight import lora_problems
from .runner import WorkflowError, check, structure_problems
from .sequence_parallel_run import torchrun_problem, torchrun_processes
from .serve_commands import OptionError, add_serve_commands, make_cert_command, serve_command
from .terminal import TERMINAL, LogHandler, StepBar
from .ui_workflow import is_ui_workflow, local_definitions, with_values

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


DESCRIPTION = """\
FLUX.1 Krea [dev] from the command line: run a ComfyUI workflow of the Krea nodes here (no ComfyUI server needed)
or on a running ComfyUI (--server), or serve fal's API for programs written for fal's clients.

  python -m comfyui_krea run workflows/api/krea_text_to_image.json --demo
  python -m comfyui_krea run WORKFLOW.json --prompt "a red fox" --seed 7
  python -m comfyui_krea run WORKFLOW.json --server http://127.0.0.1:8188

Everything that can be checked without the weights (values, model files, the input image, the output folder, the
memory the run needs) is checked before any model is loaded. Errors are one 'error: ...' message; exit code 2 for
bad input, 1 for a failed run, 130 for Ctrl-C, 143 for SIGTERM. `python -m comfyui_krea COMMAND --help` lists a
command's options."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_krea", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a workflow (API or UI format) here or on a running ComfyUI (--server)")
    p.add_argument("workflow", type=Path, help="workflow JSON, API format (workflows/api/...) or as saved from the UI "
                                               "(workflows/...)")
    p.add_argument("--models", type=Path, default=None,
                   help="models folder with ComfyUI's layout (diffusion_models/, text_encoders/, vae/, "
                        "safety_checker/); default: ComfyUI's when the pack is in its custom_nodes, else ./models")
    p.add_argument("--output", type=Path, default=None,
                   help="where images are written (default: ComfyUI's output folder when the pack is in its "
                        "custom_nodes, else ./output)")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="folder with clip/ (vocab.json, merges.txt) and t5/ (tokenizer.json) tokenizer files; "
                        "not needed when the pack is in ComfyUI's custom_nodes (ComfyUI's own are used)")
    p.add_argument("--prompt", help="what the image should show (the text of the workflow's Krea Text Encode)")
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
    p.add_argument("--mask", type=Path, help="mask of inpainting workflows, the input image's size: white = repaint, "
                                             "black = keep")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMAT.choices,
                   help=f"{OUTPUT_FORMAT.name} (default: the workflow's, png in the shipped ones: ComfyUI restores "
                        f"the workflow of a dropped png or webp; fal's default: {OUTPUT_FORMAT.default})")
    p.add_argument("--no-safety-checker", action="store_true", help="disable the safety checker")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:STRENGTH]",
                   help="merge a LoRA from the loras folder of --models into the transformer, at STRENGTH (default "
                        "1; -100 to 100); repeatable. Written into the workflow as LoraLoaderModelOnly nodes")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                   help="set any input of a node, e.g. --set 6.quality=80 (value parsed as JSON, else a string)")
    p.add_argument("--demo", action="store_true",
                   help="build small random-weight models in a temporary folder (removed on exit) and run on them: "
                        "the image is noise and only proves the install works")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the estimated memory of the run exceeds what the machine has free")
    p.add_argument("--server", metavar="URL",
                   help="run on a running ComfyUI (http(s)://HOST:PORT) instead of in this process; the images are "
                        "downloaded into --output")
    p.add_argument("--token", help="with --server: sent as 'Authorization: Bearer TOKEN' (ComfyUI behind a proxy)")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="with --server: an extra HTTP header for every request (repeatable)")
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print what each step does (models loaded, nodes run, the sampler's report)")
    add_serve_commands(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `with` blocks (the demo's temporary folder) clean up."""


@contextlib.contextmanager
def sigterm_raises(stop: threading.Event | None = None) -> Iterator[None]:
    """While inside, SIGTERM sets `stop` and raises Terminated wherever the main thread is.

    The raise alone can be lost: Python runs the handler between any two bytecodes, and library code that catches
    every exception swallows it (a bare `except:`, as in mpmath's backend probe that torch's lazy import of
    torch._dynamo runs while the demo builds its models; a `__del__`, whose exceptions are only printed). `run`
    hands `stop` to the host as its interrupt event, which the nodes check between nodes, before every
    transformer block, every step, VAE tile and saved image: a swallowed raise stops the run at the next check.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        if stop is not None:
            stop.set()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Errors that come from what the user gave (exit code 2); anything else is a failure of the run itself (1).
BAD_INPUT = (WorkflowError, ModelFileError, OptionError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[LogHandler()])

    def fail(message: str, code: int) -> int:
        TERMINAL.end_line()  # never behind an unfinished progress bar
        if getattr(args, "debug", False):
            traceback.print_exc()
        TERMINAL.line(f"error: {message}")
        return code

    stop = threading.Event()  # set by SIGTERM (sigterm_raises); nothing else sets it
    try:
        with sigterm_raises(stop):
            if problem := torchrun_problem(args):
                raise WorkflowError(problem)
            if args.command == "serve":
                return serve_command(args)
            if args.command == "make-cert":
                return make_cert_command(args)
            if args.server is not None:
                return run_remote_command(args)
            return run_command(args, stop)
    except KeyboardInterrupt:
        return fail("interrupted (Ctrl-C); the run stopped and nothing more was written.", 130)
    except (Terminated, Interrupted):  # Interrupted: `stop` seen by a check after the raise itself was swallowed
        return fail("terminated (SIGTERM); the run stopped and nothing more was written.", 143)
    except (*BAD_INPUT, FileExistsError) as err:
        return fail(str(err), 2)
    except Exception as err:
        offers_debug = hasattr(args, "debug")  # run has --debug; serve and make-cert do not
        hint = " (run again with --debug for the traceback)" if offers_debug and not args.debug else ""
        return fail(f"the run failed: {type(err).__name__}: {err}{hint}", 1)


def run_command(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """`run`: read, override, pre-flight, run, report. Raises on every error (main turns it into a line); `stop`
    set (SIGTERM) stops the run at the host's next interrupt check, and between nodes."""
    classes = PACK_CLASSES
    workflow = read_workflow(args.workflow)
    definitions = local_definitions(classes, NODE_DISPLAY_NAME_MAPPINGS)
    prompt = api_prompt(workflow, definitions)
    problems = structure_problems(prompt, classes)  # before the options are written into the nodes
    if problems:
        raise WorkflowError("the workflow cannot run:\n  " + "\n  ".join(problems))
    for node in prompt.values():
        node.setdefault("inputs", {})
    unused = unused_options(prompt, args)
    if unused:
        raise WorkflowError("; ".join(unused) + ".")
    if args.demo and sampler_nodes(prompt):  # the demo's small size and few steps, for a workflow that samples
        from .demo import DEMO_SETTINGS

        sized_elsewhere = args.image_size is not None or is_image_to_image(prompt)  # by the user or the input
        for name, value in DEMO_SETTINGS.items():
            if getattr(args, name) is None and not (sized_elsewhere and name in ("width", "height")):
                setattr(args, name, value)
    apply_overrides(prompt, args, classes)
    root = comfyui_root()
    output = args.output if args.output is not None else (root / "output" if root else Path("output"))
    # Only --demo makes a temporary folder; it is removed on exit, on Ctrl-C and on SIGTERM (main).
    scratch = tempfile.TemporaryDirectory(prefix="krea-demo-") if args.demo else contextlib.nullcontext(None)
    with scratch as scratch_dir, torchrun_processes() as processes:  # one process, or torchrun's N
        models = args.models if args.models is not None else (root / "models" if root else Path("models"))
        tokenizers = args.tokenizers
        if args.demo:
            from .demo import write_demo_models

            print("--demo: building small RANDOM-WEIGHT models; the image will be noise. It only proves that "
                  "the install, the nodes and the workflow run.", file=sys.stderr)
            models, tokenizers = write_demo_models(Path(scratch_dir))
        host = standalone_host()
        # Inside ComfyUI's custom_nodes (root), ComfyUI's tokenizer files are found too.
        host.configure(models_dir=models, output_dir=output, progress=StepBar(), tokenizer_dir=tokenizers,
                       interrupt=stop, comfyui_dir=root)
        prompt = processes.same_prompt(prompt)
        checked = check(prompt, classes)
        problems = lora_problems(prompt)  # each LoRA against its base transformer's header
        if problems:
            raise WorkflowError("the workflow cannot run:\n  " + "\n  ".join(problems))
        processes.preflight(prompt, host.torch_device(), check_memory=not args.no_memory_check)
        started = time.perf_counter()
        uis = processes.run(checked, extra_pnginfo=embedded_workflow(workflow, prompt, definitions),
                            on_node=lambda node_id, kind: host.throw_if_interrupted())
        host.throw_if_interrupted()  # a SIGTERM whose raise was swallowed after the last check is no success
    saved = [Path(output) / img["subfolder"] / img["filename"]
             for ui in uis.values() for img in ui.get("images", [])]
    reports = [(node_id, text) for node_id, ui in uis.items() for text in ui.get("text", [])]
    report(prompt, reports, saved, started)
    return 0


def embedded_workflow(workflow: dict, prompt: dict, definitions: dict[str, dict]) -> dict | None:
    """What saved images embed beside the prompt, as ComfyUI's editor has them embed: a UI-format workflow with the
    values of this run (an API-format file has no UI form: the prompt alone is embedded, which ComfyUI loads too)."""
    return {"workflow": with_values(workflow, prompt, definitions)} if is_ui_workflow(workflow) else None


def server_headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    for item in args.header:
        name, colon, value = item.partition(":")
        if not colon or not name.strip():
            raise WorkflowError(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return headers


def object_info(url: str, headers: dict[str, str]) -> dict[str, dict]:
    """The server's node definitions (GET /object_info)."""
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/object_info", headers=headers),
                                    timeout=60) as answer:
            return json.loads(answer.read())
    except OSError as err:
        raise WorkflowError(f"cannot reach ComfyUI at {url}: {getattr(err, 'reason', None) or err}") from None


def run_remote_command(args: argparse.Namespace) -> int:
    """`run --server`: the workflow queued on a running ComfyUI, followed, its images downloaded."""
    import asyncio

    from .remote import ServerRun, run_on_server

    try:
        import aiohttp  # noqa: F401  (the websocket client)
    except ImportError:
        raise WorkflowError("--server needs aiohttp: pip install -e '.[serve]'") from None

    url = args.server.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise WorkflowError(f"--server {args.server!r}: expected http://HOST:PORT or https://HOST:PORT")
    local_only = [option for option, given in (("--demo", args.demo), ("--models", args.models),
                                               ("--tokenizers", args.tokenizers),
                                               ("--no-memory-check", args.no_memory_check)) if given]
    if local_only:
        raise WorkflowError(f"{', '.join(local_only)} cannot be used with --server: the server runs its own models")
    workflow = read_workflow(args.workflow)
    headers = server_headers(args)
    option_problems(args)  # before the server is asked anything
    definitions = object_info(url, headers)
    prompt = api_prompt(workflow, definitions)
    missing = sorted({n.get("class_type") for n in prompt.values()} - set(definitions))
    if missing:
        raise WorkflowError(f"the server has no node type {', '.join(map(repr, missing))} (a missing custom node "
                            "pack?)")
    for node in prompt.values():
        node.setdefault("inputs", {})
    apply_overrides(prompt, args)
    files = {"LoadImage": args.image, "LoadImageMask": args.mask}
    images = {k: files[n["class_type"]] for k, n in prompt.items() if files.get(n.get("class_type"))}
    output = args.output if args.output is not None else Path("output")
    started = time.perf_counter()
    server = ServerRun(url, headers)
    written, reports = asyncio.run(run_on_server(
        prompt, server, output, images, lambda final: embedded_workflow(workflow, final, definitions)))
    report(prompt, reports, written, started)
    return 0


def report(prompt: dict, reports: list[tuple[str, str]], saved: list[Path], started: float) -> None:
    """The nodes' reports ((node id, text): the sampler's steps, the safety check's flags) and where the images are."""
    for node_id, text in reports:
        label = "has_nsfw_concepts" if prompt.get(node_id, {}).get("class_type") == "KreaSafetyCheck" else "sampler"
        print(f"{label}: {text}")
    for path in saved:
        print(f"saved {path}")
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
