"""REGINA: regularised encoder with latent cycle-GAN for perturbation response prediction.

`import regina_cli as regina` gives the notebook API (`regina_cli/api.py`, docs/api.md):
`regina.fetch`, `split`, `label`, `train_ae`, `train_gan`, `predict`, `evaluate`, `load_run`.
They are loaded on first use and import torch, scanpy and anndata only inside, so
`import regina_cli` and `regina --help` stay instant.
"""

import sys
import types

from regina_cli.errors import ReginaError
from regina_cli.private_dirs import use_private_config_dir, use_private_numba_cache

use_private_config_dir()  # before anything imports matplotlib or numba (scanpy does)
use_private_numba_cache()

__version__ = "0.1.0"

_API = ("fetch", "split", "label", "train_ae", "train_gan", "predict", "evaluate", "load_run")
__all__ = [*_API, "ReginaError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from regina_cli import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps `regina_cli.evaluate` the API function: importing the subpackage of the same name
    would otherwise replace it. Code inside the package imports submodules with `from
    regina_cli.evaluate.run import ...`, which reads sys.modules and is unaffected."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
