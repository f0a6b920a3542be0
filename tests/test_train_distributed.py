"""`--gpus 2 --device cpu`: two data-parallel gloo processes started through torchrun's elastic
launcher train phase 1 and phase 2; the ranks must end with identical weights, and rank 0 alone
writes. One process trains on the threads torch started with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from regina_cli.config import build_config
from regina_cli.engine.train_ae import train_autoencoder

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=16", "model.ff_mult=2",
        "model.classifier_hidden=16", "ae.batch_size=32", "ae.max_epochs=2"]


def test_two_gloo_processes_stay_in_sync(tmp_path):
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset

    data_dir = tmp_path / "data"
    write_dataset(simulate_screen(n_cells=300, n_genes=140, n_singles=6, n_doubles=3, seed=0), "screen", data_dir)
    split_dataset("screen", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("screen", "stress", split="simulation_1", data_dir=data_dir)

    run_dir = tmp_path / "run"
    summary = train_autoencoder("screen", split="simulation_1", labels="stress", run_dir=run_dir,
                                config=build_config(preset="demo", overrides=TINY), data_dir=data_dir,
                                gpus=2, device="cpu", progress="silent")
    ranks = summary["per_rank"]
    assert len(ranks) == 2
    assert ranks[0]["parameter_checksum"] == ranks[1]["parameter_checksum"]  # weights identical
    assert ranks[0]["last"]["val_cons"] == ranks[1]["last"]["val_cons"]  # same decisions
    assert summary["epochs"] == 2 and summary["stop_reason"].startswith("max_epochs")

    # What rank 0 wrote is the weights both ranks trained.
    saved = torch.load(run_dir / "ae" / "last.pt", weights_only=True)["modules"]["autoencoder"]
    params = {k: v for k, v in saved.items() if "running" not in k and "num_batches" not in k
              and not k.endswith(("_u", "_v"))}
    meta = json.loads((run_dir / "ae" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(params) > 0 and abs(sum(float(v.double().sum()) for v in params.values())
                                   - summary["parameter_checksum"]) < 1e-6 * max(1.0, abs(summary["parameter_checksum"]))
    # history.csv has the columns of a one-process run, in the same order.
    header = (run_dir / "ae" / "history.csv").read_text().splitlines()[0].split(",")
    validation = [c for c in header if c.startswith("val_")]
    assert validation == ["val_mse", "val_cons", "val_variance_preservation", "val_clf_acc"]

    # Phase 2 on two processes: rank 0 alone chooses the kept correction, and every rank follows
    # it (the same scale, the same number of epochs: none where it keeps the prior alone).
    from regina_cli.engine.train_gan import train_gan

    for choice, run in (("true", run_dir), ("false", tmp_path / "trained")):
        if choice == "false":
            shutil.copytree(run_dir / "ae", run / "ae")
        config = build_config(preset="demo", overrides=[*TINY, "gan.max_epochs=1", "gan.batch_size=32",
                                                        f"gan.correction_choice={choice}"])
        gan = train_gan(run, config=config, data_dir=data_dir, gpus=2, device="cpu", progress="silent")
        ranks = gan["per_rank"]
        assert ranks[0]["parameter_checksum"] == ranks[1]["parameter_checksum"]
        assert ranks[0]["epochs"] == ranks[1]["epochs"] == gan["epochs"]
        scale = float(torch.load(run / "gan" / "model.pt", weights_only=True)["gan.correction_scale"])
        if choice == "true":
            assert gan["epochs"] == (0 if gan["correction_choice"]["correction_scale"] == 0 else 1)
            assert scale == gan["correction_choice"]["correction_scale"]
        else:
            assert gan["epochs"] == 1 and scale == 0.5 and gan["correction_choice"] is None


def _step_on_two_ranks(ctx) -> dict:
    """One SGD step (lr 1) per rank, gradients [3, 0] on rank 0 and [-1, 0] on rank 1 (mean [1, 0]):
    without clipping, and clipped to norm 0.5; then a flag only rank 0 raises, and rank 0's numbers."""
    from regina_cli.engine.distributed import any_rank, broadcast_floats, data_parallel

    found = {}
    for clip in (0.0, 0.5):
        weight = torch.nn.Parameter(torch.zeros(2))
        optimizer = data_parallel(torch.optim.SGD([weight], lr=1.0), ctx, clip=clip)
        weight.grad = torch.tensor([3.0, 0.0]) if ctx.rank == 0 else torch.tensor([-1.0, 0.0])
        optimizer.step()
        found[str(clip)] = weight.detach().tolist()
    found["any"] = any_rank(ctx.rank == 0, ctx)  # a stop signal only rank 0 saw
    found["broadcast"] = broadcast_floats([float(ctx.rank), 7.0 + ctx.rank], ctx)
    return found


def test_every_step_averages_the_gradients_over_the_ranks_and_then_clips():
    """`data_parallel`: each rank steps with the mean of the ranks' gradients (not their sum, which
    would scale the step with the number of GPUs), clipped after averaging, so every rank clips
    the same gradient (clipping each rank's own first gives another step). A stop signal one rank
    sees stops them all (`any_rank`), and decisions use rank 0's numbers (`broadcast_floats`)."""
    from regina_cli.engine.distributed import run_distributed

    result = run_distributed(_step_on_two_ranks, {}, gpus=2, device="cpu")
    assert len(result["per_rank"]) == 2
    for found in result["per_rank"]:
        assert found["0.0"] == pytest.approx([-1.0, 0.0])  # mean gradient [1, 0]
        assert found["0.5"] == pytest.approx([-0.5, 0.0])  # its clip to norm 0.5
        assert found["any"] is True and found["broadcast"] == [0.0, 7.0]  # every rank stops; rank 0's numbers


def test_a_user_error_on_one_rank_ends_every_process(tmp_path):
    """Only rank 0 writes checkpoints: its full disk (one user error) left the other process
    waiting in its next all-reduce for 30 minutes. Now the error line comes at once."""
    import os
    import subprocess
    import sys

    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset

    data_dir = tmp_path / "data"
    write_dataset(simulate_screen(n_cells=300, n_genes=140, n_singles=6, n_doubles=3, seed=0), "screen", data_dir)
    split_dataset("screen", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("screen", "stress", split="simulation_1", data_dir=data_dir)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # loaded by every spawned process: rank 0's disk fills at epoch 1
        "import os, torch\n_save = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if os.environ.get('RANK') == '0' and isinstance(obj, dict) and obj.get('epoch', 0) >= 1:\n"
        "        raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0')\n"
        "    return _save(obj, f, *a, **k)\n"
        "torch.save = save\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    sets = [a for s in TINY for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "regina_cli", "train-ae", "screen", "--split", "simulation_1",
                             "--labels", "stress", "--run", str(tmp_path / "run"), "--gpus", "2", "--device", "cpu",
                             "--data-dir", str(data_dir), "--max-epochs", "3", *sets],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the write failed (is the disk full" in errors[0], result.stderr[-2000:]


def _srun_screen(tmp_path):
    """A tiny screen, split and labelled, for commands started as srun tasks."""
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset

    data_dir = tmp_path / "data"
    write_dataset(simulate_screen(n_cells=300, n_genes=140, n_singles=6, n_doubles=3, seed=0), "screen", data_dir)
    split_dataset("screen", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("screen", "stress", split="simulation_1", data_dir=data_dir)
    return data_dir


def _srun_tasks(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run `commands` as the tasks of one `srun -n N` step (its environment, no Slurm): (exit
    status, stdout, stderr) of each."""
    import socket

    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "TORCHELASTIC", "MASTER_"))}
    tasks = [subprocess.Popen([sys.executable, "-m", "regina_cli", *command],
                              env={**clean, "SLURM_STEP_NUM_TASKS": str(len(commands)), "SLURM_PROCID": str(rank),
                                   "SLURM_LOCALID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, command in enumerate(commands)]
    try:
        outputs = [task.communicate(timeout=120) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    return [(task.returncode, out, err) for task, (out, err) in zip(tasks, outputs)]


def _train_ae_command(data_dir, run) -> list[str]:
    sets = [a for s in TINY for a in ("--set", s)]
    return ["train-ae", "screen", "--split", "simulation_1", "--labels", "stress", "--run", str(run),
            "--device", "cpu", "--data-dir", str(data_dir), *sets]


def test_an_srun_launch_on_a_busy_run_is_refused_by_every_process(tmp_path):
    """Only rank 0 looked at the run's lock: refused, it left, and the other srun process waited
    30 minutes for it in the process group. Every process now gets rank 0's verdict."""
    from regina_cli.io import run_lock

    data_dir = _srun_screen(tmp_path)
    with run_lock(tmp_path / "run"):  # another job trains this run
        results = _srun_tasks([_train_ae_command(data_dir, tmp_path / "run")] * 2)
    assert [code for code, _, _ in results] == [2, 2], results
    assert results[0][2].splitlines()[-1].startswith("error: ") and "is in use by another regina process" in results[0][2]
    assert results[1][2].splitlines()[-1].startswith("rank 1: error: ")


def test_an_srun_task_farm_is_refused_by_training_and_prints_elsewhere(tmp_path):
    """`srun -n 2` running two independent commands: two trainings of different runs joined one
    process group and waited in it forever (SIGTERM could not end them), and the second task's
    `regina split` printed nothing, its result included, under `--json` too."""
    data_dir = _srun_screen(tmp_path)
    results = _srun_tasks([_train_ae_command(data_dir, tmp_path / "run0"), _train_ae_command(data_dir, tmp_path / "run1")])
    assert [code for code, _, _ in results] == [2, 2], results
    assert all("processes of this launch were given different training commands" in err for _, _, err in results)
    assert not (tmp_path / "run0" / "ae" / "model.pt").exists() and not (tmp_path / "run1" / "ae" / "model.pt").exists()
    results = _srun_tasks([["--json", "split", "screen", "--seed", str(seed), "--data-dir", str(data_dir)]
                           for seed in (2, 3)])
    assert [code for code, _, _ in results] == [0, 0], results
    assert [json.loads(out)["split"] for _, out, _ in results] == ["simulation_2", "simulation_3"]


def test_gpus_above_one_refuses_a_node_without_a_gpu_or_more_processes_than_cores(monkeypatch):
    """`--gpus 4` with `--device auto` on a node without a GPU (a batch job that forgot to ask for
    one) must not quietly start 4 CPU processes, and `--device cpu` must not start more processes
    than the cores it may use: both fail before anything is spawned."""
    import pytest

    from regina_cli.engine import distributed
    from regina_cli.errors import ReginaError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "available_cpus", lambda: 4)
    distributed.check_process_count(1, "auto")
    distributed.check_process_count(4, "cpu")
    with pytest.raises(ReginaError, match="no CUDA GPU is visible; run on a GPU node, or add --device cpu"):
        distributed.check_process_count(4, "auto")
    with pytest.raises(ReginaError, match="would start 5 processes on 4 CPU cores; use at most --gpus 4"):
        distributed.check_process_count(5, "cpu")


def test_training_runs_on_the_threads_torch_starts_with():
    """numba's OpenMP layer (scanpy's) raised torch's threads in a notebook, so its training
    differed from the command's; training now runs on the count torch started the process with."""
    from regina_cli.devices import available_cpus

    if available_cpus() < 2:
        pytest.skip("one core: numba cannot raise torch's thread count")
    script = """
import numba, torch
from regina_cli.engine.distributed import run_distributed

@numba.njit(parallel=True)
def total(n):
    s = 0.0
    for i in numba.prange(n):
        s += i
    return s

total(1000)
raised = torch.get_num_threads()
print(raised, run_distributed(lambda ctx: torch.get_num_threads(), {}, gpus=1, device="cpu"), torch.get_num_threads())
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    raised, training, after = map(int, done.stdout.split())
    assert raised > 1, "numba did not raise torch's count here: the test shows nothing"
    assert (training, after) == (1, raised)


def test_training_never_raises_a_thread_count_lowered_on_purpose(monkeypatch):
    """A forked child that set torch to 1 thread (as DataLoader workers do: a forked OpenMP pool
    deadlocks) must train on 1, not on the count the process started with: the suite's kill tests
    hung in a fork once training set it back to 2."""
    from regina_cli import devices

    monkeypatch.setattr(devices, "start_threads", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with devices.torch_threads() as n:
            assert n == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
