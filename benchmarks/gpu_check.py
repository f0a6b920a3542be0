"""REGINA's GPU paths run and measured by one command, in under 9 minutes on one NVIDIA GPU.

    python benchmarks/gpu_check.py                          # --device cuda: writes results/gpu_<card>.json
    python benchmarks/gpu_check.py --device cpu --quick     # tiny shapes, under a minute (run by the tests)
    python benchmarks/gpu_check.py --parts evaluate         # one part again (its own budget)

Four parts, each in a process of its own with its own time budget: what a part has not reached
when its budget runs out is skipped and listed, a failed part is recorded and the next one runs,
so one call always finishes.

  pipeline    the real CLI on the demo: fetch, split, label, then train-ae and train-gan (2 epochs
              each, --set runtime.amp=bf16 --set runtime.compile=true), predict and evaluate on
              --device, and the same four commands again on the CPU (same data, same seeds; not with
              --device cpu); REGINA's
              test pearson_delta of both runs (metrics.json) must agree within 0.05
  torchrun    `torchrun --standalone --nproc-per-node=1 ... train-ae --gpus 1`: the process must
              join a process group of one (NCCL on a GPU, gloo on the CPU)
  throughput  phase-1 and phase-2 training cells/s at Norman's shape (91,205 x 5,045), norman
              preset, bf16, batches 8,192 / 2,048 / 512, eager and compiled, timed after warm-up
              with the device synchronised (train_throughput.measure, data built once)
  evaluate    the whole `regina evaluate` command at Norman's shape (100 test conditions x 100
              predicted cells x 5,045 genes, every metric, the 4 baselines, the report)

Each row records its wall time and peak GPU memory (torch's allocator, reset per row), each
part its peak resident memory. One table is printed; the JSON holds every row. Exit status 1
when a part failed. Target beside the measurements: >= 40,000 training cells/s in each phase.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # also without `pip install -e .` (GPU machine)

TARGET_CELLS_PER_S = 40_000
METRIC_TOLERANCE = 0.05
# Sized from the first H200 run (benchmarks/results/gpu_NVIDIA_H200.md): the pipeline took 169 s
# (torch.compile on the demo about a minute of it), evaluate 34 s; throughput needs about 40 s for
# the data, 45 s for the three eager sizes and 60 s for the first compiled one.
TOTAL_S = 510  # all parts, under 9 minutes with the start-ups
BUDGETS_S = {"pipeline": 190, "torchrun": 40, "throughput": 220, "evaluate": 60}
SPLIT = "simulation_1"


@dataclass(frozen=True)
class Sizes:
    demo: list[str]  # `regina fetch demo` size options
    cells: int  # throughput data
    genes: int
    batches: tuple[int, ...]
    preset: str
    timed_cells: int  # cells per timed window (at least 2 steps)
    warmup: int
    evaluate: dict = field(default_factory=dict)  # evaluate_speed's shape arguments


FULL = Sizes(demo=[], cells=91_205, genes=5_045, batches=(8192, 2048, 512), preset="norman", timed_cells=65_536,
             warmup=5, evaluate=dict(genes=5045, conditions=100, cells=100, true_cells=300, train_conditions=40,
                                     controls=7353))
QUICK = Sizes(demo=["--cells", "600", "--genes", "200", "--singles", "12", "--doubles", "10"], cells=1024,
              genes=256, batches=(64, 32), preset="demo", timed_cells=128, warmup=1,
              evaluate=dict(genes=200, conditions=6, cells=20, true_cells=30, train_conditions=6, controls=200))


# --- Inside a part's process -------------------------------------------------------------------------
class Part:
    """A part's rows, saved after each one, so a part killed at its budget keeps what it measured."""

    def __init__(self, state: Path, budget_s: float, device):
        self.state, self.deadline, self.device = state, time.monotonic() + budget_s, device
        self.record = {"rows": [], "skipped": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def begin(self, item: str) -> None:
        """Name the item now running, so a part killed at its budget says what it was doing."""
        self.record["in_flight"] = item
        self.save()

    def add(self, item: str, ok: bool, result: str, **measured) -> None:
        self.record["rows"].append({"item": item, "ok": bool(ok), "result": result, **measured})
        self.record.pop("in_flight", None)
        self.save()

    def skip(self, item: str) -> None:
        self.record["skipped"].append(item)
        self.save()

    def save(self) -> None:
        import resource

        self.record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, self.state)

    def command(self, item: str, args: list) -> bool:
        """`regina ARGS` in this process (typer's CliRunner); one row: exit status, time, GPU memory."""
        from typer.testing import CliRunner

        from regina_cli.cli import app
        from train_throughput import peak_gib, reset_peak

        self.begin(item)
        reset_peak(self.device)
        started = time.perf_counter()
        result = CliRunner().invoke(app, ["--quiet", *map(str, args)])
        wall = time.perf_counter() - started
        failure = result.output + ("".join(traceback.format_exception(*result.exc_info))
                                   if result.exc_info and result.exit_code not in (0, 2) else "")
        self.add(item, result.exit_code == 0, f"exit {result.exit_code}" + (
            "" if result.exit_code == 0 else ": " + failure[-1500:]), wall_s=wall, peak_gpu_gib=peak_gib(self.device))
        return result.exit_code == 0


def prepare_demo(part: Part, data: Path, sizes: Sizes, *, again: bool = True) -> bool:
    """fetch, split and label the demo into `data` (skipped when `again` is False and it is there)."""
    from regina_cli import keys

    if not again and keys.labels_file("demo", "stress", data).is_file():
        return True
    steps = [("fetch", ["fetch", "demo", *sizes.demo]), ("split", ["split", "demo", "--mode", "simulation", "--seed", "1"]),
             ("label", ["label", "demo", "--method", "stress", "--split", SPLIT])]
    return all(part.command(name, [*args, "--data-dir", data]) for name, args in steps)


def fresh(run: Path) -> Path:
    """`run` emptied: a scratch run left by an earlier check would be refused as already trained."""
    shutil.rmtree(run, ignore_errors=True)
    return run


def pipeline(part: Part, args, sizes: Sizes) -> None:
    data = args.work / "data"
    if not prepare_demo(part, data, sizes):
        return
    deltas = {}
    runs = [(args.device, args.device)] + ([("cpu reference", "cpu")] if part.device.type != "cpu" else [])
    for label, device in runs:
        run = fresh(args.work / "runs" / label.replace(" ", "_"))
        train = ["--device", device, "--max-epochs", "2", "--set", "runtime.amp=bf16", "--set",
                 "runtime.compile=true", "--data-dir", data]
        steps = [("train-ae", ["train-ae", "demo", "--split", SPLIT, "--labels", "stress", "--run", run, *train]),
                 ("train-gan", ["train-gan", "--run", run, *train]),
                 ("predict", ["predict", "--run", run, "--device", device, "--data-dir", data]),
                 ("evaluate", ["evaluate", "demo", "--predictions", run / "predictions.h5ad", "--out", run / "eval",
                               "--device", device, "--data-dir", data])]
        for number, (name, command) in enumerate(steps):
            if part.left() <= 0:
                part.skip(f"{label}: {', '.join(n for n, _ in steps[number:])} (part out of time)")
                break
            if not part.command(f"{label} {name}", command):
                break
        else:
            metrics = json.loads((run / "eval" / "metrics.json").read_text())
            deltas[label] = metrics["results"]["regina"]["overall"]["pearson_delta"]
    if len(deltas) == 2:
        (a, x), (b, y) = deltas.items()
        part.add("pearson_delta, device vs CPU", abs(x - y) <= METRIC_TOLERANCE,
                 f"{a} {x:.4f} vs {b} {y:.4f}: |diff| {abs(x - y):.4f} (<= {METRIC_TOLERANCE} wanted)",
                 pearson_delta=deltas)
    elif len(deltas) == len(runs):  # --device cpu: the run is its own reference
        part.add("pearson_delta", True, f"{args.device} {deltas[args.device]:.4f} (no GPU run to compare)",
                 pearson_delta=deltas)


def torchrun(part: Part, args, sizes: Sizes) -> None:
    from measured_step import run_step

    data = args.work / "data"
    if not prepare_demo(part, data, sizes, again=False):
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    command = ["--quiet", "train-ae", "demo", "--split", SPLIT, "--labels", "stress", "--run",
               fresh(args.work / "runs" / "torchrun"), "--max-epochs", "2", "--gpus", "1", "--device", args.device,
               "--set", "runtime.amp=bf16", "--data-dir", data]
    log = args.work / "torchrun.log"
    report = run_step(args.work / "torchrun_step.json", command, launcher=launcher, timeout_s=part.left(), log=log)
    wanted = "nccl" if part.device.type == "cuda" else "gloo"
    ok = report["exit_code"] == 0 and report["backend"] == wanted
    detail = (f"exit {report['exit_code']}, backend {report['backend']} ({wanted} wanted), world size "
              f"{report.get('world_size')}" + (f"; {report['killed']}" if report["killed"] else ""))
    part.add("torchrun --nproc-per-node=1 train-ae --gpus 1", ok,
             detail if ok else f"{detail}: {log.read_text()[-1500:]}", wall_s=report["wall_s"],
             peak_gpu_gib=report["peak_gpu_gib"], peak_rss_gib=report["peak_rss_gib"])


def throughput(part: Part, args, sizes: Sizes) -> None:
    import torch

    from train_throughput import measure, synthetic_screen

    started = time.perf_counter()
    data = synthetic_screen(sizes.cells, sizes.genes)
    part.add("synthetic data", True, f"{sizes.cells:,} cells x {sizes.genes:,} genes, dense float32",
             wall_s=time.perf_counter() - started)
    # Eager at every size first: compiling takes about a minute a size, and what it gains is the
    # smaller question.
    for compiled in (False, True):
        for batch in sizes.batches:
            item = f"batch {batch:,} bf16 {'compiled' if compiled else 'eager'}"
            if part.left() <= 0:
                part.skip(f"{item} (part out of time)")
                continue
            part.begin(item)
            started = time.perf_counter()
            try:
                result = measure(part.device, cells_n=sizes.cells, genes_n=sizes.genes, batch=batch,
                                 steps=max(2, sizes.timed_cells // batch), warmup=sizes.warmup, preset=sizes.preset,
                                 amp="bf16", compile_=compiled, data=data)
            except Exception as exc:  # one size failing (out of memory, a compile error): the next runs
                part.add(item, False, f"{type(exc).__name__}: {exc}"[:1500], wall_s=time.perf_counter() - started)
                if part.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            ae, gan = result["ae"]["cells_per_s"], result["gan"]["cells_per_s"]
            peaks = [r["peak_gib"] for r in result.values() if r["peak_gib"] is not None]
            part.add(item, True, f"phase 1 {ae:,.0f}, phase 2 {gan:,.0f} cells/s (>= {TARGET_CELLS_PER_S:,} "
                     f"wanted: {'met' if min(ae, gan) >= TARGET_CELLS_PER_S else 'not met'})",
                     wall_s=time.perf_counter() - started, peak_gpu_gib=max(peaks) if peaks else None,
                     ae_cells_per_s=ae, gan_cells_per_s=gan, batch=batch, compiled=compiled)


def evaluate(part: Part, args, sizes: Sizes) -> None:
    from evaluate_vs_celleval import write_inputs

    folder = args.work / "evaluate"
    shape = argparse.Namespace(**sizes.evaluate)
    started = time.perf_counter()
    _, predictions, _ = write_inputs(folder, shape)
    part.add("synthetic test set", True, f"{shape.conditions} conditions x {shape.cells} predicted cells x "
             f"{shape.genes:,} genes", wall_s=time.perf_counter() - started)
    part.command("regina evaluate (whole command)", [
        "evaluate", "bench", "--data-dir", folder / "data", "--predictions", predictions, "--out", folder / "out",
        "--model-name", "model", "--device", args.device])


PARTS = {"pipeline": pipeline, "torchrun": torchrun, "throughput": throughput, "evaluate": evaluate}


def run_part(args) -> None:
    import torch

    from regina_cli.devices import resolve_device

    sizes = QUICK if args.quick else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    part = Part(args.state, args.budget, device)
    part.record["machine"] = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    part.save()
    PARTS[args.part](part, args, sizes)


# --- The whole check ---------------------------------------------------------------------------------

def status_of(part: dict, code: int, killed: str | None) -> str:
    if any(not row["ok"] for row in part["rows"]) or (code != 0 and not killed):
        return "failed"
    return "stopped at its budget" if killed or part["skipped"] else "ok"


def run_all(args) -> dict:
    """Every part in its own process (no torch here: the parts say what machine they ran on)."""
    from measured_step import run_limited

    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]]), "device": args.device,
               "quick": args.quick, "load_average_before": os.getloadavg(),
               "targets": {"cells_per_s_each_phase": TARGET_CELLS_PER_S, "pearson_delta_tolerance": METRIC_TOLERANCE,
                           "total_s": TOTAL_S}, "parts": {}}
    deadline = time.monotonic() + TOTAL_S
    for name in args.parts:
        budget = min(BUDGETS_S[name], deadline - time.monotonic())
        if budget < 5:
            results["parts"][name] = {"status": "skipped: no time left", "rows": [], "skipped": [name]}
            continue
        state = args.work / f"{name}.json"
        command = [sys.executable, __file__, "--part", name, "--state", state, "--budget", f"{budget:.0f}",
                   "--device", args.device, "--work", args.work, *(["--quick"] if args.quick else [])]
        started = time.perf_counter()
        log = args.work / f"{name}.log"
        code, killed, _ = run_limited([str(c) for c in command], timeout_s=budget, log=log)
        part = json.loads(state.read_text()) if state.is_file() else {"rows": [], "skipped": []}
        if killed and "in_flight" in part:
            part["skipped"].append(f"{part.pop('in_flight')} (stopped while running: {killed})")
        part.update(budget_s=round(budget), wall_s=time.perf_counter() - started, exit_code=code, killed=killed)
        part["status"] = status_of(part, code, killed)
        if code != 0 and not killed:
            part["error"] = log.read_text()[-3000:]
        results["parts"][name] = part
        print(f"{name}: {part['status']} ({part['wall_s']:.0f} s of {budget:.0f})", flush=True)
    machines = [p["machine"] for p in results["parts"].values() if "machine" in p]
    results.update(machines[0] if machines else {"card": "unknown (no part started)"})
    results["load_average_after"] = os.getloadavg()
    return results


def print_table(results: dict) -> None:
    print(f"\nREGINA GPU check on {results['card']} ({results['date']}; torch {results.get('torch')}, CUDA "
          f"{results.get('cuda')}; load average {results['load_average_before'][0]:.1f})"
          f"{' --quick' if results['quick'] else ''}")
    print(f"{'part':<11}{'item':<38}{'ok':<5}{'wall s':>8}{'GPU GiB':>9}  result")
    for name, part in results["parts"].items():
        memory = f"; peak resident {part['peak_rss_gib']:.1f} GiB" if part.get("peak_rss_gib") else ""
        print(f"{name:<11}{'[' + part['status'] + ']':<38}{'':<5}{part.get('wall_s', 0):>8.1f}{'':>9}  "
              f"budget {part.get('budget_s', 0)} s{memory}")
        for row in part["rows"]:
            gpu = f"{row['peak_gpu_gib']:.2f}" if row.get("peak_gpu_gib") is not None else "-"
            result = row["result"].splitlines()[0][:120] if row["result"] else ""
            print(f"{'':<11}{row['item'][:37]:<38}{'yes' if row['ok'] else 'NO':<5}{row.get('wall_s', 0):>8.1f}"
                  f"{gpu:>9}  {result}")
        for item in part["skipped"]:
            print(f"{'':<11}{'skipped: ' + item}")
        if "error" in part:
            print(f"{'':<11}error: {part['error'].strip().splitlines()[-1][:150] if part['error'].strip() else '?'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and the demo preset: checks the "
                        "script itself in under a minute, measures nothing worth reporting")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/gpu_<card>.json)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="run only these parts, in this order (default: all four)")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in its own process
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        run_part(args)
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="regina-gpu-check-"))
    args.work.mkdir(parents=True, exist_ok=True)
    results = run_all(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', results['card'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print_table(results)
    print(f"\nwritten: {out}; scratch files: {args.work}")
    sys.exit(1 if any(p["status"] == "failed" for p in results["parts"].values()) else 0)


if __name__ == "__main__":
    main()
