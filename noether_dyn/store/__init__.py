"""The run store: an embedded SQLite file per run, crash-safe and readable while it is written."""

from noether_dyn.store.errors import StoreError, StoreLockedError, StoreWarning, StoreWriteError
from noether_dyn.store.reader import Run, load_run
from noether_dyn.store.schema import CHARGE_COLUMNS, SCHEMA_VERSION
from noether_dyn.store.writer import RunWriter

__all__ = [
    "CHARGE_COLUMNS",
    "SCHEMA_VERSION",
    "Run",
    "RunWriter",
    "StoreError",
    "StoreLockedError",
    "StoreWarning",
    "StoreWriteError",
    "load_run",
]
