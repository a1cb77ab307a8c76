"""Import CrypTen 0.4.1 on a current torch (benchmark-only extra, never a dependency of hf_secure).

CrypTen is unmaintained since 2022 and does not install or import cleanly on torch 2.13:

* ``pip install crypten`` fails: it requires the dead ``sklearn`` package, and ``torchvision``,
  which would replace the CPU torch with a CUDA build. Install it without its dependencies and add
  the ones its MPC code actually imports (see ``INSTALL``).
* ``import crypten`` fails with ``No module named 'torch.onnx._internal.registration'``: its ONNX
  converter imports that module, which torch moved to
  ``torch.onnx._internal.torchscript_exporter.registration``. ``import_crypten`` registers the old
  name as an alias of the new module before importing CrypTen. Only the ONNX converter
  (``crypten.nn.from_pytorch``) uses it; ``crypten.mpc`` does not.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

INSTALL = (
    "pip install --no-deps crypten==0.4.1\n"
    "    pip install omegaconf onnx pandas pyyaml scipy"
)

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


def _alias_onnx_registration() -> None:
    """Make ``torch.onnx._internal.registration`` importable if this torch moved it."""
    if _OLD_REGISTRATION in sys.modules or importlib.util.find_spec(_OLD_REGISTRATION) is not None:
        return
    sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)


def import_crypten() -> ModuleType:
    """Return the ``crypten`` module, importable on torch 2.13.

    Raises ImportError with the install commands when CrypTen (or one of the dependencies that its
    ``--no-deps`` install leaves out) is missing.
    """
    if importlib.util.find_spec("crypten") is None:
        raise ImportError(
            "CrypTen is not installed. It is a benchmark-only extra; install it with\n"
            f"    {INSTALL}\n"
            "(plain `pip install crypten` fails: it requires the dead `sklearn` package and "
            "torchvision, which would replace the CPU torch)."
        )
    _alias_onnx_registration()
    try:
        return importlib.import_module("crypten")
    except ModuleNotFoundError as err:
        raise ImportError(
            f"CrypTen is installed but cannot be imported ({err}). Install its dependencies with\n"
            f"    {INSTALL}"
        ) from err
