"""One `regina` command in a process of its own, and what it cost: the unit of the benchmarks.

    python benchmarks/measured_step.py REPORT.json -- fetch demo
    torchrun --standalone --nproc-per-node=1 benchmarks/measured_step.py REPORT.json -- train-ae ... --gpus 1

Runs the command exactly as `regina` would, in this process, and writes REPORT.json at exit (so a
command that ends in sys.exit is measured too): exit status, wall seconds, this process's peak
resident memory (the kernel's high-water mark, what `/usr/bin/time -v` prints), torch's peak GPU
memory, and the backend torch.distributed was initialised with (None: no process group joined).
`run_step` starts such a process from a benchmark, with a time limit and a memory guard.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # regina_cli also without `pip install -e .`
POLL_S = 0.2


def _spy_on_process_group(record: dict) -> None:
    """Record the backend `regina_cli.engine.distributed.setup` initialises (torchrun launches only)."""
    import torch.distributed as dist

    original = dist.init_process_group

    def init_process_group(*args, **kwargs):
        record["backend"] = kwargs.get("backend", args[0] if args else None)
        record["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        return original(*args, **kwargs)

    dist.init_process_group = init_process_group


def _write_report(path: Path, record: dict, started: float) -> None:
    record["wall_s"] = time.perf_counter() - started
    record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    torch = sys.modules.get("torch")  # imported by the command, or not at all (no GPU then)
    gpu = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    record["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):  # `--help` was taken for REPORT and written at exit
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    report, args = Path(sys.argv[1]), sys.argv[2:]
    args = args[1:] if args[:1] == ["--"] else args
    record = {"command": args, "exit_code": 1, "backend": None}
    started = time.perf_counter()
    atexit.register(_write_report, report, record, started)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _spy_on_process_group(record)
    from regina_cli.cli import app

    try:
        app(args=args, prog_name="regina")
        record["exit_code"] = 0
    except SystemExit as exc:
        record["exit_code"] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise


def _rss_gib(pid: int) -> float:
    """Current resident memory of process `pid` (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_limited(command: list[str], *, timeout_s: float, kill_gib: float | None = None,
                log: Path | None = None) -> tuple[int, str | None, float]:
    """Run `command` in a session of its own: (exit status, why it was killed or None, largest
    resident memory seen in GiB). Past `timeout_s`, or once its resident memory passes `kill_gib`
    (checked every 0.2 s, so a step that would exhaust a shared machine fails instead), the whole
    session is killed (a launcher's workers too). Output goes to `log`, else is discarded."""
    out = open(log, "w") if log else subprocess.DEVNULL
    started, seen, killed = time.perf_counter(), 0.0, None
    try:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while process.poll() is None:
            seen = max(seen, _rss_gib(process.pid))
            if kill_gib is not None and seen > kill_gib:
                killed = f"resident memory passed {kill_gib:g} GiB"
            elif time.perf_counter() - started > timeout_s:
                killed = f"still running after {timeout_s:.0f} s"
            if killed:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(POLL_S)
    finally:
        if log:
            out.close()
    return process.returncode, killed, seen


def run_step(report: Path, args: list[str], *, launcher: list[str] = (), timeout_s: float = 3600,
             kill_gib: float | None = None, log: Path | None = None) -> dict:
    """Run `regina ARGS` through this file (after `launcher`, e.g. torchrun) under `run_limited`
    and return its report; a killed step's report says why (`killed`) and the largest resident
    memory seen (of the process started: a launcher's, not its workers')."""
    report.unlink(missing_ok=True)
    command = [*(launcher or [sys.executable]), str(HERE), str(report), "--", *map(str, args)]
    started = time.perf_counter()
    code, killed, seen = run_limited(command, timeout_s=timeout_s, kill_gib=kill_gib, log=log)
    record = json.loads(report.read_text()) if report.is_file() else {"exit_code": code, "backend": None}
    record.setdefault("wall_s", time.perf_counter() - started)
    record.setdefault("peak_rss_gib", seen)
    record.setdefault("peak_gpu_gib", None)
    record["killed"] = killed
    return record


if __name__ == "__main__":
    main()
