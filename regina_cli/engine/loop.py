"""The epoch loop both phases share: steps, validation, history, checkpoints, resume, signals.

A phase (`train_ae.AutoencoderPhase`, `train_gan.CycleGANPhase`) supplies the math: its
modules, optimisers, schedulers, random generators, `train_step` (named loss terms) and
`validate`. This loop owns everything around it, once: exact resume (mid-epoch too), early
stopping, best checkpoint, rank-0-only writes, and the pre-emption save; and the plumbing both
phases use to get there (seeding, epoch batches, mixed precision, compilation).

Per-step work stays on the device: loss terms are accumulated as tensors and read back only
when the progress display refreshes and at the end of an epoch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Protocol

import numpy as np
import torch

from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.distributed import DistContext, any_rank, barrier, broadcast_floats, broadcast_state
from regina_cli.engine.early_stopping import BestTracker
from regina_cli.engine.preemption import StopOnSignal, TrainingInterrupted
from regina_cli.engine.progress import TrainingProgress, format_losses
from regina_cli.engine.run_meta import check_run_dataset, read_meta
from regina_cli.errors import ReginaError

CHECKPOINT_FORMAT = 2  # 2: named running loss terms
SIGNAL_POLL_STEPS = 8  # several processes agree on a stop every this many steps
MIN_TIMED_S = 0.01  # epochs shorter than this report no throughput


class Phase(Protocol):
    name: str
    cells_per_step: int

    def modules(self) -> dict[str, torch.nn.Module]: ...
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...
    def schedulers(self) -> dict[str, object]: ...
    def generators(self) -> dict[str, torch.Generator]: ...
    def steps_per_epoch(self) -> int: ...
    def begin_epoch(self, epoch: int) -> None: ...
    def train_step(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step; returns its named, detached scalar terms (logged as train_<name>)."""
    def end_epoch(self, epoch: int) -> None: ...
    def validate(self, epoch: int) -> dict[str, float]: ...
    def weights(self) -> dict[str, torch.Tensor]: ...


# --- Plumbing both phases share ---------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed every random stream; also flush denormal floats to zero, which on CPUs otherwise
    slow small matmuls down tenfold once tiny gradients appear (measured in phase 2)."""
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def scaled_lr(lr: float, enabled: bool, global_batch: int) -> float:
    """Linear learning-rate scaling for large batches (Goyal et al. 2017), reference batch 64."""
    return lr * global_batch / 64 if enabled else lr


def compile_modules(modules, enabled: bool, device: torch.device) -> None:
    """torch.compile the forward of each module in place (state_dict keys stay unchanged)."""
    if enabled and device.type == "cuda":
        for module in modules:
            module.forward = torch.compile(module.forward)


def steps_per_epoch(n_cells: int, batch_size: int, ctx: DistContext) -> int:
    """Full batches per rank (the last partial batch is dropped: BatchNorm needs > 1 cell)."""
    share = n_cells // ctx.world_size
    if share < 2:
        raise ReginaError(f"only {n_cells} training cells for {ctx.world_size} process(es); "
                          "use a larger split or fewer --gpus")
    return max(1, share // batch_size)


class EpochBatches:
    """One epoch of (row indices, expression) batches from `CellTensors.batches`, by step.

    The shuffle depends on (seed, epoch) only, so a resumed run and every rank see the same
    order without storing it; `get(step)` skips the batches a mid-epoch resume already did.
    """

    def __init__(self, cells, index: torch.Tensor, batch_size: int, *, seed: int, epoch: int, ctx: DistContext):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self._iterator = cells.batches(index, batch_size, generator=generator, rank=ctx.rank,
                                       world_size=ctx.world_size)
        self._position = 0

    def get(self, step: int):
        while self._position < step:
            batch = next(self._iterator)
            self._position += 1
        return batch


def amp_context(device: torch.device, setting: str):
    """bf16 autocast where the GPU supports it (`runtime.amp`: auto, bf16, off; the config
    checks the value)."""
    if setting == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    if setting == "auto" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def fit(
    phase: Phase,
    ctx: DistContext,
    paths: ckpt.PhasePaths,
    *,
    max_epochs: int,
    stopper,
    best: BestTracker,
    progress: TrainingProgress,
    resume: bool,
) -> dict:
    """Train `phase` for up to `max_epochs`; returns a summary (also written by the caller)."""
    start_epoch, step0, running, stop_reason = 1, 0, None, ""
    if resume:
        start_epoch, step0, running, stop_reason = _restore(phase, paths, stopper, best, ctx)
    history_tail: dict = {}
    with StopOnSignal() as signals, progress:
        if stop_reason:
            progress.message(f"{phase.name}: already finished ({stop_reason}); nothing to resume")
        if not resume and getattr(phase, "validate_initial", False):
            history_tail = _validate_initial(phase, ctx, paths, stopper, best, progress)
        epoch = start_epoch
        while not stop_reason and epoch <= max_epochs:
            phase.begin_epoch(epoch)
            n_steps = phase.steps_per_epoch()
            progress.start_epoch(epoch, n_steps, done=step0)
            t0 = time.perf_counter()
            step = step0
            for step in range(step0 + 1, n_steps + 1):
                running = _accumulate(running, phase.train_step(epoch, step))
                progress.step(step, lambda: running.means(step))
                if step < n_steps and _should_stop(signals, step, ctx):
                    _save_state(phase, paths, ctx, epoch=epoch - 1, step=step, running=running,
                                stopper=stopper, best=best, stop_reason="")
                    raise _interrupted(signals, phase.name, epoch, step, paths)
            seconds = time.perf_counter() - t0
            train_terms = running.means(max(n_steps, 1)) if running is not None else {}
            for module in phase.modules().values():
                broadcast_state(module, ctx, buffers_only=True)
            val = _validate(phase, epoch, ctx)
            cells = (n_steps - step0) * phase.cells_per_step * ctx.world_size
            is_best = best.update(epoch, val[best.metric])
            should_stop = stopper.update(epoch, val[stopper.metric])
            if should_stop:
                stop_reason = stopper.reason
            elif epoch == max_epochs:
                stop_reason = f"max_epochs: reached {max_epochs} epochs"
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_terms.items()},
                   **{f"val_{k}": v for k, v in val.items()}, "stop_counter": stopper.counter,
                   "best": int(is_best), "seconds": seconds, **_learning_rates(phase)}
            if cells > 0 and seconds >= MIN_TIMED_S:  # too short to time: no absurd throughput
                row["cells_per_s"] = cells / seconds
            phase.end_epoch(epoch)
            if ctx.is_main:
                ckpt.append_history(paths, row)
            _save_state(phase, paths, ctx, epoch=epoch, step=0, running=None, stopper=stopper,
                        best=best, stop_reason=stop_reason, is_best=is_best)
            progress.end_epoch({**train_terms, **{f"val_{k}": v for k, v in val.items()}},
                               note="*best*" if is_best else "")
            history_tail = row
            running, step0 = None, 0
            if any_rank(signals.requested, ctx) and not stop_reason:
                raise _interrupted(signals, phase.name, epoch, n_steps, paths)
            epoch += 1
    barrier(ctx)
    stop_reason = stop_reason or (f"max_epochs: reached {max_epochs} epochs" if max_epochs else
                                  "max_epochs: 0, nothing trained (the untrained start kept)")
    return {"stop_reason": stop_reason, "best_epoch": best.epoch, "best_metric": best.metric,
            "best_value": best.value, "epochs": epoch - 1, "last": history_tail}


class RunningTerms:
    """Sums of the named loss terms over an epoch's steps, kept on the device as one tensor."""

    def __init__(self, names: list[str], sums: torch.Tensor):
        self.names, self.sums = names, sums

    def means(self, steps: int) -> dict[str, float]:
        return dict(zip(self.names, (self.sums / steps).tolist()))  # the one host sync

    def state_dict(self) -> dict:
        return {"names": self.names, "sums": self.sums.detach().cpu()}

    @classmethod
    def from_state(cls, state: dict | None, device) -> "RunningTerms | None":
        return None if state is None else cls(list(state["names"]), state["sums"].to(device))


def _accumulate(running: RunningTerms | None, terms: dict[str, torch.Tensor]) -> RunningTerms:
    values = torch.stack(list(terms.values())).float()
    if running is None:
        return RunningTerms(list(terms), values)
    if list(terms) != running.names:
        raise RuntimeError(f"a phase's loss terms changed between steps: {running.names} -> {list(terms)}")
    running.sums += values
    return running


def _learning_rates(phase: Phase) -> dict[str, float]:
    return {f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in phase.optimizers().items()}


def _should_stop(signals: StopOnSignal, step: int, ctx: DistContext) -> bool:
    """A signal stops every rank at the same step: single processes look at every step,
    several processes agree (one small all-reduce) every SIGNAL_POLL_STEPS steps."""
    if not ctx.is_distributed:
        return signals.requested
    return step % SIGNAL_POLL_STEPS == 0 and any_rank(signals.requested, ctx)


def _interrupted(signals: StopOnSignal, name: str, epoch: int, step: int, paths) -> TrainingInterrupted:
    signum = signals.signum or 15
    return TrainingInterrupted(
        f"{name} training interrupted by signal {signum} at epoch {epoch} step {step}; "
        f"state saved to {paths.last}; continue with --resume", signum)


def _validate_initial(phase: Phase, ctx: DistContext, paths, stopper, best: BestTracker, progress) -> dict:
    """Score the untrained phase as epoch 0 (a phase that starts from a fitted prior is a valid
    model already): history row (returned, the summary's last one when no epoch trains), and the
    best weights if no epoch beats it."""
    val = _validate(phase, 0, ctx)
    is_best = best.update(0, val[best.metric])
    row = {"epoch": 0, **{f"val_{k}": v for k, v in val.items()}, "best": int(is_best)}
    if ctx.is_main:
        ckpt.append_history(paths, row)
    _save_state(phase, paths, ctx, epoch=0, step=0, running=None, stopper=stopper, best=best, stop_reason="",
                is_best=is_best)
    progress.message(f"{phase.name} before training: {format_losses({f'val_{k}': v for k, v in val.items()})}"
                     + (" *best*" if is_best else ""))
    return row


def _validate(phase: Phase, epoch: int, ctx: DistContext) -> dict[str, float]:
    """Rank 0 validates; its numbers go to every rank so all take the same decisions."""
    values = phase.validate(epoch) if ctx.is_main else None
    if not ctx.is_distributed:
        return values
    names = list(values) if values is not None else None  # rank 0's order: history.csv's columns as with 1 process
    names = _broadcast_names(names, ctx)
    numbers = broadcast_floats([values[n] for n in names] if values else [0.0] * len(names), ctx)
    return dict(zip(names, numbers))


def _broadcast_names(names, ctx: DistContext) -> list[str]:
    import torch.distributed as dist

    box = [names]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- Checkpoint state --------------------------------------------------------------------------------
def _state(phase: Phase, *, epoch, step, running, stopper, best, stop_reason, rng_per_rank) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "phase": phase.name, "epoch": epoch, "step": step,
        "world_size": len(rng_per_rank),
        "running": running.state_dict() if running is not None else None,
        "modules": {k: ckpt.state_dict_to_cpu(m) for k, m in phase.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in phase.optimizers().items()},
        "schedulers": {k: s.state_dict() for k, s in phase.schedulers().items()},
        "rng": rng_per_rank,  # one entry per rank: every process resumes its own random streams
        "stopper": stopper.state_dict(), "best": best.state_dict(), "stop_reason": stop_reason,
    }


def _gather_rng(phase: Phase, ctx: DistContext) -> list[dict] | None:
    """Every rank's RNG state, collected on rank 0 (all ranks must call this together)."""
    state = ckpt.capture_rng_state(phase.generators())
    if not ctx.is_distributed:
        return [state]
    import torch.distributed as dist

    states = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(state, states, dst=0)
    return states


def _save_state(phase, paths, ctx, *, epoch, step, running, stopper, best, stop_reason, is_best=False) -> None:
    rng_per_rank = _gather_rng(phase, ctx)
    if not ctx.is_main:
        return
    state = _state(phase, epoch=epoch, step=step, running=running, stopper=stopper, best=best,
                   stop_reason=stop_reason, rng_per_rank=rng_per_rank)
    if is_best:  # best files first: a kill before last.pt is written redoes this epoch, never skips them
        ckpt.save_torch(paths.best, state)
        ckpt.save_torch(paths.model, phase.weights())
        ckpt.copy_file(paths.best, paths.last)  # the same state: no second serialisation
    else:
        ckpt.save_torch(paths.last, state)


def check_resume_trains(paths: ckpt.PhasePaths, config, max_epochs: int, *, resume: bool) -> None:
    """Refuse, before anything is written, a resume that would train nothing yet record settings
    the weights were not trained with: a --max-epochs below the epochs trained (equal is allowed:
    a run killed after its last checkpoint finishes its records), or other settings for a run that
    stopped for good (early stopping)."""
    if not resume or not paths.last.is_file():
        return
    state = ckpt.load_torch(paths.last, map_location="cpu", mmap=True)  # _restore reads the tensors later
    done, final = int(state.get("epoch", 0)), _final_stop(state.get("stop_reason", ""))
    if final:
        _refuse_other_settings(paths, config, final)
    if not final and max_epochs < done:
        raise ReginaError(f"{paths.dir} has trained {done} epochs already, more than --max-epochs {max_epochs}: "
                          f"pass --max-epochs {done} or more to resume")


def _refuse_other_settings(paths: ckpt.PhasePaths, config, reason: str) -> None:
    if paths.config.is_file() and ckpt.read_config(paths) != config:
        raise ReginaError(f"{paths.dir} already finished ({reason}), so resuming trains nothing and cannot take "
                          "other settings: train a new --run to change them")


def finished_summary(paths: ckpt.PhasePaths, config, max_epochs: int, *, resume: bool,
                     dataset: str | None = None) -> dict | None:
    """A resume of a trained phase with nothing left to train (it stopped for good, or at this
    --max-epochs): the summary its meta.json recorded, with `nothing_to_resume` set and nothing
    written, so the phase never reads as unfinished meanwhile and a kill cannot leave it so.
    None for anything else. Other settings, or another `dataset` than the run's, are refused:
    the weights were not trained with them."""
    if not resume or not paths.last.is_file() or not paths.meta.is_file():
        return None
    meta = read_meta(paths)
    if not meta.is_trained or not meta.training:
        return None  # killed after its last checkpoint: the resume finishes its records
    reason = meta.training.get("stop_reason", "")
    if not _final_stop(reason) and max_epochs > int(meta.training.get("epochs", 0)):
        return None
    _refuse_other_settings(paths, config, reason)
    if dataset is not None:
        check_run_dataset(meta, dataset, str(paths.run_dir))  # its genes: the dataset's hash, checked before
    return {**meta.training, "nothing_to_resume": True}


def _restore(phase: Phase, paths, stopper, best, ctx: DistContext):
    """Load `last.pt` into the phase; returns (next epoch, steps done in it, running sums, reason)."""
    if not paths.last.is_file():
        raise ReginaError(f"nothing to resume: {paths.last} does not exist; drop --resume to start")
    state = ckpt.load_torch(paths.last, map_location=ctx.device)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("phase") != phase.name:
        raise ReginaError(f"{paths.last} is not a {phase.name} checkpoint of this REGINA version")
    for name, module in phase.modules().items():
        module_state = state["modules"][name]
        target = getattr(module, "_orig_mod", module)
        target.load_state_dict(module_state)
    schedulers = phase.schedulers()
    for name, opt in phase.optimizers().items():
        rates = [group["lr"] for group in opt.param_groups]  # this run's settings
        opt.load_state_dict(state["optimizers"][name])
        if name not in schedulers:  # a constant rate: the settings' (a resume may change it); else the schedule's
            for group, rate in zip(opt.param_groups, rates):
                group["lr"] = rate
    for name, sched in schedulers.items():
        _load_schedule(sched, state["schedulers"][name])
    if len(state["rng"]) == ctx.world_size:
        ckpt.restore_rng_state(state["rng"][ctx.rank], phase.generators())
    else:  # resumed with another process count: rank 0's streams, offset per rank
        ckpt.restore_rng_state(state["rng"][0], phase.generators())
        if ctx.rank:
            torch.manual_seed(torch.initial_seed() + 7919 * ctx.rank + state["epoch"])
            for g in phase.generators().values():
                g.manual_seed(g.initial_seed() + 7919 * ctx.rank + state["epoch"])
    stopper.load_state_dict(state["stopper"])
    best.load_state_dict(state["best"])
    if ctx.is_main:
        ckpt.truncate_history(paths, state["epoch"])
    running = RunningTerms.from_state(state["running"], ctx.device)
    reason = state["stop_reason"] if _final_stop(state["stop_reason"]) else ""
    return state["epoch"] + 1, state["step"], running, reason


def _load_schedule(scheduler, saved: dict) -> None:
    """A saved learning-rate schedule, continued at the length and base rates this run was built
    with: a resume with a larger --max-epochs follows the cosine of an uninterrupted run that long
    (the saved length would restart the cosine), and one with another rate (`--set ae.lr=...`)
    trains at it, as its config records. Same settings: the saved state as it is, so resume
    stays exact."""
    length, bases = getattr(scheduler, "T_max", None), list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    if length is None or (length == scheduler.T_max and bases == scheduler.base_lrs):
        return
    scheduler.T_max, scheduler.base_lrs = length, bases
    progress = (1 + math.cos(math.pi * scheduler.last_epoch / length)) / 2
    for group, base in zip(scheduler.optimizer.param_groups, bases):
        group["initial_lr"] = base
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * progress
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _final_stop(reason: str) -> str:
    """The reason a run stopped for good: not a stop at --max-epochs, which a larger one continues."""
    return "" if reason.startswith("max_epochs") else reason
