"""Data-parallel training with torch.distributed, nanoGPT-style: a few readable lines.

A process learns its place from the environment: `RANK`/`LOCAL_RANK`/`WORLD_SIZE` (torchrun,
or the processes `--gpus N` spawns through torchrun's own elastic launcher), else
`SLURM_PROCID`/`SLURM_LOCALID`/`SLURM_STEP_NUM_TASKS` under `srun`. NCCL on GPUs, gloo on the CPU.
One `is_main` flag gates every print and every write.

Gradients are averaged inside `optimizer.step()` itself (`data_parallel` registers a step
pre-hook: one flat all-reduce, public `torch.distributed` API), which is what DDP does, so no
step can forget it. DDP's own wrapper does not fit the method: its steps call submodules
directly (a classifier step on detached latents, a discriminator step every N-th step), whose
gradients DDP's forward hooks would silently leave unsynchronised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from regina_cli.devices import available_cpus, resolve_device, torch_threads
from regina_cli.errors import ReginaError
from regina_cli.io import check_not_in_use, run_lock
from regina_cli.launch import scheduler_place


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_by_scheduler() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when torchrun started us or `srun` started several of us
    (`launch.scheduler_place`), else None; under srun, the variables init_process_group(env://) reads."""
    place = scheduler_place()
    if place is None:
        return None
    if place.launcher == "srun":
        env = os.environ  # the sbatch script may set MASTER_ADDR itself
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = map(str, (place.rank, place.world_size, place.local_rank))
    return place.rank, place.local_rank, place.world_size


def check_run_free(run_dir) -> None:
    """Refuse a run another regina process is training (`io.run_lock`). In a torchrun/srun launch
    every process must reach the same verdict, so there it is taken after they join
    (`run_distributed`)."""
    if scheduler_place() is None:
        check_not_in_use(run_dir)


def check_process_count(gpus: int, device: str) -> None:
    """Fail before spawning anything when `--gpus` cannot be honoured."""
    if gpus < 1:
        raise ReginaError(f"--gpus takes a positive number, not {gpus}")
    if gpus > 1 and ":" in str(device):
        raise ReginaError(f"--device {device} names one GPU; with --gpus {gpus} use --device cuda (one GPU per process)")
    if gpus == 1:
        return
    if resolve_device(device).type == "cuda":
        if gpus > torch.cuda.device_count():
            raise ReginaError(
                f"--gpus {gpus} asks for more GPUs than the {torch.cuda.device_count()} visible; "
                f"lower --gpus or use --device cpu for CPU processes"
            )
    elif str(device) != "cpu":  # `auto` on a node without a GPU (a job that forgot to ask for one)
        raise ReginaError(f"--gpus {gpus}: no CUDA GPU is visible; run on a GPU node, "
                          f"or add --device cpu to train in {gpus} CPU processes")
    elif gpus > available_cpus():
        raise ReginaError(f"--gpus {gpus} --device cpu would start {gpus} processes on {available_cpus()} "
                          f"CPU cores; use at most --gpus {available_cpus()}")


def setup(device: str) -> DistContext:
    """Join the process group when launched as one of several processes; else a single process."""
    launched = launched_by_scheduler()
    if launched is None:
        return DistContext(0, 0, 1, resolve_device(device))
    rank, local_rank, world = launched
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, local_rank, world, dev)


def teardown(ctx: DistContext) -> None:
    if launched_by_scheduler() is not None and dist.is_initialized():  # a group of one too
        dist.destroy_process_group()


def run_distributed(target: Callable, kwargs: dict, *, gpus: int, device: str, run_dir=None,
                    recheck: Callable[[], None] = lambda: None) -> Any:
    """Run `target(ctx, **kwargs)`: in this process, joined to an existing launch, or in `gpus`
    processes started through torchrun's elastic launcher (rank 0's result is returned).

    `run_dir`: the run `target` writes, locked while it runs (`io.run_lock`; `recheck` then runs
    under the lock, for what another writer may have changed before it): by this process, or in
    a torchrun/srun launch by its first process once all have joined, every process sharing its
    verdict (a refusal on rank 0 alone would leave the others waiting for it). In this process
    it runs on the threads torch started with (`devices.torch_threads`), as a command would."""
    if launched_by_scheduler() is not None:
        return _run_here(target, kwargs, device, run_dir, recheck)
    with _locked(run_dir, recheck):
        if gpus > 1:
            return _spawn(target, kwargs, nprocs=gpus, device=device)
        with torch_threads():  # the command's count, whatever numba (scanpy) set in a notebook
            return _run_here(target, kwargs, device)


@contextlib.contextmanager
def _locked(run_dir, recheck: Callable[[], None]):
    if run_dir is None:
        yield
        return
    with run_lock(run_dir):
        recheck()
        yield


def _run_here(target: Callable, kwargs: dict, device: str, run_dir=None,
              recheck: Callable[[], None] = lambda: None) -> Any:
    ctx = setup(device)
    try:
        if ctx.is_distributed:
            _check_one_request(kwargs, run_dir, ctx)
        with contextlib.ExitStack() as held:
            refusal = ""
            if ctx.is_main:
                try:
                    held.enter_context(_locked(run_dir, recheck))
                except ReginaError as exc:
                    refusal = str(exc)
            if ctx.is_distributed:  # every process learns rank 0's verdict
                verdict = [refusal]
                dist.broadcast_object_list(verdict, src=0)
                refusal = verdict[0]
            if refusal:
                raise ReginaError(refusal)
            return target(ctx, **kwargs)
    finally:
        teardown(ctx)


RANK_OWN = ("progress",)  # training arguments that differ by rank in one launch (only the first prints)


def _check_one_request(kwargs: dict, run_dir, ctx: DistContext) -> None:
    """Every process of a launch must have been given the same command. `srun -n N` running N
    independent trainings (a task farm) joins them into one group, where collectives over data of
    different sizes wait forever: refused on every process, naming the runs."""
    asked = repr(sorted((k, v) for k, v in kwargs.items() if not callable(v) and k not in RANK_OWN))
    mine = (str(Path(run_dir).resolve()) if run_dir is not None else "", hashlib.sha256(asked.encode()).hexdigest())
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) > 1:
        runs = ", ".join(sorted({run for run, _ in everyone}))
        raise ReginaError(f"the {ctx.world_size} processes of this launch were given different training commands "
                          f"(runs: {runs}): one srun or torchrun launch trains one run in data parallel; start "
                          "independent trainings as separate steps (`srun -n 1 ...` each, or a job array)")


def _spawn(target: Callable, kwargs: dict, *, nprocs: int, device: str) -> Any:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from regina_cli.engine.preemption import TrainingInterrupted

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn",
    )
    with tempfile.TemporaryDirectory(prefix="regina-errors-") as errors:
        try:
            results = elastic_launch(config, _worker)(target, kwargs, device, nprocs, errors)
        except SignalException as exc:  # the launcher passed SIGTERM/SIGINT on; workers saved last.pt
            raise TrainingInterrupted(f"training interrupted by signal {int(exc.sigval)}; the processes saved "
                                      "their state (last.pt) if they were training: continue with --resume",
                                      int(exc.sigval)) from None
        except ChildFailedError as exc:
            reported = sorted(Path(errors).glob("rank*.json"), key=lambda f: int(f.stem[4:]))
            if not reported:
                raise RuntimeError(f"a training process failed: {exc}") from exc
            outcome = json.loads(reported[0].read_text())
            error = ReginaError(outcome["user_error"])
            error.exit_code = outcome["exit_code"]
            raise error from None
    return results[0] if len(results) == 1 else {**results[0], "per_rank": [results[r] for r in sorted(results)]}


def _worker(target: Callable, kwargs: dict, device: str, nprocs: int, errors: str) -> dict:
    """Body of each spawned process: share the CPU fairly, run the target, report user errors.

    A user error (one line for the user) goes to `errors/rank<R>.json`, and the process leaves at
    once: the launcher then stops the others, which would otherwise wait in their next collective
    for a peer that left (a checkpoint only rank 0 writes failing on a full disk, say).
    `target` must be a module-level function: the spawned process unpickles it by reference."""
    from regina_cli.engine.preemption import TrainingInterrupted

    torch.set_num_threads(max(1, available_cpus() // nprocs))
    try:
        return _run_here(target, kwargs, device)
    except TrainingInterrupted as exc:  # state saved; the launcher, shutting down on the signal, reads
        os._exit(exc.exit_code)  # no result and would wait 30 s before killing us: leave at once
    except ReginaError as exc:
        rank = os.environ.get("RANK", "0")
        Path(errors, f"rank{rank}.json").write_text(json.dumps({"user_error": str(exc), "exit_code": exc.exit_code}))
        os._exit(exc.exit_code)


# --- Collectives (no-ops in a single process) -----------------------------------------------------
def data_parallel(optimizer: torch.optim.Optimizer, ctx: DistContext, *, clip: float = 0.0) -> torch.optim.Optimizer:
    """Make every `optimizer.step()` first average its gradients over the processes (one flat
    all-reduce) and then clip their global norm to `clip` (0: no clipping), in that order, so
    the clip sees the same averaged gradient on every rank. Returns `optimizer`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def before_step(_optimizer, _args, _kwargs) -> None:
        if ctx.is_distributed:
            _all_reduce_mean([p.grad for p in params if p.grad is not None], ctx)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)

    optimizer.register_step_pre_hook(before_step)
    return optimizer


def _all_reduce_mean(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def parameter_checksum(module: torch.nn.Module) -> float:
    """One number per model (sum of all weights): equal on every rank when ranks stay in sync."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in module.parameters()).item())


def broadcast_state(module: torch.nn.Module, ctx: DistContext, *, buffers_only: bool = False) -> None:
    """Rank 0's parameters (at start) or buffers (BatchNorm statistics, per epoch) to all ranks."""
    if not ctx.is_distributed:
        return
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def broadcast_floats(values: list[float], ctx: DistContext) -> list[float]:
    """Rank 0's numbers to every rank, so decisions (early stopping, best) agree exactly."""
    if not ctx.is_distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is true on any (a stop signal seen by one process)."""
    if not ctx.is_distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
