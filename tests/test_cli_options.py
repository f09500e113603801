"""The `run` command's options as a user meets them: what each one parses into, what `--help` says about it (the
words users read, option by option), and the HTTP headers that --token and --header turn into for --server."""
from __future__ import annotations

from pathlib import Path

import pytest

from comfyui_krea.standalone.cli import build_parser, parse_args, server_headers
from comfyui_krea.standalone.runner import WorkflowError


def wide_help(monkeypatch, *command: str) -> str:
    """`--help` of `command`, its whitespace folded to single spaces: argparse wraps at the terminal's width, and a
    width that wraps nothing keeps hyphenated words such as text-to-image whole."""
    monkeypatch.setenv("COLUMNS", "10000")
    parser = build_parser()
    if command:
        parser = next(a for a in parser._actions if a.dest == "command").choices[command[0]]
    return " ".join(parser.format_help().split())


def test_every_option_parses_into_its_value_and_type():
    args = parse_args(["run", "wf.json", "--models", "m", "--output", "o", "--tokenizers", "t", "--prompt", "a fox",
                       "--seed", "7", "--width", "64", "--height", "48", "--image-size", "square", "--steps", "3",
                       "--guidance", "2.5", "--num-images", "2", "--acceleration", "high", "--strength", "0.5",
                       "--image", "in.png", "--mask", "m.png", "--format", "webp", "--no-safety-checker",
                       "--lora", "a.safetensors:0.5", "--lora", "b.safetensors", "--set", "6.quality=80",
                       "--set", "3.seed=1", "--demo", "--no-memory-check", "--server", "http://h:1", "--token", "tok",
                       "--header", "A:1", "--header", "B:2", "--debug", "-v"])
    # Paths as Path, numbers as int or float, flags as True, repeatable options as lists in the order given.
    assert vars(args) == {
        "command": "run", "workflow": Path("wf.json"), "models": Path("m"), "output": Path("o"),
        "tokenizers": Path("t"), "prompt": "a fox", "seed": 7, "width": 64, "height": 48, "image_size": "square",
        "steps": 3, "guidance": 2.5, "num_images": 2, "acceleration": "high", "strength": 0.5,
        "image": Path("in.png"), "mask": Path("m.png"), "output_format": "webp", "no_safety_checker": True,
        "lora": ["a.safetensors:0.5", "b.safetensors"], "set": ["6.quality=80", "3.seed=1"], "demo": True,
        "no_memory_check": True, "server": "http://h:1", "token": "tok", "header": ["A:1", "B:2"], "debug": True,
        "verbose": True}


def test_options_not_given_are_none_false_or_empty_lists():
    assert vars(parse_args(["run", "wf.json"])) == {
        "command": "run", "workflow": Path("wf.json"), "models": None, "output": None, "tokenizers": None,
        "prompt": None, "seed": None, "width": None, "height": None, "image_size": None, "steps": None,
        "guidance": None, "num_images": None, "acceleration": None, "strength": None, "image": None, "mask": None,
        "output_format": None, "no_safety_checker": False, "lora": [], "set": [], "demo": False,
        "no_memory_check": False, "server": None, "token": None, "header": [], "debug": False, "verbose": False}
    assert parse_args(["run", "wf.json", "--verbose"]).verbose is True  # -v's long form


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: command\n")


# What `run --help` prints for each option: its spelling, its value's name, and the words after it.
RUN_HELP = [
    "usage: python -m comfyui_krea run [-h]",
    "workflow workflow JSON, API format (workflows/api/...) or as saved from the UI (workflows/...)",
    "--models MODELS models folder with ComfyUI's layout (diffusion_models/, text_encoders/, vae/, safety_checker/); "
    "default: ComfyUI's when the pack is in its custom_nodes, else ./models",
    "--output OUTPUT where images are written (default: ComfyUI's output folder when the pack is in its "
    "custom_nodes, else ./output)",
    "--tokenizers TOKENIZERS folder with clip/ (vocab.json, merges.txt) and t5/ (tokenizer.json) tokenizer files; "
    "not needed when the pack is in ComfyUI's custom_nodes (ComfyUI's own are used)",
    "--prompt PROMPT what the image should show (the text of the workflow's Krea Text Encode)",
    "--seed SEED seed, 0-18446744073709551615",  # 2^64 - 1, fal's range
    "--width WIDTH custom width, a multiple of 16 up to 14142 (sets image_size to custom; text-to-image)",
    "--height HEIGHT custom height, a multiple of 16 up to 14142 (sets image_size to custom; text-to-image)",
    "--image-size {square_hd,square,portrait_4_3,portrait_16_9,landscape_4_3,landscape_16_9,custom} image_size: a "
    "fal preset or custom (fal default: landscape_4_3; text-to-image)",
    "--steps STEPS num_inference_steps, 1-50 (fal default: 28, image-to-image 40)",
    "--guidance GUIDANCE guidance_scale, 1.0-20.0 (fal default: 4.5)",
    "--num-images NUM_IMAGES num_images, 1-4 (fal default: 1)",
    "--acceleration {none,regular,high} acceleration (fal default: none)",
    "--strength STRENGTH image-to-image strength, 0.01-1.0 (fal default: 0.95)",
    "--image IMAGE input image of image-to-image workflows",
    "--mask MASK mask of inpainting workflows, the input image's size: white = repaint, black = keep",
    "--format {jpeg,png,webp} output_format (default: the workflow's, png in the shipped ones: ComfyUI restores the "
    "workflow of a dropped png or webp; fal's default: jpeg)",
    "--no-safety-checker disable the safety checker",
    "--lora NAME[:STRENGTH] merge a LoRA from the loras folder of --models into the transformer, at STRENGTH "
    "(default 1; -100 to 100); repeatable. Written into the workflow as LoraLoaderModelOnly nodes",
    "--set NODE.INPUT=JSON set any input of a node, e.g. --set 6.quality=80 (value parsed as JSON, else a string)",
    "--demo build small random-weight models in a temporary folder (removed on exit) and run on them: the image is "
    "noise and only proves the install works",
    "--no-memory-check run even when the estimated memory of the run exceeds what the machine has free",
    "--server URL run on a running ComfyUI (http(s)://HOST:PORT) instead of in this process; the images are "
    "downloaded into --output",
    "--token TOKEN with --server: sent as 'Authorization: Bearer TOKEN' (ComfyUI behind a proxy)",
    "--header NAME:VALUE with --server: an extra HTTP header for every request (repeatable)",
    "--debug print the Python traceback of an error",
    "-v, --verbose also print what each step does (models loaded, nodes run, the sampler's report)",
]


@pytest.mark.parametrize("text", RUN_HELP, ids=[t.split(" ")[0] if t[0] == "-" else t[:12] for t in RUN_HELP])
def test_run_help_explains_each_option_in_these_words(monkeypatch, text):
    assert text in wide_help(monkeypatch, "run")


def test_the_commands_help_keeps_its_examples_on_lines_of_their_own(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")
    top = build_parser().format_help()
    assert top.startswith("usage: python -m comfyui_krea [-h] {run,serve,make-cert} ...\n")
    # The description is printed as written (not re-wrapped), so each example stays a line to copy.
    for example in ("python -m comfyui_krea run workflows/api/krea_text_to_image.json --demo",
                    'python -m comfyui_krea run WORKFLOW.json --prompt "a red fox" --seed 7',
                    "python -m comfyui_krea run WORKFLOW.json --server http://127.0.0.1:8188"):
        assert f"\n  {example}\n" in top
    assert ("run run a workflow (API or UI format) here or on a running ComfyUI (--server)"
            in " ".join(top.split()))


# ------------------------------------------------------------------------------------ --token and --header

def headers_of(*options: str) -> dict[str, str]:
    return server_headers(parse_args(["run", "wf.json", "--server", "http://127.0.0.1:8188", *options]))


def test_no_token_and_no_header_send_no_headers():
    assert headers_of() == {}


def test_token_becomes_an_authorization_bearer_header_beside_the_extra_headers():
    # README: `--token TOKEN` is sent as `Authorization: Bearer TOKEN`.
    assert headers_of("--token", "s3cret", "--header", "X-Team: krea") == {"Authorization": "Bearer s3cret",
                                                                         "X-Team": "krea"}


def test_a_header_value_may_hold_colons():
    # Only the first colon ends the name: a URL or host:port value stays whole.
    assert headers_of("--header", "Referer: http://proxy:8080/x", "--header", "X-A:b:c") == {
        "Referer": "http://proxy:8080/x", "X-A": "b:c"}


@pytest.mark.parametrize("item", ["NoColon", ":value", "  :value"])
def test_a_header_without_a_name_and_a_colon_is_refused(item):
    with pytest.raises(WorkflowError) as refused:
        headers_of("--header", item)
    assert str(refused.value) == f"--header {item!r}: expected NAME:VALUE"


def test_every_command_and_every_option_is_explained_in_help():
    """What `--help` lists: each command with its one-line help (serve with a description too), each option with
    a text. (argparse keeps them on its actions; their wording is pinned for run above.)"""
    action = next(a for a in build_parser()._actions if a.dest == "command")
    commands = action.choices
    assert set(commands) == {"run", "serve", "make-cert"}
    summaries = {choice.dest: choice.help for choice in action._choices_actions}
    for name, command in commands.items():
        assert summaries[name], f"{name} has no one-line help"
        if name == "serve":
            assert "KREA_FAL_API_KEY" in command.description  # the one place --help tells how to require a key
        for option in command._actions:
            if option.dest != "help":
                assert option.help, f"{name} {option.option_strings or option.dest} has no help"


def test_serve_and_make_cert_options_parse_into_their_values_and_types():
    args = parse_args(["serve", "--models", "m", "--tokenizers", "t", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                       "--model", "flux.gguf", "--allowed-host", "a.example", "--allowed-host", "b.example",
                       "--ray", "--replicas", "3", "-v"])
    assert (args.models, args.tokenizers, args.tls_cert, args.tls_key) == (Path("m"), Path("t"), Path("c.pem"),
                                                                         Path("k.pem"))
    assert (args.model, args.allowed_host, args.ray, args.replicas, args.verbose) == (
        "flux.gguf", ["a.example", "b.example"], "", 3, True)
    assert parse_args(["serve", "--verbose"]).verbose is True
    assert parse_args(["serve", "--ray", "auto"]).ray == "auto"
    plain = parse_args(["serve"])
    assert (plain.verbose, plain.ray, plain.replicas, plain.models, plain.tls_cert, plain.allowed_host) == (
        False, None, None, None, None, [])
    cert = parse_args(["make-cert", "certs", "--name", "a.example", "--name", "10.0.0.2"])
    assert (cert.folder, cert.name) == (Path("certs"), ["a.example", "10.0.0.2"])
    assert parse_args(["make-cert", "certs"]).name is None
    assert parse_args(["make-cert", "certs", "--port", "9000"]).port == 9000
