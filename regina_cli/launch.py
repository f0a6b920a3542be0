"""Where this process stands in a multi-process launch, read from the environment alone (no
torch: the command line reads it before anything heavy is imported, so that only the first
process prints)."""

from __future__ import annotations

import os
from typing import NamedTuple


class Place(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun" or "srun"


def scheduler_place(env=None) -> Place | None:
    """This process's place when torchrun started it (even alone: `--nproc-per-node=1` still
    joins a process group) or `srun` started several in one step, else None. Only `srun` sets
    the step's task count: the batch shell of a job of several tasks has SLURM_NTASKS > 1 and
    SLURM_PROCID 0 too, and a command run there must not wait for peers that never come."""
    env = os.environ if env is None else env
    try:
        return _place(env)
    except ValueError:  # a malformed variable names no launch: one process, which never waits for peers
        return None


def _place(env) -> Place | None:
    if "RANK" in env and "WORLD_SIZE" in env and (int(env["WORLD_SIZE"]) > 1 or "TORCHELASTIC_RUN_ID" in env):
        return Place(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return Place(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"]),
                     "srun")
    return None
