"""`serve --ray [ADDRESS] --replicas N` -> the fal server's HTTP front (this process, an ingress) over N replicas of
the workflow runner deployed on a Ray cluster with Ray Serve (the `.[cluster]` extra).

The first ingress to reach a cluster deploys: the job registry (a named, detached actor: ray_registry.py) and the
Serve application APP_NAME, N replicas of KreaReplica (ray_replica.py), each with one GPU when the cluster has GPUs
(num_gpus=1), else one CPU core (and one torch thread). Each replica runs one request at a time
(max_ongoing_requests=1) and Serve queues the rest, at most --max-queue (max_queued_requests); the registry bounds
the requests waiting or running across every ingress by --max-queue as well, so a full cluster answers 503
queue_full as the single server does. Further ingresses (`serve --ray ADDRESS` on other machines, or other ports)
attach to what runs: they answer status, result and cancel of any request, take any upload slot, and read uploads
from the shared uploads folder. When the first ingress stops, it deletes the application and the registry.

The protocol (endpoint table, schemas, limits, guards, error shapes, connection bound, TLS) is the single server's
(fal_server.py over fal_api); only the Backend, the job store and the uploads' signing key differ.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fal_api.routes import FalService
from ..fal_api.settings import ServiceSettings

log = logging.getLogger(__name__)

APP_NAME = "comfyui-krea"
DEPLOYMENT_NAME = "KreaReplica"


class ClusterError(ValueError):
    """Ray is not installed, or the cluster cannot be reached (the message says which and what to do)."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None  # a running cluster (e.g. "auto", "HOST:6379", "ray://HOST:10001"); None: a local one
    replicas: int = 1


@dataclass(frozen=True)
class Cluster:
    handle: Any  # Serve's DeploymentHandle of the replicas
    registry: Any  # the job registry actor
    owner: bool  # this ingress deployed them (and removes them when it stops)


def import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as err:
        raise ClusterError(f"--ray needs Ray Serve ({err}): pip install -e '.[cluster]'") from None
    return ray


def replica_resources(ray: Any) -> tuple[dict, int | None]:
    """Each replica's Ray resources and torch threads: a GPU when the cluster has any, else a CPU core."""
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, None
    return {"num_cpus": 1}, 1


def connect(options: RayOptions, settings: ServiceSettings, models: Path | None, tokenizers: Path | None,
            output: Path, memory_check: bool) -> Cluster:
    """Join (or start) the cluster; deploy the registry and the replicas unless they run already."""
    ray = import_ray()
    from ray import serve

    from .ray_registry import NAMESPACE, REGISTRY_NAME, JobRegistry
    from .ray_replica import KreaReplica

    if not ray.is_initialized():
        try:
            ray.init(address=options.address, namespace=NAMESPACE, logging_level=logging.WARNING,
                     log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ClusterError(f"cannot reach the Ray cluster at {options.address!r}: {err}") from None
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        owner = False
    except ValueError:  # none yet: this ingress deploys
        registry = ray.remote(JobRegistry).options(name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached",
                                                   num_cpus=0, get_if_exists=True).remote(settings.retention_s)
        owner = True
    if not owner and APP_NAME in serve.status().applications:
        log.info("fal over Ray: attached to the running application %s (its replicas and models)", APP_NAME)
        return Cluster(serve.get_app_handle(APP_NAME), registry, owner=False)
    resources, threads = replica_resources(ray)
    serve.start(proxy_location="Disabled")  # the HTTP front is the fal server itself, not Serve's proxy
    deployment = serve.deployment(KreaReplica, name=DEPLOYMENT_NAME, num_replicas=options.replicas,
                                  max_ongoing_requests=1, max_queued_requests=settings.max_queue,
                                  ray_actor_options=resources)
    app = deployment.bind(str(models) if models else None, str(tokenizers) if tokenizers else None,
                          str(output.resolve()), memory_check, threads)
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    log.info("fal over Ray: %d replicas of %s deployed (%s each)", options.replicas, DEPLOYMENT_NAME, resources)
    return Cluster(handle, registry, owner=True)


def disconnect(cluster: Cluster) -> None:
    """The first ingress takes down what it deployed; the others just leave."""
    ray = import_ray()
    from ray import serve

    if cluster.owner:
        with contextlib.suppress(Exception):  # the cluster may be gone already
            serve.delete(APP_NAME)
        with contextlib.suppress(Exception):
            ray.kill(cluster.registry)
    ray.shutdown()


@contextlib.contextmanager
def ray_service(options: RayOptions, settings: ServiceSettings, models: Path | None, tokenizers: Path | None,
                output: Path, memory_check: bool, model_name: str | None = None) -> Iterator[FalService]:
    """The protocol's service over the cluster, for fal_server's app, until the block ends."""
    cluster = connect(options, settings, models, tokenizers, output, memory_check)
    from .ray_jobs import RayBackend, SharedJobStore, SharedUploads

    ray = import_ray()
    try:
        backend = RayBackend(cluster.handle, cluster.registry, output, model_name)
        uploads = SharedUploads(output / "fal-uploads", settings.retention_s,
                                quota_bytes=settings.upload_quota_bytes,
                                signing_key=ray.get(cluster.registry.signing_key.remote()))
        if cluster.owner:
            uploads.prepare()  # files of an earlier cluster have no record
        else:
            uploads.folder.mkdir(parents=True, exist_ok=True)
        yield FalService.create(backend, uploads.folder, settings, job_store=functools.partial(SharedJobStore,
                                                                                               cluster.registry),
                                uploads=uploads)
    finally:
        disconnect(cluster)
