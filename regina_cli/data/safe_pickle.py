"""Reading GEARS' pickles (split dicts, gene2go) without ever running code from them.

`pickle.load` executes whatever the file names; a downloaded or shared pickle is untrusted input.
The unpickler here rebuilds only plain containers, strings, numbers, sets and numpy arrays, and
refuses every other global, so a malicious file fails instead of running.
"""

from __future__ import annotations

import io
import pickle

PICKLE_START = b"\x80"  # protocol 2+ pickles open with the PROTO opcode


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"),
        ("__builtin__", "set"), ("__builtin__", "frozenset"),  # protocol 2 spells builtins so
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data pickle")


def is_pickle(raw: bytes) -> bool:
    return raw[:1] == PICKLE_START


def safe_loads(raw: bytes):
    """The object in `raw`; raises pickle.UnpicklingError (or EOFError/ValueError) on anything unsafe."""
    return _SafeUnpickler(io.BytesIO(raw)).load()
