"""Run cell-eval's own MetricsEvaluator on a predicted and a real .h5ad; runs in cell-eval's venv.

    .venv-celleval/bin/python benchmarks/celleval_runner.py REAL PRED OUTDIR [--profile full] [--threads N]
        [--skip-de] [--skip metric,metric]

cell-eval (PyPI `cell-eval`, through pdex) needs scipy >= 1.17, which cannot sit next to REGINA's
scipy < 1.15 pin (cell-gears), so it lives in its own environment (`make celleval`) and this script
is the only thing run there. It writes OUTDIR/results.csv (one row per perturbation, cell-eval's
column names) and OUTDIR/timing.json (seconds for reading the files and for the metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_python() -> str | None:
    """An interpreter that imports cell_eval: $REGINA_CELLEVAL_PYTHON, else .venv-celleval's; or None."""
    candidate = os.environ.get("REGINA_CELLEVAL_PYTHON") or str(ROOT / ".venv-celleval" / "bin" / "python")
    if not Path(candidate).is_file():
        return None
    probe = subprocess.run([candidate, "-c", "import cell_eval"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real")
    parser.add_argument("pred")
    parser.add_argument("outdir")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--control", default="ctrl")
    parser.add_argument("--pert-col", default="condition")
    parser.add_argument("--threads", type=int, default=-1)
    parser.add_argument("--skip-de", action="store_true", help="no differential expression (anndata profile only)")
    parser.add_argument("--skip", default="", help="comma-separated metrics to leave out")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import anndata as ad
    from cell_eval import MetricsEvaluator

    real, pred = ad.read_h5ad(args.real), ad.read_h5ad(args.pred)
    t1 = time.perf_counter()
    out = Path(args.outdir)
    evaluator = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=args.control, pert_col=args.pert_col,
                                 num_threads=args.threads, outdir=str(out / "cell-eval"), skip_de=args.skip_de)
    skip = [m for m in args.skip.split(",") if m]
    results, _ = evaluator.compute(profile=args.profile, skip_metrics=skip or None, write_csv=False)
    t2 = time.perf_counter()
    results.write_csv(out / "results.csv")
    (out / "timing.json").write_text(json.dumps({"import_and_read_s": t1 - t0, "metrics_s": t2 - t1,
                                                 "total_s": t2 - t0, "profile": args.profile}))


if __name__ == "__main__":
    main()
