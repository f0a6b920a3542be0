"""Global flags anywhere, JSON errors for scripts, flags that are flags, tables that fit batch logs."""

from __future__ import annotations

import json
import signal
import os
import subprocess
import sys

import pytest
from rich.console import Console

from cli_helpers import invoke
from regina_cli.cli.app import hoist_global_flags
from regina_cli.cli.common import set_output_mode

COMMANDS = ["fetch", "split", "label", "train-ae", "train-gan", "predict", "evaluate", "info"]


def test_global_flags_work_after_the_command():
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    assert "python" in json.loads(result.stdout)
    quiet = invoke("info", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""
    assert hoist_global_flags(["evaluate", "x", "--quiet", "--", "--json"]) == ["--quiet", "evaluate", "x", "--", "--json"]


def test_user_errors_in_json_mode_are_one_json_object(tmp_path):
    result = invoke("evaluate", "nope", "--predictions", tmp_path / "p.h5ad", "--data-dir", tmp_path, "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": json.loads(result.stdout)["error"], "exit_code": 2}
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_usage_errors_are_one_line_and_json_too():
    result = invoke("--json", "evaluate", "demo")  # --predictions missing
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and "--predictions" in error["error"]
    assert result.stderr.startswith("error:") and "Traceback" not in result.output
    plain = invoke("evaluate", "demo")
    assert plain.exit_code == 2 and plain.stdout == "" and plain.stderr.startswith("error:")


def test_boolean_options_are_flags():
    result = invoke("train-ae", "demo", "--split", "simulation_1", "--labels", "stress", "--resume", "true")
    assert result.exit_code == 2 and "true" in result.stderr
    for command in COMMANDS:
        page = invoke(command, "--help")
        assert page.exit_code == 0 and "<bool>" not in page.output, command
    assert "--plots / --no-plots" in invoke("evaluate", "--help").output
    assert "<bool>" not in invoke("--help").output


def test_evaluation_tables_fit_80_columns_without_cutting():
    from regina_cli.evaluate.metrics import METRICS
    from regina_cli.evaluate.report import HEADLINE, summary_tables

    models = ["regina_with_a_long_name", "gears", "scgpt"]
    baselines = ["no_change", "train_mean", "additive", "linear", "reconstruction"]
    results = {n: {"overall": {"n_conditions": 12, **{m: -0.000123456 for m in METRICS}},
                   "combo_seen2": {"n_conditions": 3, "pearson_delta": 0.5, "mse_top20_de": 1.5},
                   "by_prompt_source": {"measured": {"n_conditions": 7, "pearson_delta": 0.4}}}
               for n in models + baselines}
    entry = {"n_conditions": 12, "metrics": {m: {"model": 1.0, "baseline": 2.0, "model_better": i <= len(HEADLINE) // 2,
                                                 "tie": False} for i, m in enumerate(HEADLINE)}}
    summary = {"models": [{"name": n} for n in models], "baselines": baselines, "results": results,
               "comparison": {n: {b: entry for b in baselines} for n in models}, "dataset": "norman",
               "split": "simulation_1", "on": "test", "n_genes_scored": 5045, "n_genes_dataset": 5045}
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    for table in summary_tables(summary):
        console.print(table)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for name in models + baselines + list(HEADLINE):
        assert name in text
    assert f"{models[0]} wins" in text and f"{len(HEADLINE) // 2 + 1}/{len(HEADLINE)}" in text
    set_output_mode(quiet=False, json_output=False)


def test_an_interrupted_command_still_prints_its_one_json_document(capsys):
    """Training reports an interruption as an error document; predict and evaluate did not."""
    import typer

    from regina_cli.cli.common import user_errors
    from regina_cli.io import Terminated

    @user_errors
    def command(error):
        raise error

    set_output_mode(quiet=False, json_output=True)
    try:
        for error, expected in ((KeyboardInterrupt(), 130), (Terminated(15), 143)):
            with pytest.raises(typer.Exit) as stopped:
                command(error)
            document = json.loads(capsys.readouterr().out)
            assert stopped.value.exit_code == expected == document["exit_code"]
            assert document["error"].startswith("interrupted")
    finally:
        set_output_mode(quiet=False, json_output=False)


def test_only_the_first_process_of_a_launch_prints(monkeypatch, tmp_path):
    """Under torchrun every rank ran the whole command line: --json gave one document per rank."""
    for var, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("TORCHELASTIC_RUN_ID", "x")):
        monkeypatch.setenv(var, value)
    try:
        result = invoke("--json", "predict", "--run", tmp_path / "absent")
        assert result.exit_code == 2 and result.stdout == ""  # rank 0 prints the document
        assert result.output.startswith("rank 1: error: ")
        monkeypatch.setenv("RANK", "0")
        result = invoke("--json", "predict", "--run", tmp_path / "absent")
        assert json.loads(result.stdout)["exit_code"] == 2 and result.output.count("error:") == 1
    finally:
        set_output_mode(quiet=False, json_output=False)


def test_an_interruption_is_one_error_line(capsys):
    import typer

    from regina_cli.cli.common import user_errors
    from regina_cli.io import Terminated

    @user_errors
    def command():
        raise Terminated(15)

    with pytest.raises(typer.Exit):
        command()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: interrupted by signal 15: run the same command again"]


def test_slurms_warning_signal_outside_training_is_an_interruption(capsys):
    """SIGUSR1 (`#SBATCH --signal=USR1@120`) killed any command but training on the spot."""
    import typer

    from regina_cli.cli.common import user_errors

    @user_errors
    def command():
        os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 128 + signal.SIGUSR1
    assert "error: interrupted by signal 10" in capsys.readouterr().err


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), ("Terminated", 143)])
def test_an_interruption_wrapped_by_numba_is_still_an_interruption(stop, code, capsys):
    """A signal landing in scanpy's numba-compiled HVG step of `fetch` reaches us as a SystemError
    whose cause is the KeyboardInterrupt (or io.Terminated): that was a traceback and exit 1."""
    import typer

    from regina_cli.cli.common import user_errors
    from regina_cli.io import Terminated

    stop = Terminated(15) if stop == "Terminated" else stop

    @user_errors
    def command():
        try:
            raise stop
        except KeyboardInterrupt as exc:
            raise SystemError("CPUDispatcher(<function sparse_mean_var_minor_axis>) returned a result with an "
                              "exception set") from exc

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted")


class SignalledWhileCollected:
    """An object whose finalizer receives SIGTERM: the handler runs inside `__del__`, where Python
    drops the exception it raises (as in a garbage-collector callback) and goes on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):  # the handler runs at one of these bytecodes
            pass


def test_a_stop_signal_lost_in_a_finalizer_still_stops_the_command(tmp_path, capsys):
    """`regina label` killed with SIGTERM at an unlucky moment printed "Exception ignored ...
    Terminated", wrote its labels and exited 0."""
    import typer

    from regina_cli import io
    from regina_cli.cli.common import user_errors

    @user_errors
    def command():
        SignalledWhileCollected()
        io.write_text(tmp_path / "labels.csv", "cell,cell_state\n")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []  # stopped before its output appeared, temporary file removed
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: interrupted by signal 15: run the same command again"]  # no "Exception ignored"

    @user_errors
    def writes_nothing():
        SignalledWhileCollected()

    with pytest.raises(typer.Exit) as stopped:  # no output to stop at: the exit status still says it
        writes_nothing()
    assert stopped.value.exit_code == 143


def test_a_bogus_columns_value_neither_hides_errors_nor_drops_table_columns(tmp_path, monkeypatch):
    """COLUMNS=0 (set by some batch systems) printed nothing at all, the error line included;
    COLUMNS=20 dropped the model's column from evaluate's tables."""
    from io import StringIO

    from rich.table import Table

    from regina_cli.terminal import MIN_WIDTH, ReadableConsole

    done = subprocess.run([sys.executable, "-m", "regina_cli", "split", "nope", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "0"})
    assert done.returncode == 2 and done.stderr.startswith("error: dataset 'nope' not found at "), done.stderr
    for columns in ("0", "20"):
        monkeypatch.setenv("COLUMNS", columns)
        out = StringIO()
        console = ReadableConsole(file=out)
        assert console.width == MIN_WIDTH
        table = Table("metric", "regina", "no_change", "train_mean", "additive", "linear")
        table.add_row("pearson_delta_top20_de", "0.86", "0", "0.698", "0.975", "0.843")
        console.print(table)
        assert "regina" in out.getvalue() and "0.843" in out.getvalue()


def test_json_with_stdout_closed_is_no_traceback(tmp_path, monkeypatch):
    """`regina --json CMD >&-` (Python's sys.stdout is None): an AttributeError traceback, exit 1."""
    from regina_cli.cli.common import emit_error, emit_result

    done = subprocess.run(f"{sys.executable} -m regina_cli --json split nope --data-dir {tmp_path} >&-", shell=True,
                          capture_output=False, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.startswith("error:"), done.stderr
    monkeypatch.setattr(sys, "stdout", None)
    set_output_mode(quiet=False, json_output=True)
    try:
        emit_result({"split": "simulation_1"})  # a result with nowhere to go: nothing, as the tables
        emit_error("x", 2)
    finally:
        set_output_mode(quiet=False, json_output=False)


def test_result_tables_on_a_stdout_that_cannot_encode_them_are_escaped():
    """Tables moved to stdout, whose encoding errors are strict (stderr's replace): an evaluate table's
    arrows on a latin-1 stdout ended in a UnicodeEncodeError traceback."""
    code = ("from regina_cli.cli.common import set_output_mode, show; "
            "set_output_mode(quiet=False, json_output=False); show('pearson_delta \u2191')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"pearson_delta \\u2191" in done.stdout


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["predict", "--run", "no-such-run"], 2)])
def test_a_stop_signal_during_shutdown_leaves_a_successful_exit_status(argv, code, tmp_path):
    """A SIGTERM in the second a finished command spends shutting down (torch, h5py) ended it
    with 143 and no message, so a batch script recorded complete work as killed. A command that
    failed stays killable."""
    script = ("import atexit, os, signal, sys\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
              f"sys.argv = ['regina', *{argv!r}]\n"
              "from regina_cli.cli import main\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == (0 if code == 0 else -signal.SIGTERM), done.stderr
    if code:
        assert done.stderr.startswith("error: ")


def test_a_finished_phases_record_prints_with_its_null_scores(tmp_path, capsys):
    """`train-gan --resume` of a finished phase 2 prints the record meta.json keeps, where -inf
    (an epoch that may not be kept) and NaN are null: that ended in a TypeError traceback."""
    from regina_cli.cli.train_cmd import _report

    record = {"stop_reason": "max_epochs: reached 1 epochs", "epochs": 1, "best_epoch": 0,
              "best_metric": "val_pearson_delta_selectable", "best_value": 0.5, "nothing_to_resume": True,
              "last": {"epoch": 1, "val_pearson_delta_selectable": None, "val_collapse_index": None,
                       "val_pearson_delta": 0.25}}
    _report("train-gan", record, tmp_path / "gan")
    out = capsys.readouterr()
    assert "nothing to resume" in out.err
    assert "may not be kept" in out.out and "0.25" in out.out


def test_train_gan_says_which_correction_it_kept_and_on_what(tmp_path, capsys):
    from regina_cli.cli.train_cmd import _report

    record = {"stop_reason": "patience", "epochs": 3, "best_epoch": 1, "best_metric": "val_pearson_delta",
              "best_value": 0.5, "last": {},
              "correction_choice": {"correction_scale": 0.0, "configured": 0.5, "evidence": {
                  "training_held_out": {"conditions": 7, "pearson_delta": 0.31, "pearson_delta_prior_alone": 0.33}}}}
    _report("train-gan", record, tmp_path / "gan")
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table's cells, unwrapped
    assert "expression prior, decoded" in out and "0.3100 / 0.3300 (7 conditions)" in out
    record["correction_choice"] = {"correction_scale": 0.5, "configured": 0.5, "evidence": {}}
    _report("train-gan", record, tmp_path / "gan")
    assert "nothing scored" in capsys.readouterr().out
