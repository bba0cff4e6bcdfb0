"""Shared code of the label-free microscopy bundle zoo, imported by every bundle as ``common``.

A generic layer (``io``, ``data``, ``transforms``, ``losses``, ``segmentation``, ``metrics/``,
``networks/``, ``handlers``, ``report``, ``synthetic/``, ...) and one package per method beside it
(``spotlight/``, ``isl/``, ``fucci/``). Method packages import the generic layer, never each
other; the generic layer never imports a method package.

``import common`` is cheap: submodules load on first use (``common.cli.as_bool`` works after a
plain ``import common``, as bundle configs write it), so a command's first line is not held up by
torch or scikit-image imports it does not need yet.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("cli", "data", "distributed", "errors", "fastpath", "fucci", "handlers", "io", "isl", "losses", "metrics",
               "networks", "outputs", "progress", "report", "segmentation", "spotlight", "synthetic", "transforms")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))

# a named error (which file, what is wrong, what to do) is repeated as the last line of any
# traceback, below MONAI's config-expression and Compose wrappers (cheap: common.errors needs only sys)
from common.errors import install_excepthook as _install_excepthook  # noqa: E402

_install_excepthook()
