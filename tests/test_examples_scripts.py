"""examples/pipeline.sh and the Slurm script: syntax, the commands they run, skipping, resuming.

Fast tests put stand-ins for `regina`, `srun`, `torchrun`, `scontrol` and `scancel` on PATH that
record how they are called, so the orchestration (order, options, skip/resume, the one- and
two-node launches, requeue on the time-limit signal) is checked in a second. The slow test runs
the real pipeline end to end on a tiny demo screen.
"""

from __future__ import annotations

import os
import sys
import signal
import subprocess
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "examples" / "pipeline.sh"
SBATCH = REPO / "examples" / "slurm" / "train_multi_gpu.sbatch"
STEPS = ["fetch", "split", "label", "train-ae", "train-gan", "predict", "evaluate"]

# Stand-in commands: each appends its name and arguments to $FAKE_LOG.
FAKES = {
    "regina": """
echo "regina $*" >> "$FAKE_LOG"
if [[ $1 == train-ae && -n ${FAKE_BLOCK:-} ]]; then  # a long training run; SIGTERM: save, exit
    trap 'kill $!; sleep 0.5; echo "train-ae saved a checkpoint" >> "$FAKE_LOG"; exit 143' TERM
    echo $$ >> "$FAKE_BLOCK"
    sleep 60 &
    wait
fi
""",
    "srun": """
echo "srun $*" >> "$FAKE_LOG"
[[ -n ${FAKE_BLOCK:-} ]] && echo $$ >> "$FAKE_BLOCK"  # a job step's processes
exec "$@"
""",
    "torchrun": 'echo "torchrun $*" >> "$FAKE_LOG"\n',
    "scontrol": """
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node-a\\nnode-b\\n'; exit; fi
echo "scontrol $*" >> "$FAKE_LOG"
""",
    "scancel": """
echo "scancel $*" >> "$FAKE_LOG"
[[ -n ${FAKE_BLOCK:-} && -s $FAKE_BLOCK ]] && kill -TERM $(cat "$FAKE_BLOCK")  # every step process
exit 0
""",
}


# Settings pipeline.sh and the sbatch script read from the environment.
SETTINGS = ("DATA_DIR", "RUNS_DIR", "RUN_DIR", "GPUS", "DEVICE", "SPLIT_MODE", "SEED", "LABELS",
            "CONFIG", "MAX_EPOCHS", "PREDICT_CELLS", "FETCH_FROM", "FETCH_ARGS", "TRAIN_LAUNCH")


def clean_environ() -> dict:
    """This process's environment without Slurm, REGINA or pipeline settings a user may have set."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "REGINA")) and k not in SETTINGS}


@pytest.fixture
def fake_env(tmp_path) -> dict:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    env = clean_environ()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.log"),
               DATA_DIR=str(tmp_path / "data"), RUNS_DIR=str(tmp_path / "runs"))
    return env


def calls(env: dict) -> list[str]:
    log = Path(env["FAKE_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def regina_steps(env: dict) -> list[str]:
    """The subcommand of every recorded regina/torchrun call, in order."""
    steps = []
    for line in calls(env):
        words = line.split()
        if words[0] == "regina":
            steps.append(words[1])
        elif words[0] == "torchrun":
            steps.append(words[words.index("--", words.index("regina_cli")) + 1])
    return steps


def run(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("script", [PIPELINE, SBATCH], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_sbatch_directives_come_before_the_first_command():
    """sbatch stops reading #SBATCH lines at the first command: a late one is silently ignored."""
    lines = SBATCH.read_text().splitlines()[1:]
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert not [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert any("--signal=B:USR1@" in line for line in directives)
    assert any("--requeue" in line for line in directives)


def test_pipeline_needs_a_dataset_name(fake_env):
    result = run(["bash", str(PIPELINE)], fake_env)
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_pipeline_runs_the_seven_commands_in_order(fake_env):
    result = run(["bash", str(PIPELINE), "demo"], {**fake_env, "GPUS": "2", "MAX_EPOCHS": "3"})
    assert result.returncode == 0, result.stderr
    assert regina_steps(fake_env) == STEPS
    log = "\n".join(calls(fake_env))
    train_ae = next(line for line in calls(fake_env) if line.startswith("regina train-ae"))
    assert f"--split simulation_1 --labels stress --run {fake_env['RUNS_DIR']}/demo" in train_ae
    assert "--config" not in train_ae  # train-ae picks the preset named like the dataset
    assert "--gpus 2" in train_ae and "--max-epochs 3" in train_ae
    assert "--resume" not in log
    assert f"regina evaluate demo --predictions {fake_env['RUNS_DIR']}/demo/predictions.h5ad" in log
    for n, step in enumerate(["fetch demo", "split demo", "label cells", "train phase 1"], start=1):
        assert f"==> [{n}/7] {step}" in result.stdout
    assert f"Results in {fake_env['RUNS_DIR']}/demo/eval/" in result.stdout


@pytest.mark.parametrize(
    ("name", "max_epochs", "expected"),
    [("demo", None, None), ("demo", "", None), ("demo", "4", "--max-epochs 4"),
     ("norman", None, None), ("norman", "7", "--max-epochs 7")],
)
def test_max_epochs_caps_both_phases_only_when_set(fake_env, name, max_epochs, expected):
    env = fake_env if max_epochs is None else {**fake_env, "MAX_EPOCHS": max_epochs}
    result = run(["bash", str(PIPELINE), name], env)
    assert result.returncode == 0, result.stderr
    train = [line for line in calls(env) if line.startswith("regina train-")]
    assert len(train) == 2
    for line in train:
        assert (expected in line) if expected else ("--max-epochs" not in line)


def test_pipeline_passes_a_config_file_to_phase_one(fake_env):
    config = REPO / "examples" / "configs" / "norman.yaml"
    result = run(["bash", str(PIPELINE), "norman"], {**fake_env, "CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert [line for line in calls(fake_env) if f"--config {config}" in line] == [
        line for line in calls(fake_env) if line.startswith("regina train-ae norman")]


def test_pipeline_skips_finished_steps_and_resumes_interrupted_training(fake_env):
    data, run_dir = Path(fake_env["DATA_DIR"]) / "demo", Path(fake_env["RUNS_DIR"]) / "demo"
    for done in ["perturb_processed.h5ad", "splits/simulation_1.json", "labels/stress@simulation_1.csv"]:
        (data / done).parent.mkdir(parents=True, exist_ok=True)
        (data / done).touch()
    (run_dir / "ae").mkdir(parents=True)
    (run_dir / "ae" / "last.pt").touch()  # phase 1 was interrupted: meta.json says "training"
    (run_dir / "ae" / "meta.json").write_text('{\n  "status": "training"\n}\n')
    result = run(["bash", str(PIPELINE), "demo"], fake_env)
    assert result.returncode == 0, result.stderr
    assert regina_steps(fake_env) == STEPS[3:]
    assert result.stdout.count("skipped:") == 3
    train_ae = next(line for line in calls(fake_env) if "train-ae" in line)
    assert train_ae.endswith("--resume")


def test_pipeline_checks_a_trained_phase_by_resuming_it(fake_env):
    """A trained phase was skipped on its meta.json alone, so SEED=2 (or other LABELS, CONFIG)
    reported the seed-1 run's results as seed 2's, exit 0. It now runs with --resume, which
    REGINA refuses for other settings and answers "nothing to resume" otherwise."""
    run_dir = Path(fake_env["RUNS_DIR"]) / "demo"
    (run_dir / "ae").mkdir(parents=True)
    (run_dir / "ae" / "model.pt").touch()
    (run_dir / "ae" / "last.pt").touch()
    (run_dir / "ae" / "meta.json").write_text('{\n  "status": "trained"\n}\n')
    result = run(["bash", str(PIPELINE), "demo"], fake_env)
    assert result.returncode == 0, result.stderr
    assert regina_steps(fake_env) == STEPS
    train_ae = next(line for line in calls(fake_env) if "train-ae" in line)
    assert train_ae.endswith("--resume")


def test_pipeline_predicts_and_evaluates_again_after_phase_2_moved_on(fake_env):
    """Predictions older than phase 2 (resumed with a higher MAX_EPOCHS) were kept, and so was
    their evaluation."""
    data, run_dir = Path(fake_env["DATA_DIR"]) / "demo", Path(fake_env["RUNS_DIR"]) / "demo"
    outputs = ["perturb_processed.h5ad", "splits/simulation_1.json", "labels/stress@simulation_1.csv"]
    for done in [data / o for o in outputs] + [run_dir / "predictions.h5ad", run_dir / "eval" / "metrics.json"]:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
    (run_dir / "gan").mkdir()
    (run_dir / "gan" / "meta.json").write_text('{\n  "status": "trained"\n}\n')  # newer than the predictions
    result = run(["bash", str(PIPELINE), "demo"], fake_env)
    assert result.returncode == 0, result.stderr
    assert regina_steps(fake_env) == STEPS[3:]


def test_pipeline_refuses_a_split_without_test_conditions_before_training(fake_env):
    result = run(["bash", str(PIPELINE), "demo"], {**fake_env, "SPLIT_MODE": "no_test"})
    assert result.returncode == 2 and "no test conditions" in result.stderr
    assert regina_steps(fake_env) == []


def test_pipeline_stops_at_the_first_failing_step(fake_env, tmp_path):
    failing = tmp_path / "failing-regina"
    failing.write_text('#!/usr/bin/env bash\necho "regina $*" >> "$FAKE_LOG"\n[[ $1 != label ]]\n')
    failing.chmod(0o755)
    result = run(["bash", str(PIPELINE), "demo"], {**fake_env, "REGINA": str(failing)})
    assert result.returncode != 0
    assert regina_steps(fake_env) == STEPS[:3]


def slurm_env(fake_env: dict, nodes: int) -> dict:
    return {**fake_env, "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "16",
            "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(REPO)}


def test_sbatch_one_node_trains_on_every_gpu_of_the_node(fake_env):
    env = slurm_env(fake_env, nodes=1)
    result = run(["bash", str(SBATCH), "demo"], env)
    assert result.returncode == 0, result.stderr
    assert calls(env)[0] == f"srun bash {PIPELINE} demo"
    assert regina_steps(env) == STEPS
    train = [line for line in calls(env) if "regina train-" in line]
    assert len(train) == 2 and all("--gpus 4" in line for line in train)


def test_sbatch_job_array_tasks_train_their_own_seed_in_their_own_run(fake_env):
    """`sbatch --array=1-3` ran three identical jobs on one run folder."""
    env = {**slurm_env(fake_env, nodes=1), "SLURM_ARRAY_TASK_ID": "3"}
    result = run(["bash", str(SBATCH), "demo"], env)
    assert result.returncode == 0, result.stderr
    log = "\n".join(calls(env))
    assert "regina split demo --mode simulation --seed 3" in log
    assert f"--run {Path(env['RUNS_DIR']) / 'demo_seed3'} " in log and "--split simulation_3" in log


def test_sbatch_two_nodes_launch_training_through_torchrun_rendezvous(fake_env):
    env = slurm_env(fake_env, nodes=2)
    result = run(["bash", str(SBATCH), "demo"], env)
    assert result.returncode == 0, result.stderr
    assert regina_steps(env) == STEPS
    launches = [line for line in calls(env) if line.startswith("srun")]
    assert len(launches) == 2  # the two training steps span both nodes; the rest runs once
    for launch in launches:
        assert launch.startswith(
            "srun torchrun --nnodes 2 --nproc_per_node 4 --rdzv_id 42 --rdzv_backend c10d "
            "--rdzv_endpoint node-a:29500 -m regina_cli -- train-"
        )
        assert "--gpus 1" in launch  # torchrun starts the processes, regina joins them
        # torchrun's own parser (not the fake) hands every regina option to regina: `--run` is no `--run-path`
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(launch.split()[2:])
        assert parsed.module and parsed.training_script == "regina_cli"
        assert parsed.training_script_args[0].startswith("train-") and "--run" in parsed.training_script_args


def test_sbatch_in_the_container_wraps_every_command(fake_env, tmp_path):
    apptainer = tmp_path / "fake-bin" / "apptainer"
    apptainer.write_text('#!/usr/bin/env bash\necho "apptainer $*" >> "$FAKE_LOG"\n')
    apptainer.chmod(0o755)
    env = {**slurm_env(fake_env, nodes=2), "REGINA_SIF": "/images/REGINA.sif"}
    result = run(["bash", str(SBATCH), "demo"], env)
    assert result.returncode == 0, result.stderr
    inside = [line for line in calls(env) if line.startswith("apptainer exec --nv /images/REGINA.sif ")]
    assert [line.split()[4] for line in inside] == ["regina"] * 3 + ["torchrun"] * 2 + ["regina"] * 2
    launches = [line for line in calls(env) if line.startswith("srun")]
    assert len(launches) == 2
    assert all(t.startswith("srun apptainer exec --nv /images/REGINA.sif torchrun ") for t in launches)


def test_sbatch_saves_and_requeues_when_the_time_limit_nears(fake_env, tmp_path):
    block = tmp_path / "training.pid"
    env = {**slurm_env(fake_env, nodes=1), "FAKE_BLOCK": str(block)}
    job = subprocess.Popen(["bash", str(SBATCH), "demo"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (block.exists() and len(block.read_text().split()) == 2):  # srun + regina
            assert time.monotonic() < deadline and job.poll() is None, "training never started"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what Slurm sends with --signal=B:USR1@120
        out, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143  # training stopped by SIGTERM
    assert "scancel --signal=TERM 42" in calls(env)
    # The pipeline waited for training to save before it exited, and nothing ran after it.
    assert calls(env)[-2:] == ["train-ae saved a checkpoint", "scontrol requeue 42"]
    assert regina_steps(env) == STEPS[:4]
    assert "requeueing" in out


# --- The real pipeline --------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_demo(tmp_path):
    env = clean_environ()
    # The `regina` of the interpreter running the tests, also when its venv is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DATA_DIR=str(tmp_path / "data"), RUNS_DIR=str(tmp_path / "runs"), DEVICE="cpu",
               MAX_EPOCHS="2", PREDICT_CELLS="20", FETCH_ARGS="--cells 600 --genes 200 --singles 10 --doubles 6")
    first = subprocess.run(["bash", str(PIPELINE), "demo"], env=env, capture_output=True,
                           text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo"
    for output in ["ae/model.pt", "gan/model.pt", "predictions.h5ad", "eval/metrics.json",
                   "eval/per_condition.csv"]:
        assert (run_dir / output).is_file(), output
    again = subprocess.run(["bash", str(PIPELINE), "demo"], env=env, capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped:") == 5 and " ".join(again.stderr.split()).count("nothing to resume") == 2
    other_seed = subprocess.run(["bash", str(PIPELINE), "demo"], env={**env, "SEED": "2"}, capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)
    assert other_seed.returncode == 2 and "was trained with --split simulation_1, not simulation_2" in other_seed.stderr
