"""noether-dyn: read a PyTorch training run as a mechanical system.

Public API: :func:`watch` (attach a :class:`Monitor` to an optimizer), :func:`load_run` (read a
run into pandas), :class:`Symmetry` and :func:`find_symmetries` (the symmetries whose Noether
charges are tracked), :func:`report`, :func:`plot_charges` and :func:`compare` (diagnostic
reports and figures from a saved run). See docs/guide.md.

Every name is imported on first use (module ``__getattr__``), so ``import noether_dyn`` and the
``noether-dyn`` command start without loading torch's compiler, pandas or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from noether_dyn.records import VERSION

__version__ = VERSION

_LAZY = {
    "Monitor": "noether_dyn.capture",
    "watch": "noether_dyn.capture",
    "MonitorFailure": "noether_dyn.capture.monitor",
    "compare": "noether_dyn.report",
    "plot_charges": "noether_dyn.report",
    "report": "noether_dyn.report",
    "Run": "noether_dyn.store",
    "StoreError": "noether_dyn.store",
    "StoreLockedError": "noether_dyn.store",
    "StoreWriteError": "noether_dyn.store",
    "StoreWarning": "noether_dyn.store",
    "detect": "noether_dyn.symmetries",
    "Detection": "noether_dyn.symmetries",
    "load_run": "noether_dyn.store",
    "Symmetry": "noether_dyn.symmetries",
    "find_symmetries": "noether_dyn.symmetries",
    "verify": "noether_dyn.symmetries",
    "find_matrix_symmetries": "noether_dyn.symmetries.matrix",
    "MatrixSymmetry": "noether_dyn.symmetries.matrix",
}

__all__ = [
    "Monitor",
    "MonitorFailure",
    "Run",
    "StoreError",
    "StoreLockedError",
    "StoreWarning",
    "StoreWriteError",
    "Detection",
    "detect",
    "Symmetry",
    "__version__",
    "compare",
    "find_symmetries",
    "find_matrix_symmetries",
    "MatrixSymmetry",
    "load_run",
    "plot_charges",
    "report",
    "verify",
    "watch",
]

if TYPE_CHECKING:
    from noether_dyn.capture import Monitor, watch
    from noether_dyn.capture.monitor import MonitorFailure
    from noether_dyn.report import compare, plot_charges, report
    from noether_dyn.store import (
        Run,
        StoreError,
        StoreLockedError,
        StoreWarning,
        StoreWriteError,
        load_run,
    )
    from noether_dyn.symmetries import Detection, Symmetry, detect, find_symmetries, verify
    from noether_dyn.symmetries.matrix import MatrixSymmetry, find_matrix_symmetries


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'noether_dyn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
