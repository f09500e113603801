"""torchrun's environment -> `run` as one of N processes that make each image together (sequence parallelism):

    torchrun --nproc-per-node 4 -m comfyui_krea run workflows/api/krea_text_to_image.json --prompt "a red fox"

Each process (rank) owns one GPU, cuda:LOCAL_RANK (nccl; gloo on the CPU when there is no GPU), loads the models
itself and runs the nodes the samplers need; the samplers of all ranks compute every step together
(sampling/sequence_parallel.py). Rank 0 runs the whole workflow: it decodes, checks and saves the images and prints
what the command prints. The other ranks write no file and print nothing, except a failure of their own (input
errors are the same on every rank, and rank 0 reports them). Every rank runs rank 0's prompt (broadcast), and the
samplers take rank 0's noise, image latent and conditioning, so all ranks make the same image.

Before any weights load: the rank count must divide the transformer's attention heads (read from the file's
header), and each rank's memory estimate (all the weights, its share of the activations) must fit its own device;
rank 0 prints every rank's figures.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..model_loader import ModelFileError
from ..model_loader.flux import config_from_checkpoint
from ..nodes.host import standalone_host
from ..sampling.sequence_parallel import rank_count_problem
from .preflight import GIB, available_memory, estimate, memory_problem
from .runner import CheckedPrompt, WorkflowError, run

# Errors that come from the input: every rank meets the same one, and rank 0 reports it.
SAME_ON_EVERY_RANK = (WorkflowError, ModelFileError, ValueError, OSError, KeyboardInterrupt)


def torchrun_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process as one of several, else None."""
    try:
        rank, size, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        return None
    return (rank, size, local) if size > 1 else None


def torchrun_problem(args: argparse.Namespace) -> str | None:
    """Why this command cannot run as torchrun's processes (None: it can, or torchrun did not start it)."""
    if torchrun_ranks() is None or (args.command == "run" and args.server is None):
        return None
    return ("under torchrun only `run` of a workflow in this process works (each process would start its own "
            "`serve`, or queue its own copy of the workflow on the --server); start this command without torchrun")


@dataclass(frozen=True)
class Processes:
    """The processes that make each image together: one (rank 0 of 1) outside torchrun."""
    rank: int = 0
    size: int = 1
    group: Any = None

    def same_prompt(self, prompt: dict) -> dict:
        """Rank 0's prompt, on every rank."""
        if self.size == 1:
            return prompt
        box = [prompt]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def preflight(self, prompt: Mapping[str, dict], device: torch.device, check_memory: bool) -> None:
        """The checks that need no weights and know the processes: heads and each rank's memory."""
        if self.size == 1:
            problem = memory_problem(prompt, device) if check_memory else None
            if problem:
                raise WorkflowError(problem)
            return
        for node in prompt.values():
            name = node.get("inputs", {}).get("model_name")
            if node.get("class_type") == "KreaModelLoader" and isinstance(name, str):
                path = standalone_host().model_path("diffusion_models", name)
                problem = rank_count_problem(config_from_checkpoint(path).num_heads, self.size)
                if problem:
                    raise WorkflowError(problem)
        need = estimate(prompt, ranks=self.size)
        free, where = available_memory(device)
        figures: list[Any] = [None] * self.size
        dist.all_gather_object(figures, (need.total if need else 0, free, where), group=self.group)
        if need is None:
            return
        lines = [f"  rank {rank}, {where_}: needs about {total / GIB:.2f} GiB, {free_ / GIB:.1f} GiB free"
                 for rank, (total, free_, where_) in enumerate(figures)]
        sys.stderr.write(f"{self.size} processes make each image ({need.summary}); memory per process before "
                         f"loading (model weights {need.weights / GIB:.2f} GiB, this process's share of the "
                         f"transformer activations {need.activations / GIB:.2f} GiB, images "
                         f"{need.pictures / GIB:.2f} GiB):\n" + "\n".join(lines) + "\n")
        short = [line.strip() for line, (total, free_, _) in zip(lines, figures) if total > free_]
        if check_memory and short:
            raise WorkflowError("the run does not fit: " + "; ".join(short) + ". Make fewer or smaller images, use "
                                "weight_dtype fp8_e4m3fn (--set), or pass --no-memory-check to try anyway.")

    def run(self, checked: CheckedPrompt, extra_pnginfo: dict | None = None,
            on_node: Callable[[str, str], None] | None = None) -> dict[str, dict]:
        """Rank 0 runs the whole workflow (its saved images embed `extra_pnginfo`); the others what the samplers
        need, in the same order."""
        if self.rank == 0:
            return run(checked, extra_pnginfo=extra_pnginfo, on_node=on_node)
        samplers = [n for n, node in checked.prompt.items() if node.get("class_type") == "KreaSampler"]
        return run(checked, on_node=on_node, only_for=samplers)


@contextlib.contextmanager
def torchrun_processes() -> Iterator[Processes]:
    """Within the block: this process's place among torchrun's processes, their process group joined and the
    host's transformer made sequence-parallel over it (one plain process outside torchrun)."""
    ranks = torchrun_ranks()
    if ranks is None:
        yield Processes()
        return
    rank, size, local_rank = ranks
    device = None
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise WorkflowError(f"process {local_rank} of this machine has no GPU of its own: the machine has "
                                f"{torch.cuda.device_count()}; start at most that many processes per machine "
                                "(torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # the host's "cuda" is this process's GPU from here on
    dist.init_process_group("nccl" if device is not None else "gloo", device_id=device)
    host = standalone_host()
    stderr = sys.stderr
    if rank:  # helpers print nothing for the rest of the process (rank 0 reports) and log only errors
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        logging.getLogger().setLevel(logging.ERROR)
    host.configure(process_group=dist.group.WORLD)
    try:
        yield Processes(rank, size, dist.group.WORLD)
        # The helpers are done after the sampler, rank 0 only after decoding and saving: all leave the group
        # together, so that no process exits while gloo's threads still talk to a peer (a helper that did was
        # aborted by the C++ runtime now and then: "terminate called without an active exception").
        dist.barrier()
    except BaseException as err:
        if rank and not isinstance(err, SAME_ON_EVERY_RANK):
            stderr.write(f"rank {rank}: error: {type(err).__name__}: {err}\n")
        raise
    finally:
        host.restore(dataclasses.replace(host.settings(), process_group=None))
        dist.destroy_process_group()
