"""Peak memory and wall time of each pipeline step at Norman's and Replogle K562 essential's scale.

    python benchmarks/memory.py --shape norman       # 91,205 cells x 5,045 genes
    python benchmarks/memory.py --shape replogle     # 310,385 cells x 8,563 genes, 2,057 perturbations
    python benchmarks/memory.py --quick --out x.json # tiny: checks the script (the tests run this)

A synthetic screen of the shape (raw counts, ~10% non-zero, each perturbation knocking down its
targets; CSR written to an h5ad chunk by chunk, never dense) goes through `fetch --from`, `split`,
`label`, `train-ae` and `train-gan` (1 epoch each), `predict` and `evaluate` on the CPU, each
`regina` command in a process of its own (benchmarks/measured_step.py): peak resident memory (the
kernel's high-water mark, as `/usr/bin/time -v` reports it), peak GPU memory when a step used a GPU,
wall time and the load average around it. Training uses the demo preset's small network at batch
512, so one CPU epoch takes minutes: the data path (reading, streaming, statistics, files) is what
is measured, and `runtime.device_data` stays `auto` (the ae row says whether it kept the matrix
dense or streamed it). A step whose resident memory passes --kill-gib is killed, since the machine
is shared, and reported as over the limit. Results: a table, and benchmarks/results/memory_<shape>.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

NAME = "screen"
SPLIT = "simulation_1"
STEPS = ("fetch", "split", "label", "train-ae", "train-gan", "predict", "evaluate")
STRESS_GENES = 24  # genes named HSP..., so `regina label --method stress` has markers
KNOCKDOWN = 0.2  # a targeted gene keeps this share of its expressed cells


@dataclass(frozen=True)
class Screen:
    cells: int
    genes: int
    singles: int
    doubles: int
    controls: int
    density: float = 0.1


SHAPES = {
    "norman": Screen(cells=91_205, genes=5_045, singles=105, doubles=131, controls=7_353),
    "replogle": Screen(cells=310_385, genes=8_563, singles=2_057, doubles=0, controls=10_691),
    "quick": Screen(cells=3_000, genes=300, singles=24, doubles=12, controls=400),
}


def write_screen(path: Path, screen: Screen, seed: int = 0, chunk: int = 4096) -> None:
    """Raw counts as a CSR h5ad, appended chunk by chunk (memory: one dense chunk at a time)."""
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    genes = [f"G{i:05d}" for i in range(screen.genes)]
    genes[screen.singles: screen.singles + STRESS_GENES] = [f"HSPX{i:02d}" for i in range(STRESS_GENES)]
    pairs = list(itertools.combinations(range(screen.singles), 2))
    chosen = [pairs[i] for i in rng.choice(len(pairs), screen.doubles, replace=False)] if screen.doubles else []
    targets = [(i, -1) for i in range(screen.singles)] + chosen
    labels = [f"{genes[a]}+ctrl" if b < 0 else f"{genes[a]}+{genes[b]}" for a, b in targets]
    codes = np.concatenate([np.full(screen.controls, -1), rng.integers(len(labels), size=screen.cells - screen.controls)])
    rng.shuffle(codes)  # controls interleave with perturbed cells, as in a real screen
    target_idx = np.array(targets + [(-1, -1)])[codes]  # code -1 picks the last row: no target
    condition = np.where(codes < 0, "ctrl", np.array(labels, dtype=object)[np.maximum(codes, 0)])
    obs = pd.DataFrame({"condition": condition, "cell_type": "K562"}, index=[f"cell{i}" for i in range(screen.cells)])
    ad.AnnData(obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    rate = np.clip(rng.gamma(0.5, 2 * screen.density, screen.genes), 0, 0.9).astype(np.float32)
    with h5py.File(path, "a") as handle:
        for start in range(0, screen.cells, chunk):
            expressed = rng.random((min(chunk, screen.cells - start), screen.genes), dtype=np.float32) < rate
            for column in range(2):
                rows = np.flatnonzero(target_idx[start: start + len(expressed), column] >= 0)
                cols = target_idx[start + rows, column]
                expressed[rows, cols] &= rng.random(len(rows)) < KNOCKDOWN
            block = sp.csr_matrix(expressed, dtype=np.float32)
            block.data = rng.geometric(0.4, block.nnz).astype(np.float32)
            if start == 0:
                write_elem(handle, "X", block)
            else:
                sparse_dataset(handle["X"]).append(block)


def commands(source: Path, data: Path, run: Path) -> dict[str, list]:
    train = ["--device", "cpu", "--max-epochs", "1", "--batch-size", "512", "--data-dir", data]
    return {
        "fetch": ["fetch", NAME, "--from", source, "--data-dir", data],
        "split": ["split", NAME, "--mode", "simulation", "--seed", "1", "--data-dir", data],
        "label": ["label", NAME, "--method", "stress", "--split", SPLIT, "--data-dir", data],
        "train-ae": ["train-ae", NAME, "--split", SPLIT, "--labels", "stress", "--run", run, "--preset", "demo",
                     "--set", "ae.min_epochs=0", *train],
        "train-gan": ["train-gan", "--run", run, *train],
        "predict": ["predict", "--run", run, "--device", "cpu", "--data-dir", data],
        "evaluate": ["evaluate", NAME, "--predictions", run / "predictions.h5ad", "--out", run / "eval",
                     "--device", "cpu", "--data-dir", data],
    }


def note_for(step: str, run: Path) -> str:
    """What a row should say besides its numbers (the data policy training chose)."""
    meta = run / "ae" / "meta.json"
    if step == "train-ae" and meta.is_file():
        dense = json.loads(meta.read_text()).get("dense_on_device")
        return "matrix kept dense in memory" if dense else "streamed from the h5ad (runtime.device_data auto)"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "quick"], default="norman")
    parser.add_argument("--quick", action="store_true", help="a tiny screen (checks the script)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} "
                        "(later steps need the files of earlier ones: use with --keep)")
    parser.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder, removed)")
    parser.add_argument("--limit-gib", type=float, default=16.0, help="what a step must stay within")
    parser.add_argument("--kill-gib", type=float, default=17.5, help="kill a step past this resident memory")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds a step may take")
    parser.add_argument("--out", type=Path, help="JSON (default: benchmarks/results/memory_<shape>.json)")
    args = parser.parse_args()

    from measured_step import run_step

    shape = "quick" if args.quick else args.shape
    screen = SHAPES[shape]
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="regina-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    source, data, run = work / "source.h5ad", work / "data", work / "run"
    results = {"shape": shape, "screen": asdict(screen), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(["python benchmarks/memory.py", *sys.argv[1:]]), "cpu_count": os.cpu_count(),
               "threads": os.environ.get("OMP_NUM_THREADS", "default"), "limit_gib": args.limit_gib, "steps": []}
    print(f"{shape}: {screen.cells:,} cells x {screen.genes:,} genes, {screen.singles} singles + {screen.doubles} "
          f"doubles, {screen.controls:,} controls, {screen.density:.0%} non-zero; work folder {work}", flush=True)
    if not source.is_file():
        write_screen(source, screen)
        print(f"source written: {source.stat().st_size / 2**30:.2f} GiB", flush=True)
    try:
        for step, command in commands(source, data, run).items():
            if step not in args.steps.split(","):
                continue
            before = os.getloadavg()[0]
            report = run_step(work / f"{step}.json", ["--quiet", *command], timeout_s=args.timeout,
                              kill_gib=args.kill_gib, log=work / f"{step}.log")
            ok = report["exit_code"] == 0 and report["peak_rss_gib"] <= args.limit_gib
            row = {"step": step, "ok": ok, "exit_code": report["exit_code"], "killed": report["killed"],
                   "peak_rss_gib": report["peak_rss_gib"], "peak_gpu_gib": report["peak_gpu_gib"],
                   "wall_s": report["wall_s"], "load_before": before, "load_after": os.getloadavg()[0],
                   "note": report["killed"] or note_for(step, run)}
            if report["exit_code"] != 0:
                row["log_tail"] = (work / f"{step}.log").read_text()[-2000:]
            results["steps"].append(row)
            print(f"{step:<10} {'ok' if ok else 'FAILED':<7} peak RSS {row['peak_rss_gib']:6.2f} GiB  "
                  f"{row['wall_s']:8.1f} s  load {before:.1f}->{row['load_after']:.1f}  {row['note']}", flush=True)
            if report["exit_code"] != 0:
                print(row["log_tail"], flush=True)
                break
    finally:
        out = args.out or ROOT / "benchmarks" / "results" / f"memory_{shape}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"written: {out}")
    sys.exit(0 if results["steps"] and all(r["ok"] for r in results["steps"]) else 1)


if __name__ == "__main__":
    main()
