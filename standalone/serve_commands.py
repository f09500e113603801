"""`serve` and `make-cert` on the command line: their options, and the calls into the server (imported only when
one of them runs, so that `run` needs neither aiohttp nor cryptography)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from ..fal_api.settings import (
    DEFAULT_PORT,
    MAX_CONNECTIONS,
    MAX_MEGAPIXELS,
    MAX_QUEUE,
    RETENTION_HOURS,
    UPLOAD_QUOTA_MB,
    ServiceSettings,
    api_key_from_env,
    host_list,
)
from ..fal_api.tls_key import key_exposure

log = logging.getLogger(__name__)


class OptionError(ValueError):
    """Options that do not go together (exit code 2)."""


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve fal's API (fal-ai/flux/krea[/image-to-image], fal-ai/flux-krea-lora[/...]) "
                            "for the fal clients",
                       description="Serves fal's protocol over the in-process runner, one request at a time. "
                                   "Set KREA_FAL_API_KEY to require 'Authorization: Key <it>'.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    s.add_argument("--models", type=Path, default=None, help="models folder with ComfyUI's layout (as for run)")
    s.add_argument("--model", default=None, metavar="NAME",
                   help="the transformer file in the models' diffusion_models folder, e.g. "
                        "flux1-krea-dev-Q8_0.gguf (default: the workflows' flux1-krea-dev.safetensors)")
    s.add_argument("--output", type=Path, default=Path("output"),
                   help="where result images (fal/) and uploads (fal-uploads/) go (default: ./output)")
    s.add_argument("--tokenizers", type=Path, default=None, help="tokenizer folder (as for run)")
    s.add_argument("--demo", action="store_true", help="small random-weight models (noise images), as run --demo")
    s.add_argument("--tls-cert", type=Path, help="server certificate (PEM), e.g. from make-cert: https")
    s.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="fetch image_url from other hosts (never from loopback, private or link-local addresses)")
    s.add_argument("--allow-remote-loras", action="store_true",
                   help="take the LoRA endpoints' loras by http(s) URL (cached in models/loras/fal-cache) or Hugging "
                        "Face name, never from loopback, private or link-local addresses; default: the loras folder "
                        "only")
    s.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help=f"requests waiting or running at most; more are answered 503 (default: {MAX_QUEUE})")
    s.add_argument("--retention-hours", type=float, default=RETENTION_HOURS,
                   help=f"how long results, uploads and request records stay available (default: {RETENTION_HOURS:g})")
    s.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                   help=f"largest image a request may make, in megapixels of 1024x1024 (default: {MAX_MEGAPIXELS:g}, "
                        "fal's own limit); larger sizes and input images are refused with 422")
    s.add_argument("--no-memory-check", action="store_true",
                   help="queue requests even when their estimated memory exceeds what was free at start")
    s.add_argument("--upload-quota-mb", type=float, default=UPLOAD_QUOTA_MB,
                   help=f"all uploads kept at once, in MiB (default: {UPLOAD_QUOTA_MB}); past it uploads get 413")
    s.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"open connections at most; more are answered 503 (default: {MAX_CONNECTIONS})")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients reach the server by (Host header), e.g. behind a reverse proxy; IP "
                        "addresses and localhost are always taken, other names refused (repeatable)")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the requests on replicas on a Ray cluster with Ray Serve (pip install -e '.[cluster]'): "
                        "ADDRESS of a running one (auto, HOST:6379, ray://HOST:10001), none: a local cluster")
    s.add_argument("--replicas", type=int, default=None,
                   help="with --ray: how many replicas run requests, one per GPU (a CPU core each without GPUs; "
                        "default: 1); a further --ray ingress attaches to the replicas running")
    s.add_argument("-v", "--verbose", action="store_true", help="also print the informational log (models, runs)")
    c = sub.add_parser("make-cert", help="make a local CA and a server certificate for https (serve, ComfyUI)")
    c.add_argument("folder", type=Path, help="where ca.pem, server.pem and server-key.pem are written (never over "
                                            "existing files)")
    c.add_argument("--name", action="append", default=None, metavar="HOST",
                   help="a host name or IP the certificate is for (repeatable; default: localhost, 127.0.0.1, ::1)")
    c.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"the port shown in the settings printed (default: {DEFAULT_PORT})")
    c.add_argument("--prefix", default="", help="'/fal' for ComfyUI's routes (in the settings printed)")


def serve_command(args: argparse.Namespace) -> int:
    try:
        from .fal_server import ServeOptions, serve, tls_context
    except ImportError as err:
        raise OptionError(f"serve needs aiohttp and pydantic ({err}): pip install -e '.[serve]'") from None

    if (args.tls_cert is None) != (args.tls_key is None):
        raise OptionError("--tls-cert and --tls-key go together")
    if args.max_queue < 1 or args.retention_hours <= 0:
        raise OptionError("--max-queue must be at least 1 and --retention-hours above 0")
    if args.max_megapixels <= 0 or args.upload_quota_mb <= 0 or args.max_connections < 1:
        raise OptionError("--max-megapixels and --upload-quota-mb must be above 0, --max-connections at least 1")
    if args.demo and (args.models is not None or args.tokenizers is not None):
        raise OptionError("--demo builds its own models and tokenizers: leave out --models and --tokenizers")
    if args.tls_key is not None:
        exposure = key_exposure(args.tls_key)
        if exposure is not None and exposure[0]:
            raise OptionError(exposure[1])
        if exposure is not None:
            log.warning("%s", exposure[1])
    if args.replicas is not None and (args.ray is None or args.replicas < 1):
        raise OptionError("--replicas goes with --ray and must be at least 1")
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    ray = None
    if args.ray is not None:
        from .ray_serve import RayOptions

        ray = RayOptions(address=args.ray or None, replicas=args.replicas or 1)
    service = ServiceSettings(retention_hours=args.retention_hours, max_queue=args.max_queue,
                              allow_remote_images=args.allow_remote_images, api_key=api_key_from_env(),
                              allow_remote_loras=args.allow_remote_loras,
                              max_megapixels=args.max_megapixels, upload_quota_mb=args.upload_quota_mb,
                              allowed_hosts=allowed_hosts(args.host, args.allowed_host))
    options = ServeOptions(output=args.output, models=args.models, tokenizers=args.tokenizers, model=args.model,
                           service=service, max_connections=args.max_connections,
                           memory_check=not args.no_memory_check, ray=ray)
    return serve(options, args.host, args.port, tls, args.demo)


def allowed_hosts(bind: str, given: list[str]) -> tuple[str, ...]:
    """The names the Host header may carry: those given, and the bound address when it is a name."""
    names = list(host_list(",".join(given)))
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        names += host_list(bind)
    return tuple(dict.fromkeys(names))


def make_cert_command(args: argparse.Namespace) -> int:
    from .certificates import DEFAULT_HOSTS, client_settings, make_certificates

    hosts = tuple(args.name) if args.name else DEFAULT_HOSTS
    certs = make_certificates(args.folder, hosts=hosts)
    host_name = args.name[0] if args.name else "127.0.0.1"
    print(client_settings(certs, host=host_name, port=args.port, prefix=args.prefix))
    return 0
