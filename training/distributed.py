"""Process-group set-up for every way a rank can be started, and the sequence-parallel groups.

A rank learns its place from the environment: RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as
the DeepSpeed launcher and torchrun set them. Under `srun` (one task per GPU) they are taken from Slurm's
SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, with MASTER_ADDR exported by the batch script. A process
started on its own (`python launch/train.sh ...`) is rank 0 of 1.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import ConfigError


@dataclass
class Placement:
    rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Placement:
    import deepspeed   # here: it takes seconds to import, and the checkpoint readers need only raise_on_every_rank

    _fill_environment()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # On the CPU, DeepSpeed builds a shared-memory all-reduce with a C++ compiler the first time a
        # process group starts (about 2 minutes), though only its inference path uses it; training
        # all-reduces through gloo. DeepSpeed reads which ops may be built from this dict, and keeps edits.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the ranks of this machine
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return Placement(dist.get_rank(), dist.get_world_size(), device)


def raise_on_every_rank(problem: str | None, error: type[Exception]) -> None:
    """Raise error(problem) on every rank when rank 0 found a problem (collective; the other ranks pass None): a rank
    that stopped alone would leave the others waiting for it in their next collective."""
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise error(shared[0])


def process_rank() -> int:
    """This process's global rank, also before the process group exists (0 for a process on its own)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _fill_environment() -> None:
    env = os.environ
    if "RANK" in env:
        env.setdefault("LOCAL_RANK", "0")
        return
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:  # srun, one task per GPU
        if "MASTER_ADDR" not in env:
            raise ConfigError("under srun, export MASTER_ADDR (the first node's address) in the batch script; "
                               "see launch/slurm_h800.sbatch")
        env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env["SLURM_LOCALID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        env.setdefault("MASTER_PORT", "29500")
        return
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sequence_parallel_group(size: int):
    """The group of `size` consecutive ranks this rank belongs to (None for size 1).

    Every rank must create every group, in the same order, even the groups it is not in.
    """
    if size == 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine

