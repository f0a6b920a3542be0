"""The CLI starts instantly and lists every command."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from regina_cli import __version__
from regina_cli.cli import app

COMMANDS = ["fetch", "split", "label", "train-ae", "train-gan", "predict", "evaluate"]


def test_help_lists_all_seven_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize("args", [["--json", "--version"], ["--version", "--json"]])
def test_version_as_json(args):
    """`regina --json --version | jq` failed on the plain text."""
    import json

    from regina_cli.cli.app import hoist_global_flags

    result = CliRunner().invoke(app, hoist_global_flags(args))
    assert result.exit_code == 0 and json.loads(result.output) == {"version": __version__}


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from regina_cli.cli import app; "
        "heavy = [m for m in ('torch', 'scanpy', 'gears', 'anndata') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
