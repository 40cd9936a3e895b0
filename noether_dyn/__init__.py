"""noether-dyn: read a PyTorch training run as a mechanical system.

Public API: :func:`watch` (attach a :class:`Monitor` to an optimizer), :func:`load_run` (read a
run into pandas), :class:`Symmetry` and :func:`find_symmetries` (the symmetries whose Noether
charges are tracked), :func:`report`, :func:`plot_charges` and :func:`compare` (diagnostic
reports and figures from a saved run). See the README for the run-store schema.
"""

from noether_dyn.capture import Monitor, watch
from noether_dyn.capture.monitor import MonitorFailure
from noether_dyn.records import VERSION
from noether_dyn.report import compare, plot_charges, report
from noether_dyn.store import Run, StoreError, load_run
from noether_dyn.symmetries import Symmetry, find_symmetries, verify

__version__ = VERSION

__all__ = [
    "Monitor",
    "MonitorFailure",
    "Run",
    "StoreError",
    "Symmetry",
    "__version__",
    "compare",
    "find_symmetries",
    "load_run",
    "plot_charges",
    "report",
    "verify",
    "watch",
]
