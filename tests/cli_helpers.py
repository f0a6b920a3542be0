"""CLI test helpers shared by the test modules (imported as `cli_helpers`: tests/ is on sys.path)."""

from typer.testing import CliRunner

from regina_cli.cli import app


def invoke(*args):
    """Run `regina ARGS...` in-process and return typer's result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments, only_line: bool = True) -> str:
    """A user error: exit status 2, no traceback, an `error:` line holding every fragment.

    `only_line` also requires that nothing else was printed (commands that print progress
    before failing pass False). Returns the error line.
    """
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    if only_line:
        assert len(lines) == 1, result.output
    assert lines[-1].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[-1], result.output
    return lines[-1]
