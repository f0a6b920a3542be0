"""`regina` command line: a thin layer that parses options and calls one engine function.

Command modules register themselves on `app` when imported; the import order is the order in
`regina --help`.
"""

from regina_cli.cli.app import app
from regina_cli.cli import (  # noqa: F401  (registration side effect)
    fetch_cmd,
    split_cmd,
    label_cmd,
    train_cmd,
    predict_cmd,
    evaluate_cmd,
    info_cmd,
)


def main() -> None:
    from regina_cli.io import ignore_stop_signals, skip_hdf5_shutdown

    try:
        app()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
        skip_hdf5_shutdown(code)
        if code == 0:
            ignore_stop_signals()
        raise
